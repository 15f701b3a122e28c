"""Megatron-LM's tokenizer flags, defined once for every program (no torch / megatron import).

``add_tokenizer_args(parser)`` adds ``--tokenizer-type``, ``--vocab-file``, ``--merge-file``,
``--tokenizer-model`` and ``--vocab-size``; ``bam_megatron.data.tokenizers.build_tokenizer_from_args``
builds the tokenizer they describe.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    *SENTENCEPIECE_TYPES,
    "NullTokenizer",
)
# The arguments that describe a tokenizer (recorded in checkpoints, restored with them).
TOKENIZER_ARGS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")
# The ones that name files.
TOKENIZER_PATH_ARGS = ("vocab_file", "merge_file", "tokenizer_model")


def add_tokenizer_args(
    parser: argparse.ArgumentParser, *, required: bool = False, default: Optional[str] = None
) -> argparse.ArgumentParser:
    """Add Megatron-LM's tokenizer flags to ``parser`` (one argument group)."""
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, required=required, default=default,
                       help="Which tokenizer to use (Megatron-LM names).")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json (encoder.json).")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt (vocab.bpe).")
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece .model file, or HuggingFace tokenizer.json / its folder.")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="NullTokenizer: vocabulary size before the EOD token.")
    return parser


@dataclass(frozen=True)
class TokenizerArgs:
    """A tokenizer as Megatron-LM's flags describe it (``TOKENIZER_ARGS``); file paths as given
    (a checkpoint's opener makes them absolute)."""

    tokenizer_type: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None

    @classmethod
    def from_namespace(cls, args) -> "TokenizerArgs":
        return cls(**{name: getattr(args, name, None) for name in TOKENIZER_ARGS})

    def paths(self) -> Dict[str, str]:
        """The file arguments that are set: ``{"tokenizer_model": path, ...}``."""
        return {n: getattr(self, n) for n in TOKENIZER_PATH_ARGS if getattr(self, n)}

    def replace(self, **changes) -> "TokenizerArgs":
        """A copy with ``changes`` (None values are ignored: "not given")."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)
