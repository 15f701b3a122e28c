"""megatron-core 0.16.1: the helper processes of a torch_dist save die with their rank.

``dist_checkpointing.save`` (``strategies/filesystem_async.py``) starts, once per process, a
``multiprocessing`` manager in a *spawned* process (about 400 MB: it imports the program's main
module) for its results queue, and per save one *forked* writer per file bucket. None of them
watches its parent: after kill -9 or an unhandled SIGTERM of the rank, the manager (and the
``resource_tracker`` whose pipe it holds) live on forever, one pair per killed rank.

``apply()`` (Linux; a no-op elsewhere):

- creates that results queue itself, from a manager whose server process first asks the kernel
  to kill it when its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and puts it where
  megatron-core looks for it (``filesystem_async._results_queue``);
- wraps the writers' entry point (``FileSystemWriterAsync.write_preloaded_data``) so that each
  forked writer does the same first.

The resource tracker then sees its last writer close its pipe and exits by itself.
``apply()`` must run in the process's main thread (the death signal follows the creating thread).
"""

from __future__ import annotations

import ctypes
import functools
import signal
import sys

TARGET_VERSION = "0.16.1"
_PR_SET_PDEATHSIG = 1
_applied = False


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _wrap_writer(write_preloaded_data):
    @functools.wraps(write_preloaded_data)
    def write(*args, **kwargs):
        die_with_parent()
        return write_preloaded_data(*args, **kwargs)

    write._dies_with_parent = True
    return write


def apply() -> None:
    """Install both changes (idempotent); see the module docstring."""
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    writer = fsa.FileSystemWriterAsync
    if not getattr(writer.write_preloaded_data, "_dies_with_parent", False):
        writer.write_preloaded_data = staticmethod(_wrap_writer(writer.write_preloaded_data))
    if fsa._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=die_with_parent)
        fsa._results_queue = manager.Queue()
    _applied = True
