"""The Mix phase on disk: N dense torch_dist checkpoints -> one BAM checkpoint, streamed.

``upcycle(seed_paths, output, UpcycleOptions(...))`` reads the seeds (checkpoints of
``pretrain_bam.py`` or Megatron-LM GPT torch_dist checkpoints, local or Transformer-Engine layer
names) one layer at a time, applies the mapping of ``bam_megatron/upcycling.py`` (``tensor_rule``)
and writes one torch_dist checkpoint in Megatron-LM's layout::

    <output>/latest_checkpointed_iteration.txt      "0"
    <output>/iter_0000000/                          *.distcp, .metadata, common.pt, metadata.json

whose common state records the model arguments (``args``; ``pretrain_bam.py --load <output>
--use-checkpoint-args`` rebuilds the BAM model from them), iteration 0, and no optimizer, RNG
or ``layout`` entry. It loads at any TP / PP / EP layout.

Streaming: nothing holds a whole seed. Every ``[L, ...]`` tensor is processed one layer at a
time (more precisely: in the smallest layer ranges that no stored chunk straddles, which is one
layer for checkpoints written by megatron-core, and the whole tensor for one written as a single
chunk); for each layer every seed's slice is read in turn (torch.distributed.checkpoint reads
only the stored chunks that overlap it; a slice that is exactly one stored chunk is loaded
without a copy). Expert slices go to the writer as they are, averaged tensors are accumulated in
fp32 (``_Mean``, bit-identical to ``upcycling.average``). Tensors outside the layer stack
(embeddings, final norm, output layer) come first, while the write buffers are empty: read one
seed at a time into one fp32 accumulator. Peak memory: one layer-slice of one seed + the fp32 mean
of one layer-slice + two write buffers of ``part_bytes`` (one being filled, one being written
by a background thread), or, for the largest tensor outside the layers, its fp32 accumulator
plus one seed's copy of it.

Writing in parts, then merging: ``torch.distributed.checkpoint.save`` needs its whole state dict
in memory, so the output is saved in parts of about ``part_bytes`` each, every part its own small
DCP checkpoint whose entries are chunks (``c<k>``) of the real tensors. The merge moves the
parts' ``.distcp`` files into the output directory under unique names and writes one DCP
``.metadata``: per real key its global shape and the list of chunks (offsets, sizes), and per
chunk its storage location (file, byte offset, length) taken from the part that wrote it. The
result is the same structure a multi-rank save produces, so megatron-core's
``dist_checkpointing.load`` / ``load_plain_tensors`` and torch's DCP reader read it like any other
checkpoint. Each expert is its own chunk ``[1, 1, ...]`` at (layer, expert), so a loader that
holds one expert (expert parallelism) reads only that expert's bytes.

Atomicity: everything is written under ``<output>.tmp-<random>`` and renamed to ``<output>`` at
the end (with ``force`` the previous output is moved aside to ``<output>.old-<random>`` only
then, and deleted after the rename). The
parts are fsynced by a background thread (unless ``sync=False``); the merged index, the common
state, ``metadata.json`` (which is what makes a directory a megatron checkpoint) and the tracker
are written in that order, after all data is on disk. A failed or interrupted run removes its
temporary directory; nothing under ``<output>`` is ever half-written.

All validation happens before any file is written: seeds exist and are readable torch_dist
checkpoints, share one architecture (same tensors, shapes, dtypes, heads, vocabulary), are
dense, and fit the mode; every problem is an ``UpcycleError`` with a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult

from bam_megatron import upcycling as U

# Megatron-LM's checkpoint layout, shared with the trainer (imports no megatron-core).
from bam_megatron.ckpt_layout import FORMAT_VERSION, TRACKER, iteration_dir

COMMON_FILE = "common.pt"
CONFIG_FILE = "metadata.json"
DCP_METADATA_FILE = ".metadata"
# What megatron-core writes into metadata.json for a torch_dist checkpoint.
MEGATRON_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
# Megatron-LM options that change what the seed's tensors mean and that the BAM model lacks.
UNSUPPORTED_SEED_FLAGS = ("qk_layernorm", "squared_relu", "rotary_interleaved", "apply_layernorm_1p")
# Recorded arguments (besides the model's shape) that must agree between seeds.
SAME_ARGS = (
    "num_attention_heads",
    "normalization",
    "norm_epsilon",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "tokenizer_type",
    "vocab_size",
)
# Plain arguments copied from seed 0 (tokenizer and init), beside the model arguments.
CARRIED_ARGS = (
    "tokenizer_type",
    "vocab_size",
    "vocab_file",
    "merge_file",
    "tokenizer_model",
    "make_vocab_size_divisible_by",
    "init_method_std",
)
GIB = 1024**3


class UpcycleError(ValueError):
    """Bad input for the Mix phase; the message is one line naming the problem and the fix."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _shape(s: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(x)) for x in s) + "]"


# ============================================================================ reading checkpoints


def resolve_checkpoint_dir(path: str, what: str) -> str:
    """A checkpoint root (with the tracker) or an ``iter_*`` directory -> the directory holding
    ``metadata.json``. ``what`` names the input in error messages (e.g. ``"seed 2 (path)"``)."""
    if not os.path.exists(path):
        raise UpcycleError(f"{what} does not exist")
    if not os.path.isdir(path):
        raise UpcycleError(f"{what} is a file, not a checkpoint directory")
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return path
    tracker = os.path.join(path, TRACKER)
    if not os.path.isfile(tracker):
        raise UpcycleError(
            f"{what} is not a torch_dist checkpoint (neither {TRACKER} nor {CONFIG_FILE}); pass a "
            "checkpoint directory or one of its iter_* directories"
        )
    text = open(tracker).read().strip()
    if text == "release":
        ckpt = os.path.join(path, "release")
    else:
        try:
            ckpt = iteration_dir(path, int(text))
        except ValueError:
            raise UpcycleError(f"{what}: {TRACKER} holds {text!r}, not an iteration number") from None
    if not os.path.isfile(os.path.join(ckpt, CONFIG_FILE)):
        raise UpcycleError(f"{what}: {TRACKER} points at {ckpt}, which is not a complete checkpoint")
    return ckpt


def load_common(ckpt_dir: str) -> dict:
    """The common (non-tensor) state of a torch_dist checkpoint (``common.pt``).

    Plain values load with ``weights_only``; Megatron-LM pickles its arguments as an
    ``argparse.Namespace`` that may hold enums, which need the full unpickler (checkpoints are
    the user's own files, as for Megatron-LM's loader)."""
    path = os.path.join(ckpt_dir, COMMON_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False)


def plain_args(args) -> dict:
    """Recorded arguments as a dict of plain values (Megatron-LM stores a Namespace)."""
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        return {}
    return {
        k: v
        for k, v in args.items()
        if isinstance(v, (bool, int, float, str, type(None)))
        or (isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v))
    }


def read_metadata(ckpt_dir: str) -> Metadata:
    """The torch DCP index (``.metadata``) of a torch_dist checkpoint."""
    return FileSystemReader(ckpt_dir).read_metadata()


def is_model_entry(key: str) -> bool:
    """Model weights among a checkpoint's entries (not optimizer state, RNG, extra states)."""
    return not (
        key.startswith("optimizer")
        or key.startswith("rng_state")
        or "_extra_state" in key
        or key.startswith("rerun_state_machine")
    )


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
        raise UpcycleError(f"{read_item.dest_index.fqn} is not a tensor")

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

    def __init__(self, ckpt_dir: str, metadata: Optional[Metadata] = None):
        self.ckpt_dir = ckpt_dir
        self._reader = FileSystemReader(ckpt_dir)
        self.metadata = metadata if metadata is not None else self._reader.read_metadata()
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
                if info is None or info.transform_descriptors:
                    return None
                with open(os.path.join(self.ckpt_dir, info.relative_path), "rb") as f:
                    t = torch.load(_FileSlice(f, info.offset, info.length), map_location="cpu", weights_only=True)
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
                    raise UpcycleError(
                        f"{self.ckpt_dir}: the stored chunks of {key} do not cover offsets "
                        f"{_shape(offsets)} size {_shape(t.shape)}; the checkpoint is incomplete"
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


# ============================================================================ seeds


@dataclass
class SeedTensor:
    source_key: str  # the key in the seed's checkpoint (e.g. a Transformer Engine name)
    shape: Tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Seed:
    """One input checkpoint: where it is, what it records, its model tensors by canonical key."""

    index: int
    path: str
    ckpt_dir: str
    args: dict
    iteration: Optional[int]
    tensors: Dict[str, SeedTensor]
    metadata: Metadata = field(repr=False)

    @property
    def name(self) -> str:
        return f"seed {self.index} ({self.path})"

    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.ckpt_dir, self.metadata)


def open_seed(path: str, index: int) -> Seed:
    """Open (and check) one input checkpoint; reads only its indexes, no tensor data."""
    what = f"seed {index} ({path})"
    ckpt = resolve_checkpoint_dir(path, what)
    try:
        metadata = read_metadata(ckpt)
    except Exception as exc:
        raise UpcycleError(f"{what}: cannot read {os.path.join(ckpt, DCP_METADATA_FILE)} ({_one_line(exc)}); the checkpoint is damaged or not torch_dist") from None
    try:
        common = load_common(ckpt)
    except Exception as exc:
        raise UpcycleError(f"{what}: cannot read {os.path.join(ckpt, COMMON_FILE)} ({_one_line(exc)})") from None
    args = plain_args(common.get("args"))
    if not args:
        raise UpcycleError(
            f"{what} records no model arguments (common state 'args'); pass a checkpoint written "
            "by pretrain_bam.py or Megatron-LM"
        )
    tensors: Dict[str, SeedTensor] = {}
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata) or not is_model_entry(key):
            continue
        canonical = U.canonical_key(key)
        if canonical in tensors:
            raise UpcycleError(f"{what} holds both {tensors[canonical].source_key} and {key}, which are the same tensor")
        tensors[canonical] = SeedTensor(key, tuple(int(x) for x in md.size), md.properties.dtype)
    if not tensors:
        raise UpcycleError(f"{what} holds no model tensors")
    iteration = common.get("iteration")
    return Seed(index, path, ckpt, args, int(iteration) if isinstance(iteration, int) else None, tensors, metadata)


@dataclass
class Architecture:
    """The seeds' common model, as read from their tensors and recorded arguments."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    attn: U.AttentionShape
    padded_vocab_size: int
    sequential: bool
    gated: bool
    bias: bool
    dtype: torch.dtype
    shapes: Dict[str, Tuple[int, ...]]  # canonical seed key -> global shape
    args: dict  # seed 0's recorded arguments

    @property
    def layer_keys(self) -> List[str]:
        return [k for k in self.shapes if k.startswith(U.LAYER_PREFIX)]

    @property
    def global_keys(self) -> List[str]:
        return [k for k in self.shapes if not k.startswith(U.LAYER_PREFIX)]


def _check_dense(seed: Seed) -> None:
    for key in seed.tensors:
        if U.is_dense_key(key):
            continue
        if "router" in key or ".experts." in key or "linear_q." in key or "linear_kv." in key:
            raise UpcycleError(
                f"{seed.name} is not a dense model (it has {key}); the Mix phase takes dense "
                "checkpoints: the seed and the domain experts branched from it"
            )
        raise UpcycleError(f"{seed.name} has tensor {key}, which the BAM model does not support")
    for flag in UNSUPPORTED_SEED_FLAGS:
        if seed.args.get(flag):
            raise UpcycleError(f"{seed.name} was trained with --{flag.replace('_', '-')}, which the BAM model does not support")


def check_seeds(seeds: Sequence[Seed]) -> Architecture:
    """Check that all seeds are dense and share one architecture; describe it.

    Raises:
        UpcycleError: naming the first tensor (or argument) that differs, with both values.
    """
    first = seeds[0]
    for seed in seeds:
        _check_dense(seed)
    for seed in seeds[1:]:
        where = f"{seed.name} does not match seed 0 ({first.path})"
        for key, t0 in first.tensors.items():
            t = seed.tensors.get(key)
            if t is None:
                raise UpcycleError(f"{where}: it has no tensor {key}")
            if t.shape != t0.shape:
                raise UpcycleError(f"{where}: tensor {key} has shape {_shape(t.shape)} there and {_shape(t0.shape)} in seed 0")
            if t.dtype != t0.dtype:
                raise UpcycleError(f"{where}: tensor {key} is {t.dtype} there and {t0.dtype} in seed 0")
        for key in seed.tensors:
            if key not in first.tensors:
                raise UpcycleError(f"{where}: it has tensor {key}, which seed 0 lacks")
        for name in SAME_ARGS:
            if name in seed.args and name in first.args and seed.args[name] != first.args[name]:
                raise UpcycleError(
                    f"{where}: --{name.replace('_', '-')} is {seed.args[name]!r} there and "
                    f"{first.args[name]!r} in seed 0"
                )

    shapes = {k: t.shape for k, t in first.tensors.items()}
    what = first.name
    lp = U.LAYER_PREFIX
    for required in (lp + "input_layernorm.weight", lp + "self_attention.linear_qkv.weight",
                     lp + "self_attention.linear_proj.weight", lp + "mlp.linear_fc1.weight",
                     lp + "mlp.linear_fc2.weight", "embedding.word_embeddings.weight"):
        if required not in shapes:
            raise UpcycleError(f"{what} has no tensor {required}; it is not a GPT model checkpoint")
    num_layers, hidden = shapes[lp + "input_layernorm.weight"]
    for key, s in shapes.items():
        if key.startswith(lp) and s[0] != num_layers:
            raise UpcycleError(f"{what}: {key} has {s[0]} layers, {lp}input_layernorm.weight has {num_layers}")
    heads = first.args.get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0:
        raise UpcycleError(f"{what} records no --num-attention-heads")
    proj_cols = shapes[lp + "self_attention.linear_proj.weight"][-1]
    if proj_cols % heads:
        raise UpcycleError(f"{what}: linear_proj has {proj_cols} columns, not a multiple of {heads} heads")
    head_dim = proj_cols // heads
    qkv_rows = shapes[lp + "self_attention.linear_qkv.weight"][1]
    groups2 = qkv_rows // head_dim - heads
    groups = groups2 // 2
    if qkv_rows % head_dim or groups2 % 2 or groups <= 0 or heads % groups:
        raise UpcycleError(
            f"{what}: linear_qkv has {qkv_rows} rows, which fits no query-group count for {heads} "
            f"heads of dimension {head_dim}"
        )
    ffn = shapes[lp + "mlp.linear_fc2.weight"][-1]
    fc1_rows = shapes[lp + "mlp.linear_fc1.weight"][1]
    if fc1_rows not in (ffn, 2 * ffn):
        raise UpcycleError(f"{what}: linear_fc1 has {fc1_rows} rows for an FFN of {ffn}")
    linear_biases = [lp + n for n in U.DENSE_LAYER_NAMES if n.endswith(".bias") and "layernorm" not in n]
    present = [k in shapes for k in linear_biases]
    if any(present) and not all(present):
        missing = linear_biases[present.index(False)]
        raise UpcycleError(f"{what} has biases on some linear layers but not {missing}; the BAM model needs all or none (--disable-bias-linear)")
    pos = first.args.get("position_embedding_type", "rope")
    if "embedding.position_embeddings.weight" in shapes:
        pos = "learned_absolute"
    if pos not in ("rope", "learned_absolute"):
        raise UpcycleError(f"{what} uses --position-embedding-type {pos}; the BAM model supports rope and learned_absolute")
    return Architecture(
        num_layers=int(num_layers),
        hidden_size=int(hidden),
        ffn_hidden_size=int(ffn),
        attn=U.AttentionShape(heads, groups, head_dim),
        padded_vocab_size=int(shapes["embedding.word_embeddings.weight"][0]),
        sequential=lp + "pre_mlp_layernorm.weight" in shapes,
        gated=fc1_rows == 2 * ffn,
        bias=all(present),
        dtype=first.tensors[lp + "input_layernorm.weight"].dtype,
        shapes=dict(shapes),
        args=dict(first.args),
    )


# ============================================================================ the plan


@dataclass
class UpcycleOptions:
    """How to mix (see ``tools/upcycle_bam.py --help``)."""

    mode: str = "full"  # full | shared-kv | merged
    weights: Optional[Sequence[float]] = None  # per seed, for averaged tensors (normalised)
    router_init: str = "random"
    router_std: Optional[float] = None  # default: the seeds' --init-method-std
    seed: int = 1234  # generator of the random routers
    moe_router_topk: int = 1
    moe_router_pre_softmax: bool = True
    attn_routing: str = "soft"
    attn_topk: int = 1


@dataclass
class OutputTensor:
    key: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    role: str  # attention-expert | ffn-expert | shared | router

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def check_options(num_seeds: int, opts: UpcycleOptions) -> List[float]:
    """Validate the options against the seed count; returns the normalised weights."""
    n = num_seeds
    if opts.mode not in U.MODES:
        raise UpcycleError(f"unknown --attention-experts {opts.mode!r}; choose one of {', '.join(U.MODES)}")
    if n < 2:
        raise UpcycleError(
            f"--attention-experts {opts.mode} needs at least 2 seeds (the seed first, then the "
            f"domain experts), got {n}"
        )
    if opts.weights is None:
        weights = [1.0 / n] * n
    else:
        if len(opts.weights) != n:
            raise UpcycleError(f"--weights has {len(opts.weights)} values for {n} seeds; give one weight per seed")
        if any(not math.isfinite(w) or w < 0 for w in opts.weights) or sum(opts.weights) <= 0:
            raise UpcycleError("--weights must be finite, non-negative and not all zero")
        total = float(sum(opts.weights))
        weights = [float(w) / total for w in opts.weights]
    if opts.router_init not in U.ROUTER_INITS:
        raise UpcycleError(f"unknown --router-init {opts.router_init!r}; choose one of {', '.join(U.ROUTER_INITS)}")
    if opts.router_std is not None and not opts.router_std > 0:
        raise UpcycleError(f"--router-std must be positive, got {opts.router_std}")
    if not 1 <= opts.moe_router_topk <= n:
        raise UpcycleError(f"--moe-router-topk {opts.moe_router_topk} must be between 1 and the number of seeds ({n})")
    if opts.moe_router_topk == 1 and not opts.moe_router_pre_softmax:
        raise UpcycleError("--moe-router-topk 1 needs --moe-router-pre-softmax (megatron-core requirement)")
    if opts.attn_routing not in ("soft", "topk"):
        raise UpcycleError(f"unknown --attn-routing {opts.attn_routing!r}; choose soft or topk")
    if opts.attn_routing == "topk":
        if opts.mode == "merged":
            raise UpcycleError("--attn-routing topk needs attention experts; --attention-experts merged has none")
        if not 1 <= opts.attn_topk <= n:
            raise UpcycleError(f"--attn-topk {opts.attn_topk} must be between 1 and the number of seeds ({n})")
    return weights


def plan_outputs(arch: Architecture, n: int, opts: UpcycleOptions) -> Dict[str, OutputTensor]:
    """Every tensor of the BAM checkpoint: key -> global shape, dtype and role."""
    out: Dict[str, OutputTensor] = {}
    for key, shape in arch.shapes.items():
        rule = U.tensor_rule(key, opts.mode)
        for out_key, out_shape in U.upcycled_shapes(key, shape, n, opts.mode, arch.attn).items():
            if rule.kind == U.AVERAGE or (rule.kind == U.SPLIT_QKV and out_key == rule.outputs[1]):
                role = "shared"
            elif ".mlp." in out_key:
                role = "ffn-expert"
            else:
                role = "attention-expert"
            out[out_key] = OutputTensor(out_key, tuple(out_shape), arch.dtype, role)
    routers = [U.FFN_ROUTER_KEY] if opts.mode == "merged" else [U.ATTN_ROUTER_KEY, U.FFN_ROUTER_KEY]
    for key in routers:
        out[key] = OutputTensor(key, (arch.num_layers, n, arch.hidden_size), arch.dtype, "router")
    return out


def output_args(arch: Architecture, n: int, opts: UpcycleOptions) -> dict:
    """The ``args`` of the BAM checkpoint: every ``arguments.MODEL_ARGS`` entry (so that
    ``--use-checkpoint-args`` rebuilds the model) plus seed 0's tokenizer and init settings."""
    a = arch.args
    seq = a.get("seq_length")
    if not isinstance(seq, int):
        raise UpcycleError("seed 0 records no --seq-length")
    args = {k: a[k] for k in CARRIED_ARGS if k in a}
    args.update(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.attn.num_attention_heads,
        group_query_attention=arch.attn.num_query_groups != arch.attn.num_attention_heads,
        num_query_groups=arch.attn.num_query_groups,
        kv_channels=arch.attn.head_dim,
        seq_length=seq,
        max_position_embeddings=a.get("max_position_embeddings") or seq,
        swiglu=arch.gated,
        normalization=a.get("normalization")
        or ("LayerNorm" if U.LAYER_PREFIX + "input_layernorm.bias" in arch.shapes else "RMSNorm"),
        norm_epsilon=a.get("norm_epsilon", 1e-5),
        position_embedding_type="learned_absolute"
        if "embedding.position_embeddings.weight" in arch.shapes
        else a.get("position_embedding_type", "rope"),
        rotary_base=a.get("rotary_base", 10000),
        rotary_percent=a.get("rotary_percent", 1.0),
        untie_embeddings_and_output_weights="output_layer.weight" in arch.shapes,
        add_bias_linear=arch.bias,
        padded_vocab_size=arch.padded_vocab_size,
        num_experts=n,
        moe_ffn_hidden_size=arch.ffn_hidden_size,
        moe_router_topk=opts.moe_router_topk,
        moe_router_pre_softmax=bool(opts.moe_router_pre_softmax),
        bam_attn_experts=1 if opts.mode == "merged" else n,
        bam_attn_routing=opts.attn_routing if opts.mode != "merged" else "soft",
        bam_attn_topk=opts.attn_topk,
        bam_attn_topk_renormalize=True,
        bam_kv_sharing=opts.mode == "shared-kv",
        bam_sequential_block=arch.sequential,
    )
    args.setdefault("init_method_std", 0.02)
    return args


@dataclass
class ParamCounts:
    total: int
    active: int
    attention_expert: int  # parameters of one attention expert (all layers)
    ffn_expert: int  # parameters of one FFN expert (all layers)


def count_parameters(plan: Dict[str, OutputTensor], n: int, args: dict) -> ParamCounts:
    """Total parameters and those a token uses (soft attention: every attention expert; top-k
    attention: k of them; FFN: top-k experts)."""
    total = sum(t.numel for t in plan.values())
    attn = sum(t.numel for t in plan.values() if t.role == "attention-expert") // n
    ffn = sum(t.numel for t in plan.values() if t.role == "ffn-expert") // n
    attn_active = n if args.get("bam_attn_routing", "soft") == "soft" else args.get("bam_attn_topk", 1)
    active = total - (n - attn_active) * attn - (n - args["moe_router_topk"]) * ffn
    return ParamCounts(total, active, attn, ffn)


# ============================================================================ writing


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
        with _crc32_option(self.crc32):
            dcp.save(tensors, storage_writer=writer, no_dist=True)
        if self.sync:
            self._fsyncs.append(self._fsync_pool.submit(_fsync_files, part_dir))
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

    def merge(self, final_dir: str, plan: Dict[str, OutputTensor]) -> None:
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
            md = FileSystemReader(part_dir).read_metadata()
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


class _Mean:
    """Weighted mean accumulated in fp32, seed by seed: bit-identical to ``upcycling.average``
    (the same fp32 products and sums in the same order). Lower-precision inputs are widened
    block by block through a small scratch buffer (a mixed-dtype ``add_`` is several times
    slower, and a whole fp32 copy per seed would double the memory)."""

    BLOCK = 1 << 22  # elements (16 MiB of fp32)

    def __init__(self):
        self.acc: Optional[torch.Tensor] = None
        self.dtype: Optional[torch.dtype] = None
        self._scratch: Optional[torch.Tensor] = None

    def add(self, t: torch.Tensor, weight: float) -> None:
        w = float(weight)
        src = t.contiguous().view(-1)
        n = src.numel()
        if self.acc is None:
            self.acc = torch.empty(t.shape, dtype=torch.float32)
            self.dtype = t.dtype
            acc = self.acc.view(-1)
            for i in range(0, n, self.BLOCK):
                block = acc[i : i + self.BLOCK]
                block.copy_(src[i : i + self.BLOCK])
                block.mul_(w)
            return
        acc = self.acc.view(-1)
        if src.dtype == torch.float32:
            acc.add_(src, alpha=w)
            return
        if self._scratch is None:
            self._scratch = torch.empty(min(n, self.BLOCK), dtype=torch.float32)
        for i in range(0, n, self.BLOCK):
            m = min(self.BLOCK, n - i)
            scratch = self._scratch[:m]
            scratch.copy_(src[i : i + m])
            acc[i : i + m].add_(scratch, alpha=w)

    def result(self) -> torch.Tensor:
        out = self.acc.to(self.dtype)
        self.acc = self._scratch = None
        return out


def _write_file(path: str, data: bytes, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


@contextlib.contextmanager
def _crc32_option(compute: bool):
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


def _fsync_files(directory: str) -> None:
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: str) -> None:
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


# ============================================================================ the tool


@dataclass
class UpcycleResult:
    output: str
    ckpt_dir: str
    seeds: List[Seed]
    arch: Architecture
    plan: Dict[str, OutputTensor]
    args: dict
    params: ParamCounts
    weights: List[float]
    options: UpcycleOptions
    router_std: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    num_parts: int = 0
    seconds: float = 0.0
    write_seconds: float = 0.0


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_output(output: str, seed_paths: Sequence[str], force: bool) -> None:
    out_real = os.path.realpath(output)
    for i, p in enumerate(seed_paths):
        seed_real = os.path.realpath(p)
        if out_real == seed_real or seed_real.startswith(out_real + os.sep) or out_real.startswith(seed_real + os.sep):
            raise UpcycleError(f"output {output} overlaps seed {i} ({p}); choose another output path")
    if os.path.lexists(output) and not force:
        raise UpcycleError(f"output {output} exists; pass --force to replace it (or choose another path)")


def prepare(seed_paths: Sequence[str], output: str, opts: UpcycleOptions, force: bool = False):
    """All checks, no writing: returns ``(seeds, arch, plan, args, weights)``."""
    weights = check_options(len(seed_paths), opts)
    _check_output(output, seed_paths, force)
    seeds = [open_seed(p, i) for i, p in enumerate(seed_paths)]
    arch = check_seeds(seeds)
    if opts.mode != "merged" and arch.bias:
        raise UpcycleError(
            "the seeds have linear-layer biases but attention experts have none (as in the paper); "
            "use --attention-experts merged or seeds trained with --disable-bias-linear"
        )
    plan = plan_outputs(arch, len(seeds), opts)
    args = output_args(arch, len(seeds), opts)
    need = sum(t.nbytes for t in plan.values())
    free = shutil.disk_usage(_existing_ancestor(os.path.dirname(os.path.abspath(output)))).free
    if need > free:
        raise UpcycleError(f"the output needs about {need / GIB:.2f} GiB but only {free / GIB:.2f} GiB are free at {output}")
    return seeds, arch, plan, args, weights


def upcycle(
    seed_paths: Sequence[str],
    output: str,
    opts: UpcycleOptions,
    *,
    force: bool = False,
    part_bytes: int = 128 * 1024**2,
    sync: bool = True,
    crc32: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> UpcycleResult:
    """Write the BAM checkpoint of ``seed_paths`` (expert order: seed first) to ``output``.

    Raises:
        UpcycleError: bad input, before anything is written.
    """
    start = time.perf_counter()
    seeds, arch, plan, args, weights = prepare(seed_paths, output, opts, force)
    n = len(seeds)
    say = progress or (lambda _msg: None)

    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{output}.tmp-{secrets.token_hex(4)}"
    os.makedirs(tmp)
    writer = None
    try:
        writer = PartWriter(os.path.join(tmp, "parts"), part_bytes, sync, crc32)
        readers = [s.reader() for s in seeds]
        result = UpcycleResult(output, iteration_dir(output, 0), seeds, arch, plan, args,
                               count_parameters(plan, n, args), weights, opts)
        blocks_of = {
            key: layer_blocks(arch.num_layers, [r.chunks(s.tensors[key].source_key) for s, r in zip(seeds, readers)])
            for key in arch.layer_keys
        }
        total_steps = sum(len(b) for b in blocks_of.values()) + len(arch.global_keys) + 2
        last_report = [0.0]

        def report(step: int, what: str, always: bool = True) -> None:
            now = time.perf_counter()
            if not always and now - last_report[0] < 2.0:
                return
            last_report[0] = now
            read = sum(r.bytes_read for r in readers)
            say(
                f"[upcycle] {step:>5}/{total_steps} {what:<44} read {read / GIB:7.2f} GiB | "
                f"written {writer.bytes_written / GIB:7.2f} GiB | {now - start:7.1f} s"
            )

        # Outside the layer stack first, while the write buffers are still empty: the largest
        # of these (the embeddings) needs its fp32 mean and one seed's copy at the same time.
        step = 0
        for key in arch.global_keys:
            rule = U.tensor_rule(key, opts.mode)
            if rule.kind != U.AVERAGE:
                raise RuntimeError(f"internal error: {key} outside the layer stack is not averaged")
            mean = _Mean()
            for e, (seed, reader) in enumerate(zip(seeds, readers)):
                t = reader.read_full(seed.tensors[key].source_key)
                mean.add(t, weights[e])
                del t
            value = mean.result()
            writer.add(key, (0,) * value.dim(), value)
            writer.flush()  # written while the next tensor is read
            del value
            step += 1
            report(step, key)

        for key in arch.layer_keys:
            rule = U.tensor_rule(key, opts.mode)
            shape = arch.shapes[key]
            rest = (0,) * (len(shape) - 1)
            blocks = blocks_of[key]
            name = key[len(U.LAYER_PREFIX):]
            for i, (lo, hi) in enumerate(blocks):
                mean = _Mean()
                for e, (seed, reader) in enumerate(zip(seeds, readers)):
                    source = seed.tensors[key].source_key
                    if rule.kind == U.STACK:
                        # Each stored chunk of the seed becomes a chunk of expert e, as it is.
                        for chunk in reader.chunks_within(source, lo, hi):
                            t = reader.read([(source, chunk.offsets, chunk.sizes)])[0]
                            c_lo = int(chunk.offsets[0])
                            for layer in range(c_lo, c_lo + int(chunk.sizes[0])):
                                offsets = (layer, e) + tuple(int(o) for o in chunk.offsets[1:])
                                writer.add(rule.outputs[0], offsets, t[layer - c_lo : layer - c_lo + 1].unsqueeze(1))
                            del t
                        continue
                    region = (source, (lo,) + rest, (hi - lo,) + shape[1:])
                    t = reader.read([region])[0]
                    if rule.kind == U.SPLIT_QKV:
                        q, kv = U.split_qkv(t, arch.attn)
                        mean.add(kv, weights[e])
                        for layer in range(lo, hi):
                            writer.add(rule.outputs[0], (layer, e) + rest, q[layer - lo : layer - lo + 1].unsqueeze(1))
                        del q, kv
                    else:
                        mean.add(t, weights[e])
                    del t
                if mean.acc is not None:
                    writer.add(rule.outputs[-1], (lo,) + rest, mean.result())
                step += 1
                report(step, f"{name} layers {hi}/{arch.num_layers}", always=i == len(blocks) - 1)

        std = opts.router_std if opts.router_std is not None else float(arch.args.get("init_method_std", 0.02))
        result.router_std = std
        gen = torch.Generator().manual_seed(opts.seed)
        for key in (U.ATTN_ROUTER_KEY, U.FFN_ROUTER_KEY):
            if key in plan:
                router = U.new_router(arch.num_layers, n, arch.hidden_size, init=opts.router_init, std=std, generator=gen, dtype=arch.dtype)
                writer.add(key, (0, 0, 0), router)
        step += 1
        report(step, "routers")

        final = iteration_dir(tmp, 0)
        writer.merge(final, plan)
        common = {
            "args": args,
            "iteration": 0,
            "consumed_train_samples": 0,
            "skipped_iterations": 0,
            "format_version": FORMAT_VERSION,
            "upcycling": {
                "mode": opts.mode,
                "seeds": [os.path.abspath(s.path) for s in seeds],
                "seed_iterations": [s.iteration for s in seeds],
                "weights": list(weights),
                "router_init": opts.router_init,
                "router_std": std,
                "router_seed": opts.seed,
            },
        }
        buf = io.BytesIO()
        torch.save(common, buf)
        _write_file(os.path.join(final, COMMON_FILE), buf.getvalue(), sync)
        _write_file(os.path.join(final, CONFIG_FILE), json.dumps(MEGATRON_CONFIG).encode(), sync)
        _write_file(os.path.join(tmp, TRACKER), b"0", sync)
        shutil.rmtree(os.path.join(tmp, "parts"))
        if sync:
            _fsync_dir(final)
            _fsync_dir(tmp)
        step += 1
        report(step, f"merged {writer.num_parts} parts")

        old = None
        if os.path.lexists(output):  # only with force (checked up front)
            old = f"{output}.old-{secrets.token_hex(4)}"
            os.replace(output, old)
        os.replace(tmp, output)
        if sync:
            _fsync_dir(parent)
        if old is not None:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.unlink(old)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.bytes_read = sum(r.bytes_read for r in readers)
    result.bytes_written = writer.bytes_written
    result.num_parts = writer.num_parts
    result.write_seconds = writer.seconds
    result.seconds = time.perf_counter() - start
    return result


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_summary(result: UpcycleResult) -> str:
    """The end-of-run table: parameters, expert counts, where every expert came from."""
    args, n, mode = result.args, len(result.seeds), result.options.mode
    p = result.params
    kv = {"full": "Q, K, V, O per expert", "shared-kv": "Q, O per expert; K, V shared (weighted mean)", "merged": "none: attention averaged (BTX)"}[mode]
    attn_experts = args["bam_attn_experts"] if mode != "merged" else 0
    routing = "soft over all" if args["bam_attn_routing"] == "soft" else f"top-{args['bam_attn_topk']}"
    ffn_routing = f"top-{args['moe_router_topk']}" + (", softmax before top-k" if args["moe_router_pre_softmax"] else ", softmax over the chosen")
    lines = [
        f"{'BTX' if mode == 'merged' else 'BAM'} checkpoint: {result.ckpt_dir}",
        f"  mode {mode}; {args['num_layers']} layers, {'sequential' if args['bam_sequential_block'] else 'parallel'} blocks, "
        f"hidden {args['hidden_size']}, {args['num_attention_heads']} heads ({args['num_query_groups']} KV groups), "
        f"FFN {args['ffn_hidden_size']}, vocabulary {args['padded_vocab_size']}, {str(result.arch.dtype).replace('torch.', '')}",
        f"  parameters: total {p.total:,} ({_human(p.total)}), active per token {p.active:,} ({_human(p.active)})",
        f"  attention experts per layer: {attn_experts} ({kv}" + (f"; routing {routing})" if attn_experts else ")"),
        f"  FFN experts per layer: {n} (routing {ffn_routing})",
        f"  routers: {'attention + FFN' if mode != 'merged' else 'FFN'}, {result.options.router_init} init"
        + (f" (std {result.router_std:g}, seed {result.options.seed})" if result.options.router_init == "random" else ""),
        "  averaged (weights " + ", ".join(f"{w:.4g}" for w in result.weights) + "): embeddings, norms, output layer"
        + ({"shared-kv": ", K/V", "merged": ", attention"}.get(mode, "")),
        "",
    ]
    rows = [("expert", "attention from", "FFN from", "iteration")]
    for s in result.seeds:
        attn_src = s.path if mode != "merged" else "(averaged)"
        rows.append((str(s.index), attn_src, s.path, "" if s.iteration is None else str(s.iteration)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, r in enumerate(rows):
        lines.append("  " + " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  " + "-+-".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"  read {result.bytes_read / GIB:.2f} GiB, wrote {result.bytes_written / GIB:.2f} GiB in "
        f"{result.num_parts} parts, {result.seconds:.1f} s"
    )
    return "\n".join(lines)


# ============================================================================ inspection


def describe_layout(shapes: Dict[str, Sequence[int]]) -> dict:
    """The expert layout of a model from its checkpoint's tensor shapes.

    Returns ``{"num_layers", "block", "attention": {"experts", "kv", "router"},
    "ffn": {"experts", "router"}, "layers": [per-layer dicts]}``; ``kv`` is ``"per expert"``,
    ``"shared"`` or ``"dense"`` (ordinary attention).
    """
    lp = U.LAYER_PREFIX
    ln = shapes.get(lp + "input_layernorm.weight") or shapes.get(lp + "self_attention.linear_qkv.layer_norm_weight")
    num_layers = int(ln[0]) if ln is not None else None
    if lp + "self_attention.linear_q.weight" in shapes:
        attn_experts, kv = int(shapes[lp + "self_attention.linear_q.weight"][1]), "shared"
    elif lp + "self_attention.linear_qkv.weight" in shapes and len(shapes[lp + "self_attention.linear_qkv.weight"]) == 4:
        attn_experts, kv = int(shapes[lp + "self_attention.linear_qkv.weight"][1]), "per expert"
    else:
        attn_experts, kv = 1, "dense"
    fc1 = shapes.get(lp + U.EXPERTS_PREFIX + "linear_fc1.weight")
    ffn_experts = int(fc1[1]) if fc1 is not None else 0
    sequential = lp + "pre_mlp_layernorm.weight" in shapes or lp + "mlp.linear_fc1.layer_norm_weight" in shapes
    attn_router = shapes.get(U.ATTN_ROUTER_KEY)
    ffn_router = shapes.get(U.FFN_ROUTER_KEY)
    layers = [
        {
            "layer": i + 1,
            "attention_experts": attn_experts,
            "kv": kv,
            "attention_router": list(attn_router[1:]) if attn_router is not None else None,
            "ffn_experts": ffn_experts,
            "ffn_router": list(ffn_router[1:]) if ffn_router is not None else None,
        }
        for i in range(num_layers or 0)
    ]
    return {
        "num_layers": num_layers,
        "block": "sequential" if sequential else "parallel",
        "attention": {"experts": attn_experts, "kv": kv, "router": attn_router is not None},
        "ffn": {"experts": ffn_experts, "router": ffn_router is not None},
        "layers": layers,
    }


def inspect_checkpoint(path: str, include_all: bool = False) -> dict:
    """What a torch_dist checkpoint holds: tensors (model, or every entry with
    ``include_all``), recorded arguments, iteration, expert layout. Reads no tensor data."""
    ckpt = resolve_checkpoint_dir(path, path)
    try:
        md = read_metadata(ckpt)
    except Exception as exc:
        raise UpcycleError(f"{path}: cannot read {os.path.join(ckpt, DCP_METADATA_FILE)} ({_one_line(exc)})") from None
    common = load_common(ckpt)
    tensors, others = [], []
    for key, entry in md.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            rec = {"name": key, "shape": [int(x) for x in entry.size], "dtype": str(entry.properties.dtype).replace("torch.", ""),
                   "chunks": len(entry.chunks)}
            if is_model_entry(key):
                tensors.append(rec)
            elif include_all:
                others.append(rec)
            else:
                others.append({"name": key})
        else:
            others.append({"name": key} if not include_all else {"name": key, "shape": None, "dtype": "bytes"})
    tensors.sort(key=lambda r: r["name"])
    shapes = {U.canonical_key(r["name"]): r["shape"] for r in tensors}
    shapes.update({r["name"]: r["shape"] for r in tensors})
    args = plain_args(common.get("args"))
    info = {
        "path": os.path.abspath(path),
        "checkpoint_dir": os.path.abspath(ckpt),
        "iteration": common.get("iteration"),
        "consumed_train_samples": common.get("consumed_train_samples"),
        "has_optimizer_state": any(k.startswith("optimizer") for k in md.state_dict_metadata),
        "has_rng_state": any(k.startswith("rng_state") for k in md.state_dict_metadata),
        "layout_saved_with": common.get("layout"),
        "parameters": sum(math.prod(r["shape"]) for r in tensors),
        "tensors": tensors,
        "other_entries": len(others) if not include_all else others,
        "args": args,
        "upcycling": common.get("upcycling"),
        "expert_layout": describe_layout(shapes),
    }
    return info


def format_inspection(info: dict, show_args: bool = True) -> str:
    """Readable text for ``inspect_checkpoint``'s dict."""
    lay = info["expert_layout"]
    lines = [
        f"checkpoint: {info['checkpoint_dir']}",
        f"iteration: {info['iteration']}   consumed samples: {info['consumed_train_samples']}   "
        f"optimizer state: {'yes' if info['has_optimizer_state'] else 'no'}   RNG state: {'yes' if info['has_rng_state'] else 'no'}",
        f"parameters: {info['parameters']:,} ({_human(info['parameters'])})",
    ]
    if info.get("upcycling"):
        up = info["upcycling"]
        lines.append(f"upcycled ({up.get('mode')}) from: " + ", ".join(up.get("seeds", [])))
    lines += ["", "expert layout:"]
    attn = lay["attention"]
    kv_text = {"per expert": "K,V per expert", "shared": "K,V shared", "dense": "ordinary attention"}[attn["kv"]]
    lines.append(
        f"  {lay['num_layers']} layers, {lay['block']} blocks; attention experts {attn['experts']} ({kv_text}); "
        f"FFN experts {lay['ffn']['experts'] or 'none (dense FFN)'}; routers: "
        + (", ".join(x for x, on in (("attention", attn["router"]), ("FFN", lay["ffn"]["router"])) if on) or "none")
    )
    rows = [("layer", "attention experts", "KV", "attention router", "FFN experts", "FFN router")]
    for r in lay["layers"]:
        rows.append((
            str(r["layer"]), str(r["attention_experts"]), r["kv"],
            _shape(r["attention_router"]) if r["attention_router"] else "-",
            str(r["ffn_experts"] or "-"),
            _shape(r["ffn_router"]) if r["ffn_router"] else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        lines.append("  " + " | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  " + "-+-".join("-" * w for w in widths))
    lines += ["", "tensors:"]
    wn = max([len(t["name"]) for t in info["tensors"]] + [4])
    ws = max([len(_shape(t["shape"])) for t in info["tensors"]] + [5])
    for t in info["tensors"]:
        lines.append(f"  {t['name']:<{wn}}  {_shape(t['shape']):<{ws}}  {t['dtype']}")
    others = info["other_entries"]
    if isinstance(others, int):
        if others:
            lines.append(f"  (+ {others} optimizer / RNG / extra-state entries; --all lists them)")
    else:
        for t in others:
            shape = _shape(t["shape"]) if t.get("shape") else ""
            lines.append(f"  {t['name']:<{wn}}  {shape:<{ws}}  {t.get('dtype', '')}")
    if show_args:
        lines += ["", "recorded arguments:"]
        for k in sorted(info["args"]):
            lines.append(f"  {k} = {info['args'][k]!r}")
    return "\n".join(lines)


__all__ = [
    "Architecture",
    "CheckpointReader",
    "PartWriter",
    "UpcycleError",
    "UpcycleOptions",
    "UpcycleResult",
    "check_seeds",
    "describe_layout",
    "format_inspection",
    "format_summary",
    "inspect_checkpoint",
    "open_seed",
    "output_args",
    "plan_outputs",
    "prepare",
    "resolve_checkpoint_dir",
    "upcycle",
]
