"""``Tensor.type()`` answers ``"torch.cuda.<X>Tensor"`` to the four megatron-core functions that
accept only CUDA parameters, and the truth to everyone else.

megatron-core 0.16.1's optimizers sort parameters by ``param.type()`` and refuse any that is not
``'torch.cuda.FloatTensor'`` / ``HalfTensor`` / ``BFloat16Tensor``; grad clipping asserts
``param.grad.type() == 'torch.cuda.FloatTensor'``. Those checks live in exactly these functions
(``CALLERS``), and only a call made directly from one of them (its own code object, found one
frame above the mode) gets the CUDA name of a CPU tensor. torch itself, other megatron-core code
and ours see the true type. ``check`` reads each function's source for the comparison, so a
release that moves it elsewhere fails at entry instead of raising deep inside the optimizer.
"""

from __future__ import annotations

import inspect
import sys
from typing import Callable, Dict, FrozenSet

import torch

from bam_megatron.patches.target import Check

_DIST = "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer"
# caller -> the comparison in its source
CALLERS = {
    f"{_DIST}._build_model_and_main_param_groups": "model_param.type() == 'torch.cuda.FloatTensor'",
    f"{_DIST}.__init__": "param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']",
    "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__":
        "param.type() == 'torch.cuda.FloatTensor'",
    "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32":
        "param.grad.type() == 'torch.cuda.FloatTensor'",
}
_SKIPPED = ("torch.overrides", __name__.rsplit(".", 1)[0] + ".device_mode", __name__)
_CODES: Dict[str, FrozenSet] = {"codes": frozenset()}


def _code(path: str):
    from bam_megatron.patches.target import _resolve

    return inspect.unwrap(_resolve(path)).__code__


def _asked_by_a_caller() -> bool:
    """Whether the code that called ``Tensor.type()`` is one of ``CALLERS`` (the frames of the
    mode and of ``torch.overrides`` are skipped)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "") in _SKIPPED:
        frame = frame.f_back
    return frame is not None and frame.f_code in _CODES["codes"]


def _handle_type(mode, func, args, kwargs):
    name = func(*args, **kwargs)
    if (
        len(args) == 1
        and not kwargs
        and args[0].device.type == "cpu"
        and name.startswith("torch.")
        and not name.startswith("torch.cuda.")
        and _asked_by_a_caller()
    ):
        return "torch.cuda." + name[len("torch."):]
    return name


def handlers() -> Dict[Callable, Callable]:
    _CODES["codes"] = frozenset(_code(path) for path in CALLERS)
    return {torch.Tensor.type: _handle_type}


def check(c: Check) -> None:
    """Each caller still makes its comparison."""
    for path, comparison in CALLERS.items():
        c.source("megatron-core", path, comparison)
