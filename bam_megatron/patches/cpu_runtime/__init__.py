"""The CPU runtime: megatron-core 0.16.x on torch >= 2.6 without a GPU (gloo process group).

megatron-core assumes a CUDA device in many places. Inside ``with cpu_runtime():`` the host CPU
stands in for "the current CUDA device", so that GPTModel, DDP, the optimizers, the schedules
and dist_checkpointing run under gloo; leaving the block puts torch, megatron-core and CPython
back as they were. The programs enter it for their run (``parallel/distributed.init_distributed``
without a GPU; ``destroy_distributed`` leaves it), tests per test (the ``single_process``
fixture goes through the same two calls). Importing this package changes nothing.

One module per concern, each with the ``check`` of what it relies on:

- ``cuda_api.py``: ``torch.cuda`` functions (current device, streams, events, RNG state);
- ``device_mode.py``: a torch function mode mapping CUDA placements to the CPU;
- ``collectives.py``: NCCL-style collective calls made acceptable to gloo;
- ``autograd.py``: backward passes run under the device mode (torch-private engine call);
- ``type_names.py``: ``Tensor.type()`` answers a CUDA name to megatron-core's four parameter-type
  checks only;
- ``megatron_rng.py``: megatron-core's RNG tracker on the CPU generator (megatron-core-private
  entry points);
- ``threads.py``: threads started inside the runtime enter the device mode
  (``Thread._bootstrap_inner``, CPython-private).

Entering checks the installed torch, megatron-core and CPython against all of it first (see
``patches/target.py``) and fails in one line (``PatchTargetError``) when one does not fit.
Entries nest (leave them in the reverse order of entering): the outermost one installs, the
exit of the outermost one restores; each entry pushes the device mode on its own thread unless
that thread has it already, and pops what it pushed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from bam_megatron.patches.target import MEGATRON_CORE, PYTHON, Check, Replacements, Shared, torch_release

__all__ = ["TARGETS", "check", "cpu_mode_active", "cpu_runtime"]

TARGETS = (torch_release("2.13"), MEGATRON_CORE, PYTHON)


def _parts():
    from bam_megatron.patches.cpu_runtime import (
        autograd,
        collectives,
        cuda_api,
        device_mode,
        megatron_rng,
        threads,
        type_names,
    )

    return cuda_api, device_mode, collectives, autograd, type_names, megatron_rng, threads


def check() -> None:
    """Raise ``PatchTargetError`` unless the installed libraries fit every part of the runtime."""
    c = Check("cpu_runtime", *TARGETS)
    for part in _parts():
        part.check(c)


def _install(r: Replacements):
    cuda_api, device_mode, collectives, autograd, type_names, megatron_rng, threads = _parts()
    cuda_api.install(r)
    remove_filter = megatron_rng.install(r)
    threads.install(r)
    handlers = {**device_mode.placement_handlers(), **collectives.handlers(), **autograd.handlers(),
                **type_names.handlers()}
    device_mode.activate(handlers)

    def cleanup() -> None:
        device_mode.deactivate()
        remove_filter()

    return cleanup


_SHARED = Shared("cpu_runtime", check, _install)


def cpu_mode_active() -> bool:
    """Whether the CPU runtime is entered in this process right now."""
    return _SHARED.active


@contextlib.contextmanager
def cpu_runtime() -> Iterator[None]:
    """Run the block on the CPU runtime (see the module docstring).

    Raises:
        RuntimeError: CUDA is available (run on the GPU instead).
        PatchTargetError: the installed torch / megatron-core / CPython does not fit.
    """
    import torch

    if torch.cuda.is_available():
        raise RuntimeError(
            "the CPU runtime is only for machines without CUDA; a CUDA device is available, "
            "run on it (backend nccl) instead"
        )
    from bam_megatron.patches.cpu_runtime import device_mode

    with _SHARED.entered():
        pushed = device_mode.enter_on_this_thread()
        try:
            yield
        finally:
            if pushed:
                device_mode.leave_on_this_thread()
