"""megatron-core 0.16.1: the helper processes of a torch_dist save die with their rank, and never
of a signal meant for the run.

``dist_checkpointing.save`` (``strategies/filesystem_async.py``) starts, once per process, a
``multiprocessing`` manager in a *spawned* process (about 400 MB: it imports the program's main
module) for its results queue (starting it also starts multiprocessing's ``resource_tracker``),
and per save one *forked* writer per file bucket. As shipped, none of them watches its parent
(after kill -9 or an unhandled SIGTERM of the rank, the manager and the tracker live on forever),
and each dies of the stop signal a scheduler sends to every process of a job: the manager's
death ends the rank's save in ``BrokenPipeError`` from ``global_results_queue.put``.

``apply()`` (Linux; a no-op elsewhere), see ``bam_megatron/parallel/lifetime.py``:

- starts the ``resource_tracker`` and the manager with the stop signals blocked (they inherit
  the block through fork and exec), the manager's server first running ``helper_process_init``
  (ignore the stop signals, SIGKILL when the rank dies), and puts the manager's queue where
  megatron-core looks for it (``filesystem_async._results_queue``);
- wraps the multi-process write (``FileSystemWriterAsync.write_preloaded_data_multiproc``) in
  the same block, so that the forked writers inherit it, and the writers' entry point
  (``write_preloaded_data``) so that each writer runs ``helper_process_init`` first. A stop
  signal that reaches the rank during the write is delivered to it when the write is done.

The resource tracker sees its last writer close its pipe and exits by itself. ``apply()`` must
run in the process's main thread (the death signal follows the thread that started the helper).
"""

from __future__ import annotations

import functools
import sys

from bam_megatron.parallel.lifetime import helper_process_init, stop_signals_blocked

TARGET_VERSION = "0.16.1"
_applied = False


def _wrap_writer(write_preloaded_data):
    @functools.wraps(write_preloaded_data)
    def write(*args, **kwargs):
        helper_process_init()
        return write_preloaded_data(*args, **kwargs)

    write._helper_init = True
    return write


def _wrap_multiproc(write_preloaded_data_multiproc):
    @functools.wraps(write_preloaded_data_multiproc)
    def write_all(*args, **kwargs):
        with stop_signals_blocked():
            return write_preloaded_data_multiproc(*args, **kwargs)

    write_all._helper_init = True
    return write_all


def apply() -> None:
    """Install the changes (idempotent); see the module docstring."""
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return
    import multiprocessing as mp
    from multiprocessing import resource_tracker
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    writer = fsa.FileSystemWriterAsync
    if not getattr(writer.write_preloaded_data, "_helper_init", False):
        writer.write_preloaded_data = staticmethod(_wrap_writer(writer.write_preloaded_data))
    if not getattr(writer.write_preloaded_data_multiproc, "_helper_init", False):
        writer.write_preloaded_data_multiproc = staticmethod(_wrap_multiproc(writer.write_preloaded_data_multiproc))
    # (replacing a queue megatron-core made itself, in a save before apply())
    with stop_signals_blocked():  # the tracker ignores SIGINT / SIGTERM itself ...
        resource_tracker.ensure_running()
    with stop_signals_blocked():  # ... and unblocks them here on its way: block again
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=helper_process_init)
    fsa._results_queue = manager.Queue()
    _applied = True
