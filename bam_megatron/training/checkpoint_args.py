"""The arguments a checkpoint records, against those of this run.

``merge_checkpoint_args`` is ``--use-checkpoint-args``: it restores what the model and the
tokenizer need from the checkpoint the run will load (this project's plain dict, or Megatron-LM's
pickled ``argparse.Namespace``), and says in one line per value what it replaced:

- the model arguments (``MODEL_ARGS``) and the tokenizer type / vocabulary size: the checkpoint
  wins (a different value given on the command line is replaced, with a line saying so);
- tokenizer file paths: the command line wins when it gives one; a recorded relative path is
  looked up from the working directory, then from the checkpoint's root folder (tools that copy
  the tokenizer beside a checkpoint record it that way);
- dropout and the MoE loss settings (``TRAINING_ARGS``): taken from the checkpoint unless the
  command line gives them.

``check_checkpoint_matches`` stops a run whose model differs from the checkpoint it loads, with
one line naming the flag and both values.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from bam_megatron.checkpoint.common import plain_args, read_common
from bam_megatron.data.tokenizer_args import TOKENIZER_ARGS
from bam_megatron.errors import CheckpointError
from bam_megatron.training.arguments import MODEL_ARGS

TOKENIZER_PATH_ARGS = ("vocab_file", "merge_file", "tokenizer_model")
# Restored only when the command line leaves them at their defaults.
TRAINING_ARGS = ("hidden_dropout", "attention_dropout", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                 "moe_router_load_balancing_type", "init_method_std", "make_vocab_size_divisible_by")


def checkpoint_root(ckpt_dir: str) -> str:
    """The folder holding ``ckpt_dir`` and its tracker (``ckpt_dir`` itself if not an iter_*)."""
    name = os.path.basename(os.path.normpath(ckpt_dir))
    return os.path.dirname(os.path.normpath(ckpt_dir)) if name.startswith("iter_") or name == "release" else ckpt_dir


def _resolve_path(path, root: str):
    if not isinstance(path, str) or not path or os.path.isabs(path) or os.path.exists(path):
        return path
    beside = os.path.join(root, path)
    return beside if os.path.exists(beside) else path


def saved_model_args(ckpt_dir: str) -> dict:
    """The recorded arguments as plain values, with Megatron-LM's conventions made ours (its
    ``num_query_groups`` only counts with ``group_query_attention``)."""
    saved = plain_args(read_common(ckpt_dir).get("args"))
    if saved.get("group_query_attention") is False and "num_attention_heads" in saved:
        saved["num_query_groups"] = saved["num_attention_heads"]
    return saved


def merge_checkpoint_args(args, ckpt_dir: str, defaults: Callable[[str], object], log: Callable[[str], None] = print) -> None:
    """``--use-checkpoint-args`` from ``ckpt_dir`` (see the module docstring).

    ``defaults(name)`` is the parser's default of an argument (to tell given values apart)."""
    saved = saved_model_args(ckpt_dir)
    if not saved:
        raise CheckpointError(f"--use-checkpoint-args: {ckpt_dir} records no arguments")
    root = checkpoint_root(ckpt_dir)

    def take(name: str, value) -> None:
        given = getattr(args, name, None)
        if given != defaults(name) and given != value:
            log(f"[checkpoint-args] --{name.replace('_', '-')} {value!r} from {ckpt_dir} replaces {given!r} "
                "given on the command line")
        setattr(args, name, value)

    for name in MODEL_ARGS:
        if name in saved and name != "padded_vocab_size" and saved[name] is not None:
            take(name, saved[name])
    for name in TOKENIZER_ARGS:
        if name not in saved or saved[name] is None:
            continue
        if name in TOKENIZER_PATH_ARGS:
            if getattr(args, name, None) in (None, defaults(name)):
                setattr(args, name, _resolve_path(saved[name], root))
        else:
            take(name, saved[name])
    for name in TRAINING_ARGS:
        if name in saved and getattr(args, name, None) == defaults(name) and saved[name] != defaults(name):
            log(f"[checkpoint-args] --{name.replace('_', '-')} {saved[name]!r} from {ckpt_dir}")
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
        "use the checkpoint's tokenizer (or --use-checkpoint-args)"
    )


def check_checkpoint_matches(args, ckpt_dir: str, saved: Optional[dict] = None) -> None:
    """One clear error when the checkpoint's model differs from the one asked for."""
    saved = saved_model_args(ckpt_dir) if saved is None else saved
    for name in MODEL_ARGS:
        if name in saved and saved[name] is not None and saved[name] != getattr(args, name, None):
            if name == "padded_vocab_size":
                raise _vocab_mismatch(args, ckpt_dir, saved)
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(
                f"checkpoint {ckpt_dir} has {flag} {saved[name]!r} but {getattr(args, name, None)!r} "
                "was given; fix the flag or add --use-checkpoint-args"
            )
