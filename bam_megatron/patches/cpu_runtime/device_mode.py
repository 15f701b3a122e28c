"""The CPU runtime's torch function mode: CUDA placements in torch calls go to the CPU.

A ``torch.overrides.TorchFunctionMode`` sees every torch function and tensor method called on
its thread. While the runtime is entered, ``CpuDeviceMode`` maps:

* ``device=`` keyword arguments naming CUDA (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda",
  N)`` or an int index) -> ``"cpu"``, for every torch function and tensor method: megatron
  creates tensors with ``device="cuda"`` (schedules' token counters, grad-clipping overflow
  buffer, causal mask, ...);
* ``Tensor.to(<cuda device>)`` -> the CPU; ``Tensor.cuda()`` -> the CPU tensor (optimizer
  buffers, grad scaler, ``.to(torch.cuda.current_device())``);
* ``pin_memory=True`` -> ``False`` and ``Tensor.pin_memory()`` -> the tensor itself: pinned host
  memory needs an accelerator and only speeds up host-to-device copies, which do not exist here;
* ``Tensor.record_stream`` -> no-op (CPU tensors do not support it);

and hands the calls of ``collectives.py``, ``autograd.py`` and ``type_names.py`` to their
handlers. Modes are per thread: ``enter_on_this_thread`` pushes one (``threads.py`` does it for
every thread started while the runtime is entered) and ``leave_on_this_thread`` pops it. A mode
still on the stack of a thread that outlived the runtime passes every call through unchanged.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict

import torch
from torch.overrides import TorchFunctionMode

from bam_megatron.patches.target import Check

_CPU = torch.device("cpu")
_THREAD = threading.local()
_STATE = {"active": False}
HANDLERS: Dict[Callable, Callable] = {}


def names_accelerator(device: Any) -> bool:
    """True for anything that means a CUDA device: 'cuda', 'cuda:1', device('cuda'), 3."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def cpu_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``kwargs`` with a CUDA ``device`` made the CPU and ``pin_memory`` off."""
    device = kwargs.get("device")
    map_device = device is not None and names_accelerator(device)
    pinned = bool(kwargs.get("pin_memory"))
    if not (map_device or pinned):
        return kwargs
    kwargs = dict(kwargs)
    if map_device:
        kwargs["device"] = _CPU
    if pinned:
        kwargs["pin_memory"] = False
    return kwargs


def _handle_to(mode, func, args, kwargs):
    if len(args) > 1 and names_accelerator(args[1]):
        args = (args[0], _CPU) + tuple(args[2:])
    return func(*args, **cpu_kwargs(kwargs))


def _handle_cuda(mode, func, args, kwargs):
    return args[0].to(_CPU, non_blocking=bool(kwargs.get("non_blocking", False)))


def _handle_pin_memory(mode, func, args, kwargs):
    return args[0]


def _handle_record_stream(mode, func, args, kwargs):
    return None


def placement_handlers() -> Dict[Callable, Callable]:
    return {
        torch.Tensor.to: _handle_to,
        torch.Tensor.cuda: _handle_cuda,
        torch.Tensor.pin_memory: _handle_pin_memory,
        torch.Tensor.record_stream: _handle_record_stream,
    }


class CpuDeviceMode(TorchFunctionMode):
    """Maps CUDA placements in torch calls to the CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _STATE["active"]:
            return func(*args, **kwargs)
        handler = HANDLERS.get(func)
        if handler is not None:
            return handler(self, func, args, kwargs)
        if kwargs:
            return func(*args, **cpu_kwargs(kwargs))
        return func(*args)


def activate(handlers: Dict[Callable, Callable]) -> None:
    HANDLERS.clear()
    HANDLERS.update(handlers)
    _STATE["active"] = True


def deactivate() -> None:
    _STATE["active"] = False
    HANDLERS.clear()


def active() -> bool:
    return _STATE["active"]


def enter_on_this_thread() -> bool:
    """Push a mode on this thread unless it has one; returns whether one was pushed."""
    if getattr(_THREAD, "mode", None) is not None:
        return False
    mode = CpuDeviceMode()
    mode.__enter__()
    _THREAD.mode = mode
    return True


def leave_on_this_thread() -> None:
    """Pop the mode ``enter_on_this_thread`` pushed on this thread."""
    mode, _THREAD.mode = _THREAD.mode, None
    mode.__exit__(None, None, None)


def check(c: Check) -> None:
    """The tensor methods the mode handles still exist."""
    c.has("torch", "torch.overrides.TorchFunctionMode", "torch.Tensor.to", "torch.Tensor.cuda",
          "torch.Tensor.pin_memory", "torch.Tensor.record_stream")
