"""The files a tokenizer consists of, so that they can travel with a checkpoint (no torch import).

A checkpoint carries its tokenizer in ``<checkpoint root>/tokenizer/`` under the names
transformers looks for (``tokenizer.json``; ``tokenizer.model``; ``vocab.json`` + ``merges.txt``),
with the companion files beside the main one (``tokenizer_config.json`` holds the special tokens
that ``HuggingFaceTokenizer`` reads, ``chat_template.jinja``, ...), and records them with
Megatron-LM's flags relative to the root (``tokenizer_model=tokenizer/tokenizer.json``).
``TokenizerFiles`` lists such files; ``files_of`` finds them for a tokenizer's flags,
``find_in_folder`` for a Hugging Face model folder; ``copy_files`` copies them.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from bam_megatron.data.tokenizer_args import TokenizerArgs

TOKENIZER_DIR = "tokenizer"
# The file names transformers looks for, per Megatron-LM tokenizer type.
CANONICAL_NAMES = {
    "HuggingFaceTokenizer": ("tokenizer.json",),
    "SentencePieceTokenizer": ("tokenizer.model",),
    "GPTSentencePieceTokenizer": ("tokenizer.model",),
    "Llama2Tokenizer": ("tokenizer.model",),
    "GPT2BPETokenizer": ("vocab.json", "merges.txt"),
}
COMPANIONS = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class TokenizerFiles:
    """Files to copy (name -> source path) and the Megatron-LM tokenizer flags they make."""

    folder: str
    files: Dict[str, str] = field(default_factory=dict)
    tokenizer_type: Optional[str] = None
    main: List[str] = field(default_factory=list)  # file names the flags point at

    def args(self, prefix: str = TOKENIZER_DIR) -> dict:
        """Recorded tokenizer arguments, paths relative to the checkpoint root."""
        paths = [f"{prefix}/{name}" for name in self.main]
        if self.tokenizer_type == "GPT2BPETokenizer":
            return {"tokenizer_type": self.tokenizer_type, "vocab_file": paths[0], "merge_file": paths[1]}
        return {"tokenizer_type": self.tokenizer_type, "tokenizer_model": paths[0]}


def find_in_folder(folder: str) -> Optional[TokenizerFiles]:
    """The tokenizer of a Hugging Face model folder (None when it has none)."""
    def has(name):
        return os.path.isfile(os.path.join(folder, name))

    if has("tokenizer.json"):
        kind, main = "HuggingFaceTokenizer", ["tokenizer.json"]
    elif has("tokenizer.model"):
        kind, main = "SentencePieceTokenizer", ["tokenizer.model"]
    elif has("vocab.json") and has("merges.txt"):
        kind, main = "GPT2BPETokenizer", ["vocab.json", "merges.txt"]
    else:
        return None
    names = list(main) + [n for n in ("tokenizer.model", *COMPANIONS) if has(n) and n not in main]
    return TokenizerFiles(folder, {n: os.path.join(folder, n) for n in names}, kind, main)


def from_paths(kind: str, paths: List[str]) -> TokenizerFiles:
    """Main files ``paths`` of tokenizer ``kind`` (stored under transformers' names) plus the
    companions beside the first."""
    folder = os.path.dirname(os.path.abspath(paths[0]))
    main = list(CANONICAL_NAMES.get(kind, [os.path.basename(p) for p in paths]))
    files = dict(zip(main, paths))
    for name in COMPANIONS:
        if name not in files and os.path.isfile(os.path.join(folder, name)):
            files[name] = os.path.join(folder, name)
    return TokenizerFiles(folder, files, kind, main)


def files_of(tok: TokenizerArgs) -> Optional[TokenizerFiles]:
    """The files of a tokenizer whose flags name existing files (None: no files, e.g.
    ``NullTokenizer``, or a file that does not exist)."""
    if tok.tokenizer_type in (None, "NullTokenizer"):
        return None
    names = ("vocab_file", "merge_file") if tok.tokenizer_type == "GPT2BPETokenizer" else ("tokenizer_model",)
    paths = [getattr(tok, n) for n in names]
    if not all(p and os.path.exists(p) for p in paths):
        return None
    if tok.tokenizer_type == "HuggingFaceTokenizer" and os.path.isdir(paths[0]):
        paths[0] = os.path.join(paths[0], "tokenizer.json")
        if not os.path.isfile(paths[0]):
            return None
    return from_paths(tok.tokenizer_type, paths)


def copy_files(tok: TokenizerFiles, dest: str) -> None:
    """Copy the tokenizer files into ``dest`` (created)."""
    os.makedirs(dest, exist_ok=True)
    for name, src in tok.files.items():
        shutil.copyfile(src, os.path.join(dest, name))


def same_files(tok: TokenizerFiles, folder: str) -> bool:
    """Whether ``folder`` holds exactly these files with the same contents."""
    if not os.path.isdir(folder) or sorted(os.listdir(folder)) != sorted(tok.files):
        return False
    return all(filecmp.cmp(src, os.path.join(folder, name), shallow=False) for name, src in tok.files.items())


def json_vocab_size(path: str) -> Optional[int]:
    """Token count of a ``tokenizer.json`` (largest id + 1, added tokens included), as this
    project's ``HuggingFaceTokenizer`` counts it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    vocab = (data.get("model") or {}).get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
    ids += [t.get("id", -1) for t in data.get("added_tokens") or []]
    return max(ids) + 1 if ids else None
