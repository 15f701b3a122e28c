"""Training checkpoints in Megatron-LM's layout, torch_dist format, written atomically.

Layout::

    <dir>/latest_checkpointed_iteration.txt     "100"  (written last)
    <dir>/iter_0000100/                         torch_dist: *.distcp, .metadata, common.pt,
                                                metadata.json

The checkpoint holds the model (global, layout-independent keys), the optimizer state (unless
none exists, e.g. an upcycled model), the LR scheduler, the RNG state of every rank, the
iteration, the consumed samples and the arguments (``args``: all of them; ``MODEL_ARGS`` define
the architecture), and, for a model upcycled by ``tools/upcycle_bam.py``, where its experts came
from (``upcycling``, carried from the checkpoint it was loaded from).

Atomicity: ranks write into ``iter_XXXXXXX.tmp``; after a barrier rank 0 renames it to
``iter_XXXXXXX`` and only then rewrites the tracker (via a temporary file + rename). A crash at
any point leaves the previous checkpoint and tracker intact and nothing that looks like a valid
new one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from bam_megatron.checkpoint import optimizer as optimizer_state
from bam_megatron.checkpoint.common import read_common
from bam_megatron.checkpoint.layout import FORMAT_VERSION, TRACKER, iteration_dir
from bam_megatron.checkpoint.rng import has_rng_shards, parallel_layout, rng_sharded_object, set_rng_state
from bam_megatron.checkpoint.weights import EXTRA_STATE, CheckpointError, model_sharded_state_dict, unwrap_chunks
from bam_megatron.parallel.device import get_device

# ------------------------------------------------------------------------------------ save


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    upcycling: Optional[dict] = None  # where the experts came from (tools/upcycle_bam.py), kept on


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
        "rng_state": rng_sharded_object(),
        "args": args_dict,
        "layout": parallel_layout(),
        "iteration": state.iteration,
        "consumed_train_samples": state.consumed_train_samples,
        "skipped_iterations": state.skipped_iterations,
        "format_version": FORMAT_VERSION,
    }
    if state.upcycling:
        sharded["upcycling"] = state.upcycling
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
    if load_rng and saved_layout != parallel_layout():
        if dist.get_rank() == 0:
            why = "holds no RNG state" if saved_layout is None else f"was saved at another layout ({saved_layout} -> {parallel_layout()})"
            print(f"[checkpoint] {ckpt_dir} {why}: RNG state not restored", flush=True)
        load_rng = False
    if load_rng and not has_rng_shards(ckpt_dir):
        if dist.get_rank() == 0:
            print(f"[checkpoint] {ckpt_dir} stores its RNG state in an older layout: RNG state not restored", flush=True)
        load_rng = False
    model_sd = model_sharded_state_dict(model)
    sharded = {"model": model_sd}
    has_optim = bool(optimizer_state.saved_parts(common))  # a chain's tensors are "chained_<i>.optimizer..."
    if load_optim and optimizer is not None and has_optim:
        sharding = optimizer_state.check_loadable(common, optimizer, parallel_layout(), ckpt_dir)
        optimizer_state.prepare_for_load(optimizer)
        sharded["optimizer"] = optimizer_state.sharded_state_dict(optimizer, model_sd, is_loading=True, sharding=sharding)
    elif load_optim and optimizer is not None and dist.get_rank() == 0:
        print(f"[checkpoint] {ckpt_dir} has no optimizer state: starting the optimizer fresh", flush=True)
    if load_rng:
        sharded["rng_state"] = rng_sharded_object()

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
    chunks = unwrap_chunks(model)
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
            set_rng_state(loaded["rng_state"])

    if finetune:
        return TrainState(upcycling=common.get("upcycling"))
    if scheduler is not None and "opt_param_scheduler" in common and load_optim:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    return TrainState(
        iteration=int(common.get("iteration", 0)),
        consumed_train_samples=int(common.get("consumed_train_samples", 0)),
        skipped_iterations=int(common.get("skipped_iterations", 0)),
        upcycling=common.get("upcycling"),
    )
