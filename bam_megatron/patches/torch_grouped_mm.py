"""torch's private grouped GEMM, ``torch._grouped_mm``, for the FFN experts on Hopper GPUs
(``model/experts.py``; a call, nothing replaced, nothing to enter or leave).

``torch._grouped_mm(mat_a [T, in], mat_b [N, in, out], offs=cumsum(tokens per group) int32)``
multiplies each group of rows by its own matrix in one kernel: the experts' two GEMMs over the
expert-sorted tokens instead of a Python loop of per-expert MLPs. It is torch-private (no
stability promise), so ``available()`` also checks, once per process, that the operator still
takes ``offs``; a torch without the operator falls back to megatron-core's loop, one whose
operator changed fails in one line.
"""

from __future__ import annotations

import torch

from bam_megatron.parallel.device import hopper_or_newer
from bam_megatron.patches.target import Check, torch_release

TARGETS = (torch_release("2.13"),)
_CHECKED = []


def check() -> None:
    """Raise ``PatchTargetError`` when torch has ``_grouped_mm`` with other parameters."""
    c = Check("torch_grouped_mm", *TARGETS)
    if not hasattr(torch, "_grouped_mm"):
        return  # no grouped GEMM: the experts loop (available() is False)
    schema = getattr(getattr(torch.ops.aten._grouped_mm, "default", None), "_schema", None)
    names = [a.name for a in getattr(schema, "arguments", ())]
    if names[:3] != ["self", "mat2", "offs"]:
        c.fail("torch", f"changed torch._grouped_mm (arguments {', '.join(names) or 'unknown'}; expected self, mat2, offs)")


def available() -> bool:
    """torch has a ``_grouped_mm`` of the expected shape and the current GPU runs it (Hopper or newer)."""
    if not (hasattr(torch, "_grouped_mm") and hopper_or_newer()):
        return False
    if not _CHECKED:
        check()
        _CHECKED.append(True)
    return True


def grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[T, in] x [N, in, out]`` -> ``[T, out]``, rows ``offsets[i-1]:offsets[i]`` by ``mat_b[i]``."""
    return torch._grouped_mm(mat_a, mat_b, offs=offsets)
