"""Training checkpoints in Megatron-LM's layout, torch_dist format, written atomically.

Layout::

    <dir>/latest_checkpointed_iteration.txt     "100"  (written last)
    <dir>/iter_0000100/                         torch_dist: *.distcp, .metadata, common.pt,
                                                metadata.json

The checkpoint holds the model (global, layout-independent keys), the optimizer state (unless
none exists, e.g. an upcycled model), the LR scheduler, the RNG state of every rank, the
iteration, the consumed samples and the arguments (``args``: all of them; ``MODEL_ARGS`` define
the architecture).

Atomicity: ranks write into ``iter_XXXXXXX.tmp``; after a barrier rank 0 renames it to
``iter_XXXXXXX`` and only then rewrites the tracker (via a temporary file + rename). A crash at
any point leaves the previous checkpoint and tracker intact and nothing that looks like a valid
new one.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling

from bam_megatron import optimizer_state
from bam_megatron.checkpointing import EXTRA_STATE, CheckpointError, model_sharded_state_dict
from bam_megatron.distributed import get_device

from bam_megatron.ckpt_layout import FORMAT_VERSION, TRACKER, iteration_dir  # noqa: F401


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration under ``root``, or None when there is no checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; the checkpoint directory is damaged") from None


def resolve_load_dir(path: str) -> str:
    """``--load`` may name a checkpoint root (with a tracker) or one ``iter_*`` directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"--load {path} does not exist; pass a checkpoint directory written by pretrain_bam.py or Megatron-LM")
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(f"--load {path} has no {TRACKER} and is not an iteration directory; pass a checkpoint directory")
    d = iteration_dir(path, iteration)
    if iteration == 0 and not os.path.isdir(d) and os.path.isdir(os.path.join(path, "release")):
        d = os.path.join(path, "release")
    if not os.path.isfile(os.path.join(d, "metadata.json")):
        raise CheckpointError(f"{TRACKER} in {path} points at {d}, which is not a complete checkpoint")
    return d


def read_common(ckpt_dir: str) -> dict:
    """The non-tensor state (args, iteration, scheduler...) of a checkpoint, without a model."""
    try:
        return dist_checkpointing.load_common_state_dict(ckpt_dir)
    except Exception as exc:  # corrupt or foreign files
        raise CheckpointError(f"cannot read {ckpt_dir}: {exc}; the checkpoint is damaged or not torch_dist") from None


# ------------------------------------------------------------------------------------ RNG


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> Dict[str, int]:
    return dict(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
    )


def _rng_sharded_object() -> ShardedObject:
    """Every rank's RNG, one shard per global rank (expert- and data-parallel ranks overlap, so
    the parallel ranks do not index the processes); restored only at the same layout."""
    return ShardedObject("rng_state", _rng_state(), (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _has_rng_shards(ckpt_dir: str) -> bool:
    """Whether the checkpoint holds the RNG state one shard per global rank (checkpoints of
    earlier versions indexed it by parallel ranks)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata
    except Exception:  # unreadable index: the load itself reports it
        return True
    return f"rng_state/shard_0_{dist.get_world_size()}" in keys


# ------------------------------------------------------------------------------------ save


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0


def save_checkpoint(
    root: str,
    state: TrainState,
    model: List[torch.nn.Module],
    optimizer,
    scheduler,
    args_dict: dict,
    keep_last: Optional[int] = None,
) -> str:
    """Write ``root/iter_<iteration>`` atomically, then the tracker; returns the directory."""
    final = iteration_dir(root, state.iteration)
    tmp = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier()

    model_sd = model_sharded_state_dict(model)
    sharded = {
        "model": model_sd,
        "rng_state": _rng_sharded_object(),
        "args": args_dict,
        "layout": _layout(),
        "iteration": state.iteration,
        "consumed_train_samples": state.consumed_train_samples,
        "skipped_iterations": state.skipped_iterations,
        "format_version": FORMAT_VERSION,
    }
    if optimizer is not None:
        sharded["optimizer"] = optimizer_state.sharded_state_dict(optimizer, model_sd, is_loading=False)
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(sharded, tmp)
    dist.barrier()

    if rank == 0:
        if os.path.exists(final):  # re-saving an iteration (e.g. after a restart)
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(state.iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
        if keep_last:
            _delete_old(root, keep_last, state.iteration)
    dist.barrier()
    return final


def _delete_old(root: str, keep_last: int, newest: int) -> None:
    iters = sorted(
        int(name[len("iter_"):])
        for name in os.listdir(root)
        if name.startswith("iter_") and name[len("iter_"):].isdigit()
    )
    for it in iters[:-keep_last]:
        if it != newest:
            shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


# ------------------------------------------------------------------------------------ load


def load_checkpoint(
    ckpt_dir: str,
    model: List[torch.nn.Module],
    optimizer,
    scheduler,
    *,
    load_optim: bool = True,
    load_rng: bool = True,
    finetune: bool = False,
) -> TrainState:
    """Load ``ckpt_dir`` (an ``iter_*`` directory) into the model and, unless told otherwise or
    absent from the checkpoint, the optimizer, scheduler and RNG. Returns the resumed state
    (iteration 0 with ``finetune``)."""
    common = read_common(ckpt_dir)
    if finetune:
        load_optim = load_rng = False
    saved_layout = common.get("layout")
    if load_rng and saved_layout != _layout():
        if dist.get_rank() == 0:
            why = "holds no RNG state" if saved_layout is None else f"was saved at another layout ({saved_layout} -> {_layout()})"
            print(f"[checkpoint] {ckpt_dir} {why}: RNG state not restored", flush=True)
        load_rng = False
    if load_rng and not _has_rng_shards(ckpt_dir):
        if dist.get_rank() == 0:
            print(f"[checkpoint] {ckpt_dir} stores its RNG state in an older layout: RNG state not restored", flush=True)
        load_rng = False
    model_sd = model_sharded_state_dict(model)
    sharded = {"model": model_sd}
    has_optim = bool(optimizer_state.saved_parts(common))  # a chain's tensors are "chained_<i>.optimizer..."
    if load_optim and optimizer is not None and has_optim:
        sharding = optimizer_state.check_loadable(common, optimizer, _layout(), ckpt_dir)
        optimizer_state.prepare_for_load(optimizer)
        sharded["optimizer"] = optimizer_state.sharded_state_dict(optimizer, model_sd, is_loading=True, sharding=sharding)
    elif load_optim and optimizer is not None and dist.get_rank() == 0:
        print(f"[checkpoint] {ckpt_dir} has no optimizer state: starting the optimizer fresh", flush=True)
    if load_rng:
        sharded["rng_state"] = _rng_sharded_object()

    # megatron-core's names: "unexpected" = asked for but not in the checkpoint; "missing" = in
    # the checkpoint but asked for by no rank (e.g. optimizer state or RNG not loaded: fine)
    loaded, _missing, unexpected = dist_checkpointing.load(sharded, ckpt_dir, strict=StrictHandling.RETURN_ALL)
    absent = sorted(k for k in unexpected if EXTRA_STATE not in k and k != "rng_state")
    # "unexpected" differs between ranks: all of them stop, not only those that saw it
    flag = torch.tensor([float(len(absent))],
                        device=get_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        what = f"has no tensor {absent[0]!r} ({len(absent)} missing)" if absent else "lacks tensors of this model"
        if absent and absent[0].startswith("optimizer"):
            raise CheckpointError(f"checkpoint {ckpt_dir} {what}: its optimizer state does not fit; add --no-load-optim")
        raise CheckpointError(
            f"checkpoint {ckpt_dir} {what}: it was saved from a different model; check the model "
            "arguments (or use --use-checkpoint-args)"
        )
    chunks = [m.module if hasattr(m, "module") else m for m in model]
    states = [loaded["model"]] if len(chunks) == 1 else [loaded["model"][f"model{i}"] for i in range(len(chunks))]
    for chunk, st in zip(chunks, states):
        chunk.load_state_dict(st, strict=False)
    # ``loaded`` also holds the checkpoint's non-tensor state (its "optimizer" part too): only
    # what was asked for goes back in
    if "optimizer" in sharded:
        with torch.no_grad():  # the distributed optimizer copies into views of the parameters
            optimizer.load_state_dict(loaded["optimizer"])
        optimizer_state.restore_adam_steps(optimizer)
    if "rng_state" in sharded:
        if "rng_state" in unexpected:
            if dist.get_rank() == 0:
                print(f"[checkpoint] {ckpt_dir} holds no RNG state: not restored", flush=True)
        else:
            _set_rng_state(loaded["rng_state"])

    if finetune:
        return TrainState()
    if scheduler is not None and "opt_param_scheduler" in common and load_optim:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    return TrainState(
        iteration=int(common.get("iteration", 0)),
        consumed_train_samples=int(common.get("consumed_train_samples", 0)),
        skipped_iterations=int(common.get("skipped_iterations", 0)),
    )
