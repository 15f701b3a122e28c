"""The CPU runtime (``bam_megatron/patches/cpu_runtime.py``) for one test or one module, not for
the rest of the session.

``enable_cpu_mode()`` (called by ``init_distributed`` without a GPU) installs its redirects for
the life of the process. ``cpu_runtime_scope()`` undoes, when its block ends, what was installed
inside it: the ``torch.cuda`` functions, megatron-core's RNG hooks and log filter, the thread
start hook and this thread's device mode. Entered while the runtime is already on (a program run
in this process before), it leaves it on.
"""

from __future__ import annotations

import contextlib
import logging
import threading


@contextlib.contextmanager
def cpu_runtime_scope():
    import torch
    from megatron.core.tensor_parallel import random as mp_random

    from bam_megatron.patches import cpu_runtime

    if cpu_runtime.cpu_mode_active():
        yield
        return
    cuda = dict(vars(torch.cuda))
    rng = (mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state)
    rng_log = logging.getLogger(mp_random.__name__)
    filters = list(rng_log.filters)
    bootstrap = threading.Thread._bootstrap_inner
    try:
        yield
    finally:
        mode = getattr(cpu_runtime._THREAD_STATE, "mode", None)
        if mode is not None:
            mode.__exit__(None, None, None)
            cpu_runtime._THREAD_STATE.mode = None
        for name in set(vars(torch.cuda)) - set(cuda):
            delattr(torch.cuda, name)
        for name, value in cuda.items():
            if vars(torch.cuda).get(name) is not value:
                setattr(torch.cuda, name, value)
        mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state = rng
        rng_log.filters[:] = filters
        threading.Thread._bootstrap_inner = bootstrap
        cpu_runtime._HANDLERS.clear()
        cpu_runtime._ACTIVE = False
