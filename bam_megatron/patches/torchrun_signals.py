"""torch >= 2.6, checked on 2.13 (torchrun's elastic agent): stop signals that reach the agent go
to its ranks, and the agent keeps supervising them.

As shipped, torchrun's agent (``torch.distributed.elastic.multiprocessing.api``) raises
``SignalException`` on SIGTERM / SIGHUP (``_terminate_process_handler``, installed by
``PContext.start`` for the signals in ``TORCHELASTIC_SIGNALS_TO_HANDLE``), sends the signal to
its ranks, SIGKILLs those still running after ``--shutdown-timeout`` (30 s by default) and exits
1 whatever the ranks did; SIGUSR1 / SIGUSR2 kill the agent outright unless ``--signals-to-handle``
lists them (then they are treated like SIGTERM). So a run told
to stop (``scancel --signal``, a time limit, a preemption: every process of the job step gets
the signal) loses a save longer than 30 s, and a ``--exit-signal SIGUSR1`` run loses its agent
(and with it the ranks, which die with their launcher: ``bam_megatron/parallel/lifetime.py``).

Inside ``with passed_on():`` (in the agent, around ``torch.distributed.run.main``): SIGTERM,
SIGUSR1, SIGUSR2 and SIGHUP, whatever ``--signals-to-handle`` says, are passed on to the ranks
(the agent's child processes) with one line on stderr, and the agent goes on supervising them
as in a normal run: ranks that save and exit 0 make torchrun exit 0 (``--exit-signal-handler``);
ranks that die of the signal make it fail as usual. Before the
ranks exist (rendezvous) a stop signal stops the agent as torchrun does. SIGINT and SIGQUIT keep
torchrun's meaning (stop now). Leaving the block puts torchrun's handler and the previous
signal handlers back. Entering checks that torchrun's agent still installs its handler by name
(``PContext.start``) with the parameters ours takes, and fails in one line otherwise.
"""

from __future__ import annotations

import os
import signal
from typing import ContextManager

import psutil  # imported here: a signal handler must not be the first to import a module

from bam_megatron.patches.target import Check, Replacements, Shared, torch_release

TARGETS = (torch_release("2.13"),)
PASSED_ON = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
_API = "torch.distributed.elastic.multiprocessing.api"


def check() -> None:
    """Raise ``PatchTargetError`` unless torchrun's agent still has the shape relied on here."""
    c = Check("torchrun_signals", *TARGETS)
    c.params("torch", f"{_API}._terminate_process_handler", "signum", "frame", leading=True)
    c.source("torch", f"{_API}.PContext.start", "_terminate_process_handler)")
    c.has("torch", f"{_API}.SignalException")


def _ranks() -> list:
    """The agent's running child processes: its ranks."""
    ranks = []
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                ranks.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return ranks


def _handler(original):
    def pass_on(signum, frame):
        if signum not in PASSED_ON:
            return original(signum, frame)
        ranks = _ranks()
        if not ranks:
            return original(signum, frame)
        for pid in ranks:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        name = signal.Signals(signum).name
        os.write(2, f"[launcher] received {name}: passed on to {len(ranks)} rank(s); waiting for them\n".encode())

    return pass_on


def _install(r: Replacements):
    from torch.distributed.elastic.multiprocessing import api

    r.set(api, "_terminate_process_handler", _handler(api._terminate_process_handler))
    previous = {sig: signal.getsignal(sig) for sig in PASSED_ON}
    for sig in PASSED_ON:
        signal.signal(sig, api._terminate_process_handler)

    def restore_handlers() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    return restore_handlers


_SHARED = Shared("torchrun_signals", check, _install)


def passed_on() -> ContextManager[None]:
    """Within the block (main thread of the agent), the agent passes stop signals on to its
    ranks; see the module docstring."""
    return _SHARED.entered()
