"""Training logs: Megatron-LM's console lines, wandb and TensorBoard.

Only the last rank logs (it holds the loss under pipeline parallelism). wandb runs offline with
``WANDB_MODE=offline`` (no key, no network; ``wandb sync`` uploads later); a run with ``--save``
keeps its wandb run id there, so a resumed or requeued run continues the same wandb run.
"""

from __future__ import annotations

import datetime
import math
import os
import secrets
from typing import Dict, Optional

import torch.distributed as dist


def _is_logging_rank() -> bool:
    return dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(message: str) -> None:
    if _is_logging_rank():
        print(message, flush=True)


def print_rank_0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


WANDB_RUN_ID = os.path.join("wandb", "run_id")


def wandb_run_id(args) -> Optional[str]:
    """The wandb run of a training run: its id is kept in ``<save>/wandb/run_id`` (8 random hex
    digits the first time, written atomically), so that every requeue or resume of the
    same command logs to the same wandb run (``resume="allow"``). None (a new run each time)
    without ``--save`` or for an evaluation-only run."""
    if not args.save or args.skip_train:
        return None
    path = os.path.join(args.save, WANDB_RUN_ID)
    try:
        with open(path) as f:
            kept = f.read().strip()
        if kept:
            return kept
    except FileNotFoundError:
        pass
    run_id = secrets.token_hex(4)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(run_id + "\n")
    os.replace(path + ".tmp", path)
    return run_id


class MetricsLogger:
    """Console + wandb + TensorBoard sink for scalar metrics (last rank only)."""

    def __init__(self, args):
        self.active = _is_logging_rank()
        self.wandb = None
        self.tb = None
        if not self.active:
            return
        if args.wandb_project:
            import wandb

            save_dir = args.wandb_save_dir or os.path.join(args.save or ".", "wandb")
            os.makedirs(save_dir, exist_ok=True)
            run_id = wandb_run_id(args)
            self.wandb = wandb.init(
                project=args.wandb_project,
                name=args.wandb_exp_name,
                dir=save_dir,
                id=run_id,
                resume="allow" if run_id else None,
                config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
            )
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=args.tensorboard_dir)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if not self.active:
            return
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def training_line(
    *,
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    elapsed_ms: float,
    tflops_per_gpu: float,
    tokens_per_s: float,
    lr: float,
    global_batch_size: int,
    losses: Dict[str, float],
    grad_norm: Optional[float],
    skipped: int,
    nan_iters: int,
    memory: float,
    run_seconds: Optional[float] = None,
    eta_seconds: Optional[float] = None,
) -> str:
    """Megatron-LM's training log line (plus tokens/s, memory, elapsed time and ETA)."""
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        f" [{now}] iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
        f"throughput per GPU (TFLOP/s/GPU): {tflops_per_gpu:.3g}",
        f"tokens per second: {tokens_per_s:.0f}",
        f"learning rate: {lr:.6E}",
        f"global batch size: {global_batch_size:5d}",
    ]
    parts += [f"{name}: {value:.6E}" for name, value in losses.items()]
    if grad_norm is not None:
        parts.append(f"grad norm: {grad_norm:.3f}")
    parts += [
        f"number of skipped iterations: {skipped:3d}",
        f"number of nan iterations: {nan_iters:3d}",
        f"mem (GiB): {memory:.2f}",
    ]
    if run_seconds is not None:
        parts.append(f"elapsed: {duration(run_seconds)}")
    if eta_seconds is not None:
        parts.append(f"ETA: {duration(eta_seconds)}")
    return " | ".join(parts) + " |"


def duration(seconds: float) -> str:
    """``1:02:03`` (hours:minutes:seconds); days as ``2d 01:02:03``."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    text = str(datetime.timedelta(seconds=rest))
    return f"{days}d {text}" if days else text


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(20)`` as Megatron-LM does; NaN for a NaN loss (not the cap:
    ``min(20, nan)`` is 20) and inf for an infinite one."""
    if not math.isfinite(loss):
        return loss
    return math.exp(min(20.0, loss))


def validation_line(iteration: int, loss: float, name: Optional[str] = None) -> str:
    """Megatron-LM's validation line; ``name`` for a named (per-domain) validation set."""
    ppl = perplexity(loss)
    where = f"validation loss ({name})" if name else "validation loss"
    return f" {where} at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
