"""Autograd-aware collectives along any tensor dimension.

megatron-core's mappings only gather / scatter along the first dimension. The Mixture of
Attention keeps tokens in ``[batch, seq, ...]`` layout (what fused attention kernels read), and
gathers along the batch dimension across the expert-parallel group and along the sequence
dimension across the tensor-parallel group (sequence parallelism). These four functions are the
conjugate pairs it needs; each is the identity when the group has one rank.

| function            | forward                     | backward                    |
|---------------------|-----------------------------|-----------------------------|
| ``all_gather``      | all-gather along ``dim``    | reduce-scatter along ``dim``|
| ``reduce_scatter``  | reduce-scatter along ``dim``| all-gather along ``dim``    |
| ``all_reduce``      | sum over the group          | identity                    |
| ``copy_to_group``   | identity                    | sum over the group          |
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((world * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, moved, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if x.shape[dim] % world:
        raise ValueError(
            f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over {world} ranks"
        )
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty(
        (moved.shape[0] // world, *moved.shape[1:]), dtype=x.dtype, device=x.device
    )
    dist.reduce_scatter_tensor(out, moved, group=group)
    return out.movedim(0, dim)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order); grads are reduce-scattered."""
    return x if _size(group) == 1 else _AllGather.apply(x, dim, group)


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's chunk of ``dim``; grads are all-gathered."""
    return x if _size(group) == 1 else _ReduceScatter.apply(x, dim, group)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``x`` over the group; the gradient passes through unchanged."""
    return x if _size(group) == 1 else _AllReduce.apply(x, group)


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; the gradient is summed over the group (for partial gradients)."""
    return x if _size(group) == 1 else _CopyToGroup.apply(x, group)
