"""Checksums of an opened checkpoint, checked before its contents are used.

Two stages, both against the checkpoint's ``checksums.json`` (``checkpoint/integrity.py``):

1. ``verify_index``: the small files the opener itself reads (``.metadata``, ``common.pt``,
   ``metadata.json``), before it unpickles them;
2. ``ensure_verified``: the tensor data (``*.distcp``), before any loader reads it — at once in one
   process (the tools), or spread over the ranks of a job and agreed collectively (training,
   generation and evaluation under torchrun: each rank checks its share, every rank learns the
   first problem).

A mismatch is a ``CheckpointError`` naming the first damaged file; nothing has been read into a
model or written anywhere by then.
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional

from bam_megatron.checkpoint import integrity
from bam_megatron.checkpoint.layout import COMMON_FILE, CONFIG_FILE, DCP_METADATA_FILE
from bam_megatron.checkpoint.opener.record import Checkpoint
from bam_megatron.errors import CheckpointError

INDEX_FILES = (DCP_METADATA_FILE, COMMON_FILE, CONFIG_FILE)
PROGRESS_BYTES = 1 << 30  # checkpoints at least this large report per file (at most every 2 s)
HINT = "; restore the file or use an earlier checkpoint"


def verify_index(ckpt_dir: str, manifest: dict) -> None:
    """The index files recorded in ``manifest`` match their checksums."""
    problems = integrity.verify_files(ckpt_dir, manifest, [n for n in INDEX_FILES if n in manifest])
    if problems:
        raise integrity.problems_to_error(ckpt_dir, problems, HINT)


def _data_files(ckpt: Checkpoint) -> List[str]:
    return [n for n in sorted(ckpt.manifest or {}) if n not in INDEX_FILES]


def verify_data(ckpt: Checkpoint, progress: Optional[Callable[[str], None]] = None) -> None:
    """Every data file of ``ckpt`` against its checksum, in this process (``progress``: a line
    per file for large checkpoints)."""
    v = ckpt.verification
    if v.data != "pending":
        return
    start, names = time.perf_counter(), _data_files(ckpt)
    total = sum(ckpt.manifest[n]["size"] for n in names)
    done, last = 0, 0.0
    report = progress if progress and total >= PROGRESS_BYTES else None
    for i, name in enumerate(names):
        problems = integrity.verify_files(ckpt.dir, ckpt.manifest, [name])
        if problems:
            raise integrity.problems_to_error(ckpt.dir, problems, HINT)
        done += ckpt.manifest[name]["size"]
        now = time.perf_counter()
        if report and (now - last >= 2.0 or i == len(names) - 1):
            report(f"[verify] {done / 2**30:.2f} / {total / 2**30:.2f} GiB  {name}")
            last = now
    _done(ckpt, len(names), total, time.perf_counter() - start)


def _done(ckpt: Checkpoint, files: int, size: int, seconds: float) -> None:
    v = ckpt.verification
    v.data, v.files, v.bytes, v.seconds = "verified", files + len([n for n in INDEX_FILES if n in ckpt.manifest]), size, seconds


def verify_collective(ckpt: Checkpoint) -> None:
    """``verify_data`` spread over the ranks of the default process group: every rank checks its
    share; every rank raises the same error when any file is damaged."""
    import torch.distributed as dist

    v = ckpt.verification
    if v.data != "pending":
        return
    start, names = time.perf_counter(), _data_files(ckpt)
    mine = names[dist.get_rank()::dist.get_world_size()]
    problems = integrity.verify_files(ckpt.dir, ckpt.manifest, mine)
    gathered: List[Optional[list]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    found = [p for part in gathered for p in (part or [])]
    if found:
        raise integrity.problems_to_error(ckpt.dir, found, HINT)
    _done(ckpt, len(names), sum(ckpt.manifest[n]["size"] for n in names), time.perf_counter() - start)


def ensure_verified(ckpt: Checkpoint, progress: Optional[Callable[[str], None]] = None) -> None:
    """Before tensor data is read: the data files are verified (collectively when a process group
    of more than one rank exists). A no-op when done, not asked for or not recorded.

    Raises:
        CheckpointError: a damaged file (or the checkpoint was opened as "not read").
    """
    v = ckpt.verification
    if v.data == "not read":
        raise CheckpointError(f"internal error: {ckpt.dir} was opened without reading tensors")
    if v.data != "pending":
        return
    try:
        import torch.distributed as dist

        group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    except ImportError:
        group = False
    if group:
        verify_collective(ckpt)
    else:
        verify_data(ckpt, progress)
