"""The arguments a checkpoint records, against those of this run.

``merge_checkpoint_args`` is ``--use-checkpoint-args``: it restores what the model and the
tokenizer need from the checkpoint the run will load (read once by ``checkpoint/opener``: this
project's recorded arguments or Megatron-LM's ``Namespace``), and says in one line per value what
it replaced:

- the model arguments (``MODEL_ARGS``) and the tokenizer type / vocabulary size: the checkpoint
  wins (a different value given on the command line is replaced, with a line saying so);
- tokenizer files: the command line wins when it gives one; otherwise the checkpoint's, found
  where the opener found it (the checkpoint's own ``tokenizer/`` folder first);
- dropout, init and the MoE loss settings (``model_args.CARRIED``): taken from the checkpoint
  unless the command line gives them.

``check_checkpoint_matches`` stops a run whose model differs from the checkpoint it loads, with
one line naming the flag and both values.
"""

from __future__ import annotations

from typing import Callable

from bam_megatron.checkpoint.opener import Checkpoint
from bam_megatron.data.tokenizer_args import TOKENIZER_PATH_ARGS
from bam_megatron.errors import CheckpointError
from bam_megatron.model.model_args import CARRIED, ModelArgs
from bam_megatron.training.arguments import MODEL_ARGS


def merge_checkpoint_args(args, ckpt: Checkpoint, defaults: Callable[[str], object], log: Callable[[str], None] = print) -> None:
    """``--use-checkpoint-args`` from ``ckpt`` (see the module docstring).

    ``defaults(name)`` is the parser's default of an argument (to tell given values apart).

    Raises:
        CheckpointError: the checkpoint records no arguments, or a tokenizer file it needs is
            missing and the command line gives none.
    """
    if not ckpt.recorded_args:
        raise CheckpointError(f"--use-checkpoint-args: {ckpt.dir} records no arguments")

    def take(name: str, value) -> None:
        given = getattr(args, name, None)
        if given != defaults(name) and given != value:
            log(f"[checkpoint-args] --{name.replace('_', '-')} {value!r} from {ckpt.dir} replaces {given!r} "
                "given on the command line")
        setattr(args, name, value)

    for name in MODEL_ARGS:
        if name in ckpt.known_model_args and name != "padded_vocab_size":
            take(name, getattr(ckpt.model, name))
    _merge_tokenizer(args, ckpt, defaults, take)
    for name in CARRIED:
        value = ckpt.recorded_args.get(name)
        if value is not None and getattr(args, name, None) == defaults(name) and value != defaults(name):
            log(f"[checkpoint-args] --{name.replace('_', '-')} {value!r} from {ckpt.dir}")
            setattr(args, name, value)


def _merge_tokenizer(args, ckpt: Checkpoint, defaults, take) -> None:
    recorded = ckpt.recorded_args
    for name in ("tokenizer_type", "vocab_size"):
        if recorded.get(name) is not None:
            take(name, recorded[name])
    given = {n: getattr(args, n, None) for n in TOKENIZER_PATH_ARGS if getattr(args, n, None) not in (None, defaults(n))}
    tok = ckpt.require_tokenizer(**given)
    for name in TOKENIZER_PATH_ARGS:
        if name not in given and getattr(tok, name) is not None:
            setattr(args, name, getattr(tok, name))


def _vocab_mismatch(args, ckpt: Checkpoint) -> CheckpointError:
    saved = ckpt.recorded_args
    padded = ckpt.model.padded_vocab_size
    if saved.get("tokenizer_vocab_size") == args.tokenizer_vocab_size:
        return CheckpointError(
            f"checkpoint {ckpt.dir} pads the vocabulary to {padded} but this run "
            f"pads it to {args.padded_vocab_size} (the padding depends on "
            "--tensor-model-parallel-size); set --make-vocab-size-divisible-by so that both pad to "
            "the same size"
        )
    return CheckpointError(
        f"the tokenizer has {args.tokenizer_vocab_size} tokens (padded {args.padded_vocab_size}) but "
        f"checkpoint {ckpt.dir} was trained with a padded vocabulary of {padded}; "
        "use the checkpoint's tokenizer (or --use-checkpoint-args)"
    )


def check_checkpoint_matches(args, ckpt: Checkpoint) -> None:
    """One clear error when the checkpoint's model differs from the one asked for."""
    ours = ModelArgs.from_namespace(args)
    for name in MODEL_ARGS:
        saved = getattr(ckpt.model, name)
        if name not in ckpt.known_model_args or saved is None or saved == getattr(ours, name):
            continue
        if name == "padded_vocab_size":
            raise _vocab_mismatch(args, ckpt)
        flag = "--" + name.replace("_", "-")
        raise CheckpointError(
            f"checkpoint {ckpt.dir} has {flag} {saved!r} but {getattr(ours, name)!r} "
            "was given; fix the flag or add --use-checkpoint-args"
        )
