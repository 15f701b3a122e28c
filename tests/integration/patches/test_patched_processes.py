"""What the process patches of ``bam_megatron/patches`` do to real processes: the checkpoint
writers' helpers (``megatron_save_workers``) are deaf to the run's stop signals, and torchrun's
agent (``torchrun_signals``) passes a stop signal on to its rank and lives on."""

import inspect
import os
import signal
import sys

import pytest
import torch

from bam_megatron.parallel.lifetime import STOP_SIGNALS
from bam_megatron.patches import megatron_save_workers, torchrun_signals


def test_save_workers_patch_installs_its_writers_and_queue():
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

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
