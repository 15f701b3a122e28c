"""Saving a training checkpoint so that no sequence of kills leaves a damaged latest one.

Order of work (every rank takes part; rank 0 renames and writes the tracker):

1. rank 0 makes ``iter_N.tmp`` (a leftover one is removed) and checks the free space against the
   previous checkpoint's size;
2. ``dist_checkpointing.save`` writes into ``iter_N.tmp`` (the strategy of ``strategies.py``
   decides which rank writes which replicated tensor); a failure on any rank (disk full,
   read-only, quota) is one line for every rank, and ``iter_N.tmp`` is removed;
3. each rank checksums the files it wrote, rank 0 the rest, and writes ``checksums.json``;
4. rank 0 publishes: an existing ``iter_N`` (a re-save of the same iteration) is first renamed to
   ``iter_N.old-<random>``, then ``iter_N.tmp`` becomes ``iter_N``, then the tracker is replaced
   (temporary file + rename), then the old copy, the leftovers of interrupted saves and
   checkpoints beyond ``--keep-last-checkpoints`` are deleted.

``save_checkpoint`` runs the four steps in turn; ``async_save.py`` runs step 2's writes and step
3's checksums in a helper process and steps 3-4 when it is done (``--async-save``). A kill between
the two renames of step 4 leaves the tracker naming a missing ``iter_N`` next to two complete
copies; the opener (``checkpoint/opener/locate.py``) finds and uses one of them. A kill at any
other moment leaves the tracker naming the previous complete checkpoint and at most an
``iter_*.tmp`` folder, which the next publish removes.
"""

from __future__ import annotations

import os
import secrets
import shutil
from typing import Dict, List, Optional

import torch.distributed as dist

from bam_megatron.checkpoint import integrity
from bam_megatron.checkpoint import optimizer as optimizer_state
from bam_megatron.checkpoint.layout import FORMAT_VERSION, TRACKER, iteration_dir, list_iterations
from bam_megatron.checkpoint.rng import parallel_layout, rng_sharded_object
from bam_megatron.checkpoint.weights import model_sharded_state_dict
from bam_megatron.errors import DISK_ERRNOS, CheckpointError, disk_error, human_bytes, one_line
from bam_megatron.parallel.distributed import first_problem


def directory_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total




def _previous(root: str) -> Optional[str]:
    iters = list_iterations(root)
    return iteration_dir(root, iters[-1]) if iters else None


def _prepare_tmp(root: str, tmp: str) -> Optional[str]:
    """Rank 0: a fresh ``tmp`` with room for a checkpoint the size of the previous one."""
    try:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    except OSError as exc:
        return f"cannot write checkpoints into --save {root}: {DISK_ERRNOS.get(exc.errno, one_line(exc))}"
    previous = _previous(root)
    if previous:
        need, free = directory_bytes(previous), shutil.disk_usage(root).free
        if free < need:
            shutil.rmtree(tmp, ignore_errors=True)
            return (f"not enough free space in --save {root} for a checkpoint ({human_bytes(need)} needed, "
                    f"{human_bytes(free)} free); the previous checkpoint {previous} is intact; free space or "
                    "choose another --save")
    return None


def _sharded_state(state, model, optimizer, scheduler, args_dict: dict) -> dict:
    model_sd = model_sharded_state_dict(model)
    sharded = {
        "model": model_sd,
        "rng_state": rng_sharded_object(),
        "args": args_dict,
        "layout": parallel_layout(),
        "iteration": state.iteration,
        "consumed_train_samples": state.consumed_train_samples,
        "skipped_iterations": state.skipped_iterations,
        "format_version": FORMAT_VERSION,
    }
    if getattr(state, "upcycling", None):
        sharded["upcycling"] = state.upcycling
    if optimizer is not None:
        sharded["optimizer"] = optimizer_state.sharded_state_dict(optimizer, model_sd, is_loading=False)
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    return sharded


def _own_bytes(t):
    """A contiguous CPU view ``t`` as a tensor over exactly its own bytes, sharing the memory (a
    storage made from ``t``'s bytes through numpy): ``torch.save`` writes a tensor's whole
    storage, so megatron-core clones views before writing them; this one it writes as it is."""
    import torch

    if t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return t
    if t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    raw = t.detach().reshape(-1).view(torch.uint8)
    return torch.from_numpy(raw.numpy()).view(t.dtype).view(t.shape)


def without_view_copies(sharded: dict) -> dict:
    """``sharded`` with megatron-core's factories applied and every contiguous CPU view among its
    tensors (e.g. the SwiGLU ``linear_fc1`` halves and their optimizer state: about half of a
    SwiGLU model's state) replaced by ``_own_bytes``: no copy of them when the save starts, the
    same bytes on disk. (A background save's forked helper sees the memory as it was at the
    fork; on a GPU the host copy is made tensor by tensor anyway.)"""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded)
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor) and value.data is not None:
            value.data = _own_bytes(value.data)
    return sharded


def failure(exc: BaseException, tmp: str):
    """``(problem, bug)`` of a save that raised ``exc`` on this rank: a disk condition is a
    one-line problem and no bug; anything else is a problem line and the bug to re-raise."""
    what = disk_error(exc)
    if what:
        return f"{what} while writing {tmp}", None
    return f"saving failed on rank {dist.get_rank()} ({one_line(exc)})", exc


def settle(problem: Optional[str], bug: Optional[BaseException], tmp: str, root: str) -> None:
    """Collective: when any rank has a problem, every rank stops with the same line (a disk
    condition of any rank first: one line, no traceback; the rank with a bug keeps its traceback)
    and ``tmp`` is removed.

    Raises:
        CheckpointError: the disk refused the checkpoint; the line names the intact previous one.
    """
    reports: List[Optional[tuple]] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (problem, bug is None) if problem else None)
    found = [r for r in reports if r]
    if not found:
        return
    disk = [p for p, is_disk in found if is_disk]
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if bug is not None and not disk:
        raise bug  # not a disk condition: keep its traceback
    previous = _previous(root)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no checkpoint was written"
    error = CheckpointError(f"{(disk or [p for p, _ in found])[0]}; {kept}; free space or choose another --save")
    error.same_on_every_rank = True
    raise error


def _write(sharded: dict, tmp: str, root: str, strategy=None) -> None:
    """``dist_checkpointing.save`` into ``tmp``; a disk failure on any rank -> one line on all."""
    from megatron.core import dist_checkpointing

    from bam_megatron.patches import megatron_save_workers

    problem, bug = None, None
    try:
        with megatron_save_workers.saving():
            dist_checkpointing.save(sharded, tmp, sharded_strategy=strategy)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch DCP's CheckpointException is a BaseException
        problem, bug = failure(exc, tmp)
    settle(problem, bug, tmp, root)


def own_files(tmp: str) -> List[str]:
    """The files of ``tmp`` this rank wrote (``__<rank>_*``)."""
    prefix = f"__{dist.get_rank()}_"
    return [n for n in integrity.checkpoint_files(tmp) if n.startswith(prefix)]


def write_checksums(tmp: str, mine: Optional[Dict[str, Dict[str, int]]] = None) -> None:
    """Collective: every rank checksums the files it wrote (or passes ``mine``, computed
    already), rank 0 also the rest; rank 0 writes the manifest."""
    if mine is None:
        mine = integrity.checksum_files(tmp, own_files(tmp))
    gathered: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        merged: Dict[str, Dict[str, int]] = {}
        for part in gathered:
            merged.update(part or {})
        names = integrity.checkpoint_files(tmp)
        merged.update(integrity.checksum_files(tmp, [n for n in names if n not in merged]))
        integrity.write_manifest(tmp, merged)


def _publish(root: str, tmp: str, final: str, iteration: int, keep_last: Optional[int]) -> None:
    """Rank 0: move ``tmp`` into place (an older copy of the same iteration aside first), then the
    tracker, then delete what is no longer needed."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{secrets.token_hex(4)}"
        os.replace(final, old)
    os.replace(tmp, final)
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _remove_leftovers(root)
    if keep_last:
        for it in list_iterations(root)[:-keep_last]:
            if it != iteration:
                shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def _remove_leftovers(root: str) -> None:
    """Folders that interrupted saves left (``iter_*.tmp``, ``iter_*.old-*``): once the tracker
    names a newer complete checkpoint nothing needs them."""
    for name in os.listdir(root):
        if name.startswith("iter_") and (name.endswith(".tmp") or ".old-" in name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def begin(root: str, state, model, optimizer, scheduler, args_dict: dict):
    """Collective steps before the write: ``(final, tmp, sharded state)`` with ``tmp`` made
    fresh and the free space checked.

    Raises:
        CheckpointError: ``--save`` cannot take the checkpoint (every rank; nothing written).
    """
    final = iteration_dir(root, state.iteration)
    tmp = final + ".tmp"
    problem = _prepare_tmp(root, tmp) if dist.get_rank() == 0 else None
    problem = first_problem(problem)
    if problem:
        raise CheckpointError(problem)
    return final, tmp, without_view_copies(_sharded_state(state, model, optimizer, scheduler, args_dict))


def finish(root: str, tmp: str, final: str, iteration: int, keep_last: Optional[int],
           checksums: Optional[bool], mine: Optional[dict] = None) -> None:
    """Collective steps after the write: checksums (``mine``: this rank's, when computed
    already), then rank 0 publishes."""
    if checksums:
        write_checksums(tmp, mine)
    dist.barrier()
    if dist.get_rank() == 0:
        _publish(root, tmp, final, iteration, keep_last)
    dist.barrier()


def save_checkpoint(root: str, state, model, optimizer, scheduler, args_dict: dict,
                    keep_last: Optional[int] = None, checksums: bool = True, strategy=None) -> str:
    """Write ``root/iter_<iteration>`` (see the module docstring); returns the directory.
    ``strategy``: megatron-core's save strategy (``strategies.save_strategy``; None: its default).

    Raises:
        CheckpointError: the disk refused the checkpoint (every rank; nothing was published).
    """
    final, tmp, sharded = begin(root, state, model, optimizer, scheduler, args_dict)
    _write(sharded, tmp, root, strategy)
    finish(root, tmp, final, state.iteration, keep_last, checksums)
    return final
