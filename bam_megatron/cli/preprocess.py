"""Tokenize a jsonl corpus into Megatron's indexed dataset format (.bin + .idx).

Same flags and output as Megatron-LM's tools/preprocess_data.py: for every ``--json-keys`` key
it writes ``<output-prefix>_<key>_document.bin`` / ``.idx`` with megatron-core's
``IndexedDatasetBuilder`` (token dtype uint16 when the vocabulary has fewer than 65500
entries, else int32), one document per input line, optionally ending in the tokenizer's eod
token (``--append-eod``). A key may hold a string or a list of strings (the pieces are
concatenated, as Megatron-LM does for pre-split sentences).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/code \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 4

Blank lines are skipped. A line that is not valid JSON, lacks a key, or is not UTF-8 stops
the run with a one-line error naming the line; partial outputs are removed.
``--input`` may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence

from bam_megatron.data.tokenizer_args import add_tokenizer_args
from bam_megatron.library_messages import quiet_libraries


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize a jsonl file into Megatron .bin/.idx indexed datasets.",
    )
    add_tokenizer_args(parser, required=True)
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True, help="Path to the input jsonl file.")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="Space-separated JSON keys to extract (one output per key).")
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="Append the tokenizer's eod token to the end of every document.")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True,
                       help="Output path without suffix; <prefix>_<key>_document.bin/.idx")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="Number of tokenizer worker processes.")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="Print progress every this many documents.")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.log_interval < 1:
        parser.error(f"--log-interval must be >= 1, got {args.log_interval}")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys has duplicates: {args.json_keys}")
    return args


def preprocess(argv: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """Run the program on ``argv``; returns per-key statistics. Errors exit with status 1 and a
    one-line message."""
    args = get_args(argv)
    # megatron-core warns on import when Transformer Engine / Apex are absent; irrelevant here.
    from bam_megatron.data.preprocess import run
    from bam_megatron.errors import BAMError

    try:
        return run(args)
    except BAMError as e:
        raise SystemExit(f"preprocess_data.py: error: {e}") from None  # printed, exit status 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (exit status 0 on success)."""
    quiet_libraries()
    preprocess(argv)
    return 0
