"""The model arguments a checkpoint records, against those of this run.

``merge_checkpoint_args`` is ``--use-checkpoint-args`` (take the model arguments from the
checkpoint in ``--load``); ``check_checkpoint_matches`` stops a run whose model differs from the
checkpoint it loads, with one line naming the flag and both values.
"""

from __future__ import annotations

from bam_megatron.checkpoint.common import read_common
from bam_megatron.checkpoint.layout import resolve_checkpoint_dir
from bam_megatron.errors import CheckpointError
from bam_megatron.training.arguments import MODEL_ARGS


def merge_checkpoint_args(args) -> None:
    """``--use-checkpoint-args``: take the model arguments from the checkpoint in ``--load``."""
    saved = read_common(resolve_checkpoint_dir(args.load, f"--load {args.load}")).get("args")
    if not saved:
        raise CheckpointError(f"--use-checkpoint-args: {args.load} records no arguments")
    for name in MODEL_ARGS:
        if name in saved and name != "padded_vocab_size":
            setattr(args, name, saved[name])


def _vocab_mismatch(args, ckpt_dir: str, saved: dict) -> CheckpointError:
    if saved.get("tokenizer_vocab_size") == args.tokenizer_vocab_size:
        return CheckpointError(
            f"checkpoint {ckpt_dir} pads the vocabulary to {saved['padded_vocab_size']} but this run "
            f"pads it to {args.padded_vocab_size} (the padding depends on "
            "--tensor-model-parallel-size); set --make-vocab-size-divisible-by so that both pad to "
            "the same size"
        )
    return CheckpointError(
        f"the tokenizer has {args.tokenizer_vocab_size} tokens (padded {args.padded_vocab_size}) but "
        f"checkpoint {ckpt_dir} was trained with a padded vocabulary of {saved['padded_vocab_size']}; "
        "use the checkpoint's tokenizer"
    )


def check_checkpoint_matches(args, ckpt_dir: str) -> None:
    """One clear error when the checkpoint's model differs from the one asked for."""
    saved = read_common(ckpt_dir).get("args") or {}
    for name in MODEL_ARGS:
        if name in saved and saved[name] != getattr(args, name, None):
            if name == "padded_vocab_size":
                raise _vocab_mismatch(args, ckpt_dir, saved)
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(
                f"checkpoint {ckpt_dir} has {flag} {saved[name]!r} but {getattr(args, name, None)!r} "
                "was given; fix the flag or add --use-checkpoint-args"
            )
