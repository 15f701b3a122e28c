"""A checkpoint's tokenizer: recorded paths resolved on opening, files carried on writing.

Opening (``resolve_tokenizer``): a recorded file path is looked up

1. relative to the checkpoint root (where this project's writers put the tokenizer:
   ``<root>/tokenizer/``), then to the iteration directory;
2. as an absolute path;
3. relative to the working directory — how older checkpoints recorded it — with one warning.

So a checkpoint opens from any working directory after it was moved, renamed or copied to another
machine. A file found nowhere is not an error yet (``Checkpoint.tokenizer_problem``): only a
program that needs the tokenizer and is given no replacement stops, naming the flag to pass.

Writing (``carry_tokenizer``): every program that writes a checkpoint copies the tokenizer's files
into ``<root>/tokenizer/`` and records them relative to the root.
"""

from __future__ import annotations

import os
import secrets
import shutil
from typing import Any, Dict, List, Optional, Tuple

from bam_megatron.data.tokenizer_args import TOKENIZER_ARGS, TokenizerArgs
from bam_megatron.data.tokenizer_files import TOKENIZER_DIR, files_of, same_files
from bam_megatron.errors import CheckpointError


def _relevant(tok: TokenizerArgs) -> Tuple[str, ...]:
    """The path arguments the tokenizer type uses."""
    if tok.tokenizer_type in (None, "NullTokenizer"):
        return ()
    if tok.tokenizer_type == "GPT2BPETokenizer":
        return ("vocab_file", "merge_file")
    return ("tokenizer_model",)


def _find(path: str, root: str, ckpt_dir: str) -> Tuple[Optional[str], bool]:
    """``(absolute path or None, found only relative to the working directory)``."""
    if os.path.isabs(path):
        return (path if os.path.exists(path) else None), False
    for base in (root, ckpt_dir):
        candidate = os.path.join(base, path)
        if os.path.exists(candidate):
            return os.path.abspath(candidate), False
    if os.path.exists(path):
        return os.path.abspath(path), True
    return None, False


def resolve_tokenizer(recorded: Dict[str, Any], root: str, ckpt_dir: str) -> Tuple[TokenizerArgs, List[str], Optional[str]]:
    """``(tokenizer with absolute paths, notes, problem)`` of a checkpoint's recorded arguments."""
    tok = TokenizerArgs(**{n: recorded.get(n) for n in TOKENIZER_ARGS})
    changes, notes, problem = {}, [], None
    for name in _relevant(tok):
        path = getattr(tok, name)
        if not isinstance(path, str) or not path:
            continue
        found, from_cwd = _find(path, root, ckpt_dir)
        flag = "--" + name.replace("_", "-")
        if found is None:
            problem = problem or (
                f"checkpoint {root} records the tokenizer file {path!r} ({flag}), which exists neither in the "
                f"checkpoint folder nor {'at that path' if os.path.isabs(path) else 'under the working directory'}; "
                f"pass {flag} PATH"
            )
            continue
        changes[name] = found
        if from_cwd:
            notes.append(
                f"[checkpoint] WARNING: {root} records its tokenizer file {path!r} relative to the working directory "
                f"(an older checkpoint); using {found}. A checkpoint saved from it carries the file in "
                f"{TOKENIZER_DIR}/ and opens from anywhere"
            )
    return tok.replace(**changes), notes, problem


def relative_tokenizer(tok: TokenizerArgs) -> TokenizerArgs:
    """The arguments a checkpoint that carries ``tok``'s files in ``tokenizer/`` records."""
    files = files_of(tok)
    if files is None:
        return tok
    return TokenizerArgs(**{**{n: None for n in ("vocab_file", "merge_file", "tokenizer_model")},
                            **files.args(TOKENIZER_DIR), "vocab_size": tok.vocab_size})


def carry_tokenizer(tok: TokenizerArgs, root: str) -> TokenizerArgs:
    """Copy the files of ``tok`` (absolute paths) into ``<root>/tokenizer/`` and return the
    arguments to record (relative to ``root``). A tokenizer without files (``NullTokenizer``) or
    whose files do not exist is returned as it is. An existing ``<root>/tokenizer/`` must hold the
    same files (a run resumed into its own folder); the copy is made beside it and renamed.

    Raises:
        CheckpointError: ``<root>/tokenizer/`` holds another tokenizer.
    """
    files = files_of(tok)
    if files is None:
        return tok
    dest = os.path.join(root, TOKENIZER_DIR)
    if os.path.exists(dest):
        if same_files(files, dest):
            return relative_tokenizer(tok)
        raise CheckpointError(
            f"{dest} holds another tokenizer than this run's ({', '.join(files.files.values())}); a checkpoint "
            f"folder carries one tokenizer: choose another --save, or remove {dest} if it is stale"
        )
    tmp = f"{dest}.tmp-{secrets.token_hex(4)}"
    try:
        os.makedirs(tmp)
        for name, src in files.files.items():
            shutil.copyfile(src, os.path.join(tmp, name))
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return relative_tokenizer(tok)
