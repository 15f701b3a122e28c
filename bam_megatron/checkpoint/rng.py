"""The random-number state of every rank in a training checkpoint.

Each global rank saves its own generators (Python, numpy, torch, the GPU's, and megatron-core's
model-parallel RNG tracker) as one shard of the ``rng_state`` object. Expert- and data-parallel
ranks overlap, so parallel ranks cannot index the processes; the shards are restored only when
the checkpoint was saved at the same layout (same world size and parallel sizes).
"""

from __future__ import annotations

import random
from typing import Dict

import numpy as np
import torch
import torch.distributed as dist

from bam_megatron.parallel.device import accelerator_rng_state, set_accelerator_rng_state


def rng_state() -> dict:
    """This process's generator states."""
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    accelerator = accelerator_rng_state()
    if accelerator is not None:
        state["cuda"] = accelerator
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``'s result."""
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    set_accelerator_rng_state(state.get("cuda"))
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def parallel_layout() -> Dict[str, int]:
    """The current TP / PP / EP / DP sizes (recorded in every training checkpoint)."""
    from megatron.core import parallel_state

    return dict(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
    )


def rng_sharded_object():
    """Every rank's RNG as one ``ShardedObject``, one shard per global rank."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", rng_state(), (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def has_rng_shards(metadata) -> bool:
    """Whether the checkpoint (its DCP index ``metadata``) holds the RNG state one shard per
    global rank (checkpoints of earlier versions indexed it by parallel ranks)."""
    return f"rng_state/shard_0_{dist.get_world_size()}" in metadata.state_dict_metadata
