"""Preemption: a signal, a time budget or an interval makes a run save and exit 0, the same command
resumes it exactly, and no process of a run outlives it.

* SIGTERM (the default --exit-signal) and SIGUSR1 (--exit-signal SIGUSR1) mid-run: a checkpoint
  at the current iteration, exit status 0; resuming gives the uninterrupted run's losses;
* --exit-interval and --exit-duration-in-mins stop the same way;
* kill -9 of a rank, or SIGTERM without --exit-signal-handler: every helper process of the run
  (checkpoint writers, their resource tracker) is gone (the tests poll for up to
  ``GONE_WITHIN_S``: a helper that outlives its run stays for good);
* SIGTERM / SIGUSR1 sent to every process of a run at once, as a scheduler does (the ranks, the
  torchrun agent, the checkpoint writers' manager and resource tracker, data-loader workers),
  after a periodic save: the same checkpoint, exit 0 and exact resume as when only the rank
  gets it, and no process of the run left (1 rank, and 2 ranks under tools/torchrun.py);
* kill -9 of the torchrun agent: its ranks and their helpers are gone, and the last
  complete checkpoint resumes.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from support.training import (
    BAM,
    GONE_WITHIN_S,
    MOCK,
    NO_DROPOUT,
    SAVED_LINE,
    TINY,
    _tail,
    alive,
    descendants,
    finish,
    left_after,
    read_until,
    signal_every_process,
    start_run,
    start_torchrun,
    torchrun,
    train_log,
)

from bam_megatron import training
from bam_megatron.checkpoint.opener import read_tracker

ITERS = 12
ARGS = TINY + NO_DROPOUT + BAM + MOCK + ["--train-iters", str(ITERS)]


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run."""
    summary = training.pretrain(ARGS)
    assert len(summary["train_losses"]) == ITERS
    return summary


@pytest.mark.parametrize("signame,flags", [("SIGTERM", []), ("SIGUSR1", ["--exit-signal", "SIGUSR1"])])
def test_signal_saves_exits_zero_and_resumes_exactly(signame, flags, reference, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    argv = ARGS + ["--save", ckpt, "--load", ckpt, "--save-interval", "100", "--exit-signal-handler", *flags]
    proc, seen = start_run(argv), []
    try:
        read_until(proc, r"iteration\s+3/", seen)
        os.kill(proc.pid, getattr(signal, signame))
        log = finish(proc, seen)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, _tail(log)
    assert f"received {signame}" in log and "[exit]" in log, _tail(log)
    stopped = read_tracker(ckpt)
    assert 3 <= stopped < ITERS
    assert max(train_log(log)) == stopped  # saved at the iteration it was in, then stopped

    resumed = training.pretrain(argv)
    assert resumed["iteration"] == ITERS
    assert resumed["train_losses"] == reference["train_losses"][stopped:]  # exact on CPU
    assert resumed["valid"] == reference["valid"]


def test_exit_interval_and_duration_stop_with_a_checkpoint(reference, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    argv = ARGS + ["--save", ckpt, "--load", ckpt, "--save-interval", "100"]
    first = training.pretrain(argv + ["--exit-interval", "4"])
    assert first["iteration"] == 4 and read_tracker(ckpt) == 4
    assert "--exit-interval 4" in first["exit_reason"]
    assert "[exit] reached --exit-interval 4" in capsys.readouterr().out
    second = training.pretrain(argv + ["--exit-duration-in-mins", "0.000001"])
    assert second["iteration"] == 5 and read_tracker(ckpt) == 5  # one more step, then out of time
    third = training.pretrain(argv)
    assert third["iteration"] == ITERS and "exit_reason" not in third
    assert first["train_losses"] + second["train_losses"] + third["train_losses"] == reference["train_losses"]


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM without --exit-signal-handler"])
def test_no_process_of_the_run_outlives_it(how, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    argv = ARGS + ["--train-iters", "400", "--save", ckpt, "--save-interval", "2"]
    proc, seen = start_run(argv), []
    try:
        read_until(proc, SAVED_LINE.pattern, seen)  # the checkpoint writers have started
        read_until(proc, r"iteration\s+3/", seen)
        helpers = descendants(proc.pid)
        assert helpers, "a checkpointing run should have helper processes to check"
        os.kill(proc.pid, signal.SIGKILL if how == "kill -9" else signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + GONE_WITHIN_S
        while alive(helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(helpers)
        for pid in left:  # do not leave them to the next test (they hold the output pipe open)
            os.kill(pid, signal.SIGKILL)
        assert not left, f"left behind {GONE_WITHIN_S} s after {how}: {left}"
        log = finish(proc, seen, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if how != "kill -9":
        assert "received SIGTERM without --exit-signal-handler" in log, _tail(log)
    assert read_tracker(ckpt) >= 2


LONG = 30
LONG_ARGS = TINY + NO_DROPOUT + BAM + MOCK + ["--train-iters", str(LONG)]


@pytest.fixture(scope="module")
def long_references():
    """The uninterrupted LONG-iteration runs: ``{ranks: {iteration: loss}}`` for 1 rank (in this
    process) and 2 ranks (torchrun)."""
    one = training.pretrain(LONG_ARGS)["train_losses"]
    two = train_log(torchrun(LONG_ARGS, nproc=2))
    assert len(one) == LONG and sorted(two) == list(range(1, LONG + 1))
    return {1: dict(enumerate(one, start=1)), 2: two}


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("signame,flags", [("SIGTERM", []), ("SIGUSR1", ["--exit-signal", "SIGUSR1"])])
def test_stop_signal_to_every_process_of_the_run(ranks, signame, flags, long_references, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    argv = LONG_ARGS + ["--save", ckpt, "--load", ckpt, "--save-interval", "3", "--exit-signal-handler", *flags]
    if ranks == 1:
        argv += ["--num-workers", "1"]  # a data-loader worker among the helpers
    proc, seen = (start_run(argv) if ranks == 1 else start_torchrun(argv, nproc=2)), []
    try:
        read_until(proc, SAVED_LINE.pattern, seen)  # a periodic save: the checkpoint helpers run
        groups = signal_every_process(proc.pid, getattr(signal, signame))
        log = finish(proc, seen)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    left = left_after(groups)
    assert proc.returncode == 0, _tail(log)
    assert f"received {signame}" in log and "BrokenPipeError" not in log, _tail(log)
    stopped = read_tracker(ckpt)
    assert 3 <= stopped < LONG and max(train_log(log)) == stopped, _tail(log)
    assert f"saved {ckpt}/iter_{stopped:07d}" in log
    assert not left, f"left {GONE_WITHIN_S} s after the run ended: {left}"

    if ranks == 1:
        resumed = dict(enumerate(training.pretrain(argv)["train_losses"], start=stopped + 1))
    else:
        resumed = train_log(torchrun(argv, nproc=2))
    assert resumed == {i: loss for i, loss in long_references[ranks].items() if i > stopped}  # exact on CPU


def test_kill_9_of_torchrun_ends_its_ranks_and_their_helpers(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    argv = LONG_ARGS + ["--train-iters", "400", "--save", ckpt, "--load", ckpt, "--save-interval", "2"]
    proc, seen = start_torchrun(argv, nproc=2, plain=True), []
    try:
        read_until(proc, SAVED_LINE.pattern, seen)
        read_until(proc, r"iteration\s+3/", seen)
        run = descendants(proc.pid)
        assert len(run) > 2, "two ranks and their checkpoint helpers expected"
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + GONE_WITHIN_S
        while alive(run) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(run)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        finish(proc, seen, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"alive {GONE_WITHIN_S} s after kill -9 of the torchrun agent: {left}"
    last = read_tracker(ckpt)
    assert last >= 2
    capsys.readouterr()
    resumed = training.pretrain(argv + ["--exit-interval", str(last + 1)])  # loads it all, one step, saves
    assert resumed["iteration"] == last + 1 and read_tracker(ckpt) == last + 1
    assert f"loaded {ckpt}/iter_{last:07d} at iteration {last}" in capsys.readouterr().out
