"""What the tools print: progress lines on stderr, and a user error as one line."""

from __future__ import annotations

import sys
from typing import Callable, Optional


def stderr_progress(quiet: bool) -> Optional[Callable[[str], None]]:
    """A progress callback that prints each line to stderr, or ``None`` with ``--quiet``."""
    if quiet:
        return None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def user_error(prog: str, exc: BaseException) -> int:
    """Print ``<prog>: error: <exc>`` on stderr (argparse's form) and return the exit status 1."""
    print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
    return 1
