"""Megatron-LM's checkpoint directory layout: names and where a save puts things.

    <root>/latest_checkpointed_iteration.txt     the newest complete iteration (written last)
    <root>/iter_0000100/                         one torch_dist checkpoint:
        *.distcp, .metadata                      tensors (torch DCP)
        common.pt                                non-tensor state (args, iteration, ...)
        metadata.json                            megatron-core's backend description

A directory is a complete torch_dist checkpoint when it holds ``metadata.json`` (written last by
every writer of this project). Finding the checkpoint a path names (the tracker, leftovers of
interrupted saves) is the opener's (``checkpoint/opener/locate.py``). No torch or megatron-core
import.
"""

from __future__ import annotations

import os
from typing import List

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
