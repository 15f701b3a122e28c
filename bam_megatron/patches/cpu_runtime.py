"""Explicit CPU runtime for megatron-core 0.16.1 on torch >= 2.6 (gloo process group, no GPU).

megatron-core assumes a CUDA device in many places.  ``enable_cpu_mode()`` makes
the host CPU stand in for "the current CUDA device" so that GPTModel, DDP, the
optimizers, the schedules and dist_checkpointing run under gloo.  Importing
this module changes nothing; every redirect below is installed by
``enable_cpu_mode()`` and stays for the life of the process.

Redirects and why
-----------------
torch.cuda module functions (replaced on the ``torch.cuda`` module):

* ``current_device`` -> ``0``.  megatron builds buffers with
  ``device=torch.cuda.current_device()`` (DDP grad buffers, rotary embedding,
  rerun state machine, ...).  The int is kept, as in the CUDA contract; the
  device mode below maps integer device ids to CPU.
* ``Stream``, ``Event``, ``current_stream``, ``default_stream``, ``stream``,
  ``set_stream``, ``synchronize`` -> in-order CPU stand-ins.  DDP, the
  schedules, timers and dist_checkpointing create/wait on streams and events;
  on CPU all work runs in program order, so waits are no-ops and events record
  host time (``Event.elapsed_time`` returns milliseconds like CUDA events).
* ``get_rng_state`` / ``set_rng_state`` / ``manual_seed`` -> the CPU default
  generator.  ``CudaRNGStatesTracker.add`` and ``model_parallel_cuda_manual_seed``
  seed and snapshot "the CUDA generator"; on CPU every random op (init,
  dropout) draws from the CPU default generator, so that is the generator the
  tracker has to save, swap and restore for ``fork()`` to be deterministic.

megatron-core functions:

* ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` /
  ``_set_cuda_rng_state`` -> CPU default generator state.  Same reason as
  above; these are the entry points ``CudaRNGStatesTracker.fork()`` and
  activation recomputation use (the originals call ``torch.cuda.default_generators``,
  which is empty without CUDA).
* the log record "CPU RNG state changed within GPU RNG context" of
  ``megatron.core.tensor_parallel.random`` is filtered out: with the CUDA
  generator aliased to the CPU one, every random op inside ``fork()`` would
  trigger it although nothing is wrong.

Tensor-level redirects (a ``torch.overrides.TorchFunctionMode``):

* ``device=`` keyword arguments naming CUDA (``"cuda"``, ``"cuda:N"``,
  ``torch.device("cuda", N)`` or an int index) -> ``"cpu"``, for every torch
  function and tensor method.  megatron creates tensors with ``device="cuda"``
  (schedules' token counters, grad-clipping overflow buffer, causal mask, ...).
* ``Tensor.to(<cuda device>)`` -> CPU; ``Tensor.cuda()`` -> the CPU tensor
  itself (optimizer buffers, grad scaler, ``.to(torch.cuda.current_device())``).
* ``pin_memory=True`` -> ``False`` and ``Tensor.pin_memory()`` -> the tensor
  itself: pinned host memory needs an accelerator and only speeds up
  host-to-device copies, which do not exist here.
* ``torch.distributed.all_to_all_single`` split sizes given as tensors / numpy arrays ->
  int lists: gloo accepts only int sequences, and megatron's alltoall token dispatcher passes
  tensors.
* ``torch.distributed.all_gather`` / ``reduce_scatter`` with tensor lists of uneven first
  dimensions -> padded to the largest and trimmed: gloo needs equal sizes, NCCL does not, and
  megatron's MoE dispatcher gathers uneven token counts under expert tensor parallelism.
* ``Tensor.record_stream`` -> no-op (CPU tensors do not support it).
* ``Tensor.type()`` called from megatron code reports ``"torch.cuda.<X>Tensor"``
  for CPU tensors: the mixed-precision optimizer and grad clipping accept only
  ``'torch.cuda.FloatTensor'`` (and half/bf16) params/grads.  Other callers see
  the true type.  ``Tensor.type("torch.cuda.<X>Tensor")`` converts to the CPU type.
* ``Tensor.backward``, ``torch.autograd.backward`` and ``torch.autograd.grad``
  are run with the mode re-entered: torch removes a mode from the stack while
  its handler runs, so without this the backward pass (DDP grad hooks, custom
  autograd functions, activation recomputation) would run without the CPU
  mapping.

Threads:

* ``threading.Thread._bootstrap_inner`` is wrapped so every thread started
  after ``enable_cpu_mode()`` enters the device mode too (torch function modes
  are thread-local).  The autograd engine runs CPU backward passes on the
  calling thread, so backward is covered by the calling thread's mode.
  Processes started with fork inherit everything; spawned processes (torchrun,
  ``torch.multiprocessing.spawn``) start clean and must call
  ``enable_cpu_mode()`` themselves (``bam_megatron.parallel.distributed.init_distributed``
  does).

Not redirected on purpose: ``torch.cuda.is_available()`` stays ``False`` so the
CPU-aware branches inside megatron-core and torch keep working, and
``Tensor.is_cuda`` stays truthful.  ``torch.cuda.memory_allocated`` and friends
already return 0 when CUDA was never initialised.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_cpu_mode", "cpu_mode_active"]

TARGET_VERSION = "0.16.1"  # megatron-core
_CPU = torch.device("cpu")
_ACTIVE = False
_ENABLE_LOCK = threading.Lock()
_THREAD_STATE = threading.local()
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"


def cpu_mode_active() -> bool:
    """Whether ``enable_cpu_mode()`` has been called in this process."""
    return _ACTIVE


def enable_cpu_mode() -> None:
    """Install the CPU redirects listed in the module docstring (idempotent).

    Raises:
        RuntimeError: if CUDA is available (use the GPU instead).
    """
    global _ACTIVE
    with _ENABLE_LOCK:
        if _ACTIVE:
            _enter_device_mode_on_this_thread()
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "enable_cpu_mode() is only for machines without CUDA; "
                "a CUDA device is available, run on it (backend nccl) instead"
            )
        _patch_torch_cuda()
        _patch_megatron_rng()
        _patch_thread_start()
        _enter_device_mode_on_this_thread()
        _ACTIVE = True


# ---------------------------------------------------------------------------
# Device helpers


def _names_accelerator(device: Any) -> bool:
    """True for anything that means a CUDA device: 'cuda', 'cuda:1', device('cuda'), 3."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    device = kwargs.get("device")
    map_device = device is not None and _names_accelerator(device)
    pinned = bool(kwargs.get("pin_memory"))
    if not (map_device or pinned):
        return kwargs
    kwargs = dict(kwargs)
    if map_device:
        kwargs["device"] = _CPU
    if pinned:
        kwargs["pin_memory"] = False
    return kwargs


# ---------------------------------------------------------------------------
# Torch function mode


def _called_from_megatron() -> bool:
    """Whether the code that made the intercepted call is megatron's.

    Only this module's and torch's dispatch frames are skipped: torch internals
    that call ``Tensor.type()`` on megatron's behalf keep seeing the true type.
    """
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name not in (__name__, "torch.overrides"):
            return name.startswith("megatron.")
        frame = frame.f_back
    return False


def _handle_to(mode, func, args, kwargs):
    if len(args) > 1 and _names_accelerator(args[1]):
        args = (args[0], _CPU) + tuple(args[2:])
    return func(*args, **_cpu_kwargs(kwargs))


def _handle_cuda(mode, func, args, kwargs):
    return args[0].to(_CPU, non_blocking=bool(kwargs.get("non_blocking", False)))


def _handle_pin_memory(mode, func, args, kwargs):
    return args[0]


def _handle_record_stream(mode, func, args, kwargs):
    return None


def _handle_type(mode, func, args, kwargs):
    if len(args) == 1 and not kwargs:
        name = func(*args)
        if (
            args[0].device.type == "cpu"
            and name.startswith("torch.")
            and not name.startswith("torch.cuda.")
            and _called_from_megatron()
        ):
            return "torch.cuda." + name[len("torch.") :]
        return name
    target = args[1] if len(args) > 1 else kwargs.get("dtype")
    if isinstance(target, str) and target.startswith("torch.cuda."):
        target = "torch." + target[len("torch.cuda.") :]
        kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
        return func(args[0], target, *args[2:], **kwargs)
    return func(*args, **kwargs)


_SIGNATURES: Dict[Callable, inspect.Signature] = {}


def _bind(func, args, kwargs) -> Dict[str, Any]:
    sig = _SIGNATURES.get(func)
    if sig is None:
        sig = _SIGNATURES[func] = inspect.signature(func)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, dict):
        return tuple(value.values())
    return tuple(value)


def _default_grads(outputs: tuple, grads) -> tuple:
    grads = _as_tuple(grads) or (None,) * len(outputs)
    if len(grads) != len(outputs):
        raise RuntimeError(
            f"got {len(grads)} gradients for {len(outputs)} tensors in backward()"
        )
    result = []
    for out, grad in zip(outputs, grads):
        if grad is None and out.requires_grad:
            if out.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            grad = torch.ones_like(out, memory_format=torch.preserve_format)
        result.append(grad)
    return tuple(result)


def _handle_backward(mode, func, args, kwargs):
    from torch.autograd import Variable

    arguments = _bind(func, args, kwargs)
    if func is torch.Tensor.backward:
        tensors, grads = (arguments["self"],), arguments["gradient"]
    else:
        if arguments.get("grad_variables") is not None:
            return func(*args, **kwargs)
        tensors, grads = _as_tuple(arguments["tensors"]), arguments["grad_tensors"]
    grads = _default_grads(tensors, grads)
    create_graph = bool(arguments["create_graph"])
    retain_graph = create_graph if arguments["retain_graph"] is None else arguments["retain_graph"]
    inputs = _as_tuple(arguments["inputs"])
    with mode:
        Variable._execution_engine.run_backward(
            tensors, grads, retain_graph, create_graph, inputs,
            allow_unreachable=True, accumulate_grad=True,
        )


def _handle_grad(mode, func, args, kwargs):
    from torch.autograd import Variable

    arguments = _bind(func, args, kwargs)
    if arguments.get("is_grads_batched"):
        return func(*args, **kwargs)
    outputs = _as_tuple(arguments["outputs"])
    inputs = _as_tuple(arguments["inputs"])
    grads = _default_grads(outputs, arguments["grad_outputs"])
    create_graph = bool(arguments["create_graph"])
    retain_graph = create_graph if arguments["retain_graph"] is None else arguments["retain_graph"]
    materialize = bool(arguments.get("materialize_grads"))
    allow_unused = materialize if arguments["allow_unused"] is None else arguments["allow_unused"]
    with mode:
        result = Variable._execution_engine.run_backward(
            outputs, grads, retain_graph, create_graph, inputs,
            allow_unused, accumulate_grad=False,
        )
    if materialize:
        result = tuple(
            torch.zeros_like(inp, requires_grad=create_graph) if g is None else g
            for g, inp in zip(result, inputs)
        )
    return tuple(result)


def _as_int_list(sizes):
    if sizes is None or isinstance(sizes, list):
        return sizes
    if isinstance(sizes, torch.Tensor):
        return [int(x) for x in sizes.tolist()]
    return [int(x) for x in sizes]  # numpy arrays, tuples


def _handle_all_to_all_single(mode, func, args, kwargs):
    """gloo accepts only int sequences as split sizes; megatron's alltoall token dispatcher
    passes them as tensors / numpy arrays (on GPU it hands NCCL host arrays)."""
    args = list(args)
    for index, name in ((2, "output_split_sizes"), (3, "input_split_sizes")):
        if len(args) > index:
            args[index] = _as_int_list(args[index])
        elif name in kwargs:
            kwargs = {**kwargs, name: _as_int_list(kwargs[name])}
    return func(*args, **kwargs)


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _handle_all_gather(mode, func, args, kwargs):
    """gloo's list all_gather needs equal sizes; megatron gathers uneven first dimensions (MoE
    token dispatch with expert tensor parallelism). Pad to the largest, gather, trim."""
    tensor_list, tensor = args[0], args[1]
    if all(t.shape == tensor.shape for t in tensor_list) or kwargs.get("async_op"):
        return func(*args, **kwargs)
    rows = max(t.shape[0] for t in tensor_list)
    buffers = [tensor.new_empty((rows, *tensor.shape[1:])) for _ in tensor_list]
    func(buffers, _padded(tensor, rows), *args[2:], **kwargs)
    for out, buf in zip(tensor_list, buffers):
        out.copy_(buf[: out.shape[0]])
    return None


def _handle_reduce_scatter(mode, func, args, kwargs):
    """The reduce-scatter twin of ``_handle_all_gather`` (uneven input chunks)."""
    output, input_list = args[0], args[1]
    if all(t.shape == output.shape for t in input_list) or kwargs.get("async_op"):
        return func(*args, **kwargs)
    rows = max(t.shape[0] for t in input_list)
    buffer = output.new_empty((rows, *output.shape[1:]))
    func(buffer, [_padded(t, rows) for t in input_list], *args[2:], **kwargs)
    output.copy_(buffer[: output.shape[0]])
    return None


def _build_handlers() -> Dict[Callable, Callable]:
    import torch.distributed as dist

    return {
        dist.all_gather: _handle_all_gather,
        dist.reduce_scatter: _handle_reduce_scatter,
        dist.all_to_all_single: _handle_all_to_all_single,
        torch.Tensor.to: _handle_to,
        torch.Tensor.cuda: _handle_cuda,
        torch.Tensor.pin_memory: _handle_pin_memory,
        torch.Tensor.record_stream: _handle_record_stream,
        torch.Tensor.type: _handle_type,
        torch.Tensor.backward: _handle_backward,
        torch.autograd.backward: _handle_backward,
        torch.autograd.grad: _handle_grad,
    }


_HANDLERS: Dict[Callable, Callable] = {}


class _CpuDeviceMode(TorchFunctionMode):
    """Maps CUDA placements in torch calls to CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(self, func, args, kwargs or {})
        if kwargs:
            return func(*args, **_cpu_kwargs(kwargs))
        return func(*args)


def _enter_device_mode_on_this_thread() -> None:
    if getattr(_THREAD_STATE, "mode", None) is None:
        mode = _CpuDeviceMode()
        mode.__enter__()
        _THREAD_STATE.mode = mode


# ---------------------------------------------------------------------------
# torch.cuda stand-ins


class _CpuEvent:
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

    def elapsed_time(self, end_event: "_CpuEvent") -> float:
        if self._time is None or end_event._time is None:
            raise RuntimeError("both events must be recorded before elapsed_time()")
        return (end_event._time - self._time) * 1000.0


class _CpuStream:
    """CPU stand-in for ``torch.cuda.Stream``: CPU work is already in program order."""

    cuda_stream = 0

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        self.device = _CPU
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Optional[_CpuEvent] = None) -> _CpuEvent:
        event = event if event is not None else _CpuEvent()
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> "_CpuStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_DEFAULT_STREAM = _CpuStream()


def _current_stream(device: Any = None) -> _CpuStream:
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


def _patch_torch_cuda() -> None:
    replacements = {
        "current_device": _current_device,
        "Stream": _CpuStream,
        "Event": _CpuEvent,
        "current_stream": _current_stream,
        "default_stream": _current_stream,
        "stream": _stream_context,
        "set_stream": _set_stream,
        "synchronize": _synchronize,
        "get_rng_state": _get_rng_state,
        "set_rng_state": _set_rng_state,
        "manual_seed": _manual_seed,
    }
    for name, replacement in replacements.items():
        setattr(torch.cuda, name, replacement)
    _HANDLERS.update(_build_handlers())


# ---------------------------------------------------------------------------
# megatron-core RNG hooks


def _megatron_get_rng_state(device: Any = "cuda", clone: bool = False,
                            graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _megatron_set_rng_state(new_state: Any, device: Any = -1, graph_safe: bool = False) -> None:
    if isinstance(new_state, torch.Generator):
        new_state = new_state.get_state()
    torch.set_rng_state(new_state)


class _DropAliasedRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_WARNING not in record.getMessage()


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _megatron_get_rng_state
    mp_random._set_cuda_rng_state = _megatron_set_rng_state
    logging.getLogger(mp_random.__name__).addFilter(_DropAliasedRngWarning())


# ---------------------------------------------------------------------------
# Threads


def _patch_thread_start() -> None:
    original = threading.Thread._bootstrap_inner

    def _bootstrap_inner(self):  # runs first thing in the new thread
        try:
            _enter_device_mode_on_this_thread()
        except Exception as exc:  # never keep a thread from starting
            warnings.warn(f"CPU device mode not entered in thread {self.name}: {exc}")
        return original(self)

    threading.Thread._bootstrap_inner = _bootstrap_inner
