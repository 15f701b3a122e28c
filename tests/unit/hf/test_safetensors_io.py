"""Streamed safetensors reading and writing, checked against the safetensors library."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from bam_megatron.errors import HFError
from bam_megatron.hf.safetensors_io import INDEX_FILE, PlannedEntry, SafetensorsFolder, SafetensorsWriter


def test_written_shards_read_back_here_and_in_the_safetensors_library(tmp_path):
    tensors = {f"w{i}": torch.randn(3 + i, 5).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(5)}
    plan = [PlannedEntry(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = SafetensorsWriter(str(tmp_path), plan, shard_bytes=60, sync=False)
    for name in reversed(list(tensors)):  # any order
        writer.write(name, tensors[name])
    writer.close()
    with open(tmp_path / INDEX_FILE) as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map) == set(tensors) and len(set(weight_map.values())) == len(writer.files) > 1
    loaded = {}
    for name in writer.files:
        loaded.update(load_file(str(tmp_path / name)))
    folder = SafetensorsFolder(str(tmp_path))
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t) and torch.equal(folder.read(name), t)
    assert folder.bytes_read == sum(t.numel() * t.element_size() for t in tensors.values())
    folder.close()


def test_library_files_read_and_damage_is_one_line(tmp_path):
    save_file({"a": torch.arange(6, dtype=torch.int64).view(2, 3)}, str(tmp_path / "model.safetensors"))
    assert torch.equal(SafetensorsFolder(str(tmp_path)).read("a"), torch.arange(6).view(2, 3))
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "model.safetensors") - 8)
    with pytest.raises(HFError, match="damaged"):
        SafetensorsFolder(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(HFError, match="not a readable safetensors file"):
        SafetensorsFolder(str(tmp_path))


def test_writer_refuses_unplanned_shapes(tmp_path):
    writer = SafetensorsWriter(str(tmp_path), [PlannedEntry("a", (2,), torch.float32)], shard_bytes=1 << 20, sync=False)
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(RuntimeError, match="not written"):
        writer.close()
