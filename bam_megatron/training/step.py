"""One forward/backward step's pieces: the batch, the loss, and what is reduced after it.

``forward_step`` is the function megatron-core's pipeline schedules call per micro-batch;
``reduce_losses`` / ``grads_finite`` / ``moe_losses`` turn a step's per-rank results into the
values every rank agrees on (NaN handling, logs).
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from bam_megatron.parallel.device import get_device


def rng_neutral(data_iterator: Iterator) -> Iterator:
    """Yield from ``data_iterator`` without touching torch's global RNG.

    A DataLoader draws its base seed from the default generator when it starts an epoch; on
    CPU that generator also drives dropout, so a resumed run (whose loader starts after the RNG
    state is restored) would draw dropout masks other than the uninterrupted run's."""
    while True:
        state = torch.get_rng_state()
        try:
            batch = next(data_iterator)
        except StopIteration:
            return
        finally:
            torch.set_rng_state(state)
        yield batch


def batch_to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Masked mean of the per-token losses ``output [b, s]`` (``loss_mask [b, s]``)."""
    losses = output.float()
    mask = loss_mask.float()
    loss = (losses * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def check_vocabulary(batch: dict, vocab_size: int) -> None:
    """Stop (one line) on a token id the model's vocabulary cannot hold; checked on the host
    tensors of the batch, before they reach the device."""
    from bam_megatron.errors import DataConfigError

    top = int(torch.maximum(batch["tokens"].max(), batch["labels"].max()))
    if top >= vocab_size:
        where = f" (blend member {int(batch['dataset_id'][0])})" if "dataset_id" in batch else ""
        raise DataConfigError(
            f"the data holds token id {top}{where}, outside the model's vocabulary of {vocab_size}: it was "
            "tokenized with another tokenizer; re-run tools/preprocess_data.py with the model's tokenizer"
        )


def forward_step(device, data_iterator, model, vocab_size: Optional[int] = None):
    """megatron-core's ``forward_step_func``: one micro-batch ``{tokens, labels, loss_mask,
    position_ids[, attention_mask]}`` ``[b, s]`` through ``model``; returns the per-token losses
    ``[b, s]`` and the loss function to reduce them."""
    batch = next(data_iterator)
    if vocab_size is not None:
        check_vocabulary(batch, vocab_size)
    batch = batch_to_device(batch, device)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
    )
    return output, partial(loss_func, batch["loss_mask"])


def reduce_losses(losses: List[dict]) -> Optional[float]:
    """Mean 'lm loss' over micro-batches and data-parallel ranks (last pipeline stage), shared
    with every rank so all agree on NaN handling."""
    from megatron.core import parallel_state as ps

    value = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
        stacked = torch.stack([d["lm loss"].float() for d in losses])
        value[0] = stacked.sum().item() / ps.get_tensor_model_parallel_world_size()
        value[1] = len(losses) / ps.get_tensor_model_parallel_world_size()
    value = value.to(get_device())
    dist.all_reduce(value)  # every rank of the last stage holds the same per-TP loss
    return (value[0] / value[1]).item() if value[1] > 0 else None


def grads_finite(model) -> bool:
    """Whether the reduced gradients of every rank are finite (all ranks get the same answer).

    The fp32 optimizer applies whatever it gets (a NaN gradient norm turns every weight into
    NaN), so a step with a NaN/inf gradient must be skipped before ``optimizer.step()``. A sum is
    NaN/inf when any element is, without a temporary the size of the gradients."""
    device = get_device()
    sums = [
        buffer.grad_data.sum(dtype=torch.float32).to(device)
        for m in model
        for buffer in list(getattr(m, "buffers", [])) + list(getattr(m, "expert_parallel_buffers", []))
    ]
    bad = torch.zeros(1, dtype=torch.float32, device=device)
    if sums:
        bad[0] = (~torch.isfinite(torch.stack(sums))).any().float()
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def clear_moe_tracker() -> None:
    """Forget the aux losses megatron-core tracked since the last call."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()


def moe_losses(num_layers: int, num_microbatches: int) -> Dict[str, float]:
    """Mean per-layer aux losses of one step from megatron-core's tracker (then cleared).

    The tracker sums over the step's micro-batches: divided by their number (as Megatron-LM's
    ``track_moe_metrics`` does). Some losses (the z-loss) are means over this rank's tokens only,
    others are already the same on every rank: the mean over all ranks makes both the value of
    the whole global batch, whatever the TP / EP / data-parallel layout."""
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    reduce_aux_losses_tracker_across_ranks()
    out = {}
    for name, entry in tracker.items():
        values = entry["values"].float() / num_microbatches
        if dist.get_world_size() > 1:
            dist.all_reduce(values)  # every rank holds all layers after the pipeline reduce
            values /= dist.get_world_size()
        out[name] = values.sum().item() / num_layers
        for layer, v in enumerate(values.tolist(), start=1):
            out[f"moe/{name}/layer_{layer}"] = v
    clear_moe_tracker()
    return out


def routing_metrics(routing: dict) -> Dict[str, float]:
    """``RoutingRecorder.result()`` as flat log metrics: attention-router weights and FFN expert
    load (fractions) per layer and expert."""
    out = {}
    for kind, prefix in (("attention", "attn_router"), ("ffn", "ffn_load")):
        for layer, row in enumerate(routing[kind] or [], start=1):
            for e, value in enumerate(row):
                out[f"{prefix}/layer_{layer}/expert_{e}"] = value
    return out
