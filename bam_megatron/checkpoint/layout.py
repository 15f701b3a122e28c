"""Megatron-LM's checkpoint directory layout, and the one resolver of checkpoint paths.

    <root>/latest_checkpointed_iteration.txt     the newest complete iteration (written last)
    <root>/iter_0000100/                         one torch_dist checkpoint:
        *.distcp, .metadata                      tensors (torch DCP)
        common.pt                                non-tensor state (args, iteration, ...)
        metadata.json                            megatron-core's backend description

A directory is a complete torch_dist checkpoint when it holds ``metadata.json`` (written last by
every writer of this project). No megatron-core import: tools that only read or write files use
this module without paying megatron-core's import time.
"""

from __future__ import annotations

import glob
import os
from typing import List, Optional

from bam_megatron.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1  # version of the common state this project writes
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


def iteration_dir(root: str, iteration: int) -> str:
    """``<root>/iter_<7 digits>``."""
    return os.path.join(root, f"iter_{iteration:07d}")


def is_checkpoint_dir(path: str) -> bool:
    """Whether ``path`` is one complete torch_dist checkpoint (an ``iter_*`` directory)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def list_iterations(root: str) -> List[int]:
    """The iterations of the complete-looking ``iter_*`` directories under ``root``, sorted."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        digits = name[len("iter_"):]
        if name.startswith("iter_") and digits.isdigit() and os.path.isdir(os.path.join(root, name)):
            found.append(int(digits))
    return sorted(found)


def leftover_copies(root: str, iteration: int) -> List[str]:
    """Complete copies of ``iter_<iteration>`` that an interrupted save left beside it
    (``.tmp``: the new copy; ``.old-*``: the copy it replaces), newest kind first."""
    base = iteration_dir(root, iteration)
    candidates = [base + ".tmp"] + sorted(glob.glob(base + ".old-*"))
    return [c for c in candidates if is_checkpoint_dir(c)]


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration under ``root``, or None when there is no tracker.

    Raises:
        CheckpointError: the tracker exists but holds no iteration number.
    """
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8").strip()
    except UnicodeDecodeError:
        text = None
    if text == "release":
        return 0
    try:
        return int(text)
    except (TypeError, ValueError):
        shown = "bytes that are not text" if text is None else repr(text)
        raise CheckpointError(
            f"{path} holds {shown}, not an iteration number; the checkpoint directory is damaged "
            "(fix or delete the tracker to use the newest complete iter_* directory)"
        ) from None


def resolve_checkpoint_dir(path: str, what: Optional[str] = None) -> str:
    """A checkpoint root (with the tracker) or one ``iter_*`` directory -> the directory holding
    ``metadata.json``. ``what`` names the input in error messages (default: the path).

    Raises:
        CheckpointError: one line naming the input and what is wrong with it.
    """
    what = what or path
    if not os.path.exists(path):
        raise CheckpointError(
            f"{what} does not exist; pass a checkpoint directory written by pretrain_bam.py or "
            "Megatron-LM"
        )
    if not os.path.isdir(path):
        raise CheckpointError(f"{what} is a file, not a checkpoint directory")
    if is_checkpoint_dir(path):
        return path
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(
            f"{what} is not a torch_dist checkpoint (neither {TRACKER} nor {CONFIG_FILE}); pass a "
            "checkpoint directory or one of its iter_* directories"
        )
    ckpt = iteration_dir(path, iteration)
    if iteration == 0 and not os.path.isdir(ckpt) and os.path.isdir(os.path.join(path, "release")):
        ckpt = os.path.join(path, "release")
    if not is_checkpoint_dir(ckpt):
        leftovers = leftover_copies(path, iteration)
        if leftovers:
            return leftovers[0]  # a kill between the renames of a re-save: the data is complete
        raise CheckpointError(f"{what}: {TRACKER} points at {ckpt}, which is not a complete checkpoint")
    return ckpt


def has_checkpoint(path: str) -> bool:
    """Whether ``path`` holds a checkpoint to resume (a tracker or an ``iter_*`` directory
    given directly); False for an absent or empty directory."""
    return os.path.isdir(path) and (is_checkpoint_dir(path) or os.path.isfile(os.path.join(path, TRACKER)))
