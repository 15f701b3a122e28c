"""``ExitConditions`` (``--exit-signal-handler``): what happens to the stop signals of a process.

* while the run trains, a stop signal is recorded (the rank saves after the iteration);
* once the run stops because of one, further copies are ignored until the process ends (a
  scheduler signals every process of a job, torchrun passes its copy on: a late copy must not
  kill the rank after its save);
* a run that was not signalled gives the previous handlers back.
"""

import signal
from types import SimpleNamespace

from bam_megatron.training.exit_conditions import ExitConditions


def _args(**kw):
    base = dict(exit_signal_handler=True, exit_signal="SIGUSR1", save=None, exit_duration_in_mins=None,
                exit_interval=None)
    return SimpleNamespace(**{**base, **kw})


def test_late_copies_of_the_stop_signal_are_ignored(single_process, capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    exits = ExitConditions(_args())
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert exits.received == signal.SIGUSR1
        assert "received SIGUSR1: saving a checkpoint after this iteration" in capsys.readouterr().err
        assert exits.reason(5) == "received SIGUSR1"
        exits.restore()
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.raise_signal(signal.SIGUSR1)  # would end this process with the default handler
        signal.raise_signal(signal.SIGTERM)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_an_unsignalled_run_gives_the_handlers_back(single_process):
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    exits = ExitConditions(_args())
    assert signal.getsignal(signal.SIGUSR1) == exits._record
    assert exits.reason(3) is None
    exits.restore()
    assert {s: signal.getsignal(s) for s in before} == before
