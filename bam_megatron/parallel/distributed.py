"""Process-group and model-parallel setup for megatron-core.

``init_distributed()`` reads the torchrun environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT; SLURM jobs launch through torchrun) or,
when it is absent, runs as a single process on a free localhost port.  With a
GPU it uses NCCL on ``cuda:LOCAL_RANK``; without one it uses gloo. The device itself is chosen
by ``bam_megatron.parallel.device`` (the one device policy). For the run, from
``init_distributed`` to ``destroy_distributed``, it holds the run's patches
(``bam_megatron.patches.run``: the CPU runtime without a GPU, and the megatron-core fixes);
``destroy_distributed`` leaves them, so nothing of them outlives the run. A rank started by
torchrun dies with the torchrun agent (``bam_megatron.parallel.lifetime.die_with_launcher``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from bam_megatron.errors import LayoutError
from bam_megatron.parallel.device import get_device, release_device, select_device
from bam_megatron.parallel.lifetime import die_with_launcher
from bam_megatron.parallel.sizes import validate_parallel_layout

__all__ = [
    "DistributedInfo",
    "init_distributed",
    "destroy_distributed",
    "first_problem",
    "free_port",
    "seed_everything",
    "get_device",
    "validate_parallel_layout",
]


@dataclass(frozen=True)
class DistributedInfo:
    """What ``init_distributed()`` set up for this process."""

    device: torch.device
    backend: str
    rank: int
    world_size: int
    local_rank: int


_INFO: Optional[DistributedInfo] = None
_OWNS_PROCESS_GROUP = False
_RUN_PATCHES: Optional[contextlib.ExitStack] = None


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise LayoutError(f"environment variable {name}={value!r} is not an integer") from None


def _launch_env() -> Tuple[bool, int, int, int]:
    """``(launched, rank, world_size, local_rank)`` from the torchrun environment (or one
    process when it is absent)."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched:
        return False, 0, 1, 0
    rank = _env_int("RANK", 0)
    return True, rank, _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", rank)


def _init_process_group(launched: bool, backend: str, rank: int, world_size: int, timeout_minutes: int) -> None:
    """Create the default process group (env:// under torchrun, a free localhost port alone)."""
    global _OWNS_PROCESS_GROUP
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise RuntimeError(
                f"torch.distributed is already initialised with backend {dist.get_backend()}, "
                f"but this machine needs {backend}"
            )
        return
    if launched:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise LayoutError(
                "RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; launch with "
                "torchrun or export both"
            )
        init_method = "env://"
    else:
        init_method = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    _OWNS_PROCESS_GROUP = True


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch and megatron-core's model-parallel RNG tracker."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    seed: int = 1234,
    timeout_minutes: int = 10,
) -> DistributedInfo:
    """Initialise torch.distributed and megatron-core's model-parallel groups, then seed.

    Every rank is seeded with the same ``seed``: data-parallel replicas start
    identical, CPU-initialised (``use_cpu_initialization=True``) dense master
    weights are the same as in a 1-process run, and megatron's RNG tracker gives
    each tensor-parallel rank its own stream for sharded init and dropout. FFN
    experts are drawn per expert-parallel rank (megatron-core's expert RNG
    stream), so a fresh model at EP > 1 differs from a 1-process one: start
    layout comparisons from a checkpoint.
    """
    global _INFO, _RUN_PATCHES
    if _INFO is not None:
        raise RuntimeError("init_distributed() was already called; call destroy_distributed() first")
    launched, rank, world_size, local_rank = _launch_env()
    if launched:
        die_with_launcher()
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    # Pure arithmetic first: a bad layout fails before any import or process-group work.
    validate_parallel_layout(
        world_size,
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        expert_model_parallel_size,
        expert_tensor_parallel_size,
    )
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron model parallelism is already initialised; destroy it first")
    device, backend = select_device(local_rank)
    from bam_megatron.patches.run import run_patches

    held = contextlib.ExitStack()  # what destroy_distributed() undoes, last entered first
    held.callback(release_device)
    try:
        held.enter_context(run_patches(on_cpu=device.type == "cpu"))
        _init_process_group(launched, backend, rank, world_size, timeout_minutes)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
        seed_everything(seed)
    except BaseException:
        held.close()
        raise
    _RUN_PATCHES = held
    _INFO = DistributedInfo(
        device=device, backend=backend, rank=rank, world_size=world_size, local_rank=local_rank
    )
    return _INFO


def first_problem(problem: Optional[str]) -> Optional[str]:
    """Collective: the first rank's problem (a one-line message, or None) on every rank, so that
    all ranks stop together with the same message."""
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the process group this module created, then leave
    the run's patches (idempotent)."""
    global _INFO, _OWNS_PROCESS_GROUP, _RUN_PATCHES
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
    _INFO = None
    held, _RUN_PATCHES = _RUN_PATCHES, None
    if held is not None:
        held.close()
    release_device()
