"""Run a test function in N local worker processes (gloo on CPU, one GPU each with CUDA).

    results = run_distributed(fn, 2, arg, key=value)   # [fn(0, 2, ...), fn(1, 2, ...)]

Workers are not daemonic: megatron-core's checkpoint writer starts processes of its own.
``fn`` must be importable by the spawned workers (a module-level function of a
test module).  Each worker gets the torchrun environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and calls ``fn(rank, world_size, *args,
**kwargs)``; ``fn`` sets up the process group itself (``init_distributed()``).
Return values travel back pickled, by file.  A failing worker raises
``WorkerFailed`` with that worker's traceback; a run that does not finish
within ``timeout_s`` (e.g. a hung collective) raises ``TimeoutError``.  Either
way the other workers are killed.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp

__all__ = ["run_distributed", "WorkerFailed"]


class WorkerFailed(RuntimeError):
    """A worker process raised or died."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write(path: str, payload: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(payload, f)
    os.replace(tmp, path)


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable,
            args: tuple, kwargs: dict) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        result = fn(rank, world_size, *args, **kwargs)
        _write(path, ("ok", result))
    except BaseException:  # report everything, including SystemExit / KeyboardInterrupt
        _write(path, ("error", traceback.format_exc()))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 120.0,
                    **kwargs: Any) -> List[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` processes.

    Returns the per-rank results, ordered by rank.
    """
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="dist_harness_") as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, out_dir, fn, args, kwargs),
                        name=f"dist-worker-{r}")
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            results = _collect(procs, out_dir, timeout_s, getattr(fn, "__name__", repr(fn)))
        except BaseException:
            for p in procs:
                p.kill()
            raise
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
        return results


def _collect(procs: list, out_dir: str, timeout_s: float, name: str) -> List[Any]:
    """Wait for every worker's result; raise on the first failure or on timeout."""
    deadline = time.monotonic() + timeout_s
    results: dict = {}
    while len(results) < len(procs):
        for rank, proc in enumerate(procs):
            if rank in results:
                continue
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    status, payload = pickle.load(f)
                if status == "error":
                    raise WorkerFailed(f"{name}: rank {rank} raised:\n{payload}")
                results[rank] = payload
            elif proc.exitcode is not None and not os.path.exists(path):
                raise WorkerFailed(
                    f"{name}: rank {rank} died with exit code {proc.exitcode} without a result"
                )
        if len(results) < len(procs):
            if time.monotonic() > deadline:
                missing = sorted(set(range(len(procs))) - set(results))
                raise TimeoutError(
                    f"{name}: ranks {missing} did not finish within {timeout_s:.0f} s "
                    f"(hung collective?)"
                )
            time.sleep(0.02)
    return [results[rank] for rank in range(len(procs))]
