"""megatron-core 0.16.x: the distributed optimizer's private parts that ``checkpoint/optimizer.py``
uses (calls and reads; nothing is replaced, so there is nothing to enter or leave).

- ``DistributedOptimizer._init_optimizer_states_with_dummy_values()``: allocates the Adam state
  of a distributed optimizer that has not stepped yet, as megatron-core's own loader does.
  Without Transformer Engine or apex (plain ``torch.optim``) ``DistributedOptimizer.state_dict``
  cannot build a loading state dict before that state exists (Adam's per-parameter ``step``);
  ``allocate_state`` calls it (``checkpoint/optimizer.prepare_for_load``).
- ``distrib_optimizer.HAVE_APEX_OR_TE``: whether megatron-core took the ``torch.optim`` path,
  the one that needs the repairs of ``checkpoint/optimizer.py`` (``uses_torch_optimizers``).

Each runs ``check()`` first (once per process) and fails in one line when megatron-core does not fit.
"""

from __future__ import annotations

from bam_megatron.patches.target import MEGATRON_CORE, Check

TARGETS = (MEGATRON_CORE,)
_MODULE = "megatron.core.optimizer.distrib_optimizer"
_CHECKED = []


def check() -> None:
    """Raise ``PatchTargetError`` unless megatron-core still has both, as used here."""
    c = Check("megatron_optimizer", *TARGETS)
    c.params("megatron-core", f"{_MODULE}.DistributedOptimizer._init_optimizer_states_with_dummy_values", "self")
    c.source("megatron-core", f"{_MODULE}.DistributedOptimizer._init_optimizer_states_with_dummy_values",
             "self.optimizer.step()")
    c.has("megatron-core", f"{_MODULE}.HAVE_APEX_OR_TE")


def _checked() -> None:
    if not _CHECKED:
        check()
        _CHECKED.append(True)


def uses_torch_optimizers() -> bool:
    """megatron-core uses ``torch.optim`` (neither Transformer Engine nor apex imported)."""
    _checked()
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def allocate_state(opt) -> None:
    """Allocate the Adam state of the distributed optimizer ``opt`` with megatron-core's dummy
    step (it changes the weights: load them afterwards)."""
    _checked()
    opt._init_optimizer_states_with_dummy_values()
