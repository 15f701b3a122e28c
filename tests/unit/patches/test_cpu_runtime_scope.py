"""The CPU runtime is entered and left: inside, megatron-core's CUDA assumptions are answered by
the CPU; after, torch, megatron-core and CPython are as they were, on every thread."""

import logging
import threading

import pytest
import torch

from bam_megatron.patches import entered
from bam_megatron.patches.cpu_runtime import cpu_mode_active, cpu_runtime, cuda_api, megatron_rng

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is for machines without CUDA")


def _refused(make) -> bool:
    try:
        make()
    except (RuntimeError, AssertionError):  # "Torch not compiled with CUDA enabled" / no device
        return True
    return False


def _snapshot():
    from megatron.core.tensor_parallel import random as mp_random

    return {
        "torch.cuda": {name: vars(torch.cuda).get(name) for name in cuda_api.REPLACEMENTS},
        "rng": (vars(mp_random)["_get_cuda_rng_state"], vars(mp_random)["_set_cuda_rng_state"]),
        "thread": vars(threading.Thread)["_bootstrap_inner"],
        "filters": list(logging.getLogger(megatron_rng.MODULE).filters),
        "modes": len(torch.overrides._get_current_function_mode_stack()),
    }


def test_entered_and_left_as_found():
    before = _snapshot()
    assert _refused(lambda: torch.zeros(1, device="cuda"))
    with cpu_runtime():
        assert cpu_mode_active() and entered() == ["cpu_runtime"]
        assert _snapshot() != before
        assert torch.cuda.current_device() == 0
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        assert torch.ones(1).cuda().device.type == "cpu"
        with torch.cuda.stream(torch.cuda.Stream()):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            end.record()
        assert end.elapsed_time(start) <= 0.0 <= start.elapsed_time(end)
    assert _snapshot() == before
    assert not cpu_mode_active() and entered() == []
    assert _refused(lambda: torch.zeros(1, device="cuda"))


def test_entries_nest_and_the_outermost_exit_restores():
    before = _snapshot()
    with cpu_runtime():
        with cpu_runtime():
            assert torch.zeros(1, device="cuda").device.type == "cpu"
        assert cpu_mode_active()
        assert torch.zeros(1, device="cuda").device.type == "cpu"
    assert _snapshot() == before and not cpu_mode_active()


def test_a_thread_started_inside_is_mapped_and_unpatched_once_the_runtime_is_left():
    inside, go, seen = threading.Event(), threading.Event(), {}

    def work():
        seen["inside"] = torch.zeros(1, device="cuda").device.type
        inside.set()
        go.wait(timeout=60)
        seen["after"] = "refused" if _refused(lambda: torch.zeros(1, device="cuda")) else "mapped"

    with cpu_runtime():
        worker = threading.Thread(target=work)
        worker.start()
        assert inside.wait(timeout=60)
    go.set()
    worker.join(timeout=60)
    assert seen == {"inside": "cpu", "after": "refused"}


def test_only_megatron_cores_type_checks_see_a_cuda_type():
    """The mixed-precision optimizers and grad clipping accept only CUDA parameters: clipping a CPU
    gradient works inside the runtime; any other caller (torch, ours, the rest of megatron-core)
    gets the true type."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    other_megatron_code = {"__name__": "megatron.core.transformer.module"}
    exec("def type_name(t):\n    return t.type()\n", other_megatron_code)
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.ones(4)
    with cpu_runtime():
        clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=10.0)
        assert param.type() == "torch.FloatTensor"
        assert other_megatron_code["type_name"](param) == "torch.FloatTensor"
    assert torch.allclose(param.grad, torch.full((4,), 1.0 / (10.0 + 1e-6)))
    with pytest.raises(AssertionError):
        clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=10.0)


def test_megatron_core_rng_tracker_forks_the_cpu_generator_inside_only():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with cpu_runtime():
        tracker = get_cuda_rng_tracker()
        tracker.reset()
        tracker.add("stream", 7)
        before = torch.get_rng_state()
        with tracker.fork("stream"):
            forked = torch.rand(4)
        assert torch.equal(before, torch.get_rng_state())  # the default stream is restored
        with tracker.fork("stream"):
            assert not torch.equal(forked, torch.rand(4))  # the forked stream moved on
        tracker.reset()
    with pytest.raises(Exception):
        get_cuda_rng_tracker().add("stream", 7)  # megatron-core's own code needs CUDA again
    get_cuda_rng_tracker().reset()


def test_refuses_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="only for machines without CUDA"):
        with cpu_runtime():
            pass
    assert not cpu_mode_active()
