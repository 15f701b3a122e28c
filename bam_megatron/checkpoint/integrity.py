"""Is a checkpoint directory whole? Per-file checksums and a structural check of the DCP index.

``checksums.json`` (written into every ``iter_*`` directory this project saves, before the
directory becomes visible under its final name) records each file's size and CRC-32::

    {"algorithm": "crc32", "files": {"__0_0.distcp": {"size": 123, "crc32": 456}, ...}}

CRC-32 (zlib) finds the damage that happens to files on disk and in transfer (truncation,
flipped bits, a file of another checkpoint) at about 2.5 GB/s per core; it is not a defence
against deliberate tampering. ``verify_files`` checks any subset of the files (the ranks of a
job split the work); ``check_structure`` needs no checksums: it checks that every data file the
DCP index names exists and holds the byte ranges the index points into. The opener
(``checkpoint/opener``) decides what to check when.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional, TypeVar

from bam_megatron.checkpoint.layout import CONFIG_FILE
from bam_megatron.errors import CheckpointError, one_line

MANIFEST = "checksums.json"
ALGORITHM = "crc32"
_BLOCK = 16 << 20
_MAX_THREADS = 8
_T = TypeVar("_T")


def file_checksum(path: str) -> Dict[str, int]:
    """``{"size": bytes, "crc32": value}`` of one file."""
    crc, size = 0, 0
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"size": size, "crc32": crc}


def _each_file(work: Callable[[str], _T], names: List[str]) -> List[_T]:
    """``work(name)`` for every name, the files read at once by a few threads (reading and
    ``zlib.crc32`` release the GIL: a checkpoint's few large files are checked in about 1/k of
    the time on k cores); results in the order of ``names``."""
    threads = min(len(names), os.cpu_count() or 1, _MAX_THREADS)
    if threads <= 1:
        return [work(n) for n in names]
    with ThreadPoolExecutor(threads, thread_name_prefix="checksum") as pool:
        return list(pool.map(work, names))


def checkpoint_files(ckpt_dir: str) -> List[str]:
    """The files of a checkpoint directory that the manifest covers (all but itself)."""
    return sorted(n for n in os.listdir(ckpt_dir) if n != MANIFEST and os.path.isfile(os.path.join(ckpt_dir, n)))


def checksum_files(ckpt_dir: str, names: Iterable[str]) -> Dict[str, Dict[str, int]]:
    """Checksums of ``names`` (files of ``ckpt_dir``), several files at once."""
    names = list(names)
    return dict(zip(names, _each_file(lambda n: file_checksum(os.path.join(ckpt_dir, n)), names)))


def write_manifest(ckpt_dir: str, entries: Dict[str, Dict[str, int]]) -> None:
    """Write ``checksums.json`` (fsynced) for the files in ``entries``."""
    path = os.path.join(ckpt_dir, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump({"algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_manifest(ckpt_dir: str) -> Optional[Dict[str, Dict[str, int]]]:
    """The recorded checksums, or None when the checkpoint has none (older or foreign).

    Raises:
        CheckpointError: the manifest exists but cannot be read.
    """
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("algorithm") != ALGORITHM or not isinstance(data.get("files"), dict):
            raise ValueError("unknown layout")
        return data["files"]
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path} is damaged ({one_line(exc)}); the checkpoint cannot be verified") from None


def verify_files(ckpt_dir: str, manifest: Dict[str, Dict[str, int]], names: Iterable[str]) -> List[str]:
    """Problems (one line each) of the files ``names`` against ``manifest``; empty when whole
    (several files checked at once)."""

    def problem(name: str) -> Optional[str]:
        path = os.path.join(ckpt_dir, name)
        want = manifest[name]
        if not os.path.isfile(path):
            return f"{path} is missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{path} has {size} bytes, {want['size']} were written (truncated or replaced)"
        if file_checksum(path)["crc32"] != want["crc32"]:
            return f"{path} does not match its checksum (its bytes changed after it was written)"
        return None

    return [p for p in _each_file(problem, list(names)) if p]


def check_structure(ckpt_dir: str, metadata) -> None:
    """Every data file the DCP index ``metadata`` (read by the opener) points into exists and is
    long enough.

    Raises:
        CheckpointError: one line naming the file and what is wrong.
    """
    if not os.path.isfile(os.path.join(ckpt_dir, CONFIG_FILE)):
        raise CheckpointError(f"{ckpt_dir} has no {CONFIG_FILE}: the checkpoint is incomplete")
    needed: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        size = os.path.getsize(path)
        if size < end:
            raise CheckpointError(f"{path} has {size} bytes but the index needs {end}: the file is truncated")


def problems_to_error(ckpt_dir: str, problems: List[str], hint: str = "") -> CheckpointError:
    """One ``CheckpointError`` line for a damaged checkpoint (the first problem, and a count)."""
    more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
    return CheckpointError(f"{problems[0]}{more}; the checkpoint {ckpt_dir} is damaged{hint}")
