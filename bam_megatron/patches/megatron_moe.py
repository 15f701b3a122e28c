"""megatron-core 0.16.x without Transformer Engine: the MoE router's missing ``te_general_gemm``.

``megatron.core.transformer.moe.moe_utils`` imports ``te_general_gemm`` inside a
``try: ... except ImportError`` and never defines it otherwise, but the router's
``RouterGatingLinearFunction`` tests ``te_general_gemm is not None``: a ``NameError`` on every
MoE forward. Inside ``with te_general_gemm_defined():`` the missing name is ``None`` (the
function then uses ``torch.matmul``); leaving the block removes it again. Nothing changes where
Transformer Engine defines it. Not tied to the CPU: GPU machines without Transformer Engine need
it too. Entered for a run by ``parallel/distributed.init_distributed`` (``patches/run.py``).
"""

from __future__ import annotations

from typing import ContextManager

from bam_megatron.patches.target import MEGATRON_CORE, Check, Replacements, Shared

TARGETS = (MEGATRON_CORE,)
_MODULE = "megatron.core.transformer.moe.moe_utils"


def check() -> None:
    """Raise ``PatchTargetError`` unless megatron-core's router still tests the name."""
    c = Check("megatron_moe", *TARGETS)
    c.source("megatron-core", f"{_MODULE}.RouterGatingLinearFunction", "te_general_gemm is not None")


def _install(r: Replacements) -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        r.set(moe_utils, "te_general_gemm", None)


_SHARED = Shared("megatron_moe", check, _install)


def te_general_gemm_defined() -> ContextManager[None]:
    """Within the block, ``moe_utils.te_general_gemm`` is defined (see the module docstring)."""
    return _SHARED.entered()
