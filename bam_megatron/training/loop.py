"""The training loop: train step → skip bad steps → log → evaluate / save, until done.

megatron-core has no training loop; this one drives its pieces the way Megatron-LM does: the
pipeline schedules of ``get_forward_backward_func`` (no pipelining or 1F1B), the optimizer
(skipped steps on overflow), ``OptimizerParamScheduler`` (stepped in samples), torch_dist
checkpoints (``checkpoint/train_state.py``) and the logs of ``metrics.py``.

Checkpoints (``checkpoint/checkpointer.py``): periodic saves are written at once, or with
``--async-save`` handed over to a background helper and published at a later iteration boundary;
the next save, the end of the run, a stop and a stop for non-finite values wait for a save in
flight first. A failure on one rank abandons it (``iter_N.tmp`` stays, the tracker names the
previous checkpoint).

Non-finite values: a step with a NaN/inf loss or gradient is skipped, up to
``--max-skipped-nan-iters`` times (with ``--check-for-nan-in-loss-and-grad``: none), then the run
stops without saving; a model that is not finite is never saved (``finite.py``). Each stop names
the last good checkpoint.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Optional

import torch.distributed as dist

from bam_megatron.errors import TrainingError
from bam_megatron.parallel.device import peak_memory_gib, synchronize
from bam_megatron.training.evaluate import run_validation
from bam_megatron.training.finite import last_good_checkpoint, nonfinite_problem
from bam_megatron.training.metrics import print_rank_0, print_rank_last, training_line
from bam_megatron.training.routing import RoutingRecorder
from bam_megatron.training.step import (
    clear_moe_tracker,
    forward_step,
    grads_finite,
    moe_losses,
    reduce_losses,
    routing_metrics,
)


def _everywhere(exc: TrainingError) -> TrainingError:
    """``exc``, marked as found alike by every rank (a decision all ranks reduced together)."""
    exc.same_on_every_rank = True
    return exc


def _checkpointer(args):
    """The run's ``Checkpointer`` (None without ``--save``)."""
    from bam_megatron.checkpoint.checkpointer import Checkpointer, SaveOptions

    if not args.save:
        return None
    return Checkpointer(args.save, SaveOptions(
        background=args.async_save, fully_parallel=args.ckpt_fully_parallel_save,
        constant_structure=args.ckpt_assume_constant_structure, keep_last=args.keep_last_checkpoints,
        checksums=args.checkpoint_checksums,
    ))


def args_dict(args) -> dict:
    """The plain-valued arguments, as recorded in every checkpoint."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


class _Window:
    """Steps and time since the last log line (evaluation and checkpoint time left out)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.iters = time.perf_counter(), 0

    def seconds_per_iter(self) -> float:
        return (time.perf_counter() - self.start) / max(self.iters, 1)


class Trainer:
    """Runs ``run`` (see ``setup.Run``) from its current state to ``--train-iters``."""

    def __init__(self, run, train_iter):
        self.run, self.args, self.train_iter = run, run.args, train_iter
        self.state = run.state
        # Routing statistics of the training steps since the last log line (not of evaluations).
        self.recorder = RoutingRecorder(run.model, run.args.num_layers)
        self.window = _Window()
        self.nan_iters = 0
        self.last_saved: Optional[int] = None
        self.saver = _checkpointer(run.args)
        self.saved_args = {**args_dict(run.args), **run.recorded_tokenizer}
        self.start_time, self.start_iteration = time.perf_counter(), run.state.iteration

    # -------------------------------------------------------------------------------- steps

    def train_step(self) -> Optional[float]:
        """One forward/backward over a global batch; returns the loss (None: no loss)."""
        run, args = self.run, self.args
        for m in run.model:
            m.zero_grad_buffer()
        run.optimizer.zero_grad()
        with self.recorder:
            losses = run.forward_backward_func(
                forward_step_func=partial(forward_step, run.device, vocab_size=args.padded_vocab_size),
                data_iterator=self.train_iter,
                model=run.model,
                num_microbatches=run.num_microbatches,
                seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size,
                forward_only=False,
            )
        self.state.consumed_train_samples += args.global_batch_size
        self.state.iteration += 1
        return reduce_losses(losses)

    def skip_bad_step(self, loss: Optional[float]) -> bool:
        """Skip (and count) a step with a NaN/inf loss or gradient; True when skipped.

        Raises:
            TrainingError: more than ``--max-skipped-nan-iters`` such steps.
        """
        bad_loss = loss is None or not math.isfinite(loss)
        if not bad_loss and grads_finite(self.run.model):
            return False
        self.nan_iters += 1
        self.state.skipped_iterations += 1
        what = f"loss is {loss}" if bad_loss else "gradient is not finite"
        stopping = self.args.check_for_nan_in_loss_and_grad or self.nan_iters > self.args.max_skipped_nan_iters
        if stopping and self.saver is not None:
            self.saver.wait()  # the save in flight is the last good checkpoint the message names
        if self.args.check_for_nan_in_loss_and_grad:
            raise _everywhere(TrainingError(
                f"iteration {self.state.iteration}: {what} (--check-for-nan-in-loss-and-grad); stopping "
                f"without saving; the last good checkpoint is {last_good_checkpoint(self.args.save)}. "
                "Lower --lr or check the data"
            ))
        limit = self.args.max_skipped_nan_iters
        print_rank_last(f"[train] iteration {self.state.iteration}: {what}; step skipped "
                        f"({self.nan_iters}/{limit} allowed)")
        if self.nan_iters > limit:
            raise _everywhere(TrainingError(
                f"{self.nan_iters} steps with a NaN/inf loss or gradient (more than "
                f"--max-skipped-nan-iters {limit}); stopping without saving; the last good checkpoint is "
                f"{last_good_checkpoint(self.args.save)}. Lower --lr or check the data"
            ))
        clear_moe_tracker()  # the skipped step's aux losses must not reach the next log
        return True

    def optimizer_step(self):
        """Apply the step; returns the gradient norm."""
        ok, grad_norm, _ = self.run.optimizer.step()
        if ok:
            self.run.scheduler.step(increment=self.args.global_batch_size)
        else:
            self.state.skipped_iterations += 1
        return grad_norm

    # -------------------------------------------------------------------------------- logs

    def log(self, loss: float, grad_norm) -> None:
        """Megatron-LM's training line and the metrics (aux losses, routing) to wandb / TB."""
        run, args, state = self.run, self.args, self.state
        synchronize(run.device)
        elapsed = self.window.seconds_per_iter()
        tokens_per_s = args.global_batch_size * args.seq_length / elapsed
        metrics = {"lm loss": loss}
        metrics.update(moe_losses(args.num_layers, run.num_microbatches))
        lr = run.optimizer.param_groups[0]["lr"]
        print_rank_last(training_line(
            iteration=state.iteration, train_iters=args.train_iters,
            consumed_samples=state.consumed_train_samples, elapsed_ms=elapsed * 1e3,
            tflops_per_gpu=run.flops_per_token * tokens_per_s / dist.get_world_size() / 1e12,
            tokens_per_s=tokens_per_s, lr=lr, global_batch_size=args.global_batch_size,
            losses={k: v for k, v in metrics.items() if "/" not in k}, grad_norm=grad_norm,
            skipped=state.skipped_iterations, nan_iters=self.nan_iters, memory=peak_memory_gib(run.device),
            run_seconds=time.perf_counter() - self.start_time, eta_seconds=self.eta(),
        ))
        metrics.update(routing_metrics(self.recorder.result()))  # collective: every rank logs here
        self.recorder = RoutingRecorder(run.model, args.num_layers)
        metrics.update({
            "learning-rate": lr, "grad-norm": grad_norm if grad_norm is not None else float("nan"),
            "throughput/tokens_per_s": tokens_per_s, "iteration-time-ms": elapsed * 1e3,
            "consumed-samples": state.consumed_train_samples,
        })
        run.logger.log(metrics, state.iteration)
        self.window.reset()

    def eta(self) -> Optional[float]:
        """Seconds to ``--train-iters`` at this run's average pace so far."""
        done = self.state.iteration - self.start_iteration
        if done <= 0:
            return None
        per_iter = (time.perf_counter() - self.start_time) / done
        return per_iter * (self.args.train_iters - self.state.iteration)

    # -------------------------------------------------------------------------------- save

    def save(self, background: bool = False) -> None:
        """A checkpoint of the current iteration (once per iteration) — of a finite model only
        (``finite.py``): a diverged one stops the run, naming the last good checkpoint. A save
        still in flight completes first; ``background``: this one is handed over
        (``--async-save``, ``checkpoint/async_save.py``) and the loop goes on."""
        run, args = self.run, self.args
        if not args.save or self.last_saved == self.state.iteration:
            return
        self.saver.wait()
        problem = nonfinite_problem(run)
        if problem:
            raise _everywhere(TrainingError(
                f"the model at iteration {self.state.iteration} is not finite ({problem}): not saved, "
                f"stopping; the last good checkpoint is {last_good_checkpoint(args.save)}. Lower --lr "
                "or check the data"
            ))
        self.saver.save(self.state, run.model, run.optimizer, run.scheduler, self.saved_args, background=background)
        self.last_saved = self.state.iteration

    def complete_saves(self) -> None:
        """Collective: the save in flight, if any, completes (the end of the run, a stop)."""
        if self.saver is not None:
            self.saver.wait()

    def evaluate_and_save(self) -> None:
        """A background save whose helpers are done is published; validation and checkpoints at
        their intervals (their time is kept out of the step time)."""
        args, it = self.args, self.state.iteration
        if self.saver is not None:
            self.saver.poll()
        paused = False
        if args.eval_interval and it % args.eval_interval == 0 and it < args.train_iters:
            run_validation(self.run, it)
            paused = True
        if args.save_interval and it % args.save_interval == 0:
            self.save(background=args.async_save)
            paused = True
        if paused:
            self.window.reset()

    # -------------------------------------------------------------------------------- loop

    def stop_early(self, exits) -> bool:
        """Save and stop when an exit condition holds after this iteration (every rank agrees)."""
        reason = exits.reason(self.state.iteration)
        if reason is None:
            return False
        self.save()
        self.complete_saves()
        where = f"checkpoint {self.args.save} at iteration {self.state.iteration}" if self.args.save else "no --save: nothing saved"
        print_rank_0(f"[exit] {reason}: stopping after iteration {self.state.iteration} ({where}); "
                     "the same command resumes")
        self.run.summary["exit_reason"] = reason
        return True

    def train(self) -> None:
        """Train until ``--train-iters`` (or an exit condition), then save."""
        from bam_megatron.training.exit_conditions import ExitConditions

        args = self.args
        for m in self.run.model:
            m.train()
        if self.saver is not None:
            self.saver.prepare()
        exits = ExitConditions(args)
        try:
            while self.state.iteration < args.train_iters:
                loss = self.train_step()
                if self.skip_bad_step(loss):
                    continue
                grad_norm = self.optimizer_step()
                self.run.summary["train_losses"].append(loss)
                self.window.iters += 1
                if self.state.iteration % args.log_interval == 0 or self.state.iteration == args.train_iters:
                    self.log(loss, grad_norm)
                else:
                    clear_moe_tracker()
                self.evaluate_and_save()
                if self.stop_early(exits):
                    return
            self.save()
            self.complete_saves()
        except BaseException:
            if self.saver is not None:
                self.saver.abort()  # this rank's failure: no collective wait (iter_N.tmp stays)
            raise
        finally:
            exits.restore()
