"""Work spread over data-parallel ranks, with every rank's forward calls lined up.

Each data-parallel rank serves its own share of the prompts (or scoring requests); the ranks of
one tensor- / pipeline-parallel group serve the same share. Ranks still talk to each other
inside every forward: the Mixture of Attention gathers the expert-parallel group's tokens along
the batch, and the FFN experts exchange tokens across the expert-parallel group. So all ranks
must make the same number of forward calls with the same ``[b, s]``: they agree on batch counts
and lengths with one all-reduce (``agree_max`` / ``agree_min``) and pad with dummy rows.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, TypeVar

import torch
import torch.distributed as dist

from bam_megatron.parallel.device import get_device

T = TypeVar("T")


def data_parallel_share(items: Sequence[T]) -> List[int]:
    """Indices of ``items`` this rank's data-parallel group serves (round robin)."""
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    rank = ps.get_data_parallel_rank()
    return list(range(rank, len(items), dp))


def _all_reduce(values: List[int], op) -> List[int]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=get_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def agree_max(values: List[int]) -> List[int]:
    """Element-wise maximum of ``values`` over all ranks (same length everywhere)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def agree_min(values: List[int]) -> List[int]:
    """Element-wise minimum of ``values`` over all ranks (same length everywhere)."""
    return _all_reduce(values, dist.ReduceOp.MIN)


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank."""
    return bool(agree_min([int(flag)])[0])


def gather_by_index(local: Dict[int, T]) -> Dict[int, T]:
    """Merge every rank's ``{index: result}`` (each index from any rank that has it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(local)
    parts: List[Dict[int, T]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(parts, local)
    merged: Dict[int, T] = {}
    for part in parts:
        merged.update(part)
    return merged
