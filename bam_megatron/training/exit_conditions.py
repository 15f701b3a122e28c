"""When a run should save and stop before ``--train-iters``: a signal, a time budget, an interval.

Megatron-LM's flags and meaning:

- ``--exit-signal-handler``: the signal ``--exit-signal`` (SIGTERM by default; e.g. SIGUSR1 with
  ``#SBATCH --signal=USR1@300``) is recorded when it arrives; after the current iteration every
  rank learns whether any rank got it, and the run saves a checkpoint and exits with status 0.
  SIGTERM is always one of the signals acted on (a preempting scheduler or torchrun sends it),
  also when ``--exit-signal`` names another one.
- ``--exit-duration-in-mins``: the same once the run has lasted this long.
- ``--exit-interval``: the same after every iteration divisible by it.

Without ``--exit-signal-handler`` a SIGTERM still ends the run, but first says so in one line
(which checkpoint is the last complete one) instead of dying silently.

A stop signal reaches every process of a run (schedulers signal a whole job step, torchrun
passes its copy on); the helper processes ignore it (``bam_megatron/parallel/lifetime.py``), and
copies that arrive after the rank decided to stop are ignored too.

The check costs one all-reduce of one number per iteration.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from bam_megatron.parallel.device import get_device

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")


class ExitConditions:
    """Decides, identically on every rank, whether to save and stop after an iteration."""

    def __init__(self, args, start_time: Optional[float] = None):
        self.args = args
        self.start_time = time.time() if start_time is None else start_time
        self.signal_name = args.exit_signal
        self.received: Optional[int] = None
        self._previous = []
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. tests in threads)
        if args.exit_signal_handler:
            for signum in {getattr(signal, self.signal_name), signal.SIGTERM}:
                self._previous.append((signum, signal.signal(signum, self._record)))
        else:
            self._previous.append((signal.SIGTERM, signal.signal(signal.SIGTERM, self._announce_and_die)))

    def _record(self, signum, _frame) -> None:
        if self.received is None:
            sys.stderr.write(f"[exit] rank {dist.get_rank()} received {signal.Signals(signum).name}: "
                             "saving a checkpoint after this iteration, then stopping\n")
            sys.stderr.flush()
        self.received = signum

    def _announce_and_die(self, signum, _frame) -> None:
        save = self.args.save
        sys.stderr.write(
            f"[exit] received {signal.Signals(signum).name} without --exit-signal-handler: stopping now "
            f"without a checkpoint" + (f" (the last complete one is in {save})" if save else "") + "\n"
        )
        sys.stderr.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def restore(self) -> None:
        """Put back the handlers this object replaced; once a stop signal has arrived, ignore
        those signals instead: a scheduler signals every process of a job and a launcher passes
        its copy on, so more copies may arrive while the rank, its checkpoint saved, exits."""
        for signum, handler in self._previous:
            signal.signal(signum, signal.SIG_IGN if self.received is not None else handler)
        self._previous = []

    def reason(self, iteration: int) -> Optional[str]:
        """Why the run should stop after ``iteration`` (the same answer on every rank), or None."""
        args = self.args
        local = 0.0
        if self.received is not None:
            local = 1.0
        elif args.exit_duration_in_mins and (time.time() - self.start_time) / 60.0 >= args.exit_duration_in_mins:
            local = 2.0
        flag = torch.tensor([local], device=get_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 1.0:
            name = signal.Signals(self.received).name if self.received is not None else self.signal_name
            return f"received {name}"
        if flag.item() == 2.0:
            return f"ran for --exit-duration-in-mins {args.exit_duration_in_mins}"
        if args.exit_interval and iteration % args.exit_interval == 0:
            return f"reached --exit-interval {args.exit_interval}"
        return None
