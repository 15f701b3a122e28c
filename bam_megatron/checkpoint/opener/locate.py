"""Which checkpoint a path names: the one resolver of checkpoint paths (no torch import).

A path is a checkpoint *root* (Megatron-LM's layout: ``latest_checkpointed_iteration.txt`` names
the newest complete ``iter_*`` directory; ``release`` stands for iteration 0) or one ``iter_*``
directory given directly. A kill between the two renames of a re-save leaves the tracker naming a
missing directory beside complete copies (``iter_N.tmp`` / ``iter_N.old-*``): the resolver uses
one of them and says so.
"""

from __future__ import annotations

import glob
import os
from typing import List, Optional, Tuple

from bam_megatron.checkpoint.layout import CONFIG_FILE, TRACKER, is_checkpoint_dir, iteration_dir
from bam_megatron.errors import CheckpointError


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


def locate(path: str, what: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``(iteration directory, note)`` of a checkpoint root or ``iter_*`` directory; the note says
    when a leftover copy of an interrupted save is used (else None). ``what`` names the input in
    error messages (default: the path).

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
        return path, None
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(
            f"{what} is not a torch_dist checkpoint (neither {TRACKER} nor {CONFIG_FILE}); pass a "
            "checkpoint directory or one of its iter_* directories"
        )
    ckpt = iteration_dir(path, iteration)
    if iteration == 0 and not os.path.isdir(ckpt) and os.path.isdir(os.path.join(path, "release")):
        ckpt = os.path.join(path, "release")
    if is_checkpoint_dir(ckpt):
        return ckpt, None
    leftovers = leftover_copies(path, iteration)
    if leftovers:  # a kill between the renames of a re-save: the data is complete
        return leftovers[0], (f"[checkpoint] the tracker of {path} names a missing folder; using the complete copy "
                              f"{leftovers[0]} left by an interrupted save")
    raise CheckpointError(f"{what}: {TRACKER} points at {ckpt}, which is not a complete checkpoint")


def resolve_checkpoint_dir(path: str, what: Optional[str] = None) -> str:
    """The iteration directory ``path`` names (see ``locate``)."""
    return locate(path, what)[0]


def has_checkpoint(path: str) -> bool:
    """Whether ``path`` holds a checkpoint to resume (a tracker or an ``iter_*`` directory
    given directly); False for an absent or empty directory."""
    return os.path.isdir(path) and (is_checkpoint_dir(path) or os.path.isfile(os.path.join(path, TRACKER)))


def checkpoint_root(ckpt_dir: str) -> str:
    """The folder a checkpoint's relative paths are recorded against: the one holding the
    ``iter_*`` directory and its tracker (``ckpt_dir`` itself when it is not an ``iter_*`` /
    ``release`` directory)."""
    norm = os.path.normpath(os.path.abspath(ckpt_dir))
    name = os.path.basename(norm)
    if name.startswith("iter_") or name == "release":
        return os.path.dirname(norm)
    return norm
