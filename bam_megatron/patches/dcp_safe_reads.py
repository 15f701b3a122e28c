"""torch 2.6+ DCP / megatron-core 0.16.1: checkpoint reads that do not unpickle arbitrary code.

Inside ``megatron.core.dist_checkpointing.load`` (and ``load_plain_tensors``), three readers
unpickle files of the checkpoint:

- ``torch.distributed.checkpoint.FileSystemReader.read_metadata``: ``.metadata`` with plain
  ``pickle.load``;
- ``torch.distributed.checkpoint.DefaultLoadPlanner.load_bytes``: byte items of ``*.distcp``
  (e.g. the RNG state) with ``torch.load(weights_only=False)``;
- megatron-core's ``TorchCommonLoadStrategy.load_common``: ``common.pt`` with ``torch.load``.

``restricted_reads(load_metadata, load_torch)`` is a scoped, reversible context manager that
routes all three through the given readers (``checkpoint/opener/unpickle.py``: allow-listed
unpicklers) for the duration of one load, then puts the originals back. Each replacement keeps
the original's other behaviour (the storage metadata's load id, the planner's flattening).
Entering checks that torch DCP and megatron-core still have the readers and the attributes the
replacements use, and fails in one line otherwise (``patches/target.py``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

from bam_megatron.patches.target import MEGATRON_CORE, Check, torch_release, tracked

TARGETS = (torch_release("2.6 - 2.14 (the DCP reader)"), MEGATRON_CORE)
_lock = threading.RLock()
_DCP = "torch.distributed.checkpoint"


def check() -> None:
    """Raise ``PatchTargetError`` unless the three readers and what the replacements use fit."""
    c = Check("dcp_safe_reads", *TARGETS)
    c.params("torch", f"{_DCP}.filesystem.FileSystemReader.read_metadata", "self", leading=True)
    c.params("torch", f"{_DCP}.filesystem.FileSystemReader._get_metadata_path", "self", "rank", leading=True)
    c.source("torch", f"{_DCP}.filesystem.FileSystemReader", "self.fs", "self.load_id")
    c.has("torch", f"{_DCP}.metadata.StorageMeta.load_id", f"{_DCP}._traverse.set_element")
    c.params("torch", f"{_DCP}.default_planner.DefaultLoadPlanner.load_bytes", "self", "read_item", "value", leading=True)
    c.source("torch", f"{_DCP}.default_planner.DefaultLoadPlanner.set_up_planner",
             "self.original_state_dict", "self.mappings", "self.flatten_state_dict")
    c.params("megatron-core", "megatron.core.dist_checkpointing.strategies.common.TorchCommonLoadStrategy.load_common",
             "self", "checkpoint_dir", leading=True)


def _targets():
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    return FileSystemReader, DefaultLoadPlanner, TorchCommonLoadStrategy


def _read_metadata(load_metadata: Callable):
    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(f, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
    return read_metadata


def _load_bytes(load_torch: Callable):
    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = load_torch(value, f"byte item {read_item.dest_index.fqn} of the checkpoint")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
    return load_bytes


def _load_common(load_torch: Callable):
    def load_common(self, checkpoint_dir):
        from megatron.core.dist_checkpointing.core import CheckpointingException

        path = os.path.join(checkpoint_dir, "common.pt")
        if not os.path.isfile(path):
            raise CheckpointingException(f"Common file {path} does not exist")
        return load_torch(path, path)
    return load_common


@contextlib.contextmanager
def restricted_reads(load_metadata: Callable, load_torch: Callable):
    """Within the block, torch DCP and megatron-core unpickle checkpoint files only through
    ``load_metadata(file, path)`` and ``load_torch(path_or_file, path)``."""
    check()
    reader, planner, common = _targets()
    with _lock, tracked("dcp_safe_reads"):
        saved = (reader.read_metadata, planner.load_bytes, common.load_common)
        reader.read_metadata = _read_metadata(load_metadata)
        planner.load_bytes = _load_bytes(load_torch)
        common.load_common = _load_common(load_torch)
        try:
            yield
        finally:
            reader.read_metadata, planner.load_bytes, common.load_common = saved
