"""Model weights in megatron-core's torch_dist format, at any parallel layout.

- ``save_model_weights(model, dir)``: every rank calls it; each shard is written once.
- ``load_model_weights(model, ckpt)``: loads a checkpoint saved at any TP/PP/EP layout (an opened
  ``Checkpoint``, or a path opened with ``checkpoint.opener``; Megatron-LM's Transformer Engine
  names of the fused norms are mapped).
- ``save_global_tensors(tensors, dir)``: writes full (unsharded) tensors from one process as a
  checkpoint the models above can load at any layout (used to write upcycled models).

Local (non-Transformer-Engine) linear layers carry an empty ``_extra_state`` entry; a checkpoint
without those entries (e.g. one written by ``save_global_tensors``) still loads, but any missing
*tensor* is an error naming it.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Dict, Union

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.validation import StrictHandling

from bam_megatron.checkpoint.keys import canonical_key
from bam_megatron.errors import CheckpointError
from bam_megatron.patches import megatron_save_workers

if TYPE_CHECKING:
    from bam_megatron.checkpoint.opener import Checkpoint

EXTRA_STATE = "_extra_state"


def unwrap_chunks(model) -> list:
    """The bare megatron-core models of one model or a list of chunks (one per virtual stage),
    without their DDP / Float16Module wrappers."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = []
    for module in chunks:
        while hasattr(module, "module"):
            module = module.module
        out.append(module)
    return out


def model_sharded_state_dict(model) -> dict:
    """Sharded state dict of one model or of a list of model chunks (one per virtual stage)."""
    chunks = unwrap_chunks(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_model_weights(model, checkpoint_dir: str) -> None:
    """Save the model's weights (all ranks call this) into ``checkpoint_dir``."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    with megatron_save_workers.saving():
        dist_checkpointing.save(model_sharded_state_dict(model), checkpoint_dir)


def _opened(source: Union[str, "Checkpoint"]) -> "Checkpoint":
    from bam_megatron.checkpoint.opener import Checkpoint, open_checkpoint

    return source if isinstance(source, Checkpoint) else open_checkpoint(source, tensors="defer")


def use_checkpoint_names(sharded: dict, ckpt: "Checkpoint") -> None:
    """Point the model's keys at the names a Transformer Engine checkpoint (Megatron-LM) stores
    its fused norms under, where the checkpoint has those instead of the local layers' names."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    stored = set(ckpt.metadata.state_dict_metadata)
    alias = {canonical_key(k): k for k in stored if canonical_key(k) != k}
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor) and sh.key not in stored and sh.key in alias:
            sh.key = alias[sh.key]


def load_model_weights(model, source: Union[str, "Checkpoint"]) -> None:
    """Load the weights of ``source`` (an opened checkpoint, or a path opened here) into
    ``model``, whatever layout it was saved at. Its data is verified first (collectively in a
    process group) and read without unpickling code (``checkpoint/opener``).

    Raises:
        CheckpointError: a tensor of the model is absent from the checkpoint.
    """
    from bam_megatron.checkpoint.opener import dcp_reads

    ckpt = _opened(source)
    checkpoint_dir = ckpt.dir
    sharded = model_sharded_state_dict(model)
    use_checkpoint_names(sharded, ckpt)
    # megatron-core's naming: "unexpected" = asked for by the model but absent from the
    # checkpoint; "missing" = in the checkpoint but asked for by no one (e.g. optimizer state)
    with dcp_reads(ckpt):
        state, _missing, unexpected = dist_checkpointing.load(sharded, checkpoint_dir, strict=StrictHandling.RETURN_ALL)
    missing_tensors = sorted(k for k in unexpected if EXTRA_STATE not in k)
    if missing_tensors:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} has no tensor {missing_tensors[0]!r} "
            f"({len(missing_tensors)} missing): it was saved from a different model "
            "architecture; check the model arguments against the checkpoint's"
        )
    chunks = unwrap_chunks(model)
    per_chunk = [state] if len(chunks) == 1 else [state[f"model{i}"] for i in range(len(chunks))]
    for chunk, chunk_state in zip(chunks, per_chunk):
        result = chunk.load_state_dict(chunk_state, strict=False)
        absent = [k for k in result.missing_keys if EXTRA_STATE not in k]
        if absent:
            raise CheckpointError(f"checkpoint {checkpoint_dir} did not provide {absent[0]!r}")


def save_global_tensors(tensors: Dict[str, torch.Tensor], checkpoint_dir: str) -> None:
    """Write full tensors as a torch_dist checkpoint from a single-process group.

    Keys must be megatron-core's global checkpoint keys (e.g. ``decoder.layers.<name>`` with
    the layer axis first, as ``load_plain_tensors`` returns them).
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    sharded = {
        k: ShardedTensor.from_rank_offsets(k, t.contiguous(), replica_id=0)
        for k, t in tensors.items()
    }
    with megatron_save_workers.saving():
        dist_checkpointing.save(sharded, checkpoint_dir)


@contextlib.contextmanager
def _process_group():
    """A one-process gloo group for model-free reads when none exists (tools, tests)."""
    if dist.is_initialized():
        yield
        return
    from bam_megatron.parallel.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def read_global_tensors(source: Union[str, "Checkpoint"]) -> Dict[str, torch.Tensor]:
    """All tensors of a torch_dist checkpoint (opened, or a path opened here) as full (global)
    tensors, keyed by their checkpoint keys; works with or without a process group."""
    from bam_megatron.checkpoint.opener import dcp_reads

    ckpt = _opened(source)
    with _process_group(), dcp_reads(ckpt):
        return dist_checkpointing.load_plain_tensors(ckpt.dir)


__all__ = [
    "CheckpointError",
    "load_model_weights",
    "model_sharded_state_dict",
    "read_global_tensors",
    "save_global_tensors",
    "save_model_weights",
    "unwrap_chunks",
]
