"""Preemption: a signal, a time budget or an interval makes a run save and exit 0, the same command
resumes it exactly, and no process of a run outlives it.

* SIGTERM (the default --exit-signal) and SIGUSR1 (--exit-signal SIGUSR1) mid-run: a checkpoint
  at the current iteration, exit status 0; resuming gives the uninterrupted run's losses;
* --exit-interval and --exit-duration-in-mins stop the same way;
* kill -9 of a rank, or SIGTERM without --exit-signal-handler: every helper process of the run
  (checkpoint writers, their resource tracker) is gone within 5 seconds.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from support.training import (
    BAM,
    MOCK,
    NO_DROPOUT,
    SAVED_LINE,
    TINY,
    _tail,
    alive,
    descendants,
    finish,
    read_until,
    start_run,
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


@pytest.mark.slow
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


@pytest.mark.slow
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
        deadline = time.monotonic() + 5
        while alive(helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(helpers)
        for pid in left:  # do not leave them to the next test (they hold the output pipe open)
            os.kill(pid, signal.SIGKILL)
        assert not left, f"left behind 5 s after {how}: {left}"
        log = finish(proc, seen, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if how != "kill -9":
        assert "received SIGTERM without --exit-signal-handler" in log, _tail(log)
    assert read_tracker(ckpt) >= 2
