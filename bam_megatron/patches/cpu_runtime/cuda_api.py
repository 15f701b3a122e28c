"""``torch.cuda`` functions that megatron-core calls, answered by the CPU.

* ``current_device`` -> ``0``: megatron builds buffers with ``device=torch.cuda.current_device()``
  (DDP grad buffers, rotary embedding, rerun state machine, ...). The int is kept, as in the
  CUDA contract; the device mode (``device_mode.py``) maps integer device ids to the CPU.
* ``Stream``, ``Event``, ``current_stream``, ``default_stream``, ``stream``, ``set_stream``,
  ``synchronize`` -> in-order CPU stand-ins: DDP, the schedules, timers and dist_checkpointing
  create / wait on streams and events; on the CPU all work runs in program order, so waits are
  no-ops and events record host time (``Event.elapsed_time`` in milliseconds, like CUDA's).
* ``get_rng_state`` / ``set_rng_state`` / ``manual_seed`` -> the CPU default generator:
  ``CudaRNGStatesTracker.add`` and ``model_parallel_cuda_manual_seed`` seed and snapshot "the
  CUDA generator"; on the CPU every random op (init, dropout) draws from the CPU default
  generator, so that is the one the tracker has to save, swap and restore.

Not replaced on purpose: ``torch.cuda.is_available()`` stays ``False`` (the CPU-aware branches of
megatron-core and torch keep working), ``memory_allocated`` and friends already answer 0.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Optional

import torch

from bam_megatron.patches.target import Check, Replacements

_CPU = torch.device("cpu")


class CpuEvent:
    """CPU stand-in for ``torch.cuda.Event``: records host time when recorded."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False, **_: Any) -> None:
        self.enable_timing = enable_timing
        self._time: Optional[float] = None

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: "CpuEvent") -> float:
        if self._time is None or end_event._time is None:
            raise RuntimeError("both events must be recorded before elapsed_time()")
        return (end_event._time - self._time) * 1000.0


class CpuStream:
    """CPU stand-in for ``torch.cuda.Stream``: CPU work is already in program order."""

    cuda_stream = 0

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        self.device = _CPU
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Optional[CpuEvent] = None) -> CpuEvent:
        event = event if event is not None else CpuEvent()
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> "CpuStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_DEFAULT_STREAM = CpuStream()


def _current_stream(device: Any = None) -> CpuStream:
    return _DEFAULT_STREAM


def _stream_context(stream: Any = None):
    return contextlib.nullcontext(stream)


def _set_stream(stream: Any) -> None:
    pass


def _synchronize(device: Any = None) -> None:
    pass


def _current_device() -> int:
    return 0


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


REPLACEMENTS = {
    "current_device": _current_device,
    "Stream": CpuStream,
    "Event": CpuEvent,
    "current_stream": _current_stream,
    "default_stream": _current_stream,
    "stream": _stream_context,
    "set_stream": _set_stream,
    "synchronize": _synchronize,
    "get_rng_state": _get_rng_state,
    "set_rng_state": _set_rng_state,
    "manual_seed": _manual_seed,
}


def check(c: Check) -> None:
    """Each replaced function exists and its replacement takes every parameter it takes."""
    for name, replacement in REPLACEMENTS.items():
        c.accepts("torch", f"torch.cuda.{name}", replacement)


def install(r: Replacements) -> None:
    for name, replacement in REPLACEMENTS.items():
        r.set(torch.cuda, name, replacement)
