"""megatron-core 0.16.1 without Transformer Engine: the MoE router's missing ``te_general_gemm``.

Each fix is a no-op when the problem is absent, and ``apply_megatron_compat`` is idempotent.
It is not tied to CPU: GPU machines without Transformer Engine need it too.

- ``megatron.core.transformer.moe.moe_utils`` imports ``te_general_gemm`` inside a
  ``try: ... except ImportError`` and never defines it otherwise, but the router's
  ``RouterGatingLinearFunction`` tests ``te_general_gemm is not None``: a ``NameError`` on every
  MoE forward. We define the missing name as ``None`` (the function then uses ``torch.matmul``).
"""

from __future__ import annotations

TARGET_VERSION = "0.16.1"
_applied = False


def apply_megatron_compat() -> None:
    """Patch the known gaps of megatron-core 0.16.1 without Transformer Engine."""
    global _applied
    if _applied:
        return
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _applied = True
