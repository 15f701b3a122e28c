"""Is the model finite? Checked before every save, so that a diverged model never becomes the
latest checkpoint.

A diverging run (a far too large ``--lr``) first takes a huge but finite step: the weights stay
finite, yet every later forward pass may give a NaN loss, so the finite loss of that step says
nothing about the weights it produced. ``nonfinite_problem`` therefore asks two
questions of the weights as they are, the same on every rank:

- are all parameters finite (one flag per rank, all-reduced);
- is their validation loss finite: the first validation set over ``--eval-iters`` global batches
  (forward only, dropout off, the same batches at every save: what a validation of that set
  prints, without ``--full-validation``'s whole pass). Without a validation set only the
  parameters are checked.

``last_good_checkpoint`` names what a stopped run leaves to resume from: the tracker of
``--save`` (every checkpoint this check passed; a checkpoint written before the check existed is
named as it is).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from bam_megatron.parallel.device import get_device


def parameters_finite(model) -> bool:
    """Collective: whether every parameter of every rank is finite."""
    device = get_device()
    flags = [torch.isfinite(p.detach()).all().to(device) for m in model for p in m.parameters()]
    bad = torch.zeros(1, dtype=torch.float32, device=device)
    if flags:
        bad[0] = (~torch.stack(flags)).any().float()
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def probe_loss(run) -> Optional[float]:
    """Collective: the validation loss of the current weights on the first ``--eval-iters``
    global batches of the first validation set (None without one)."""
    from bam_megatron.data.sampler import build_data_iterator
    from bam_megatron.training.evaluate import evaluate, validation_plan
    from bam_megatron.training.step import rng_neutral

    datasets = run.datasets
    if datasets is None:
        return None
    sets = ([datasets.valid] if datasets.valid is not None else []) + list(datasets.valid_sets.values())
    if not sets:
        return None
    dataset, steps = validation_plan(run, sets[0])
    iterator = rng_neutral(build_data_iterator(dataset, micro_batch_size=run.args.micro_batch_size,
                                               consumed_samples=0, num_workers=0, cyclic=True))
    return evaluate(run, iterator, min(steps, run.args.eval_iters))


def nonfinite_problem(run) -> Optional[str]:
    """Collective: why the current weights must not be saved (``"its parameters are not
    finite"``, ``"its validation loss is nan"``), or None when they are finite."""
    if not parameters_finite(run.model):
        return "its parameters are not finite"
    loss = probe_loss(run)
    if loss is not None and not math.isfinite(loss):
        return f"its validation loss is {loss}"
    return None


def last_good_checkpoint(save_dir: Optional[str]) -> str:
    """The checkpoint a stopped run leaves to resume from, in words."""
    from bam_megatron.checkpoint.opener import has_checkpoint, resolve_checkpoint_dir
    from bam_megatron.errors import CheckpointError

    if not save_dir:
        return "none (no --save)"
    if not has_checkpoint(save_dir):
        return f"none in --save {save_dir} yet"
    try:
        return resolve_checkpoint_dir(save_dir)
    except CheckpointError as exc:  # named in an error message: say what is wrong instead
        return f"none usable in --save {save_dir} ({exc})"
