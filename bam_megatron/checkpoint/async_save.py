"""Saving in the background (``--async-save``, Megatron-LM's flag and meaning, torch_dist format).

The training loop hands the state to megatron-core's async machinery and goes on; the write,
the checksums and the publish complete later, with every step and guarantee of ``save.py``.

Hand-over (every rank, at the save's iteration; training waits for it):

1. ``save.begin``: a fresh ``iter_N.tmp``, the free space, the sharded state;
2. ``dist_checkpointing.save(..., async_sharded_save=True)``: rank 0 writes ``common.pt``, the
   ranks agree on the save plan and each prepares its write buckets (views are cloned); a
   failure here is ``save.settle``'s one line, as in a synchronous save;
3. the returned ``AsyncRequest`` is scheduled on megatron-core's ``AsyncCallsQueue``: its
   ``TemporalAsyncCaller`` copies device tensors to host memory (the request's ``preload_fn``)
   and forks one helper process per rank, which runs ``_write_in_helper``: megatron-core's
   writer (its file-writer processes, each file fsynced), then the CRC-32 of this rank's files.

What is saved is the state at the hand-over: on a GPU the host copy; on CPU the forked helper's
view of the parent's memory, which the kernel keeps as it was (copy on write) while training
changes it. Either way the save costs up to one more copy of the checkpointed state in host
memory while it runs.

Finalize (every rank together, the first time ``AsyncCallsQueue`` finds every rank's helper done:
at an iteration boundary, or when the next save, the end of the run or a stop waits for it):
megatron-core's finalize functions (the write results gathered, rank 0 writes ``.metadata`` and
``metadata.json``), then ``save.finish`` with the helpers' checksums (``checksums.json``, the
renames, the tracker). A write that failed in the background (disk full) surfaces here as the
synchronous save's one line, naming the previous, intact checkpoint; ``iter_N.tmp`` is removed.

The helper process starts with the stop signals blocked, ignores them and dies with its rank
(``parallel/lifetime.py``), like megatron-core's file writers (``patches/megatron_save_workers.py``);
a rank that dies (kill -9) takes it along and leaves ``iter_N.tmp``, which the tracker never
named and the next publish removes. megatron-core's persistent worker is not used: a *spawned*
worker receives tensors through shared memory, which on CPU would move the live parameters there
and let training change them under the write.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, List, Optional

import torch.distributed as dist

from bam_megatron.checkpoint import integrity
from bam_megatron.checkpoint import save as steps
from bam_megatron.parallel.lifetime import helper_process_init, stop_signals_blocked


def _write_in_helper(write: Callable, tmp: str, rank: int, report_fd: int, checksums: bool, *args, **kwargs) -> None:
    """The helper process: megatron-core's writer ``write(*args, **kwargs)``, then the checksums
    of this rank's files; a JSON report (a few hundred bytes: one entry per file, at most the
    strategy's thread count, far below a pipe's buffer) goes to ``report_fd``."""
    helper_process_init()
    start = time.monotonic()
    write(*args, **kwargs)
    written = time.monotonic()
    files = None
    if checksums:
        prefix = f"__{rank}_"
        files = integrity.checksum_files(tmp, [n for n in integrity.checkpoint_files(tmp) if n.startswith(prefix)])
    report = {"files": files, "write_s": written - start, "checksum_s": time.monotonic() - written}
    data = json.dumps(report).encode()
    while data:
        data = data[os.write(report_fd, data):]
    os.close(report_fd)


def _read_report(fd: int) -> Optional[dict]:
    """The helper's report (None when it ended without one)."""
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    try:
        return json.loads(b"".join(chunks)) if chunks else None
    except ValueError:
        return None


@dataclass
class BackgroundSave:
    """One save handed over and not yet published."""

    root: str
    final: str
    tmp: str
    iteration: int
    keep_last: Optional[int]
    checksums: bool
    started: float = field(default_factory=time.monotonic)
    handover_s: float = 0.0  # training paused for the hand-over
    finalize_started: Optional[float] = None
    finalize_s: float = 0.0  # training paused for the finalize
    report: Optional[dict] = None  # the helper's (this rank's)
    _report_fd: Optional[int] = None
    _megatron_finalize: List[Callable] = field(default_factory=list)

    def finalize(self) -> None:
        """Collective (called by ``AsyncCallsQueue`` on every rank once every helper is done):
        megatron-core's finalize, then checksums and publish; a failure is ``save.settle``'s."""
        self.finalize_started = time.monotonic()
        problem, bug = None, None
        try:
            for fn in self._megatron_finalize:
                fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # torch DCP's CheckpointException is a BaseException
            problem, bug = steps.failure(exc, self.tmp)
        if self._report_fd is not None:
            self.report = _read_report(self._report_fd)
            self._report_fd = None
            if self.report is None and problem is None:
                problem = f"the background writer of rank {dist.get_rank()} ended before finishing {self.tmp}"
        steps.settle(problem, bug, self.tmp, self.root)
        mine = (self.report or {}).get("files") or {}
        steps.finish(self.root, self.tmp, self.final, self.iteration, self.keep_last, self.checksums, mine)
        self.finalize_s = time.monotonic() - self.finalize_started

    def close_report(self) -> None:
        """Drop the helper's report channel (an abandoned save)."""
        if self._report_fd is not None:
            os.close(self._report_fd)
            self._report_fd = None


def _request(sharded: dict, tmp: str, root: str, strategy):
    """Step 2: megatron-core's ``AsyncRequest`` for ``sharded`` into ``tmp``."""
    from megatron.core import dist_checkpointing

    from bam_megatron.patches import megatron_save_workers

    request, problem, bug = None, None, None
    try:
        # (the run's scope of the patch, entered by init_distributed, covers the later write)
        with megatron_save_workers.saving():
            request = dist_checkpointing.save(sharded, tmp, sharded_strategy=strategy, async_sharded_save=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        problem, bug = steps.failure(exc, tmp)
    steps.settle(problem, bug, tmp, root)
    return request


def hand_over(queue, root: str, state, model, optimizer, scheduler, args_dict: dict, *,
              keep_last: Optional[int], checksums: bool, strategy) -> BackgroundSave:
    """Steps 1-3 (collective): the save of ``state`` handed to ``queue`` (an ``AsyncCallsQueue``);
    returns it, to be finalized by the queue.

    Raises:
        CheckpointError: ``--save`` cannot take the checkpoint (every rank; nothing handed over).
    """
    started = time.monotonic()
    final, tmp, sharded = steps.begin(root, state, model, optimizer, scheduler, args_dict)
    request = _request(sharded, tmp, root, strategy)
    save = BackgroundSave(root, final, tmp, state.iteration, keep_last, bool(checksums), started=started)
    save._megatron_finalize = list(request.finalize_fns)
    write_fd = None
    if request.async_fn is not None:  # this rank writes files: its helper reports on a pipe
        save._report_fd, write_fd = os.pipe()
        helper = partial(_write_in_helper, request.async_fn, tmp, dist.get_rank(), write_fd, bool(checksums))
        request = request._replace(async_fn=helper)
    else:
        save.report = {"files": {}, "write_s": 0.0, "checksum_s": 0.0}
    request = request._replace(finalize_fns=[save.finalize])
    try:
        with stop_signals_blocked():  # the helper inherits them blocked, then ignores them
            queue.schedule_async_request(request)
    finally:
        if write_fd is not None:
            os.close(write_fd)  # the helper holds the only write end: EOF when it ends
    save.handover_s = time.monotonic() - started
    return save
