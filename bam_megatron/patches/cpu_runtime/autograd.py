"""Backward passes run under the CPU device mode.

torch removes a function mode from its thread's stack while the mode's handler runs, so a
backward pass started by ``Tensor.backward``, ``torch.autograd.backward`` or
``torch.autograd.grad`` would run without the CPU mapping: DDP's grad hooks, custom autograd
functions and activation recomputation create CUDA tensors there. Calling the public function
again with the mode re-entered would hand the call back to the mode (it is a torch function
itself), so the handlers below bind the public signature and start the autograd engine
directly (``Variable._execution_engine.run_backward``: torch-private, the call the public
functions make) with the mode re-entered. ``grad_variables`` (deprecated) and batched grads go
to torch unchanged. The engine runs CPU backward passes on the calling thread.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict

import torch

from bam_megatron.patches.target import Check

_SIGNATURES: Dict[Callable, inspect.Signature] = {}
_PARAMETERS = {
    "torch.Tensor.backward": ("self", "gradient", "retain_graph", "create_graph", "inputs"),
    "torch.autograd.backward": ("tensors", "grad_tensors", "retain_graph", "create_graph", "inputs"),
    "torch.autograd.grad": ("outputs", "inputs", "grad_outputs", "retain_graph", "create_graph",
                            "allow_unused", "is_grads_batched", "materialize_grads"),
}


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
        raise RuntimeError(f"got {len(grads)} gradients for {len(outputs)} tensors in backward()")
    result = []
    for out, grad in zip(outputs, grads):
        if grad is None and out.requires_grad:
            if out.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            grad = torch.ones_like(out, memory_format=torch.preserve_format)
        result.append(grad)
    return tuple(result)


def _engine():
    from torch.autograd import Variable

    return Variable._execution_engine


def _handle_backward(mode, func, args, kwargs):
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
        _engine().run_backward(
            tensors, grads, retain_graph, create_graph, inputs,
            allow_unreachable=True, accumulate_grad=True,
        )


def _handle_grad(mode, func, args, kwargs):
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
        result = _engine().run_backward(
            outputs, grads, retain_graph, create_graph, inputs,
            allow_unused, accumulate_grad=False,
        )
    if materialize:
        result = tuple(
            torch.zeros_like(inp, requires_grad=create_graph) if g is None else g
            for g, inp in zip(result, inputs)
        )
    return tuple(result)


def handlers() -> Dict[Callable, Callable]:
    return {
        torch.Tensor.backward: _handle_backward,
        torch.autograd.backward: _handle_backward,
        torch.autograd.grad: _handle_grad,
    }


def check(c: Check) -> None:
    """The public functions take the parameters the handlers bind; the engine entry point exists."""
    for path, names in _PARAMETERS.items():
        c.params("torch", path, *names)
    c.has("torch", "torch.autograd.Variable._execution_engine.run_backward")
