"""The training program (``pretrain_bam.py``): arguments, run setup, the loop, evaluation, logs.

``pretrain`` and ``main`` are loaded on first use, so that ``bam_megatron.training.arguments``
(and with it ``--help``) imports neither torch nor megatron-core.
"""

from __future__ import annotations

__all__ = ["main", "pretrain"]


def __getattr__(name: str):
    if name in __all__:
        from bam_megatron.training import program as _program

        return getattr(_program, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
