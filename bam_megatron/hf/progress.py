"""Progress lines of the Hugging Face tools: ``[tool] step/total what | read | written | time``."""

from __future__ import annotations

import time
from typing import Callable, Optional

GIB = 1024**3


class Progress:
    """Prints one line per step through ``say`` (nothing when ``say`` is None)."""

    def __init__(self, tool: str, say: Optional[Callable[[str], None]], total: int,
                 read_bytes: Callable[[], int], written_bytes: Callable[[], int]):
        self.tool, self.say, self.total = tool, say, total
        self.read_bytes, self.written_bytes = read_bytes, written_bytes
        self.step, self.start = 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.step += 1
        if self.say is None:
            return
        self.say(
            f"[{self.tool}] {min(self.step, self.total):>4}/{self.total} {what:<40} read {self.read_bytes() / GIB:7.2f} GiB | "
            f"written {self.written_bytes() / GIB:7.2f} GiB | {time.perf_counter() - self.start:7.1f} s"
        )
