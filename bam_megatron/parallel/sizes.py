"""Whether parallel sizes tile a world size: pure arithmetic, no torch import.

Checked twice: when the arguments are finalized (``training/arguments.py``, with torchrun's or
SLURM's ``WORLD_SIZE``), so that a bad layout is one line before any import or process start-up,
and by ``parallel/distributed.init_distributed`` for the world it actually joins.
"""

from __future__ import annotations

from typing import Optional

from bam_megatron.errors import LayoutError


def validate_parallel_layout(
    world_size: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
) -> None:
    """Raise a one-line ``LayoutError`` if the parallel sizes cannot tile ``world_size``."""
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    etp = tp if expert_tensor_parallel_size is None else expert_tensor_parallel_size
    for flag, value in (
        ("tensor-model-parallel-size", tp),
        ("pipeline-model-parallel-size", pp),
        ("expert-model-parallel-size", ep),
        ("expert-tensor-parallel-size", etp),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LayoutError(f"{flag} must be a positive integer, got {value!r}")
    if world_size % (tp * pp) != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by tensor-model-parallel-size {tp} × "
            f"pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes "
            f"or change the parallel sizes"
        )
    if world_size % (etp * ep * pp) != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by expert-tensor-parallel-size {etp} × "
            f"expert-model-parallel-size {ep} × pipeline-model-parallel-size {pp}; launch a "
            f"multiple of {etp * ep * pp} processes or change the expert parallel sizes"
        )
