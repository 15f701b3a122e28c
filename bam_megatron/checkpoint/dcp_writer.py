"""Writing one torch_dist checkpoint in parts from a single process, with bounded memory.

``torch.distributed.checkpoint.save`` needs its whole state dict in memory, so ``PartWriter``
saves the output in parts of about ``part_bytes`` each (every part a small DCP checkpoint whose
entries are chunks ``c<k>`` of the real tensors, written and fsynced by background threads), and
``PartWriter.merge`` moves the parts' ``.distcp`` files into the output under unique names and
writes one DCP ``.metadata``: per real key its global shape and chunks (offsets, sizes), per
chunk its storage location. The result is the structure a multi-rank save produces, so
megatron-core's ``dist_checkpointing.load`` and torch's DCP reader read it like any other
checkpoint. The small file helpers (``write_file``, ``fsync_dir``) make the finishing steps
crash-safe. The merge relies on torch DCP's storage layer below the public API
(``patches/dcp_storage.py``, checked when a writer is made).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.storage import WriteResult

from bam_megatron.checkpoint.opener.unpickle import read_metadata_file
from bam_megatron.patches import dcp_storage


@dataclass
class PlannedTensor:
    """A tensor the writer must produce: key, global shape and dtype (the merge checks that the
    written chunks tile it)."""

    key: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor that owns exactly its bytes (``torch.save`` writes whole storages)."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


@dataclass
class _Chunk:
    key: str
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    part: int


class PartWriter:
    """Collects chunks of the output's global tensors; saves them in parts of about
    ``part_bytes`` (each a small DCP checkpoint under ``parts_dir``); ``merge`` turns the parts
    into one checkpoint."""

    MAX_QUEUED = 2

    def __init__(self, parts_dir: str, part_bytes: int, sync: bool = True, crc32: bool = False):
        dcp_storage.checked()
        self.parts_dir = parts_dir
        self.crc32 = crc32
        self.part_bytes = max(1, int(part_bytes))
        self.sync = sync
        self.chunks: Dict[str, _Chunk] = {}
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self.num_parts = 0
        self.bytes_written = 0
        self.seconds = 0.0
        self._pool: Optional[ThreadPoolExecutor] = None
        self._fsync_pool: Optional[ThreadPoolExecutor] = None
        self._queued: list = []  # futures of the parts handed to the writer thread, oldest first
        self._fsyncs: list = []

    def add(self, key: str, offsets: Sequence[int], tensor: torch.Tensor) -> None:
        """Queue ``tensor`` as the chunk of ``key`` at global ``offsets``."""
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.part_bytes:
            self.flush()
        cid = f"c{len(self.chunks)}"
        self.chunks[cid] = _Chunk(key, tuple(int(o) for o in offsets), tuple(tensor.shape), self.num_parts)
        self._pending[cid] = _compact(tensor.detach())
        self._pending_bytes += nbytes
        if self._pending_bytes >= self.part_bytes:
            self.flush()

    def _part_dir(self, part: int) -> str:
        return os.path.join(self.parts_dir, f"part_{part:05d}")

    def flush(self) -> None:
        """Queue the collected chunks as the next part; a background thread saves the parts in
        order, so that writing overlaps reading and mapping. At most ``MAX_QUEUED`` parts wait or
        are being written (the buffers hold at most ``MAX_QUEUED + 1`` parts). With ``sync``
        every part's files are then fsynced by a second thread (their data is in the page cache
        by then; no tensor is held for it)."""
        if not self._pending:
            return
        while len(self._queued) >= self.MAX_QUEUED:
            self._queued.pop(0).result()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upcycle-writer")
            self._fsync_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upcycle-fsync")
        self._queued.append(self._pool.submit(self._save_part, self._part_dir(self.num_parts), self._pending))
        self.bytes_written += self._pending_bytes
        self._pending = {}
        self._pending_bytes = 0
        self.num_parts += 1

    def _save_part(self, part_dir: str, tensors: Dict[str, torch.Tensor]) -> None:
        import torch.distributed.checkpoint as dcp

        start = time.perf_counter()
        writer = FileSystemWriter(part_dir, single_file_per_rank=True, sync_files=False, thread_count=1)
        with crc32_option(self.crc32):
            dcp.save(tensors, storage_writer=writer, no_dist=True)
        if self.sync:
            self._fsyncs.append(self._fsync_pool.submit(fsync_files, part_dir))
        self.seconds += time.perf_counter() - start

    def close(self) -> None:
        """Wait for the part being written and for every fsync (errors surface here); stop
        the threads."""
        try:
            while self._queued:
                self._queued.pop(0).result()
            for f in self._fsyncs:
                f.result()
        finally:
            self._queued = []
            self._fsyncs = []
            for pool in (self._pool, self._fsync_pool):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._pool = self._fsync_pool = None

    def merge(self, final_dir: str, plan: Dict[str, PlannedTensor]) -> None:
        """Move every part's data files into ``final_dir`` and write one ``.metadata`` indexing
        all chunks by their real keys and global offsets. Checks that the chunks of every
        planned tensor tile it exactly."""
        self.flush()
        self.close()
        start = time.perf_counter()
        os.makedirs(final_dir, exist_ok=True)
        per_key: Dict[str, List[Tuple[_Chunk, object, object]]] = {k: [] for k in plan}
        file_count = 0
        for part in range(self.num_parts):
            part_dir = self._part_dir(part)
            md = read_metadata_file(part_dir)
            renamed: Dict[str, str] = {}
            for index, info in md.storage_data.items():
                if info.relative_path not in renamed:
                    new_name = f"__0_{file_count}.distcp"
                    file_count += 1
                    os.replace(os.path.join(part_dir, info.relative_path), os.path.join(final_dir, new_name))
                    renamed[info.relative_path] = new_name
                chunk = self.chunks[index.fqn]
                if chunk.key not in per_key:
                    raise RuntimeError(f"internal error: chunk of unplanned tensor {chunk.key}")
                per_key[chunk.key].append(
                    (chunk, dataclasses.replace(info, relative_path=renamed[info.relative_path]), md.state_dict_metadata[index.fqn].properties)
                )
        state_dict_metadata = {}
        results = []
        for key, entries in per_key.items():
            planned = plan[key]
            if not entries:
                raise RuntimeError(f"internal error: no data written for {key}")
            entries.sort(key=lambda e: e[0].offsets)
            covered = 0
            chunks = []
            for idx, (chunk, info, _props) in enumerate(entries):
                if len(chunk.offsets) != len(planned.shape) or any(
                    o + s > g for o, s, g in zip(chunk.offsets, chunk.sizes, planned.shape)
                ):
                    raise RuntimeError(f"internal error: chunk {chunk} outside {key} {planned.shape}")
                covered += math.prod(chunk.sizes)
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes)))
                results.append(WriteResult(index=MetadataIndex(key, chunk.offsets, idx), size_in_bytes=info.length, storage_data=info))
            if covered != planned.numel:
                raise RuntimeError(f"internal error: chunks of {key} cover {covered} of {planned.numel} elements")
            state_dict_metadata[key] = TensorStorageMetadata(properties=entries[0][2], size=torch.Size(planned.shape), chunks=chunks)
        writer = FileSystemWriter(final_dir, single_file_per_rank=True, sync_files=self.sync)
        writer.set_up_storage_writer(True)
        writer.finish(Metadata(state_dict_metadata=state_dict_metadata), [results])
        self.seconds += time.perf_counter() - start


def write_file(path: str, data: bytes, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


@contextlib.contextmanager
def crc32_option(compute: bool):
    """``torch.save`` with or without the zip CRC-32 of every stored tensor.

    ``torch.load`` has not verified these checksums since PyTorch 1.4 (its zip reader is built
    with ``MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS``); skipping them (PyTorch's own
    ``compute_crc32`` option, torch >= 2.6) about doubles the write speed. Files written
    without them read back everywhere torch.load is used, megatron-core included; only
    external zip tools that check entries would object."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        config = None
    save_config = getattr(config, "save", None)
    if save_config is None or not hasattr(save_config, "compute_crc32"):
        yield
        return
    previous = save_config.compute_crc32
    save_config.compute_crc32 = compute
    try:
        yield
    finally:
        save_config.compute_crc32 = previous


def release_freed_buffers() -> None:
    """Serve allocations of 1 MiB and more with their own memory mappings (glibc ``mallopt``).

    glibc raises its mmap threshold after large frees, after which tensor buffers of up to
    32 MiB come from the heap and stay resident when freed; streaming many layer slices of that
    size then creeps the resident set up by hundreds of MiB. A fixed threshold returns each
    buffer to the system when it is freed. No effect where glibc is absent.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


def fsync_files(directory: str) -> None:
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
