"""Deterministic micro-batches for each data-parallel rank, resumable from a sample count.

``PretrainingSampler`` follows Megatron-LM's ``MegatronPretrainingSampler`` order;
``build_data_loader`` / ``build_data_iterator`` wrap it in a ``DataLoader`` and give the
``data_iterator`` megatron-core's schedules take. Batches are dicts of stacked tensors as
``GPTDataset`` produces them: ``tokens``, ``labels`` ([b, s] int64), ``loss_mask`` ([b, s]
float32), ``position_ids`` ([b, s] int64), ``attention_mask`` ([b, 1, s, s] bool, True = masked;
only when created) and, for blends, ``dataset_id`` ([b]).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch

from bam_megatron.errors import DataConfigError
from bam_megatron.parallel.lifetime import helper_process_init


class PretrainingSampler:
    """Deterministic batch sampler with Megatron-LM's ``MegatronPretrainingSampler`` order.

    Global sample ``consumed_samples + k * (mbs * dp) + dp_rank * mbs + j`` goes to data-
    parallel rank ``dp_rank`` as item ``j`` of its ``k``-th micro-batch. ``consumed_samples``
    counts samples of all data-parallel ranks (Megatron-LM's ``consumed_train_samples``), so
    resuming from it continues exactly where an uninterrupted run would be. No shuffling here:
    megatron-core's datasets are already shuffled.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise DataConfigError(f"the dataset is empty (total samples {total_samples})")
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise DataConfigError(
                f"micro_batch_size and data_parallel_size must be >= 1, got "
                f"{micro_batch_size} and {data_parallel_size}"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataConfigError(
                f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})"
            )
        if not 0 <= consumed_samples < total_samples:
            raise DataConfigError(
                f"consumed samples {consumed_samples} is not below the dataset size "
                f"{total_samples}: the run is past the end of its data (build the datasets "
                "for more samples)"
            )
        step = micro_batch_size * data_parallel_size
        if drop_last and total_samples - consumed_samples < step:
            raise DataConfigError(
                f"only {total_samples - consumed_samples} samples left, fewer than one "
                f"micro-batch on every data-parallel rank ({micro_batch_size} x "
                f"{data_parallel_size})"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        step = self.micro_batch_size * self.data_parallel_size
        left = self.total_samples - self.consumed_samples
        full, rest = divmod(left, step)
        partial = 0
        if not self.drop_last and rest > self.data_parallel_rank * self.micro_batch_size:
            partial = 1
        return full + partial

    def __iter__(self) -> Iterator[List[int]]:
        mbs = self.micro_batch_size
        step = mbs * self.data_parallel_size
        offset = self.data_parallel_rank * mbs
        base = self.consumed_samples
        while base + step <= self.total_samples:
            yield list(range(base + offset, base + offset + mbs))
            base += step
        if not self.drop_last:
            start = base + offset
            stop = min(start + mbs, self.total_samples)
            if start < stop:
                yield list(range(start, stop))


def _data_parallel_defaults(rank: Optional[int], size: Optional[int]) -> Tuple[int, int]:
    if rank is not None and size is not None:
        return rank, size
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        rank = ps.get_data_parallel_rank() if rank is None else rank
        size = ps.get_data_parallel_world_size() if size is None else size
    elif torch.distributed.is_initialized():
        # no model parallelism set up: every rank is a data-parallel rank
        rank = torch.distributed.get_rank() if rank is None else rank
        size = torch.distributed.get_world_size() if size is None else size
    return (0 if rank is None else rank), (1 if size is None else size)


def build_data_loader(
    dataset: Optional[torch.utils.data.Dataset],
    *,
    micro_batch_size: int,
    consumed_samples: int = 0,
    data_parallel_rank: Optional[int] = None,
    data_parallel_size: Optional[int] = None,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> Optional[torch.utils.data.DataLoader]:
    """A DataLoader of micro-batches for this data-parallel rank (``None`` for no dataset).

    Data-parallel rank/size default to megatron-core's ``parallel_state`` when it is
    initialized, else to the torch.distributed rank/world size, else 0/1. Iterating the loader again starts again at ``consumed_samples``
    (handy for a fixed validation set). Workers (``num_workers > 0``) ignore the run's stop
    signals and die with their rank (``parallel/lifetime.py``).
    """
    if dataset is None:
        return None
    rank, size = _data_parallel_defaults(data_parallel_rank, data_parallel_size)
    sampler = PretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=rank,
        data_parallel_size=size,
        drop_last=drop_last,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=helper_process_init if num_workers > 0 else None,
    )


def build_data_iterator(
    dataset: Optional[torch.utils.data.Dataset],
    *,
    cyclic: bool = False,
    **loader_kwargs,
) -> Optional[Iterator[Dict[str, torch.Tensor]]]:
    """Iterator of micro-batch dicts, the ``data_iterator`` megatron-core's schedules take.

    ``loader_kwargs`` are :func:`build_data_loader`'s (``micro_batch_size``, ``consumed_samples``,
    data-parallel rank / size, ``num_workers``, ``pin_memory``). ``cyclic=True`` starts over from
    sample 0 after the end (same order every pass).
    """
    loader = build_data_loader(dataset, **loader_kwargs)
    if loader is None:
        return None
    if not cyclic:
        return iter(loader)

    def _cycle():
        yield from loader
        again = loader
        if loader_kwargs.get("consumed_samples"):
            again = build_data_loader(dataset, **{**loader_kwargs, "consumed_samples": 0})
        while True:
            yield from again

    return _cycle()
