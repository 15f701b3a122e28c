"""Loading a training checkpoint: verified first, then the parts the run asks for.

A training checkpoint (written by ``checkpoint/save.py`` in Megatron-LM's layout, torch_dist
format) holds the model (global, layout-independent keys), the optimizer state (unless none
exists, e.g. an upcycled model), the LR scheduler, the RNG state of every rank, the iteration,
the consumed samples and the arguments (``args``: all of them; ``MODEL_ARGS`` define the
architecture).

``load_checkpoint`` takes a checkpoint opened by ``checkpoint/opener`` (whose index files were
verified and read without unpickling code), verifies its tensor data across the ranks before
anything is read into the model, restores the weights and, as asked and where present, the
optimizer, the scheduler (Megatron-LM's schedule rules, ``training/schedule.py``) and the RNG,
and says what it did in a ``LoadReport``.
A model upcycled by ``tools/upcycle_bam.py`` also carries where its experts came from
(``upcycling``), kept on by every later save.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from bam_megatron.checkpoint import optimizer as optimizer_state
from bam_megatron.checkpoint.opener import Checkpoint, dcp_reads
from bam_megatron.checkpoint.rng import has_rng_shards, parallel_layout, rng_sharded_object, set_rng_state
from bam_megatron.checkpoint.strategies import load_strategy
from bam_megatron.checkpoint.weights import (
    EXTRA_STATE,
    CheckpointError,
    model_sharded_state_dict,
    unwrap_chunks,
    use_checkpoint_names,
)
from bam_megatron.parallel.device import get_device


@dataclass
class TrainState:
    """Where a run is: the step, the samples consumed, the steps skipped."""

    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    upcycling: Optional[dict] = None  # where the experts came from (tools/upcycle_bam.py), kept on


@dataclass
class LoadReport:
    """What ``load_checkpoint`` restored and what it left fresh (for the start-up log)."""

    ckpt_dir: str
    loaded: List[str] = field(default_factory=list)
    fresh: List[str] = field(default_factory=list)
    schedule: str = "the command line's"
    weights_only: bool = False  # --finetune / --pretrained-checkpoint

    def line(self, state: TrainState) -> str:
        text = f"[checkpoint] loaded {self.ckpt_dir} at iteration {state.iteration}: " + ", ".join(self.loaded)
        if self.fresh:
            text += "; fresh: " + ", ".join(self.fresh)
        return text


# ------------------------------------------------------------------------------------ load


def _rng_loadable(ckpt: Checkpoint, report: LoadReport) -> bool:
    """Whether the per-rank RNG state can be restored (same layout, current format)."""
    saved_layout = ckpt.common.get("layout")
    if saved_layout != parallel_layout():
        why = "none saved" if saved_layout is None else f"saved at another layout {saved_layout}"
        report.fresh.append(f"RNG state ({why})")
        return False
    if not has_rng_shards(ckpt.metadata):
        report.fresh.append("RNG state (an older format)")
        return False
    return True


def _sharded_request(ckpt: Checkpoint, model, optimizer, load_optim, load_rng, report) -> dict:
    """The sharded state dict to load: the model, plus the optimizer and RNG when asked for and
    present."""
    ckpt_dir, common = ckpt.dir, ckpt.common
    model_sd = model_sharded_state_dict(model)
    use_checkpoint_names(model_sd, ckpt)
    sharded = {"model": model_sd}
    has_optim = bool(optimizer_state.saved_parts(common))  # a chain's tensors are "chained_<i>.optimizer..."
    if load_optim and optimizer is not None and has_optim:
        sharding = optimizer_state.check_loadable(common, optimizer, parallel_layout(), ckpt_dir)
        optimizer_state.prepare_for_load(optimizer)
        sharded["optimizer"] = optimizer_state.sharded_state_dict(optimizer, model_sd, is_loading=True, sharding=sharding)
    elif optimizer is not None and not report.weights_only:  # weights only: said once, in load_checkpoint
        report.fresh.append("optimizer (" + ("none saved" if load_optim else "--no-load-optim") + ")")
    if load_rng and _rng_loadable(ckpt, report):
        sharded["rng_state"] = rng_sharded_object()
    return sharded


def _check_nothing_missing(ckpt_dir: str, unexpected) -> None:
    """Every rank stops when any rank asked for a tensor the checkpoint lacks."""
    absent = sorted(k for k in unexpected if EXTRA_STATE not in k and k != "rng_state")
    flag = torch.tensor([float(len(absent))], device=get_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return
    what = f"has no tensor {absent[0]!r} ({len(absent)} missing)" if absent else "lacks tensors of this model"
    if absent and absent[0].startswith("optimizer"):
        raise CheckpointError(f"checkpoint {ckpt_dir} {what}: its optimizer state does not fit; add --no-load-optim")
    raise CheckpointError(
        f"checkpoint {ckpt_dir} {what}: it was saved from a different model; check the model "
        "arguments (or use --use-checkpoint-args)"
    )


def _restore(loaded: dict, sharded: dict, unexpected, model, optimizer, report: LoadReport) -> None:
    """Put the loaded parts into the model, the optimizer and the RNG."""
    chunks = unwrap_chunks(model)
    states = [loaded["model"]] if len(chunks) == 1 else [loaded["model"][f"model{i}"] for i in range(len(chunks))]
    for chunk, st in zip(chunks, states):
        chunk.load_state_dict(st, strict=False)
    report.loaded.append("weights")
    # ``loaded`` also holds the checkpoint's non-tensor state (its "optimizer" part too): only
    # what was asked for goes back in
    if "optimizer" in sharded:
        with torch.no_grad():  # the distributed optimizer copies into views of the parameters
            optimizer.load_state_dict(loaded["optimizer"])
        optimizer_state.restore_adam_steps(optimizer)
        report.loaded.append("optimizer")
    if "rng_state" in sharded:
        if "rng_state" in unexpected:
            report.fresh.append("RNG state (none saved)")
        else:
            set_rng_state(loaded["rng_state"])
            report.loaded.append("RNG state")


def load_checkpoint(ckpt: Checkpoint, model: List[torch.nn.Module], optimizer, *,
                    load_optim: bool = True, load_rng: bool = True,
                    finetune: bool = False, fully_parallel: bool = False) -> Tuple[TrainState, LoadReport]:
    """Verify the tensor data of ``ckpt`` (opened by ``checkpoint/opener``), then load it into the
    model and, unless told otherwise or absent from the checkpoint, the optimizer and RNG.
    ``fully_parallel``: each replicated tensor is read by one data-parallel rank and broadcast
    (``strategies.load_strategy``, ``--ckpt-fully-parallel-load``).
    Returns the resumed state (iteration 0 with ``finetune``: weights only) and what was loaded.
    The scheduler's state is the training program's to restore (``training/schedule.py``), from
    ``ckpt.common``."""
    common = ckpt.common
    report = LoadReport(ckpt.dir, weights_only=finetune)
    if finetune:
        load_optim = load_rng = False
        report.fresh.append("iteration, optimizer, LR schedule, RNG (weights only)")
    sharded = _sharded_request(ckpt, model, optimizer, load_optim, load_rng, report)
    # megatron-core's names: "unexpected" = asked for but not in the checkpoint; "missing" = in
    # the checkpoint but asked for by no rank (e.g. optimizer state or RNG not loaded: fine)
    strategy = load_strategy(ckpt.dir, fully_parallel)
    with dcp_reads(ckpt):
        loaded, _missing, unexpected = dist_checkpointing.load(sharded, ckpt.dir, sharded_strategy=strategy,
                                                               strict=StrictHandling.RETURN_ALL)
    _check_nothing_missing(ckpt.dir, unexpected)
    _restore(loaded, sharded, unexpected, model, optimizer, report)
    upcycling = ckpt.provenance.upcycling
    if finetune:
        return TrainState(upcycling=upcycling), report
    state = TrainState(
        iteration=ckpt.iteration,
        consumed_train_samples=int(common.get("consumed_train_samples", 0)),
        skipped_iterations=int(common.get("skipped_iterations", 0)),
        upcycling=upcycling,
    )
    return state, report
