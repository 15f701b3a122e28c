"""The device policy: every decision about GPU vs CPU is made here, nowhere else.

A process computes on one device: ``cuda:LOCAL_RANK`` when CUDA is available (NCCL), otherwise
the CPU (gloo; ``parallel.distributed.init_distributed`` then enters the CPU runtime of
``bam_megatron.patches.cpu_runtime`` for the run). ``select_device`` makes that choice once per
run (``init_distributed`` calls it); everything else asks ``get_device()`` or one of the small helpers below instead of
looking at ``torch.cuda`` itself.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from bam_megatron.errors import LayoutError

_DEVICE: Optional[torch.device] = None


def accelerator_available() -> bool:
    """Whether this process can compute on a GPU."""
    return torch.cuda.is_available()


def select_device(local_rank: int) -> Tuple[torch.device, str]:
    """Choose (and make current) this process's device; returns ``(device, backend)``.

    Raises:
        LayoutError: more processes on this node than GPUs.
    """
    global _DEVICE
    if accelerator_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise LayoutError(
                f"LOCAL_RANK {local_rank} has no GPU (only {count} visible); launch at most "
                f"{count} processes per node"
            )
        torch.cuda.set_device(local_rank)
        _DEVICE = torch.device("cuda", local_rank)
        return _DEVICE, "nccl"
    _DEVICE = torch.device("cpu")
    return _DEVICE, "gloo"


def release_device() -> None:
    """Forget the selected device (after the process group is destroyed)."""
    global _DEVICE
    _DEVICE = None


def get_device() -> torch.device:
    """The device this process computes on: the selected one, else the current GPU, else CPU."""
    if _DEVICE is not None:
        return _DEVICE
    if accelerator_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def param_device(config) -> torch.device:
    """Where a module allocates its parameters: the CPU with ``use_cpu_initialization`` (or no
    GPU), else this process's GPU (megatron-core's convention)."""
    if config.use_cpu_initialization or not accelerator_available():
        return torch.device("cpu")
    return get_device()


def default_params_dtype(force_fp32: bool = False) -> torch.dtype:
    """bf16 on a GPU (unless ``force_fp32``), fp32 on the CPU."""
    if force_fp32 or not accelerator_available():
        return torch.float32
    return torch.bfloat16


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for honest step timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's resident memory on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def hopper_or_newer() -> bool:
    """A GPU of compute capability 9 or higher is current (grouped GEMMs run there)."""
    return accelerator_available() and torch.cuda.get_device_capability()[0] >= 9


def accelerator_rng_state() -> Optional[torch.Tensor]:
    """The GPU generator's state, or None without a GPU."""
    return torch.cuda.get_rng_state() if accelerator_available() else None


def set_accelerator_rng_state(state: Optional[torch.Tensor]) -> None:
    """Restore ``accelerator_rng_state()``'s result (no-op without a GPU or a state)."""
    if state is not None and accelerator_available():
        torch.cuda.set_rng_state(state)


__all__ = [
    "accelerator_available",
    "accelerator_rng_state",
    "default_params_dtype",
    "get_device",
    "hopper_or_newer",
    "param_device",
    "peak_memory_gib",
    "release_device",
    "select_device",
    "set_accelerator_rng_state",
    "synchronize",
]
