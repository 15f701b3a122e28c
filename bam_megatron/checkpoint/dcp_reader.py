"""Reading regions of a torch_dist checkpoint's global tensors, without a process group.

Made from an opened checkpoint (``Checkpoint.reader()`` in ``checkpoint/opener``: verified, its
index read by the allow-listed unpickler), never from a bare path.

``CheckpointReader`` reads only the stored chunks that overlap a requested region (each whole,
then narrowed): a layer of an ``[L, ...]`` tensor costs about that layer when the checkpoint
stores layers as separate chunks, as megatron-core does. A region that is exactly one stored
chunk is loaded as it is, without a copy. ``layer_blocks`` finds the smallest layer ranges that
no stored chunk straddles (the unit of streaming for the checkpoint tools). It relies on torch
DCP's storage layer below the public API (``patches/dcp_storage.py``, checked when a reader is
made).
"""

from __future__ import annotations

import io
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from bam_megatron.checkpoint.keys import is_model_entry  # noqa: F401  (re-exported)
from bam_megatron.checkpoint.opener.unpickle import load_tensor
from bam_megatron.errors import CheckpointError
from bam_megatron.patches import dcp_storage


def shape_text(s: Iterable[int]) -> str:
    """``[2, 3]`` for a shape (error messages, tables)."""
    return "[" + ", ".join(str(int(x)) for x in s) + "]"


class _RegionPlanner(LoadPlanner):
    """Copies what ``FileSystemReader.read_data`` reads into caller-allocated tensors."""

    def __init__(self, targets: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor]):
        self.targets = targets
        self.filled: Dict[Tuple[str, Tuple[int, ...]], int] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        raise NotImplementedError

    def create_global_plan(self, global_plan):
        raise NotImplementedError

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"{read_item.dest_index.fqn} is not a tensor")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        index = (read_item.dest_index.fqn, tuple(read_item.dest_index.offset))
        t = self.targets[index]
        for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, int(o), int(n))
        self.filled[index] = self.filled.get(index, 0) + t.numel()
        return t

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class _FileSlice(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes at ``offset`` of an open file."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self._f, self._offset, self._length = f, offset, length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(b), self._length - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got


class CheckpointReader:
    """Reads regions of the global tensors of one torch_dist checkpoint (no process group).

    Only the stored chunks that overlap a region are read (each whole, then narrowed), so a
    layer of a ``[L, ...]`` tensor costs about that layer when the checkpoint stores layers as
    separate chunks (as megatron-core does). A region that is exactly one stored chunk is
    loaded as it is, without a copy.
    """

    def __init__(self, ckpt_dir: str, metadata: Metadata):
        dcp_storage.checked()
        self.ckpt_dir = ckpt_dir
        self._reader = FileSystemReader(ckpt_dir)
        self.metadata = metadata  # read by the opener (allow-listed unpickling)
        self._reader.set_up_storage_reader(self.metadata, True)
        self.bytes_read = 0

    def chunks(self, key: str) -> List[ChunkStorageMetadata]:
        return list(self.metadata.state_dict_metadata[key].chunks)

    def chunks_within(self, key: str, lo: int, hi: int) -> List[ChunkStorageMetadata]:
        """The stored chunks of the ``[L, ...]`` tensor ``key`` inside layers ``[lo, hi)`` (a
        range that no chunk straddles, see ``layer_blocks``), in storage order."""
        return [c for c in self.chunks(key) if lo <= int(c.offsets[0]) < hi]

    def _read_exact(self, key: str, offsets: Tuple[int, ...], sizes: Tuple[int, ...]) -> Optional[torch.Tensor]:
        md = self.metadata.state_dict_metadata[key]
        for idx, chunk in enumerate(md.chunks):
            if tuple(chunk.offsets) == offsets and tuple(chunk.sizes) == sizes:
                info = self.metadata.storage_data.get(MetadataIndex(key, chunk.offsets, idx))
                if info is None or getattr(info, "transform_descriptors", None):  # (torch >= 2.8)
                    return None
                with open(os.path.join(self.ckpt_dir, info.relative_path), "rb") as f:
                    t = load_tensor(_FileSlice(f, info.offset, info.length))
                if tuple(t.shape) != sizes or t.dtype != md.properties.dtype:
                    return None
                return t
        return None

    def read(self, regions: Sequence[Tuple[str, Sequence[int], Sequence[int]]]) -> List[torch.Tensor]:
        """``[(key, offsets, sizes), ...]`` -> one new tensor per region, of shape ``sizes``."""
        targets: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor] = {}
        items = []
        out: List[Optional[torch.Tensor]] = []
        for key, offsets, sizes in regions:
            offsets, sizes = tuple(int(x) for x in offsets), tuple(int(x) for x in sizes)
            t = self._read_exact(key, offsets, sizes)
            if t is not None:
                out.append(t)
                self.bytes_read += t.numel() * t.element_size()
                continue
            md = self.metadata.state_dict_metadata[key]
            t = torch.empty(sizes, dtype=md.properties.dtype)
            targets[(key, offsets)] = t
            out.append(t)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            items += create_read_items_for_chunk_list(key, md, [chunk])
        if targets:
            planner = _RegionPlanner(targets)
            self._reader.read_data(LoadPlan(items), planner).wait()
            for (key, offsets), t in targets.items():
                if planner.filled.get((key, offsets), 0) != t.numel():
                    raise CheckpointError(
                        f"{self.ckpt_dir}: the stored chunks of {key} do not cover offsets "
                        f"{shape_text(offsets)} size {shape_text(t.shape)}; the checkpoint is incomplete"
                    )
                self.bytes_read += t.numel() * t.element_size()
        return out

    def read_full(self, key: str) -> torch.Tensor:
        size = self.metadata.state_dict_metadata[key].size
        return self.read([(key, [0] * len(size), size)])[0]


def layer_blocks(num_layers: int, chunk_lists: Iterable[Sequence[ChunkStorageMetadata]]) -> List[Tuple[int, int]]:
    """Split ``[0, L)`` into the smallest layer ranges that no stored chunk straddles.

    ``chunk_lists``: the stored chunks of one ``[L, ...]`` tensor in every seed. A checkpoint that
    stores every layer as its own chunk (megatron-core's layout) gives ``[(0, 1), (1, 2), ...]``;
    one that stores the tensor whole gives ``[(0, L)]``.
    """
    cut = [True] * (num_layers + 1)
    for chunks in chunk_lists:
        for c in chunks:
            start, stop = int(c.offsets[0]), int(c.offsets[0]) + int(c.sizes[0])
            for b in range(start + 1, stop):
                cut[b] = False
    bounds = [b for b in range(num_layers + 1) if cut[b]]
    return list(zip(bounds[:-1], bounds[1:]))
