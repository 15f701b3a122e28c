"""How a program opens checkpoints: its two flags, defined once for every program (no torch import).

- ``--no-checkpoint-checksums``: do not verify the recorded per-file checksums when opening (and,
  in programs that write checkpoints, write none); the one way past a checksum mismatch.
- ``--trust-checkpoint-code``: read pickles outside the allow-list with the full unpickler, which
  can run code from the files; only for one's own older checkpoints (off by default).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class OpenOptions:
    checksums: bool = True  # verify the recorded checksums
    trust_code: bool = False  # full unpickler for pickles outside the allow-list


def add_open_args(parser) -> None:
    """Add ``--no-checkpoint-checksums`` and ``--trust-checkpoint-code`` to ``parser`` (or an
    argument group)."""
    parser.add_argument("--no-checkpoint-checksums", dest="checkpoint_checksums", action="store_false",
                        help="Do not verify the per-file checksums a checkpoint records before using it "
                        "(and write none where this program saves a checkpoint).")
    parser.add_argument("--trust-checkpoint-code", action="store_true",
                        help="Read checkpoint pickles that name classes outside the allow-list with the full "
                        "unpickler. This can run code from the files: only for your own checkpoints.")


def open_options(args: argparse.Namespace) -> OpenOptions:
    """The options ``add_open_args``'s flags set."""
    return OpenOptions(checksums=getattr(args, "checkpoint_checksums", True),
                       trust_code=bool(getattr(args, "trust_checkpoint_code", False)))
