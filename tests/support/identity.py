"""Are two checkpoints the same, bit for bit? Read through the programs' opener.

``assert_identical(a, b, args_differ=...)`` compares every entry of the DCP index (tensors bit by
bit, byte items such as the RNG state unpickled with the allow-listed reader) and the common state
(``common.pt``), leaving out only the named recorded arguments (the flags that made the two runs
differ)."""

from __future__ import annotations

import io
import os
from typing import Iterable

import megatron.core  # noqa: F401  (registers numpy's dtype classes with torch's weights-only reader, as in every program)
import numpy as np
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from bam_megatron.checkpoint.opener import open_checkpoint, tensor_reader
from bam_megatron.checkpoint.opener.unpickle import load_torch


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its width (so that -0.0 != 0.0 and NaNs compare by payload)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()]) if t.is_floating_point() else t


def assert_equal_values(a, b, where: str) -> None:
    """Recursive equality of checkpoint values: tensors and arrays bit by bit."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b)), f"{where} differs"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"{where} differs"
    elif isinstance(a, dict):
        assert sorted(map(str, a)) == sorted(map(str, b)), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_equal_values(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_values(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, f"{where}: nan != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _byte_items(ckpt) -> dict:
    """``{key: object}`` of the byte items (pickled objects such as the RNG state) of a checkpoint."""
    out = {}
    for key, entry in ckpt.metadata.state_dict_metadata.items():
        if not isinstance(entry, BytesStorageMetadata):
            continue
        info = ckpt.metadata.storage_data[MetadataIndex(key)]
        with open(os.path.join(ckpt.dir, info.relative_path), "rb") as f:
            f.seek(info.offset)
            out[key] = load_torch(io.BytesIO(f.read(info.length)), key)
    return out


def assert_identical(a: str, b: str, args_differ: Iterable[str] = ()) -> None:
    """Checkpoint folders ``a`` and ``b`` hold the same tensors, byte items and common state
    (recorded arguments ``args_differ`` left out). Both are verified against their checksums."""
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    keys = sorted(ca.tensor_entries())
    assert keys == sorted(cb.tensor_entries()), f"{a} and {b} hold different tensors"
    assert any(k.startswith("optimizer") for k in keys), keys[:5]
    ra, rb = tensor_reader(ca), tensor_reader(cb)
    for key in keys:
        assert_equal_values(ra.read_full(key), rb.read_full(key), key)
    items_a, items_b = _byte_items(ca), _byte_items(cb)
    assert any(k.startswith("rng_state") for k in items_a), sorted(items_a)
    assert_equal_values(items_a, items_b, "byte items")
    common_a, common_b = dict(ca.common), dict(cb.common)
    for common in (common_a, common_b):
        common["args"] = {k: v for k, v in vars_of(common["args"]).items() if k not in set(args_differ)}
    assert_equal_values(common_a, common_b, "common")


def vars_of(args) -> dict:
    return dict(args) if isinstance(args, dict) else dict(vars(args))
