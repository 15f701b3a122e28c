"""Setting up megatron-core in this process (``parallel/distributed.py``): a layout that does not
divide the world is one line before any process group; the model-parallel RNG tracker is
deterministic across a tear-down and a new setup."""

import pytest
import torch
import torch.distributed as dist

from bam_megatron.parallel.distributed import destroy_distributed, get_device, init_distributed


def test_non_dividing_layout_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing may connect: the check comes first
    with pytest.raises(ValueError) as excinfo:
        init_distributed(tensor_model_parallel_size=3)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "world size 2" in message and "tensor-model-parallel-size 3" in message
    assert not dist.is_initialized()

    with pytest.raises(ValueError, match=r"world size 4 .* expert-model-parallel-size 3"):
        monkeypatch.setenv("WORLD_SIZE", "4")
        init_distributed(expert_model_parallel_size=3)
    assert not dist.is_initialized()


def test_rng_tracker_is_deterministic_and_reinit_works(distributed):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    def draw():
        device = get_device()
        before = torch.get_rng_state()
        with get_cuda_rng_tracker().fork():
            forked = torch.rand(8, device=device)
            dropped = torch.nn.functional.dropout(torch.ones(64, device=device), p=0.5)
        # the CPU (and, under CPU mode, the aliased default "CUDA") stream is restored
        assert torch.equal(before, torch.get_rng_state())
        return forked, dropped, torch.rand(8, device=device)

    distributed(seed=7)
    first = draw()
    destroy_distributed()
    assert not dist.is_initialized()

    distributed(seed=7)
    second = draw()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # the model-parallel stream is not the default stream
    assert not torch.equal(first[0], first[2])
