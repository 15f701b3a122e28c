"""Threads started while the CPU runtime is entered run under its device mode too.

Torch function modes are per thread, so ``threading.Thread._bootstrap_inner`` (CPython-private:
the first thing a new thread runs) is wrapped to enter the device mode on the new thread while
the runtime is entered; leaving the runtime puts the original back. A thread that outlives the
runtime keeps an inactive mode (``device_mode.py``). The autograd engine runs CPU backward
passes on the calling thread, so backward is covered by that thread's mode. Processes started
with fork inherit everything; spawned processes (torchrun, ``torch.multiprocessing.spawn``)
start clean and enter the runtime themselves (``parallel/distributed.init_distributed``).
"""

from __future__ import annotations

import threading
import warnings

from bam_megatron.patches.cpu_runtime import device_mode
from bam_megatron.patches.target import Check, Replacements


def check(c: Check) -> None:
    c.params("Python", "threading.Thread._bootstrap_inner", "self", leading=True)


def install(r: Replacements) -> None:
    original = threading.Thread._bootstrap_inner

    def _bootstrap_inner(self):  # runs first thing in the new thread
        try:
            if device_mode.active():
                device_mode.enter_on_this_thread()
        except Exception as exc:  # never keep a thread from starting (start() waits for it)
            warnings.warn(f"CPU device mode not entered in thread {self.name}: {exc}")
        return original(self)

    r.set(threading.Thread, "_bootstrap_inner", _bootstrap_inner)
