"""megatron-core runtime: process-group setup, training, TP2 parity, checkpoints, CPU mode.

Without a GPU everything runs on CPU under gloo (``bam_megatron.patches.cpu_runtime``); with GPUs the
device-agnostic tests run under NCCL and the CPU-mode ones are skipped.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from support import REPO_ROOT  # noqa: E402
from support.dist_harness import run_distributed

from bam_megatron.parallel.distributed import destroy_distributed, get_device, init_distributed
from bam_megatron.patches.cpu_runtime import cpu_mode_active

SEQ_LEN, VOCAB, MICRO_BATCH = 32, 128, 2

HAS_CUDA = torch.cuda.is_available()
needs_cpu_only = pytest.mark.skipif(HAS_CUDA, reason="exercises the CPU runtime (machine has CUDA)")
needs_two_devices = pytest.mark.skipif(
    HAS_CUDA and torch.cuda.device_count() < 2, reason="TP2 on NCCL needs two GPUs"
)
# TP2 vs 1-process losses agree to ~1e-7 on CPU; GPU kernels change reduction order more.
LOSS_RTOL = 1e-4 if HAS_CUDA else 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models are slower with intra-op threads than without on small CPU machines.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------
# model helpers (module level so spawned workers can use them)


def build_gpt(tensor_model_parallel_size: int = 1):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        tensor_model_parallel_size=tensor_model_parallel_size,
        sequence_parallel=False,
        use_cpu_initialization=True,  # full master weights from the CPU RNG, then sharded
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ_LEN,
    )
    return model.to(get_device())


def fixed_batch():
    gen = torch.Generator().manual_seed(2024)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ_LEN), generator=gen)
    device = get_device()
    return {
        "tokens": tokens.to(device),
        "labels": torch.roll(tokens, shifts=-1, dims=1).to(device),
        "position_ids": torch.arange(SEQ_LEN).unsqueeze(0).expand(MICRO_BATCH, -1).to(device),
        "loss_mask": torch.ones(MICRO_BATCH, SEQ_LEN, device=device),
    }


def eval_loss(model) -> float:
    batch = fixed_batch()
    model.eval()
    with torch.no_grad():
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    model.train()
    return float((per_token.float() * batch["loss_mask"]).sum() / batch["loss_mask"].sum())


def train(model, steps: int):
    """Wrap in megatron DDP + optimizer and run ``steps`` schedule steps; returns the losses."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp_model = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=3e-3,
            min_lr=3e-4,
            bf16=False,
            fp16=False,
            params_dtype=torch.float32,
            clip_grad=1.0,
            use_distributed_optimizer=False,
        ),
        [ddp_model],
    )
    batch = fixed_batch()

    def forward_step(data_iterator, model):
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token):
            loss = (per_token.float() * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
            return loss, {"lm loss": loss.detach()}

        return output, loss_func

    forward_backward = get_forward_backward_func()
    losses, grad_norms = [], []
    for _ in range(steps):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[ddp_model],
            num_microbatches=1,
            seq_length=SEQ_LEN,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step was skipped"
        losses.append(float(reports[0]["lm loss"]))
        grad_norms.append(float(grad_norm))
    return losses, grad_norms


# ---------------------------------------------------------------------------
# tests


def test_single_process_training_loss_decreases(distributed):
    info = distributed()
    expected = ("nccl", torch.device("cuda", 0)) if HAS_CUDA else ("gloo", torch.device("cpu"))
    assert (info.backend, info.device) == expected
    assert get_device() == info.device
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert cpu_mode_active() is not HAS_CUDA
    assert dist.get_backend() == info.backend

    model = build_gpt()
    assert all(p.device == info.device for p in model.parameters())
    losses, grad_norms = train(model, steps=6)

    assert all(torch.isfinite(torch.tensor(grad_norms)))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.3, losses


def _tp2_worker(rank, world_size, checkpoint_dir):
    from megatron.core import dist_checkpointing, parallel_state

    info = init_distributed(tensor_model_parallel_size=2)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    assert parallel_state.get_data_parallel_world_size() == 1

    model = build_gpt(tensor_model_parallel_size=2)
    seeded_loss = eval_loss(model)

    state = dist_checkpointing.load(model.sharded_state_dict(), checkpoint_dir)
    model.load_state_dict(state)
    loaded_loss = eval_loss(model)

    # one training step at TP2 must also work (TP all-reduces in forward and backward)
    losses, _ = train(model, steps=1)
    destroy_distributed()
    return {
        "backend": info.backend,
        "seeded": seeded_loss,
        "loaded": loaded_loss,
        "trained": losses[0],
    }


@needs_two_devices
def test_tp2_matches_single_process_and_loads_checkpoint(distributed, tmp_path):
    from megatron.core import dist_checkpointing

    distributed()
    model = build_gpt()
    seeded_loss = eval_loss(model)
    train(model, steps=2)
    trained_loss = eval_loss(model)
    checkpoint_dir = tmp_path / "ckpt"
    checkpoint_dir.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(checkpoint_dir))
    destroy_distributed()
    assert abs(trained_loss - seeded_loss) > 1e-2  # the checkpoint differs from the seeded init

    results = run_distributed(_tp2_worker, 2, str(checkpoint_dir), timeout_s=150)

    for rank, result in enumerate(results):
        assert result["backend"] == ("nccl" if HAS_CUDA else "gloo")
        # use_cpu_initialization draws full weights from the same seed: layout-independent init
        assert result["seeded"] == pytest.approx(seeded_loss, rel=LOSS_RTOL), rank
        # weights trained at 1 process, saved, and loaded into a TP2 layout
        assert result["loaded"] == pytest.approx(trained_loss, rel=LOSS_RTOL), rank
        assert result["trained"] == pytest.approx(trained_loss, rel=LOSS_RTOL), rank


_FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, threading
    import torch
    import megatron.core.tensor_parallel.random as mp_random
    import bam_megatron, bam_megatron.parallel.distributed
    from bam_megatron.patches import cpu_runtime as cpu_mode

    report = {}
    originals = (torch.cuda.current_device, torch.cuda.Stream, mp_random._get_cuda_rng_state)

    def untouched():
        return (
            torch.cuda.current_device.__module__ == "torch.cuda"
            and torch.cuda.Stream.__module__.startswith("torch.cuda")
            and mp_random._get_cuda_rng_state.__module__ == mp_random.__name__
            and not torch.overrides._get_current_function_mode_stack()
        )

    def cuda_tensor():
        try:
            torch.zeros(1, device="cuda")
            return "created"
        except (RuntimeError, AssertionError):
            return "refused"

    report["active_before"] = cpu_mode.cpu_mode_active()
    report["untouched_before"] = untouched()
    report["cuda_tensor_before"] = cuda_tensor()

    with cpu_mode.cpu_runtime(), cpu_mode.cpu_runtime():  # entries nest
        report["active_after"] = cpu_mode.cpu_mode_active()
        report["patched_after"] = all(
            now is not old
            for now, old in zip(
                (torch.cuda.current_device, torch.cuda.Stream, mp_random._get_cuda_rng_state),
                originals,
            )
        )
        report["current_device"] = torch.cuda.current_device()
        report["devices"] = [
            torch.zeros(1, device="cuda").device.type,
            torch.ones(1).cuda().device.type,
            torch.ones(1).to(torch.cuda.current_device()).device.type,
            torch.empty(1, pin_memory=True).device.type,
        ]

        seen = []
        worker = threading.Thread(target=lambda: seen.append(torch.zeros(1, device="cuda").device.type))
        worker.start(); worker.join()
        report["thread_device"] = seen

        class MakesCudaTensorInBackward(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x * 2

            @staticmethod
            def backward(ctx, grad):
                return grad * torch.full_like(grad, 2.0).to("cuda")

        x = torch.ones(3, requires_grad=True)
        MakesCudaTensorInBackward.apply(x).sum().backward()
        report["backward_grad"] = x.grad.tolist()

    report["active_left"] = cpu_mode.cpu_mode_active()
    report["untouched_left"] = untouched() and all(
        now is old
        for now, old in zip((torch.cuda.current_device, torch.cuda.Stream, mp_random._get_cuda_rng_state), originals)
    )
    report["cuda_tensor_left"] = cuda_tensor()

    torch.cuda.is_available = lambda: True  # pretend a GPU appeared: must refuse
    try:
        with cpu_mode.cpu_runtime():
            pass
        report["refuses_with_cuda"] = False
    except RuntimeError:
        report["refuses_with_cuda"] = True
    print("REPORT=" + json.dumps(report))
    """
)


@needs_cpu_only
def test_cpu_mode_inactive_until_entered_in_fresh_process_and_after_it_is_left():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_SCRIPT],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT=")][-1]
    report = json.loads(line[len("REPORT="):])

    assert report["active_before"] is False
    assert report["untouched_before"] is True
    assert report["cuda_tensor_before"] == "refused"
    assert report["active_after"] is True
    assert report["patched_after"] is True
    assert report["current_device"] == 0
    assert report["devices"] == ["cpu"] * 4
    assert report["thread_device"] == ["cpu"]
    assert report["backward_grad"] == [2.0, 2.0, 2.0]
    assert report["active_left"] is False
    assert report["untouched_left"] is True
    assert report["cuda_tensor_left"] == "refused"
    assert report["refuses_with_cuda"] is True


def _rank_1_raises(rank, world_size):
    if rank == 1:
        raise ValueError(f"boom from rank {rank} of {world_size}")
    return rank


def _rank_1_hangs(rank, world_size):
    if rank == 1:
        import time

        time.sleep(300)
    return rank


def test_harness_propagates_worker_errors_and_timeouts():
    from support.dist_harness import WorkerFailed

    with pytest.raises(WorkerFailed, match=r"(?s)rank 1 raised.*ValueError: boom from rank 1 of 2"):
        run_distributed(_rank_1_raises, 2, timeout_s=60)
    # The timeout names the ranks without a result. Rank 0 finishes as soon as it has started,
    # which a loaded machine may not manage within a short timeout: then the timeout doubles,
    # up to a deadline, until rank 1 is the only rank named.
    timeout = 6
    while True:
        with pytest.raises(TimeoutError, match=r"ranks \[(0, )?1\] did not finish") as raised:
            run_distributed(_rank_1_hangs, 2, timeout_s=timeout)
        if "ranks [1] " in str(raised.value) or timeout >= 96:
            break
        timeout *= 2
    assert "ranks [1] did not finish" in str(raised.value), str(raised.value)
