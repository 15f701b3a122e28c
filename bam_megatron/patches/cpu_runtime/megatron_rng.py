"""megatron-core's RNG tracker on the CPU generator.

* ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``
  (megatron-core-private: the entry points ``CudaRNGStatesTracker.fork()`` and activation
  recomputation use) -> the CPU default generator's state. The originals read
  ``torch.cuda.default_generators``, which is empty without CUDA; on the CPU every random op
  (init, dropout) draws from the CPU default generator, so that is the one ``fork()`` has to
  swap and restore to be deterministic.
* the log record "CPU RNG state changed within GPU RNG context" of that module is filtered out:
  with the CUDA generator aliased to the CPU one, every random op inside ``fork()`` would
  trigger it although nothing is wrong.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from bam_megatron.patches.target import Check, Replacements

MODULE = "megatron.core.tensor_parallel.random"
RNG_WARNING = "CPU RNG state changed within GPU RNG context"


def _get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: Any, device: Any = -1, graph_safe: bool = False) -> None:
    if isinstance(new_state, torch.Generator):
        new_state = new_state.get_state()
    torch.set_rng_state(new_state)


class _DropAliasedRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return RNG_WARNING not in record.getMessage()


def check(c: Check) -> None:
    """The two entry points exist with parameters ours take, ``fork()`` goes through them, and the
    filtered message is still the module's."""
    c.accepts("megatron-core", f"{MODULE}._get_cuda_rng_state", _get_rng_state)
    c.accepts("megatron-core", f"{MODULE}._set_cuda_rng_state", _set_rng_state)
    c.params("megatron-core", f"{MODULE}._set_cuda_rng_state", "new_state", leading=True)
    c.source("megatron-core", f"{MODULE}.CudaRNGStatesTracker.fork", "_set_cuda_rng_state", "_get_cuda_rng_state")
    c.source("megatron-core", MODULE, RNG_WARNING)


def install(r: Replacements) -> Callable[[], None]:
    """Replace the entry points and filter the message; returns the filter's removal."""
    import importlib

    module = importlib.import_module(MODULE)
    r.set(module, "_get_cuda_rng_state", _get_rng_state)
    r.set(module, "_set_cuda_rng_state", _set_rng_state)
    logger = logging.getLogger(MODULE)
    drop = _DropAliasedRngWarning()
    logger.addFilter(drop)
    return lambda: logger.removeFilter(drop)
