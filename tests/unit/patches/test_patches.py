"""Each runtime patch of ``bam_megatron/patches`` against the installed library.

These tests read what a patch relies on in megatron-core / torch (a name, a signature, a piece of
source). When an upstream release changes it, the test fails and names the patch to revisit,
instead of the patch silently doing something else.
"""

import inspect
import os
import signal
import sys

import megatron.core
import pytest
import torch

from bam_megatron.parallel.lifetime import STOP_SIGNALS
from bam_megatron.patches import cpu_runtime, megatron_datasets, megatron_moe, megatron_save_workers, torchrun_signals


def test_patches_name_the_megatron_core_release_they_target():
    for patch in (cpu_runtime, megatron_moe, megatron_datasets, megatron_save_workers):
        assert patch.TARGET_VERSION == "0.16.1", patch.__name__
    assert megatron.core.__version__.startswith("0.16."), (
        f"megatron-core {megatron.core.__version__}: revisit every module of bam_megatron/patches"
    )


def test_megatron_moe_router_still_tests_te_general_gemm():
    from megatron.core.transformer.moe import moe_utils

    source = inspect.getsource(moe_utils.RouterGatingLinearFunction)
    assert "te_general_gemm is not None" in source
    megatron_moe.apply_megatron_compat()
    assert hasattr(moe_utils, "te_general_gemm")  # defined (None without Transformer Engine)


def test_cpu_runtime_targets_megatron_rng_entry_points():
    from megatron.core.tensor_parallel import random as mp_random

    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        assert callable(getattr(mp_random, name)), name
    params = list(inspect.signature(mp_random._set_cuda_rng_state).parameters)
    assert params[:1] == ["new_state"]
    assert cpu_runtime._RNG_WARNING in inspect.getsource(mp_random)
    fork = inspect.getsource(mp_random.CudaRNGStatesTracker.fork)
    assert "_set_cuda_rng_state" in fork and "_get_cuda_rng_state" in fork


@pytest.mark.parametrize("name", ["current_device", "Stream", "Event", "current_stream", "default_stream",
                                  "stream", "set_stream", "synchronize", "get_rng_state", "set_rng_state",
                                  "manual_seed"])
def test_cpu_runtime_replaces_existing_torch_cuda_functions(name):
    assert hasattr(torch.cuda, name), f"torch.cuda.{name} is gone: revisit patches/cpu_runtime.py"


def test_megatron_datasets_patch_still_needed_and_fits():
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    source = inspect.getsource(BlendedDataset._build_indices)
    assert "torch.distributed.get_rank()" in source and "path_to_cache" in source
    params = list(inspect.signature(BlendedMegatronDatasetBuilder.build_generic_dataset).parameters)
    assert params[:3] == ["cls", "is_built_on_rank", "synchronize_ranks"]
    assert megatron_datasets.BlendedDataset.__name__ == BlendedDataset.__name__  # same cache hash


def test_save_workers_patch_fits_megatron_core_checkpoint_writer():
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    assert hasattr(fsa, "_results_queue") and callable(fsa._get_write_results_queue)
    assert "_results_queue" in inspect.getsource(fsa._get_write_results_queue)
    assert "Manager()" in inspect.getsource(fsa._get_write_results_queue)  # what the patch replaces
    multiproc = inspect.getsource(fsa.FileSystemWriterAsync.write_preloaded_data_multiproc)
    assert "FileSystemWriterAsync.write_preloaded_data" in multiproc and 'get_context("fork")' in multiproc
    megatron_save_workers.apply()
    assert getattr(fsa.FileSystemWriterAsync.write_preloaded_data, "_helper_init", False)
    assert getattr(fsa.FileSystemWriterAsync.write_preloaded_data_multiproc, "_helper_init", False)
    assert fsa._results_queue is not None


def _signals(pid: int, field: str) -> set:
    """The signals of ``/proc/PID/status``'s ``field`` (SigBlk: blocked, SigIgn: ignored)."""
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line.split()[1] for line in f if line.startswith(field + ":")), 16)
    return {sig for sig in signal.Signals if mask & (1 << (sig - 1))}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the save-helper patch is Linux only")
def test_save_helpers_are_deaf_to_stop_signals_and_the_rank_is_not():
    """The manager ignores every stop signal (and never had one unblocked); the resource tracker
    ignores SIGINT / SIGTERM itself and keeps the others blocked; this process is unchanged."""
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    megatron_save_workers.apply()
    manager = fsa._results_queue._manager._process.pid
    tracker = resource_tracker._resource_tracker._pid
    stop = set(STOP_SIGNALS)
    assert stop <= _signals(manager, "SigIgn") and stop <= _signals(manager, "SigBlk")
    assert {signal.SIGINT, signal.SIGTERM} <= _signals(tracker, "SigIgn")
    assert stop - {signal.SIGINT, signal.SIGTERM} <= _signals(tracker, "SigBlk")
    assert not stop & _signals(os.getpid(), "SigBlk")


_AGENT = """
import signal, subprocess, sys, time
from bam_megatron.patches import torchrun_signals
from torch.distributed.elastic.multiprocessing import api
torchrun_signals.apply()
assert all(signal.getsignal(s) is api._terminate_process_handler for s in torchrun_signals.PASSED_ON)
rank = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; "
                         "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7)); print('up', flush=True); time.sleep(60)"],
                        stdout=subprocess.PIPE, text=True)
assert rank.stdout.readline() == "up\\n"
signal.raise_signal(signal.SIGUSR1)           # passed on: the agent lives on, the rank exits 7
print("rank exit", rank.wait(timeout=30), flush=True)
try:
    signal.raise_signal(signal.SIGUSR1)       # no rank left: torchrun's own stop
except api.SignalException:
    print("agent stops", flush=True)
"""


def test_torchrun_patch_fits_the_elastic_agent():
    """torchrun installs ``api._terminate_process_handler`` by name when it starts the ranks; the
    patched one passes SIGUSR1 on to the agent's child (which exits 7 on it) and lets the agent
    live; with no child left it stops the agent as torchrun does."""
    import subprocess

    from torch.distributed.elastic.multiprocessing import api

    assert torch.__version__.startswith(torchrun_signals.TARGET_VERSION + "."), (
        f"torch {torch.__version__}: revisit bam_megatron/patches/torchrun_signals.py"
    )
    assert "_terminate_process_handler)" in inspect.getsource(api.PContext.start)
    from support import REPO_ROOT

    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _AGENT], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["rank exit 7", "agent stops"], out.stdout + out.stderr
    assert "[launcher] received SIGUSR1: passed on to 1 rank(s)" in out.stderr
