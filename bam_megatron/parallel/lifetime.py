"""How the processes of a run end: ranks with their launcher, helpers with their rank, and no
helper of a signal meant for the run.

A run is a launcher (torchrun, or SLURM's ``slurmstepd``), its ranks, and the helpers each rank
starts: megatron-core's checkpoint writers and their multiprocessing manager, the
``resource_tracker``, data-loader workers. Schedulers signal *every* process of a job step
(``scancel --signal``, the time limit, ``#SBATCH --signal=USR1@N``) and torchrun passes SIGTERM
on to each rank's whole process group, so a helper gets the same stop signal as its rank. Only
the rank acts on it (``training/exit_conditions.py``: save after this iteration, exit 0); a
helper that died of it would take the save down with it. Hence:

- ``helper_process_init()`` — first thing in every helper: ignore the stop signals and die with
  the rank (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; a helper whose rank died before that
  call exits at once); a helper ends when its rank tells it or dies, never of a signal meant
  for the run;
- ``stop_signals_blocked()`` — around the start of a helper, so that it inherits the stop
  signals blocked and no signal can arrive before its initializer runs (a signal for the rank
  stays pending and is delivered when the block ends);
- ``die_with_launcher()`` — a rank started by torchrun dies (SIGKILL) when the torchrun agent
  dies, even of ``kill -9``: without it the ranks of a killed agent go on training. The helpers
  follow their rank; the last complete checkpoint stays intact (saves are atomic).

Everything here is a no-op where the platform lacks it (``prctl`` is Linux only).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

# The signals a run may be told to stop with: SIGTERM always, --exit-signal one of these.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux only).
    Returns whether the request was made. The parent is, precisely, the thread that started
    this process: start helpers from a thread that lives as long as the process."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def ignore_stop_signals() -> None:
    """Ignore every stop signal in this process (a helper's, never a rank's)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _orphaned() -> bool:
    """Whether the process that started this ``multiprocessing`` child is gone already (this
    process was re-parented)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent is not None and os.getppid() != parent.pid


def helper_process_init(*_args) -> None:
    """First call in a helper process: ignore the run's stop signals, die with the parent — at
    once when the parent died before the death signal was asked for (a ``multiprocessing``
    child: its parent is known). Accepts and ignores arguments so that it can serve as a
    ``worker_init_fn``."""
    ignore_stop_signals()
    if die_with_parent() and _orphaned():
        os._exit(1)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block the stop signals in the calling thread for the ``with`` body. Processes started
    inside it inherit the block (through fork and exec); signals that reach this process
    meanwhile are delivered when it ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def launched_by_torchrun() -> bool:
    """Whether torchrun's agent started this process (it sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher() -> None:
    """A rank started by torchrun: die (SIGKILL) when the agent dies; at once when it is
    already gone (this process was re-parented to init). Elsewhere a no-op."""
    if not launched_by_torchrun() or not die_with_parent():
        return
    if os.getppid() == 1:
        sys.stderr.write("[launcher] the torchrun agent that started this rank is gone: stopping\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
