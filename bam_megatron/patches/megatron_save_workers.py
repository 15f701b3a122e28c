"""megatron-core 0.16.x: the helper processes of a torch_dist save die with their rank, and never
of a signal meant for the run.

``dist_checkpointing.save`` (``strategies/filesystem_async.py``) starts, once per process, a
``multiprocessing`` manager in a *spawned* process (about 400 MB: it imports the program's main
module) for its results queue (starting it also starts multiprocessing's ``resource_tracker``),
and per save one *forked* writer per file bucket. As shipped, none of them watches its parent
(after kill -9 or an unhandled SIGTERM of the rank, the manager and the tracker live on forever),
and each dies of the stop signal a scheduler sends to every process of a job: the manager's
death ends the rank's save in ``BrokenPipeError`` from ``global_results_queue.put``.

``save_helpers()`` is the scope (a run's: ``patches/run.py``, entered by
``parallel/distributed.init_distributed``; entries nest) and ``saving()`` goes around each save
(``checkpoint/save.py``, ``checkpoint/weights.py``); see ``bam_megatron/parallel/lifetime.py``.
Linux only; elsewhere both only count as entered.

- entering the scope wraps the multi-process write
  (``FileSystemWriterAsync.write_preloaded_data_multiproc``) in ``stop_signals_blocked``, so
  that the forked writers inherit the block, and the writers' entry point
  (``write_preloaded_data``) so that each writer runs ``helper_process_init`` first. A stop
  signal that reaches the rank during the write is delivered to it when the write is done;
- the first ``saving()`` of the scope starts the ``resource_tracker`` and the manager with the
  stop signals blocked (they inherit the block through fork and exec), the manager's server
  first running ``helper_process_init`` (ignore the stop signals, SIGKILL when the rank dies),
  and puts the manager's queue where megatron-core looks for it
  (``filesystem_async._results_queue``);
- leaving the scope shuts the manager down and puts megatron-core's queue and writer functions
  back. The resource tracker (multiprocessing's own, one per process) sees its last writer close
  its pipe and exits by itself.

The first ``saving()`` must run in the process's main thread (the death signal follows the
thread that started the helper).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import ContextManager, Iterator

from bam_megatron.parallel.lifetime import helper_process_init, stop_signals_blocked
from bam_megatron.patches.target import MEGATRON_CORE, Check, Replacements, Shared

TARGETS = (MEGATRON_CORE,)
_FSA = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_STATE = {"manager": None}


def check() -> None:
    """Raise ``PatchTargetError`` unless megatron-core's writer still has the shape wrapped here."""
    c = Check("megatron_save_workers", *TARGETS)
    c.has("megatron-core", f"{_FSA}._results_queue")
    c.source("megatron-core", f"{_FSA}._get_write_results_queue", "_results_queue", "Manager()")
    c.source("megatron-core", f"{_FSA}.FileSystemWriterAsync.write_preloaded_data_multiproc",
             "FileSystemWriterAsync.write_preloaded_data", 'get_context("fork")')
    writer = c.get("megatron-core", f"{_FSA}.FileSystemWriterAsync")
    for name in ("write_preloaded_data", "write_preloaded_data_multiproc"):
        if not isinstance(vars(writer).get(name), staticmethod):
            c.fail("megatron-core", f"made FileSystemWriterAsync.{name} something other than a staticmethod")


def _wrap_writer(write_preloaded_data):
    @functools.wraps(write_preloaded_data)
    def write(*args, **kwargs):
        helper_process_init()
        return write_preloaded_data(*args, **kwargs)

    return write


def _wrap_multiproc(write_preloaded_data_multiproc):
    @functools.wraps(write_preloaded_data_multiproc)
    def write_all(*args, **kwargs):
        with stop_signals_blocked():
            return write_preloaded_data_multiproc(*args, **kwargs)

    return write_all


def _linux() -> bool:
    return sys.platform.startswith("linux")


def _install(r: Replacements):
    if not _linux():
        return None
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    writer = fsa.FileSystemWriterAsync
    r.set(writer, "write_preloaded_data", staticmethod(_wrap_writer(writer.write_preloaded_data)))
    r.set(writer, "write_preloaded_data_multiproc",
          staticmethod(_wrap_multiproc(writer.write_preloaded_data_multiproc)))

    def shut_down() -> None:
        manager, _STATE["manager"] = _STATE["manager"], None
        if manager is not None:
            manager.shutdown()

    return shut_down


_SHARED = Shared("megatron_save_workers", check, _install)


def save_helpers() -> ContextManager[None]:
    """The scope in which megatron-core's save helpers are deaf to stop signals (see above)."""
    return _SHARED.entered()


def _start_helpers() -> None:
    import multiprocessing as mp
    from multiprocessing import resource_tracker
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    with stop_signals_blocked():  # the tracker ignores SIGINT / SIGTERM itself ...
        resource_tracker.ensure_running()
    with stop_signals_blocked():  # ... and unblocks them here on its way: block again
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=helper_process_init)
    _STATE["manager"] = manager
    # (replacing a queue megatron-core made itself, in a save outside the scope)
    _SHARED.replacements.set(fsa, "_results_queue", manager.Queue())


@contextlib.contextmanager
def saving() -> Iterator[None]:
    """Around one ``dist_checkpointing.save``: inside the scope (the run's, or one for this
    save), with the helpers started."""
    with save_helpers():
        if _linux() and _STATE["manager"] is None:
            _start_helpers()
        yield
