"""Megatron-LM's checkpoint directory layout (no megatron-core import: tools that only read or
write files use it without paying megatron-core's import time).

    <root>/latest_checkpointed_iteration.txt     the newest complete iteration (written last)
    <root>/iter_0000100/                         one torch_dist checkpoint
"""

import os

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1  # version of the common state this project writes


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")
