"""Tokenizer files on both sides of the Hugging Face bridge.

Import: the tokenizer files of a Hugging Face folder are copied to ``<checkpoint>/tokenizer/``
and recorded with Megatron-LM's flags, relative to the checkpoint root
(``tokenizer_type=HuggingFaceTokenizer``, ``tokenizer_model=tokenizer/tokenizer.json``; a
SentencePiece ``tokenizer.model`` or GPT-2 ``vocab.json`` + ``merges.txt`` when there is no
``tokenizer.json``). Export: the files a checkpoint records are found again (relative paths
against the working directory, then the checkpoint root) and copied, with a
``tokenizer_config.json`` written when the source has none so that ``AutoTokenizer`` loads them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from bam_megatron.errors import HFError

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


def _resolve(path: str, roots: List[str]) -> Optional[str]:
    if os.path.isabs(path):
        return path if os.path.exists(path) else None
    for root in roots:
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return candidate
    return None


def recorded(args: dict, ckpt_root: str) -> Optional[TokenizerFiles]:
    """The tokenizer files a checkpoint's arguments name (None for NullTokenizer / none).

    Raises:
        HFError: a recorded file that exists neither under the working directory nor under the
            checkpoint root.
    """
    kind = args.get("tokenizer_type")
    roots = [os.getcwd(), ckpt_root]
    if kind == "GPT2BPETokenizer":
        paths = [args.get("vocab_file"), args.get("merge_file")]
    elif kind in (None, "NullTokenizer"):
        return None
    else:
        paths = [args.get("tokenizer_model")]
    found = []
    for p in paths:
        hit = _resolve(p, roots) if p else None
        if hit is None:
            raise HFError(
                f"the checkpoint records the tokenizer file {p!r}, which exists neither here nor under {ckpt_root}; "
                "pass --tokenizer PATH (the tokenizer's file or folder) or --no-tokenizer"
            )
        found.append(hit)
    if kind == "HuggingFaceTokenizer" and os.path.isdir(found[0]):
        found[0] = os.path.join(found[0], "tokenizer.json")
    return from_paths(kind, found)


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


def from_override(path: str) -> TokenizerFiles:
    """``--tokenizer PATH``: a Hugging Face tokenizer file or a folder holding one."""
    if os.path.isdir(path):
        found = find_in_folder(path)
        if found is None:
            raise HFError(f"--tokenizer {path}: no tokenizer.json, tokenizer.model or vocab.json + merges.txt there")
        return found
    if not os.path.isfile(path):
        raise HFError(f"--tokenizer {path} does not exist")
    kind = "SentencePieceTokenizer" if path.endswith(".model") else "HuggingFaceTokenizer"
    return from_paths(kind, [path])


def copy_files(tok: TokenizerFiles, dest: str) -> None:
    """Copy the tokenizer files into ``dest`` (created)."""
    os.makedirs(dest, exist_ok=True)
    for name, src in tok.files.items():
        shutil.copyfile(src, os.path.join(dest, name))


def special_token_ids(tok: Optional[TokenizerFiles]) -> Dict[str, int]:
    """``bos/eos/pad_token_id`` of a ``tokenizer.json`` + ``tokenizer_config.json`` pair."""
    if tok is None or "tokenizer.json" not in tok.files or "tokenizer_config.json" not in tok.files:
        return {}
    try:
        with open(tok.files["tokenizer.json"]) as f:
            data = json.load(f)
        with open(tok.files["tokenizer_config.json"]) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    ids = dict((data.get("model") or {}).get("vocab") or {})
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens") or [] if "content" in t})
    out = {}
    for name in ("bos", "eos", "pad"):
        token = config.get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token in ids:
            out[f"{name}_token_id"] = int(ids[token])
    return out


def write_for_transformers(tok: TokenizerFiles, dest: str) -> None:
    """Copy the files into the export folder; add a ``tokenizer_config.json`` naming the class
    when the source has none."""
    copy_files(tok, dest)
    if "tokenizer_config.json" in tok.files:
        return
    cls = {"HuggingFaceTokenizer": "PreTrainedTokenizerFast", "GPT2BPETokenizer": "GPT2TokenizerFast"}.get(tok.tokenizer_type)
    if cls is None:
        return
    config = {"tokenizer_class": cls}
    if cls == "PreTrainedTokenizerFast" and "tokenizer.json" not in tok.main:
        return
    with open(os.path.join(dest, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
