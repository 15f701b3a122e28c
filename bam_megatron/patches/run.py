"""The patches a program's run holds, from ``parallel/distributed.init_distributed`` to
``destroy_distributed``: the CPU runtime (without a GPU), the MoE router's missing name, and the
scope of the deaf checkpoint-save helpers. Entered in that order, left in the reverse one."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def run_patches(on_cpu: bool) -> Iterator[None]:
    """Enter the run's patches (``on_cpu``: with the CPU runtime); each checks its target first."""
    from bam_megatron.patches import megatron_moe, megatron_save_workers

    with contextlib.ExitStack() as stack:
        if on_cpu:
            from bam_megatron.patches.cpu_runtime import cpu_runtime

            stack.enter_context(cpu_runtime())
        stack.enter_context(megatron_moe.te_general_gemm_defined())
        stack.enter_context(megatron_save_workers.save_helpers())
        yield
