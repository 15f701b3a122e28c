"""The one progress printer of the tools (no torch import).

    report = Progress("upcycle", say, total=12, read_bytes=lambda: r.bytes_read, written_bytes=lambda: w.bytes_written)
    report("embedding.word_embeddings.weight")           # one line
    report("layers 3/32", always=False)                  # at most one line per ``min_interval`` s

prints ``[upcycle]     1/12 embedding.word_embeddings.weight  read  0.12 GiB | written  0.10 GiB |  1.2 s``
through ``say`` (e.g. ``cli.console.stderr_progress``; nothing when ``say`` is None).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

GIB = 1024**3


class Progress:
    """``[tool] step/total what | read | written | seconds`` lines (see the module docstring)."""

    def __init__(self, tool: str, say: Optional[Callable[[str], None]], total: int,
                 read_bytes: Callable[[], int] = lambda: 0, written_bytes: Callable[[], int] = lambda: 0,
                 min_interval: float = 2.0):
        self.tool, self.say, self.total = tool, say, total
        self.read_bytes, self.written_bytes = read_bytes, written_bytes
        self.min_interval = min_interval
        self.step, self.start, self.last = 0, time.perf_counter(), float("-inf")

    def __call__(self, what: str, always: bool = True) -> None:
        """Count a step; print it (unless ``always`` is False and the last line is recent)."""
        self.step += 1
        now = time.perf_counter()
        if self.say is None or (not always and now - self.last < self.min_interval):
            return
        self.last = now
        self.say(
            f"[{self.tool}] {min(self.step, self.total):>5}/{self.total} {what:<44} read {self.read_bytes() / GIB:7.2f} GiB | "
            f"written {self.written_bytes() / GIB:7.2f} GiB | {now - self.start:7.1f} s"
        )
