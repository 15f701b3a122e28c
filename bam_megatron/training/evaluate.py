"""Validation: the mean loss over held-out sets, with routing statistics per named set.

``evaluate`` runs ``--eval-iters`` forward-only steps of one global batch on one dataset;
``run_validation`` does it for the run's validation split and every named set
(``--valid-data-path NAME:PREFIX``), prints Megatron-LM's validation lines and logs them.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch

from bam_megatron.training.metrics import print_rank_last, validation_line
from bam_megatron.training.routing import RoutingRecorder
from bam_megatron.training.step import clear_moe_tracker, forward_step, reduce_losses


def evaluate(run, data_iterator) -> Optional[float]:
    """Mean validation loss over ``--eval-iters`` steps of one global batch (None: no data)."""
    args = run.args
    for m in run.model:
        m.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(args.eval_iters):
            try:
                losses = run.forward_backward_func(
                    forward_step_func=partial(forward_step, run.device),
                    data_iterator=data_iterator,
                    model=run.model,
                    num_microbatches=run.num_microbatches,
                    seq_length=args.seq_length,
                    micro_batch_size=args.micro_batch_size,
                    forward_only=True,
                )
            except StopIteration:
                break
            loss = reduce_losses(losses)
            if loss is None:
                break
            total += loss
            count += 1
    for m in run.model:
        m.train()
    clear_moe_tracker()
    return total / count if count else None


def run_validation(run, iteration: int) -> None:
    """Evaluate every validation set; log the losses (and keep them and the routing statistics
    of named sets in ``run.summary``)."""
    datasets = run.datasets
    sets = [(None, datasets.valid)] if datasets.valid is not None else []
    sets += list(datasets.valid_sets.items())
    metrics = {}
    for name, ds in sets:
        with RoutingRecorder(run.model, run.args.num_layers) as recorder:
            loss = evaluate(run, run.data_iterator(ds, cyclic=True))
        routing = recorder.result()  # collective: every rank
        if name is not None and (routing["attention"] or routing["ffn"]):
            run.summary["routing"][name] = routing
        if loss is None:
            continue
        print_rank_last(validation_line(iteration, loss, name))
        key = f"validation/{name}" if name else "validation"
        metrics[f"{key}/lm loss"] = loss
        metrics[f"{key}/lm loss PPL"] = math.exp(min(20.0, loss))
        run.summary["valid"][name or "valid"] = loss
    run.logger.log(metrics, iteration)
