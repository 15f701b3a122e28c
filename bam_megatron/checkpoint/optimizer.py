"""Optimizer state in training checkpoints: the plain and the distributed optimizer.

megatron-core's ``get_megatron_optimizer`` returns one optimizer, or a ``ChainedOptimizer`` of a
dense and an expert optimizer when ``--expert-model-parallel-size > 1``. Each part is either a
plain (``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params``) or, with
``--use-distributed-optimizer``, a ``DistributedOptimizer`` whose Adam moments are sharded over
the data-parallel ranks.

Distributed-optimizer state is written in megatron-core's ``dp_reshardable`` format (Megatron-LM's
default: every rank writes its own buffers, no gathering). It can be resumed at another
data-parallel size, but not at another tensor / pipeline / expert-parallel layout; the checks
below say so before any work starts.

Without Transformer Engine or apex (plain ``torch.optim.AdamW``), megatron-core 0.16.1's
distributed-optimizer checkpointing needs three repairs, all made here:

* saving with its default sharding type (``fully_sharded_model_space``) fails
  ("ShardedTensor.flattened_range is not supported") -> the format is chosen explicitly;
* loading into a fresh optimizer trips an assertion in ``DistributedOptimizer.state_dict``
  (Adam's per-parameter ``step`` does not exist before the first step) ->
  :func:`prepare_for_load` allocates the state with megatron-core's own dummy step (a private
  method: ``patches/megatron_optimizer.py``);
* after loading, every parameter's Adam ``step`` is the dummy value, or one tensor shared by all
  parameters (each optimizer step then advances it once per parameter), so the bias correction
  drifts from the uninterrupted run -> :func:`restore_adam_steps` gives every parameter its own
  ``step`` from the checkpoint's parameter groups.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from bam_megatron.checkpoint.weights import CheckpointError
from bam_megatron.patches import megatron_optimizer

DIST_OPT_SHARDING = "dp_reshardable"


def optimizer_parts(optimizer) -> List:
    """The optimizers inside ``optimizer`` (a ``ChainedOptimizer`` or a single one)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed(opt) -> bool:
    """Whether ``opt`` (one part) is megatron-core's ``DistributedOptimizer``."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


def _torch_adam_path() -> bool:
    """megatron-core uses ``torch.optim`` (and needs the repairs) when neither TE nor apex imports."""
    return megatron_optimizer.uses_torch_optimizers()


def sharded_state_dict(optimizer, model_sd: dict, is_loading: bool, sharding: Optional[str] = None) -> dict:
    """``optimizer.sharded_state_dict`` with the distributed-optimizer format made explicit."""
    metadata = {"distrib_optim_sharding_type": sharding or DIST_OPT_SHARDING}
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)


def saved_parts(common: dict) -> List[dict]:
    """The common (non-tensor) optimizer state of each saved part; a chain is ``{0: .., 1: ..}``."""
    saved = common.get("optimizer")
    if not isinstance(saved, dict) or not saved:
        return []
    if all(isinstance(k, int) for k in saved):
        return [saved[k] for k in sorted(saved)]
    return [saved]


def check_loadable(common: dict, optimizer, layout: Dict[str, int], ckpt_dir: str) -> Optional[str]:
    """Raise a one-line :class:`CheckpointError` when the saved optimizer state cannot be loaded
    into ``optimizer`` at ``layout`` (tp/pp/ep/dp sizes); return the saved distributed format.

    * one optimizer vs a chain of two (EP = 1 vs EP > 1): the state of one cannot be loaded into
      the other (megatron-core fails deep inside ``dist_checkpointing.load``);
    * plain vs distributed optimizer: different tensors;
    * distributed optimizer at another TP / PP / EP size: its buffers follow the model-parallel
      layout (only the data-parallel size may change)."""
    parts, mine = saved_parts(common), optimizer_parts(optimizer)
    if not parts:
        return None
    saved_layout = common.get("layout") or {}
    if len(parts) != len(mine):
        raise CheckpointError(
            f"checkpoint {ckpt_dir} holds the state of {len(parts)} optimizer(s) (saved at "
            f"--expert-model-parallel-size {saved_layout.get('ep', '?')}), this layout uses {len(mine)} (expert "
            "parameters get an optimizer of their own only when --expert-model-parallel-size > 1), and optimizer "
            "state cannot move between the two; add --no-load-optim to load the weights with a fresh optimizer"
        )
    saved_dist = "param_state_sharding_type" in parts[0]
    if saved_dist != is_distributed(mine[0]):
        how = "with" if saved_dist else "without"
        raise CheckpointError(
            f"checkpoint {ckpt_dir} was saved {how} --use-distributed-optimizer and this run is not; use the "
            "same setting to resume its optimizer state, or add --no-load-optim"
        )
    if not saved_dist:
        return None
    moved = [k for k in ("tp", "pp", "ep") if k in saved_layout and saved_layout[k] != layout.get(k)]
    if moved:
        was = ", ".join(f"{k.upper()} {saved_layout[k]}" for k in moved)
        now = ", ".join(f"{k.upper()} {layout.get(k)}" for k in moved)
        raise CheckpointError(
            f"checkpoint {ckpt_dir} holds distributed-optimizer state saved at {was}, this run uses {now}; that "
            "state resumes only at the same tensor/pipeline/expert-parallel sizes (the data-parallel size may "
            "change): resume at the saved layout, or add --no-load-optim"
        )
    return parts[0]["param_state_sharding_type"]


def prepare_for_load(optimizer) -> None:
    """Allocate the Adam state of distributed-optimizer parts that have not stepped yet (the
    torch-optimizer path cannot build a loading state dict without it). The dummy step changes
    the weights; the checkpoint's weights are loaded afterwards."""
    if not _torch_adam_path():
        return
    for opt in optimizer_parts(optimizer):
        if is_distributed(opt) and len(opt.optimizer.state) == 0:
            megatron_optimizer.allocate_state(opt)


def restore_adam_steps(optimizer) -> None:
    """Give every parameter of the distributed-optimizer parts its own Adam ``step`` equal to the
    loaded parameter group's ``step`` (the value megatron-core saves for the torch optimizer)."""
    if not _torch_adam_path():
        return
    for opt in optimizer_parts(optimizer):
        if not is_distributed(opt):
            continue
        for group in opt.optimizer.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                st = opt.optimizer.state.get(p)
                if st is not None and isinstance(st.get("step"), torch.Tensor):
                    st["step"] = torch.tensor(float(group["step"]), dtype=st["step"].dtype, device=st["step"].device)

