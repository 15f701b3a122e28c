"""The CPU runtime a test enters (``single_process``: ``support/cpu_runtime.py``) is left when the
test ends: later tests see torch and megatron-core as shipped, whatever ran before them."""

import threading

import pytest
import torch
from megatron.core.tensor_parallel import random as mp_random
from support.cpu_runtime import cpu_runtime_scope

from bam_megatron.patches.cpu_runtime import cpu_mode_active


def _shipped():
    return (torch.cuda.current_device, torch.cuda.Stream, mp_random._get_cuda_rng_state,
            threading.Thread._bootstrap_inner)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is for machines without a GPU")
def test_the_runtime_is_on_inside_the_scope_and_off_after_it():
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    shipped = _shipped()
    assert not cpu_mode_active()
    with cpu_runtime_scope():
        init_distributed(seed=1)
        assert cpu_mode_active() and torch.zeros(1, device="cuda").device.type == "cpu"
        assert all(now is not before for now, before in zip(_shipped(), shipped))
        destroy_distributed()
    assert not cpu_mode_active()
    assert _shipped() == shipped and not torch.overrides._get_current_function_mode_stack()
    with pytest.raises((RuntimeError, AssertionError)):  # no redirect left: CUDA is refused again
        torch.zeros(1, device="cuda")
