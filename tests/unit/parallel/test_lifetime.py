"""How the processes of a run end (``bam_megatron/parallel/lifetime.py``), in this process.

* ``stop_signals_blocked`` holds a stop signal for this process until the block ends;
* the stop signals are the ones ``--exit-signal`` offers.

(A helper process that dies with its parent: ``tests/integration/parallel/test_helper_lifetime.py``.)
"""

import os
import signal
import sys
import threading

import pytest

from bam_megatron.parallel import lifetime

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux only")


def _signals(pid: int, field: str) -> set:
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line.split()[1] for line in f if line.startswith(field + ":")), 16)
    return {sig for sig in signal.Signals if mask & (1 << (sig - 1))}


def test_stop_signals_are_the_exit_signal_choices():
    from bam_megatron.training.arguments import build_parser
    from bam_megatron.training.exit_conditions import SIGNALS

    names = [s.name for s in lifetime.STOP_SIGNALS]
    assert sorted(names) == sorted(SIGNALS)
    action = next(a for a in build_parser()._actions if a.dest == "exit_signal")
    assert sorted(action.choices) == sorted(names)


@linux_only
def test_a_signal_during_the_block_is_delivered_after_it():
    got = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, _frame: got.append(signum))
    try:
        with lifetime.stop_signals_blocked():
            assert set(lifetime.STOP_SIGNALS) <= _signals(os.getpid(), "SigBlk")
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)  # to this (blocked) thread
            assert got == [] and signal.SIGUSR2 in signal.sigpending()
        assert got == [signal.SIGUSR2]
        assert not set(lifetime.STOP_SIGNALS) & _signals(os.getpid(), "SigBlk")
    finally:
        signal.signal(signal.SIGUSR2, previous)
