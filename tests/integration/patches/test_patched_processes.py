"""What the process patches of ``bam_megatron/patches`` do to real processes, entered and left as
found: the checkpoint writers' helpers (``megatron_save_workers``) are deaf to the run's stop
signals and shut down with their scope, and torchrun's agent (``torchrun_signals``) passes a stop
signal on to its rank and lives on."""

import os
import signal
import subprocess
import sys

import psutil
import pytest

from bam_megatron.parallel.lifetime import STOP_SIGNALS
from bam_megatron.patches import entered, megatron_save_workers

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the save-helper patch is Linux only")


def _signals(pid: int, field: str) -> set:
    """The signals of ``/proc/PID/status``'s ``field`` (SigBlk: blocked, SigIgn: ignored)."""
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line.split()[1] for line in f if line.startswith(field + ":")), 16)
    return {sig for sig in signal.Signals if mask & (1 << (sig - 1))}


@linux_only
def test_save_helpers_are_deaf_to_stop_signals_while_entered_and_gone_after():
    """Inside a save: the writers are wrapped, the manager ignores every stop signal (and never
    had one unblocked), the resource tracker ignores SIGINT / SIGTERM itself and keeps the others
    blocked, this process is unchanged. Leaving the scope shuts the manager down and puts
    megatron-core's writer and queue back."""
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    writer = fsa.FileSystemWriterAsync
    originals = (vars(writer)["write_preloaded_data"], vars(writer)["write_preloaded_data_multiproc"], fsa._results_queue)
    with megatron_save_workers.saving():
        assert entered() == ["megatron_save_workers"]
        assert vars(writer)["write_preloaded_data"] is not originals[0]
        assert vars(writer)["write_preloaded_data_multiproc"] is not originals[1]
        manager = fsa._results_queue._manager._process.pid
        tracker = resource_tracker._resource_tracker._pid
        stop = set(STOP_SIGNALS)
        assert stop <= _signals(manager, "SigIgn") and stop <= _signals(manager, "SigBlk")
        assert {signal.SIGINT, signal.SIGTERM} <= _signals(tracker, "SigIgn")
        assert stop - {signal.SIGINT, signal.SIGTERM} <= _signals(tracker, "SigBlk")
        assert not stop & _signals(os.getpid(), "SigBlk")
    assert (vars(writer)["write_preloaded_data"], vars(writer)["write_preloaded_data_multiproc"], fsa._results_queue) == originals
    assert not psutil.pid_exists(manager) or psutil.Process(manager).status() == psutil.STATUS_ZOMBIE
    assert entered() == []


@linux_only
def test_saves_inside_one_scope_share_one_manager():
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    original = fsa._results_queue
    with megatron_save_workers.save_helpers():
        with megatron_save_workers.saving():
            first = fsa._results_queue._manager._process.pid
        with megatron_save_workers.saving():
            assert fsa._results_queue._manager._process.pid == first
        assert psutil.pid_exists(first)  # the run's scope keeps it between saves
    assert fsa._results_queue is original
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE


_AGENT = """
import signal, subprocess, sys, time
from bam_megatron.patches import torchrun_signals
from torch.distributed.elastic.multiprocessing import api
original = api._terminate_process_handler
with torchrun_signals.passed_on():
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
restored = api._terminate_process_handler is original and all(
    signal.getsignal(s) is signal.SIG_DFL for s in torchrun_signals.PASSED_ON)
print("restored", restored, flush=True)
"""


def test_torchrun_patch_fits_the_elastic_agent_and_is_left_as_found():
    """torchrun installs ``api._terminate_process_handler`` by name when it starts the ranks; the
    patched one passes SIGUSR1 on to the agent's child (which exits 7 on it) and lets the agent
    live; with no child left it stops the agent as torchrun does. Leaving the block restores
    torchrun's handler and the signal dispositions."""
    from support import REPO_ROOT

    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _AGENT], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["rank exit 7", "agent stops", "restored True"], out.stdout + out.stderr
    assert "[launcher] received SIGUSR1: passed on to 1 rank(s)" in out.stderr
