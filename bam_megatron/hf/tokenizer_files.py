"""Tokenizer files on the Hugging Face side of the bridge.

Import: the tokenizer files of a Hugging Face folder are copied to ``<checkpoint>/tokenizer/`` and
recorded relative to the checkpoint root (``data/tokenizer_files.py``: the files a tokenizer
consists of, shared with every program that writes a checkpoint). Export: the files of the
checkpoint's tokenizer (``Checkpoint.tokenizer``, absolute paths) or of ``--tokenizer`` are
copied, with a ``tokenizer_config.json`` written when the source has none so that
``AutoTokenizer`` loads them.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

from bam_megatron.data.tokenizer_files import (  # noqa: F401  (the generic part, used by the importer)
    COMPANIONS,
    TOKENIZER_DIR,
    TokenizerFiles,
    copy_files,
    find_in_folder,
    from_paths,
    json_vocab_size,
)
from bam_megatron.errors import HFError


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
