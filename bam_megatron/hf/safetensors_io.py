"""Reading and writing Hugging Face safetensors folders one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and
``data_offsets`` into the data region; ``__metadata__``) and the raw little-endian bytes. A
folder holds one ``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` indexed by
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file).

``SafetensorsFolder`` reads single tensors with plain ``readinto`` calls into fresh buffers (no
memory map, so nothing stays resident after a tensor is dropped). ``SafetensorsWriter`` takes
the whole plan (names, shapes, dtypes) first, writes every shard's header, then each tensor's
bytes at its planned offset in whatever order the tensors come, from a background thread:
memory holds the tensors waiting to be written (at most ``MAX_PENDING`` bytes) and no more.
"""

from __future__ import annotations

import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from bam_megatron.errors import HFError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024**2


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``file``, absolute byte range ``[start, end)``."""

    name: str
    file: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> Dict[str, TensorInfo]:
    """The tensors of one safetensors file (its header only).

    Raises:
        HFError: the file is not safetensors or is truncated.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if not 0 < length <= min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {length}")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise HFError(f"{path} is not a readable safetensors file ({exc}); the download is damaged") from None
    base = 8 + length
    out: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise HFError(f"{path}: tensor {name} has dtype {entry.get('dtype')}, which these tools do not read")
        start, end = (base + int(o) for o in entry["data_offsets"])
        shape = tuple(int(x) for x in entry["shape"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end > size or end - start != math.prod(shape) * itemsize:
            raise HFError(f"{path}: tensor {name} lies outside the file or has the wrong size; the download is damaged")
        out[name] = TensorInfo(name, path, dtype, shape, start, end)
    return out


class SafetensorsFolder:
    """The weights of a Hugging Face model folder: one or several safetensors files."""

    def __init__(self, folder: str):
        self.folder = folder
        self.tensors: Dict[str, TensorInfo] = {}
        self.bytes_read = 0
        self._files: Dict[str, object] = {}
        for path in self._weight_files():
            for name, info in read_header(path).items():
                if name in self.tensors:
                    raise HFError(f"{folder}: tensor {name} is stored twice ({self.tensors[name].file} and {path})")
                self.tensors[name] = info

    def _weight_files(self) -> List[str]:
        index = os.path.join(self.folder, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise HFError(f"{index} is not a safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.isfile(os.path.join(self.folder, name)):
                    raise HFError(f"{index} names {name}, which is missing from {self.folder}; the download is incomplete")
            return [os.path.join(self.folder, n) for n in files]
        files = sorted(n for n in os.listdir(self.folder) if n.endswith(".safetensors"))
        if not files:
            other = sorted(n for n in os.listdir(self.folder) if n.endswith((".bin", ".pt", ".pth")))
            hint = f" (it has {other[0]}: save the model with safe_serialization, the transformers default)" if other else ""
            raise HFError(f"{self.folder} holds no *.safetensors weights{hint}")
        return [os.path.join(self.folder, n) for n in files]

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Tensor ``name`` in fresh memory (cast to ``dtype`` if given)."""
        info = self.tensors[name]
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb", buffering=0)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        f.seek(info.start)
        view, done = memoryview(buf.numpy()), 0
        while done < info.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise HFError(f"{info.file} ends inside tensor {name}; the download is damaged")
            done += got
        self.bytes_read += info.nbytes
        t = buf.view(info.dtype).reshape(info.shape)
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


@dataclass
class PlannedEntry:
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _header_bytes(entries: Sequence[PlannedEntry]) -> Tuple[bytes, Dict[str, int]]:
    header, offsets, pos = {"__metadata__": {"format": "pt"}}, {}, 0
    for e in entries:
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        offsets[e.name] = pos
        pos += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class SafetensorsWriter:
    """Writes a planned set of tensors into shards of about ``shard_bytes`` under ``folder``.

    ``write(name, tensor)`` hands a tensor to a background thread that puts its bytes at the
    planned offset (any order; at most ``MAX_PENDING`` bytes wait, so reading the next tensors
    overlaps writing these); ``close`` waits for them, checks that every planned tensor was
    written, fsyncs the files (with ``sync``) and writes the index when there are several shards.
    Errors of the thread surface at the next ``write`` or at ``close``.
    """

    MAX_PENDING = 256 * 1024**2

    def __init__(self, folder: str, plan: Sequence[PlannedEntry], shard_bytes: int, sync: bool = True):
        self.folder, self.sync = folder, sync
        self.bytes_written = 0
        shards: List[List[PlannedEntry]] = [[]]
        size = 0
        for e in plan:
            if shards[-1] and size + e.nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += e.nbytes
        n = len(shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where: Dict[str, Tuple[int, int, PlannedEntry]] = {}
        self._left = [len(s) for s in shards]
        self._written: set = set()
        self._handles: Dict[int, object] = {}
        self._pending: List[Tuple[object, int]] = []  # (future, bytes), oldest first
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        self.total_size = sum(e.nbytes for e in plan)
        for i, entries in enumerate(shards):
            head, offsets = _header_bytes(entries)
            with open(os.path.join(folder, self.files[i]), "wb") as f:
                f.write(head)
                f.truncate(len(head) + sum(e.nbytes for e in entries))
            for e in entries:
                self._where[e.name] = (i, len(head) + offsets[e.name], e)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, offset, entry = self._where[name]
        if name in self._written:
            raise RuntimeError(f"internal error: {name} written twice")
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise RuntimeError(f"internal error: {name} is {tuple(tensor.shape)} {tensor.dtype}, planned {entry.shape} {entry.dtype}")
        self._written.add(name)
        while self._pending and sum(b for _, b in self._pending) + entry.nbytes > self.MAX_PENDING:
            self._pending.pop(0)[0].result()
        data = tensor.detach().contiguous()
        self._pending.append((self._pool.submit(self._write_bytes, shard, offset, data), entry.nbytes))

    def _write_bytes(self, shard: int, offset: int, tensor: torch.Tensor) -> None:
        f = self._handles.get(shard)
        if f is None:
            f = self._handles[shard] = open(os.path.join(self.folder, self.files[shard]), "r+b", buffering=0)
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        f.seek(offset)
        done = 0
        while done < len(data):
            done += f.write(data[done:])
        self.bytes_written += len(data)
        self._left[shard] -= 1
        if self._left[shard] == 0:
            self._close_shard(shard)

    def _close_shard(self, shard: int) -> None:
        f = self._handles.pop(shard)
        if self.sync:
            os.fsync(f.fileno())
        f.close()

    def close(self) -> None:
        """Wait for the thread; check completeness; write the index of a sharded model."""
        try:
            while self._pending:
                self._pending.pop(0)[0].result()
        finally:
            self._pool.shutdown(wait=True)
            for shard in list(self._handles):
                self._handles.pop(shard).close()
        missing = [name for name in self._where if name not in self._written]
        if missing:
            raise RuntimeError(f"internal error: {len(missing)} planned tensors were not written (first: {missing[0]})")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: self.files[shard] for name, (shard, _, _) in self._where.items()},
            }
            with open(os.path.join(self.folder, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
