"""The checkpoints of one run: written at once (``save.py``) or in the background
(``async_save.py``), at most one save in flight.

    saver = Checkpointer(args.save, SaveOptions(background=args.async_save, ...))
    saver.prepare()  # the helpers' manager started before training, not in the first save
    saver.save(state, model, optimizer, scheduler, args_dict)   # returns once handed over
    saver.poll()     # every iteration: publish a save whose helpers are done
    saver.wait()     # before the next save, at the end, on a stop: the save in flight completes
    saver.abort()    # a rank-local failure: the helper is killed, iter_N.tmp left for the next run

``save``, ``poll`` and ``wait`` are collective (every rank calls them at the same point);
``abort`` is not. Every save and every wait keeps its time, printed on rank 0:

    [checkpoint] saved ckpt/iter_0000100 (1.13 GiB in 3.02 s)
    [checkpoint] saving ckpt/iter_0000100 in the background (training paused 0.21 s)
    [checkpoint] saved ckpt/iter_0000100 (1.13 GiB; in the background 3.10 s: written 2.71 s,
        checksummed 0.39 s; training paused 0.21 s to hand over, 0.04 s to publish)

(one line; ``, 1.52 s waiting for it`` when the next save or the end of the run came first).
The save strategy (``strategies.py``) is built at the first save and kept: it holds the caches of
``--ckpt-assume-constant-structure``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from bam_megatron.checkpoint import strategies
from bam_megatron.checkpoint.async_save import BackgroundSave, hand_over
from bam_megatron.checkpoint.save import directory_bytes, save_checkpoint
from bam_megatron.errors import human_bytes


@dataclass(frozen=True)
class SaveOptions:
    background: bool = False  # --async-save
    fully_parallel: bool = True  # --ckpt-fully-parallel-save
    constant_structure: bool = False  # --ckpt-assume-constant-structure
    keep_last: Optional[int] = None  # --keep-last-checkpoints
    checksums: bool = True  # not --no-checkpoint-checksums


def _log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


class Checkpointer:
    """The saves of one run into ``root`` (see the module docstring)."""

    def __init__(self, root: str, options: SaveOptions = SaveOptions()):
        self.root, self.options = root, options
        self.inflight: Optional[BackgroundSave] = None
        self._strategy = None
        self._queue = None

    def prepare(self) -> None:
        """Start megatron-core's checkpoint helpers now (the results manager: seconds, once per
        process; ``patches/megatron_save_workers.py``) rather than in the first save."""
        from bam_megatron.patches import megatron_save_workers

        with megatron_save_workers.saving():  # started now; they stay for the run's scope
            pass

    def _save_strategy(self):
        if self._strategy is None:
            self._strategy = strategies.save_strategy(self.options.fully_parallel, self.options.constant_structure)
        return self._strategy

    def save(self, state, model, optimizer, scheduler, args_dict: dict, background: Optional[bool] = None) -> str:
        """Save ``state`` (after any save in flight completed); in the background when
        ``background`` (default: the options'). Returns the checkpoint's final directory."""
        self.wait()
        o = self.options
        if not (o.background if background is None else background):
            start = time.monotonic()
            path = save_checkpoint(self.root, state, model, optimizer, scheduler, args_dict, o.keep_last,
                                   checksums=o.checksums, strategy=self._save_strategy())
            if dist.get_rank() == 0:
                _log(f"[checkpoint] saved {path} ({human_bytes(directory_bytes(path))} in "
                     f"{time.monotonic() - start:.2f} s)")
            return path
        if self._queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=False)
        self.inflight = hand_over(self._queue, self.root, state, model, optimizer, scheduler, args_dict,
                                  keep_last=o.keep_last, checksums=o.checksums, strategy=self._save_strategy())
        _log(f"[checkpoint] saving {self.inflight.final} in the background "
             f"(training paused {self.inflight.handover_s:.2f} s)")
        return self.inflight.final

    def poll(self) -> None:
        """Collective: publish the save in flight if every rank's helper is done."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Collective: the save in flight (if any) completes and is published."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        save = self.inflight
        if save is None:
            return
        start = time.monotonic()
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException:
            self.inflight = None  # a failed save is over (megatron-core dropped it too)
            raise
        if not done:
            return
        self.inflight = None
        waited = (save.finalize_started or start) - start if blocking else 0.0
        if dist.get_rank() == 0:
            _log(self._saved_line(save, waited))

    @staticmethod
    def _saved_line(save: BackgroundSave, waited: float) -> str:
        report = save.report or {}
        write_s, checksum_s = report.get("write_s", 0.0), report.get("checksum_s", 0.0)
        line = (f"[checkpoint] saved {save.final} ({human_bytes(directory_bytes(save.final))}; in the background "
                f"{write_s + checksum_s:.2f} s: written {write_s:.2f} s, checksummed {checksum_s:.2f} s; "
                f"training paused {save.handover_s:.2f} s to hand over, {save.finalize_s:.2f} s to publish")
        return line + (f", {waited:.2f} s waiting for it)" if waited >= 0.005 else ")")

    def abort(self) -> None:
        """Not collective: kill the helper of the save in flight (after a failure on this rank);
        its ``iter_N.tmp`` stays for the next run to remove, the tracker names the previous
        checkpoint."""
        save, self.inflight = self.inflight, None
        if save is None:
            return
        for call in list(self._queue.async_calls):
            call.async_caller.close(abort=True)
        self._queue.async_calls.clear()
        save.close_report()
        sys.stderr.write(f"[checkpoint] the background save of {save.final} was abandoned; the last complete "
                         f"checkpoint in {self.root} is intact\n")
        sys.stderr.flush()
