"""torch DCP's storage layer below its public API, as the tools' streamed reader and writer use it
(``checkpoint/dcp_reader.py``, ``checkpoint/dcp_writer.py``; calls and reads, nothing replaced,
nothing to enter or leave).

- ``Metadata.storage_data`` values (``filesystem._StorageInfo``, torch-private): each stored
  item's ``relative_path``, ``offset`` and ``length``, and from torch 2.8 its
  ``transform_descriptors``. The reader loads an untransformed item straight from those bytes
  (``FileSystemWriter`` writes a tensor item with ``torch.save`` at that place); the writer
  moves the parts' files and re-points the entries (``dataclasses.replace``) before writing
  one ``.metadata`` with ``FileSystemWriter.finish``;
- ``planner_helpers.create_read_items_for_chunk_list`` (an internal module): the read items of a
  region, handed to ``FileSystemReader.read_data`` with the reader's own ``LoadPlanner``.

``checked()`` runs ``check()`` once per process (the reader and the writer call it when made)
and fails in one line when torch does not fit.
"""

from __future__ import annotations

from bam_megatron.patches.target import Check, torch_release

TARGETS = (torch_release("2.13"),)
_DCP = "torch.distributed.checkpoint"
_CHECKED = []


def check() -> None:
    """Raise ``PatchTargetError`` unless torch DCP has the storage layer described above."""
    c = Check("dcp_storage", *TARGETS)
    c.fields("torch", f"{_DCP}.filesystem._StorageInfo", "relative_path", "offset", "length")
    c.source("torch", f"{_DCP}.filesystem._write_item", "torch.save(data,")
    c.params("torch", f"{_DCP}.planner_helpers.create_read_items_for_chunk_list",
             "fqn", "checkpoint_md", "local_chunks", leading=True)
    c.params("torch", f"{_DCP}.FileSystemReader.set_up_storage_reader", "self", "metadata", "is_coordinator", leading=True)
    c.params("torch", f"{_DCP}.FileSystemReader.read_data", "self", "plan", "planner", leading=True)
    c.params("torch", f"{_DCP}.FileSystemWriter.set_up_storage_writer", "self", "is_coordinator", leading=True)
    c.params("torch", f"{_DCP}.FileSystemWriter.finish", "self", "metadata", "results", leading=True)
    c.has("torch", *(f"{_DCP}.planner.LoadPlanner.{name}" for name in (
        "set_up_planner", "create_local_plan", "create_global_plan", "finish_plan", "load_bytes",
        "resolve_tensor", "commit_tensor")))
    c.fields("torch", f"{_DCP}.storage.WriteResult", "index", "size_in_bytes", "storage_data")


def checked() -> None:
    if not _CHECKED:
        check()
        _CHECKED.append(True)
