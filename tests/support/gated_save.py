"""``pretrain_bam.py`` whose checkpoint writes of one iteration wait at a gate, so that a test can
act while a save is certainly in flight (no timing assumption).

    BAM_TEST_GATE=DIR BAM_TEST_GATE_ITERATION=4 python tests/support/gated_save.py ARGS...

megatron-core's file writers (``filesystem_async._write_item``, in the processes that write the
tensors) of ``iter_0000004.tmp`` create ``DIR/started`` before their first write and then wait
until ``DIR/release`` exists (polled, at most ``BAM_TEST_GATE_TIMEOUT`` seconds, 300 by
default); every other write, and every write once released, is megatron-core's own. The writers
are forked from the rank (or from its background helper), so they inherit the change.
"""

import functools
import os
import sys
import time


def _gate(directory: str, iteration: int, timeout: float):
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    real = fsa._write_item
    target = f"iter_{iteration:07d}.tmp"

    @functools.wraps(real)  # megatron-core inspects its signature
    def gated(*args, **kwargs):
        stream = args[-4]  # (*transforms, stream, data, write_item, storage_key)
        if target in getattr(stream, "name", ""):
            open(os.path.join(directory, "started"), "a").close()
            deadline = time.monotonic() + timeout
            while not os.path.exists(os.path.join(directory, "release")) and time.monotonic() < deadline:
                time.sleep(0.05)
        return real(*args, **kwargs)

    fsa._write_item = gated


if __name__ == "__main__":
    _gate(os.environ["BAM_TEST_GATE"], int(os.environ["BAM_TEST_GATE_ITERATION"]),
          float(os.environ.get("BAM_TEST_GATE_TIMEOUT", "300")))
    from bam_megatron.training import main

    sys.exit(main(sys.argv[1:]))
