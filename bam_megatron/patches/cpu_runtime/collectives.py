"""Collectives megatron-core calls as NCCL takes them, adapted to what gloo takes.

* ``torch.distributed.all_to_all_single`` split sizes given as tensors / numpy arrays -> int
  lists: gloo accepts only int sequences, and megatron's alltoall token dispatcher passes
  tensors (on a GPU it hands NCCL host arrays).
* ``torch.distributed.all_gather`` / ``reduce_scatter`` with tensor lists of uneven first
  dimensions -> padded to the largest and trimmed: gloo needs equal sizes, NCCL does not, and
  megatron's MoE dispatcher gathers uneven token counts under expert tensor parallelism.

The handlers read the split sizes and tensor lists by position, as the signatures below have them.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from bam_megatron.patches.target import Check

_SIGNATURES = {
    "torch.distributed.all_gather": ("tensor_list", "tensor"),
    "torch.distributed.reduce_scatter": ("output", "input_list"),
    "torch.distributed.all_to_all_single": ("output", "input", "output_split_sizes", "input_split_sizes"),
}


def _as_int_list(sizes):
    if sizes is None or isinstance(sizes, list):
        return sizes
    if isinstance(sizes, torch.Tensor):
        return [int(x) for x in sizes.tolist()]
    return [int(x) for x in sizes]  # numpy arrays, tuples


def _handle_all_to_all_single(mode, func, args, kwargs):
    args = list(args)
    for index, name in ((2, "output_split_sizes"), (3, "input_split_sizes")):
        if len(args) > index:
            args[index] = _as_int_list(args[index])
        elif name in kwargs:
            kwargs = {**kwargs, name: _as_int_list(kwargs[name])}
    return func(*args, **kwargs)


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _handle_all_gather(mode, func, args, kwargs):
    """Pad to the largest first dimension, gather, trim."""
    tensor_list, tensor = args[0], args[1]
    if all(t.shape == tensor.shape for t in tensor_list) or kwargs.get("async_op"):
        return func(*args, **kwargs)
    rows = max(t.shape[0] for t in tensor_list)
    buffers = [tensor.new_empty((rows, *tensor.shape[1:])) for _ in tensor_list]
    func(buffers, _padded(tensor, rows), *args[2:], **kwargs)
    for out, buf in zip(tensor_list, buffers):
        out.copy_(buf[: out.shape[0]])
    return None


def _handle_reduce_scatter(mode, func, args, kwargs):
    """The reduce-scatter twin of ``_handle_all_gather`` (uneven input chunks)."""
    output, input_list = args[0], args[1]
    if all(t.shape == output.shape for t in input_list) or kwargs.get("async_op"):
        return func(*args, **kwargs)
    rows = max(t.shape[0] for t in input_list)
    buffer = output.new_empty((rows, *output.shape[1:]))
    func(buffer, [_padded(t, rows) for t in input_list], *args[2:], **kwargs)
    output.copy_(buffer[: output.shape[0]])
    return None


def handlers() -> Dict[Callable, Callable]:
    import torch.distributed as dist

    return {
        dist.all_gather: _handle_all_gather,
        dist.reduce_scatter: _handle_reduce_scatter,
        dist.all_to_all_single: _handle_all_to_all_single,
    }


def check(c: Check) -> None:
    """The collectives take their tensors and split sizes at the positions the handlers read,
    and an ``async_op`` flag."""
    for path, leading in _SIGNATURES.items():
        c.params("torch", path, *leading, leading=True)
        c.params("torch", path, "async_op")
