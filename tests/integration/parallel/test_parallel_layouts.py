"""Same weights, other layouts: TP2, EP2, PP2 and TP2×EP2 give the loss and the full gradients of
one process; a checkpoint saved at one layout loads at another with the same loss.

Each run is a real megatron-core training step on gloo workers: ``DistributedDataParallel``,
the pipeline schedule of ``get_forward_backward_func`` and ``finalize_model_grads``. Full
gradients are compared layout-independently by writing them as a torch_dist checkpoint (each
parameter's reduced ``main_grad`` in place of its value) and reading them back as global tensors.
"""

import os

import pytest
import torch
from support.dist_harness import run_distributed

from bam_megatron.checkpoint.weights import read_global_tensors as load_plain_tensors

N_EXPERTS = 4
GLOBAL_BATCH = 4


def _configs(tp=1, pp=1, ep=1, kv_sharing=False, nexus=False):
    """The layout tests' model; ``nexus``: Nexus router (D 32, P 48) and a shared FFN expert.
    (z-loss, no load-balancing loss: megatron-core computes that one per micro-batch and data-
    parallel rank, so it differs, by design, between layouts that split the batch differently.)"""
    from support.models import moe_overrides, tiny_config

    from bam_megatron.model.config import BAMConfig

    extra = dict(moe_shared_expert_intermediate_size=64) if nexus else {}
    cfg = tiny_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        sequence_parallel=tp > 1,
        pipeline_dtype=torch.float32,
        num_query_groups=2,
        **moe_overrides(N_EXPERTS, 2, False, moe_z_loss_coeff=1e-3, **extra),
    )
    router = dict(ffn_router="nexus", nexus_domain_size=32, nexus_projection_size=48) if nexus else {}
    bam = BAMConfig(attn_experts=N_EXPERTS, kv_sharing=kv_sharing, **router)
    return cfg, bam


def train_step_worker(rank, world, layout, load_dir, grads_dir, save_dir=None, kv_sharing=False, nexus=False):
    """One training step at ``layout`` from the weights in ``load_dir``; returns the loss."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from support.models import SEQ, VOCAB, batch

    from bam_megatron.checkpoint.weights import load_model_weights, save_model_weights
    from bam_megatron.model.build import build_bam_model
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    tp, pp, ep = layout
    init_distributed(tp, pp, ep, seed=7)
    try:
        cfg, bam = _configs(tp, pp, ep, kv_sharing, nexus)
        model = build_bam_model(cfg, bam, vocab_size=VOCAB, max_sequence_length=SEQ)
        if load_dir is None:
            save_model_weights(model, save_dir)  # the reference weights
        else:
            load_model_weights(model, load_dir)
            if save_dir:
                save_model_weights(model, save_dir)
        ddp = DistributedDataParallel(
            cfg,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
            model,
        )
        cfg.no_sync_func = ddp.no_sync
        cfg.finalize_model_grads_func = finalize_model_grads

        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        tokens, position_ids, labels = batch(GLOBAL_BATCH, seed=3)
        per_rank = GLOBAL_BATCH // dp
        rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        micro = 1 if pp > 1 else per_rank  # pipelines run 1F1B over several micro-batches
        n_micro = per_rank // micro
        micro_batches = [
            (tokens[rows][i * micro : (i + 1) * micro], position_ids[rows][i * micro : (i + 1) * micro],
             labels[rows][i * micro : (i + 1) * micro])
            for i in range(n_micro)
        ]
        data = iter(micro_batches)

        def forward_step(data_iterator, model_chunk):
            t, p, l = next(data_iterator)
            out = model_chunk(t, p, None, labels=l)

            def loss_func(per_token):
                loss = per_token.float().mean()
                return loss, {"lm loss": loss.detach().clone()}  # the schedule divides loss in place

            return out, loss_func

        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data,
            model=[ddp],
            num_microbatches=n_micro,
            seq_length=SEQ,
            micro_batch_size=micro,
            forward_only=False,
        )
        loss = None
        if ps.is_pipeline_last_stage():
            loss = torch.stack([d["lm loss"] for d in losses]).mean()
            torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
            loss = (loss / dp).item()

        with torch.no_grad():
            for p in ddp.module.parameters():
                p.copy_(p.main_grad)
        save_model_weights(ddp.module, grads_dir)
        return loss
    finally:
        destroy_distributed()


def _loss(results):
    losses = [r for r in results if r is not None]
    assert losses, "no rank reported a loss"
    assert all(abs(x - losses[0]) < 1e-6 for x in losses)
    return losses[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    weights, grads = str(root / "weights"), str(root / "grads_ref")
    loss = _loss(run_distributed(train_step_worker, 1, (1, 1, 1), None, grads, save_dir=weights))
    return root, weights, loss, load_plain_tensors(grads)


def _assert_same_grads(ref, got, layout):
    assert set(ref) == set(got)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=2e-6, rtol=1e-4, msg=f"{layout}: {key}")
    # Both routers get gradient.
    assert ref["decoder.layers.self_attention.router.weight"].abs().sum() > 0
    assert ref["decoder.layers.mlp.router.weight"].abs().sum() > 0


@pytest.mark.parametrize(
    "layout",
    [(2, 1, 1), (1, 1, 2), (1, 2, 1), (2, 1, 2)],
    ids=["TP2", "EP2", "PP2", "TP2xEP2"],
)
def test_layout_matches_one_process(reference, layout):
    root, weights, ref_loss, ref_grads = reference
    tp, pp, ep = layout
    grads = str(root / f"grads_{tp}{pp}{ep}")
    save = str(root / "weights_tp2ep2") if layout == (2, 1, 2) else None
    loss = _loss(run_distributed(train_step_worker, tp * pp * ep, layout, weights, grads, save_dir=save))
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    _assert_same_grads(ref_grads, load_plain_tensors(grads), layout)


def test_checkpoint_saved_at_tp2ep2_loads_at_pp2(reference):
    root, _, ref_loss, ref_grads = reference
    saved = str(root / "weights_tp2ep2")
    if not os.path.isdir(saved):  # written by the TP2xEP2 case; make it when run alone
        run_distributed(train_step_worker, 4, (2, 1, 2), str(root / "weights"), str(root / "g"), save_dir=saved)
    grads = str(root / "grads_from_tp2ep2")
    loss = _loss(run_distributed(train_step_worker, 2, (1, 2, 1), saved, grads))
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    _assert_same_grads(ref_grads, load_plain_tensors(grads), "tp2ep2->pp2")


def test_shared_kv_tp2xep2_matches_one_process(tmp_path):
    weights, g1, g4 = (str(tmp_path / n) for n in ("w", "g1", "g4"))
    ref = _loss(run_distributed(train_step_worker, 1, (1, 1, 1), None, g1, save_dir=weights, kv_sharing=True))
    loss = _loss(run_distributed(train_step_worker, 4, (2, 1, 2), weights, g4, kv_sharing=True))
    assert loss == pytest.approx(ref, abs=1e-5)
    ref_grads, got = load_plain_tensors(g1), load_plain_tensors(g4)
    assert "decoder.layers.self_attention.linear_kv.weight" in ref_grads
    _assert_same_grads(ref_grads, got, "shared-kv TP2xEP2")
