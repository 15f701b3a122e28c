"""The non-tensor ("common") state of a torch_dist checkpoint, read without a model.

``common.pt`` holds the iteration, the recorded arguments, the scheduler and the optimizer's
non-tensor state. This project writes plain values; Megatron-LM pickles its arguments as an
``argparse.Namespace`` (possibly holding enums), which only the full unpickler reads — the
user's own files, as for Megatron-LM's loader. ``read_common`` is the one reader; ``plain_args``
turns either kind of recorded arguments into a dict of plain values.
"""

from __future__ import annotations

import argparse
import os
import pickle

from bam_megatron.checkpoint.layout import COMMON_FILE
from bam_megatron.errors import CheckpointError, one_line


def read_common(ckpt_dir: str) -> dict:
    """The common state of the checkpoint directory ``ckpt_dir`` ({} when it has none).

    Raises:
        CheckpointError: the file exists but cannot be read (damaged or foreign).
    """
    import torch

    path = os.path.join(ckpt_dir, COMMON_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged or foreign file: any of zip / pickle / torch errors
        raise CheckpointError(
            f"cannot read {path} ({one_line(exc)}); the checkpoint is damaged or not torch_dist"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint's common state")
    return state


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
