"""How the tensors of a training checkpoint are spread over the ranks that write and read them
(megatron-core's torch_dist strategies, Megatron-LM's flags).

A tensor held alike by several data-parallel ranks (every dense weight and its optimizer state
without ``--use-distributed-optimizer``) is one *replicated* shard. megatron-core writes each
shard once, from the replica whose ``replica_id`` is 0:

- ``--ckpt-fully-parallel-save`` (the default; ``--no-ckpt-fully-parallel-save``): the replicated
  shards are spread over the data-parallel group (``FullyParallelSaveStrategyWrapper``: a greedy
  split by bytes, exchanged as metadata only), so each of D ranks writes about 1/D of them instead
  of data-parallel rank 0 writing them all. Still each shard once.
- ``--ckpt-fully-parallel-load`` (the default here; ``--no-ckpt-fully-parallel-load``):
  each replicated shard is read by one rank of the group and broadcast to the others
  (``FullyParallelLoadStrategyWrapper``) instead of every replica reading it from disk.
- ``--ckpt-assume-constant-structure``: the state's structure does not change during the run, so
  the save plan (the ranks' local plans, the global plan, the DCP index) and the split over the
  ranks are computed at the first saves and reused (megatron-core checks the reuse by planning
  the first two saves in full).

The group is megatron-core's data-parallel group with context parallelism, as in Megatron-LM.
With one data-parallel rank the plain strategies are used (nothing to spread).
"""

from __future__ import annotations


def _data_parallel_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _data_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size(with_context_parallel=True)


def save_strategy(fully_parallel: bool, constant_structure: bool):
    """The save strategy of a run (build it once and keep it: it holds the caches)."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    strategy = get_default_save_sharded_strategy("torch_dist")
    strategy.use_cached_ckpt_structure = constant_structure
    if fully_parallel and _data_parallel_size() > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, _data_parallel_group(), constant_structure)
    return strategy


def load_strategy(ckpt_dir: str, fully_parallel: bool):
    """The load strategy for ``ckpt_dir`` (None: megatron-core's default for the folder)."""
    if not fully_parallel or _data_parallel_size() <= 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(ckpt_dir), _data_parallel_group())
