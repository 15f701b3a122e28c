"""Validation: the token-weighted loss over held-out sets, the same samples every time.

Every evaluation of a run — at ``--eval-interval``, at the end, or in ``tools/evaluate_bam.py``
on a saved checkpoint — reads the same validation samples: the first ``--eval-iters`` global
batches of each set (their number does not depend on ``--train-iters``), or with
``--full-validation`` one pass over the whole set (padded to whole global batches with samples
whose loss mask is zero, so every real token counts exactly once, at any batch size or layout).
The loss is the mean over all loss-masked tokens (not a mean of per-batch means).

``run_validation`` evaluates the run's validation split and every named set
(``--valid-data-path NAME:PREFIX``), prints Megatron-LM's validation lines and logs them.
"""

from __future__ import annotations

from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist

from bam_megatron.parallel.device import get_device
from bam_megatron.training.metrics import perplexity, print_rank_last, validation_line
from bam_megatron.training.routing import RoutingRecorder
from bam_megatron.training.step import batch_to_device, check_vocabulary, clear_moe_tracker


def _token_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Per-token losses ``output [b, s]`` -> (mean, {sum of masked losses, masked tokens})."""
    mask = loss_mask.float()
    total = (output.float() * mask).sum()
    count = mask.sum()
    return total / count.clamp(min=1), {"loss sum": total.detach().clone(), "tokens": count.detach().clone()}


def _eval_step(device, vocab_size, data_iterator, model):
    batch = next(data_iterator)
    check_vocabulary(batch, vocab_size)
    batch = batch_to_device(batch, device)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(_token_loss, batch["loss_mask"])


def _reduce(losses: List[dict], totals: torch.Tensor) -> None:
    """Add one step's (loss sum, tokens) of this rank's micro-batches into ``totals``."""
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for d in losses:
            totals[0] += d["loss sum"].double().item()
            totals[1] += d["tokens"].double().item()


def evaluate(run, data_iterator, steps: int) -> Optional[float]:
    """Mean loss over every masked token of ``steps`` global batches (None: no data)."""
    args = run.args
    for m in run.model:
        m.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(steps):
            try:
                losses = run.forward_backward_func(
                    forward_step_func=partial(_eval_step, run.device, args.padded_vocab_size),
                    data_iterator=data_iterator,
                    model=run.model,
                    num_microbatches=run.num_microbatches,
                    seq_length=args.seq_length,
                    micro_batch_size=args.micro_batch_size,
                    forward_only=True,
                )
            except StopIteration:
                break
            _reduce(losses, totals)
    for m in run.model:
        m.train()
    clear_moe_tracker()
    totals = totals.to(get_device())
    dist.all_reduce(totals)  # tensor-parallel copies scale both numbers alike
    return (totals[0] / totals[1]).item() if totals[1] > 0 else None


def validation_plan(run, dataset):
    """(dataset to read, global batches to read) for one evaluation of ``dataset``."""
    from bam_megatron.data.datasets import pad_to_multiple

    gbs = run.args.global_batch_size
    if run.args.full_validation:
        padded = pad_to_multiple(dataset, gbs)
        return padded, len(padded) // gbs
    return dataset, run.args.eval_iters


def run_validation(run, iteration: int) -> None:
    """Evaluate every validation set; log the losses (and keep them and the routing statistics
    of named sets in ``run.summary``)."""
    datasets = run.datasets
    sets = [(None, datasets.valid)] if datasets.valid is not None else []
    sets += list(datasets.valid_sets.items())
    metrics = {}
    for name, ds in sets:
        dataset, steps = validation_plan(run, ds)
        with RoutingRecorder(run.model, run.args.num_layers) as recorder:
            loss = evaluate(run, run.data_iterator(dataset, cyclic=True), steps)
        routing = recorder.result()  # collective: every rank
        if name is not None and (routing["attention"] or routing["ffn"]):
            run.summary["routing"][name] = routing
        if loss is None:
            continue
        print_rank_last(validation_line(iteration, loss, name))
        key = f"validation/{name}" if name else "validation"
        metrics[f"{key}/lm loss"] = loss
        metrics[f"{key}/lm loss PPL"] = perplexity(loss)
        run.summary["valid"][name or "valid"] = loss
    run.logger.log(metrics, iteration)
