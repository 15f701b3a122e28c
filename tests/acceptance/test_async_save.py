"""Checkpoints that do not stall training (``--async-save``, fully parallel save and load), with
every guarantee of the synchronous save:

* an async-save run's checkpoints are bit-identical to a synchronous run's (tensors, byte items
  such as the RNG state, common state but the flags that differ), at 1 and 2 ranks, and resuming
  from them gives the uninterrupted run's losses;
* SIGTERM to every process of a run (``--exit-signal-handler``) while a background save is in
  flight: that save and the stop save both complete, exit 0, no process left, exact resume;
* kill -9 during the background write: the tracker names the previous complete checkpoint, which
  loads; the partial ``iter_N.tmp`` is ignored and then removed by the next run; no helper left;
* a full disk during a background write: one line naming the intact checkpoint, exit 1;
* a model spoiled while a background save is in flight: that save completes, the finite check
  refuses the next one before handing anything over, and the line names the completed one;
* fully parallel save at DP 2 writes each replicated tensor once, spread over both ranks (checked
  from the files), and the checkpoint loads at DP 1.

A save "in flight" is made certain, not timed: ``support/gated_save.py`` holds megatron-core's file
writers of one iteration until the test releases them.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
from support import REPO_ROOT
from support.checkpoints import index_of
from support.identity import assert_identical
from support.training import (
    BAM,
    GOOD_ARGS,
    GOOD_ITERS,
    MOCK,
    NO_DROPOUT,
    TINY,
    _tail,
    alive,
    descendants,
    error_lines,
    finish,
    iter_dirs,
    left_after,
    run_main,
    signal_every_process,
    subprocess_env,
    torchrun,
    train_log,
)

from bam_megatron import training
from bam_megatron.checkpoint.layout import TRACKER, is_checkpoint_dir, iteration_dir
from bam_megatron.checkpoint.lock import LOCK_FILE
from bam_megatron.checkpoint.opener import open_checkpoint, read_tracker, resolve_checkpoint_dir

ITERS = 8
ARGS = TINY + NO_DROPOUT + BAM + MOCK + ["--train-iters", str(ITERS), "--save-interval", "2"]
ASYNC = ["--async-save", "--ckpt-assume-constant-structure"]
DIFFER = ["async_save", "ckpt_assume_constant_structure", "ckpt_fully_parallel_save", "save", "load"]
GATED = os.path.join(REPO_ROOT, "tests", "support", "gated_save.py")


def _run(argv, ranks: int, capsys, start: int = 0):
    """``({iteration: loss}, stdout)`` of a run of ``argv`` at ``ranks`` ranks (1: in this
    process)."""
    if ranks == 1:
        capsys.readouterr()
        losses = training.pretrain(argv)["train_losses"]
        return dict(enumerate(losses, start=start + 1)), capsys.readouterr().out
    log = torchrun(argv, nproc=ranks)
    return train_log(log), log


def _leftovers(root: str) -> list:
    return [n for n in os.listdir(root) if n.endswith(".tmp") or ".old-" in n]


def _only(root: str, iteration: int, dest: str) -> str:
    """A copy of ``root`` holding only ``iter_<iteration>``, tracked (a run stopped there)."""
    os.makedirs(dest)
    shutil.copytree(iteration_dir(root, iteration), iteration_dir(dest, iteration))
    with open(os.path.join(dest, TRACKER), "w") as f:
        f.write(str(iteration))
    return dest


# ------------------------------------------------------------------------------------ identity


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_async_checkpoints_are_the_synchronous_ones_and_resume_exactly(ranks, tmp_path, capsys):
    sync_root, async_root = str(tmp_path / "sync"), str(tmp_path / "async")
    reference, _ = _run(ARGS + ["--save", sync_root], ranks, capsys)
    losses, log = _run(ARGS + ASYNC + ["--save", async_root], ranks, capsys)
    assert losses == reference and sorted(reference) == list(range(1, ITERS + 1))
    assert log.count("in the background (training paused") == ITERS // 2, _tail(log)
    assert read_tracker(async_root) == ITERS and not _leftovers(async_root)
    assert not os.path.exists(os.path.join(async_root, LOCK_FILE))
    names = iter_dirs(sync_root)
    assert names == iter_dirs(async_root) == [f"iter_{i:07d}" for i in range(2, ITERS + 1, 2)]
    for name in names:
        assert_identical(os.path.join(sync_root, name), os.path.join(async_root, name), args_differ=DIFFER)

    resumed = _only(async_root, 4, str(tmp_path / "resumed"))
    after, _ = _run(ARGS + ASYNC + ["--load", resumed, "--save", resumed], ranks, capsys, start=4)
    assert after == {i: loss for i, loss in reference.items() if i > 4}  # exact on CPU


# ------------------------------------------------------------------------------------ gated runs

LONG = 30
LONG_ARGS = TINY + NO_DROPOUT + BAM + MOCK + ["--train-iters", str(LONG)]


@pytest.fixture(scope="module")
def long_reference():
    """The uninterrupted 1-rank run: ``{iteration: loss}``."""
    return dict(enumerate(training.pretrain(LONG_ARGS)["train_losses"], start=1))


def _start_gated(argv, gate: str, iteration: int):
    """The run of ``argv`` with the writes of ``iteration`` held at ``gate`` (its own session)."""
    import subprocess
    import sys

    os.makedirs(gate, exist_ok=True)
    env = dict(subprocess_env(), BAM_TEST_GATE=gate, BAM_TEST_GATE_ITERATION=str(iteration))
    return subprocess.Popen([sys.executable, GATED, *argv], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(path: str, proc, timeout: float = 300) -> None:
    """Poll until ``path`` exists (the gated write has started); fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{_tail(proc.stdout.read())}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_stop_signal_during_a_background_save(long_reference, tmp_path):
    ckpt, gate = str(tmp_path / "ckpt"), str(tmp_path / "gate")
    argv = LONG_ARGS + ["--save", ckpt, "--load", ckpt, "--save-interval", "2", "--async-save",
                        "--exit-signal-handler"]
    proc = _start_gated(argv, gate, iteration=4)
    try:
        _wait_for(os.path.join(gate, "started"), proc)  # iter_0000004 is being written, held
        helpers = descendants(proc.pid)
        assert len(helpers) >= 3, helpers  # the background helper, its file writers, the manager
        groups = signal_every_process(proc.pid, signal.SIGTERM)
        open(os.path.join(gate, "release"), "w").close()
        log = finish(proc, [])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    left = left_after(groups, 5)
    assert proc.returncode == 0, _tail(log)
    assert "received SIGTERM" in log and "BrokenPipeError" not in log, _tail(log)
    stopped = read_tracker(ckpt)
    assert 4 < stopped < LONG and max(train_log(log)) == stopped, _tail(log)
    assert f"saved {ckpt}/iter_0000004 (" in log and f"saved {ckpt}/iter_{stopped:07d} (" in log, _tail(log)
    assert log.index(f"saved {ckpt}/iter_0000004 (") < log.index("[exit] received SIGTERM")
    assert not left, f"left 5 s after the run ended: {left}"
    assert not _leftovers(ckpt)

    resumed = dict(enumerate(training.pretrain(argv)["train_losses"], start=stopped + 1))
    assert resumed == {i: loss for i, loss in long_reference.items() if i > stopped}  # exact on CPU


@pytest.mark.slow
def test_kill_9_during_the_background_write(long_reference, tmp_path, capsys):
    ckpt, gate = str(tmp_path / "ckpt"), str(tmp_path / "gate")
    argv = LONG_ARGS + ["--save", ckpt, "--load", ckpt, "--save-interval", "2", "--async-save"]
    proc = _start_gated(argv, gate, iteration=4)
    try:
        _wait_for(os.path.join(gate, "started"), proc)
        helpers = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 5
        while alive(helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(helpers)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        finish(proc, [], timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"helpers alive 5 s after kill -9 of their rank: {left}"
    partial = iteration_dir(ckpt, 4) + ".tmp"
    assert read_tracker(ckpt) == 2 and os.path.isdir(partial) and not is_checkpoint_dir(partial)
    assert resolve_checkpoint_dir(ckpt) == iteration_dir(ckpt, 2)
    assert open_checkpoint(ckpt).verification.data == "verified"

    capsys.readouterr()
    resumed = dict(enumerate(training.pretrain(argv)["train_losses"], start=3))
    out = capsys.readouterr().out
    assert f"loaded {ckpt}/iter_0000002 at iteration 2" in out
    assert resumed == {i: loss for i, loss in long_reference.items() if i > 2}
    assert read_tracker(ckpt) == LONG and not _leftovers(ckpt)


def test_full_disk_during_a_background_write_is_one_line(tmp_path, capsys, monkeypatch):
    """The writers fail as the kernel makes them fail (ENOSPC inside megatron-core's writer
    processes, forked from the background helper): the run stops with one line naming the
    intact checkpoint, and the partial folder is removed."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    ckpt = str(tmp_path / "ckpt")
    assert run_main(ARGS + ["--train-iters", "4", "--save-interval", "100", "--save", ckpt], capsys)[0] == 0

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsa, "_write_item", full_disk)
    rc, out, err = run_main(ARGS + ASYNC + ["--load", ckpt, "--save", ckpt, "--override-opt-param-scheduler"], capsys)
    monkeypatch.undo()
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "no space left on device while writing" in lines[0] and f"{iteration_dir(ckpt, 4)} is intact" in lines[0]
    assert f"saving {iteration_dir(ckpt, 6)} in the background" in out
    assert read_tracker(ckpt) == 4 and not _leftovers(ckpt)


def test_a_nonfinite_model_is_not_handed_over(good, tmp_path, capsys, monkeypatch):
    """Saving every iteration in the background, the weights spoiled at iteration 10 while the
    write of 9 is held at a gate (released only after the loop's poll found it unfinished): the
    next save waits for 9, then the finite check refuses 10 before anything is handed over, and
    the one line names 9."""
    import torch
    from support.gated_save import _gate

    from bam_megatron.checkpoint.checkpointer import Checkpointer
    from bam_megatron.training import loop

    ckpt, gate = str(tmp_path / "ckpt"), str(tmp_path / "gate")
    shutil.copytree(good["root"], ckpt)
    os.makedirs(gate)
    step, poll, bad = loop.Trainer.optimizer_step, Checkpointer.poll, GOOD_ITERS + 2

    def spoiled(self):
        norm = step(self)
        if self.state.iteration == bad:
            weight = next(p for n, p in self.run.model[0].named_parameters() if n.endswith("output_layer.weight"))
            with torch.no_grad():
                weight.view(-1)[0] = float("inf")
        return norm

    def poll_then_release(self):
        poll(self)
        if self.inflight is not None and self.inflight.iteration == bad - 1:
            open(os.path.join(gate, "release"), "w").close()  # unfinished at the poll, by construction

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    monkeypatch.setattr(fsa, "_write_item", fsa._write_item)  # undone at the end of the test
    _gate(gate, bad - 1, timeout=120)
    monkeypatch.setattr(loop.Trainer, "optimizer_step", spoiled)
    monkeypatch.setattr(Checkpointer, "poll", poll_then_release)
    rc, out, err = run_main(GOOD_ARGS + ASYNC + ["--train-iters", str(GOOD_ITERS + 4), "--override-opt-param-scheduler",
                                                 "--load", ckpt, "--save", ckpt, "--save-interval", "1"], capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    last = iteration_dir(ckpt, bad - 1)
    assert os.path.exists(os.path.join(gate, "started")) and f"saved {last} (" in out, _tail(out)
    assert f"the model at iteration {bad} is not finite (its parameters are not finite)" in lines[0], lines[0]
    assert f"the last good checkpoint is {last}" in lines[0], lines[0]
    assert f"saving {iteration_dir(ckpt, bad)}" not in out
    assert read_tracker(ckpt) == bad - 1 and iter_dirs(ckpt)[-1] == os.path.basename(last) and not _leftovers(ckpt)


# ------------------------------------------------------------------------------------ fully parallel


def _tensor_bytes_by_rank(ckpt_dir: str) -> dict:
    """``{rank: bytes}`` of the tensor chunks each rank's files hold, from the DCP index; every
    chunk of every tensor is stored exactly once, and the files hold nothing else."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = index_of(ckpt_dir)
    stored = {}
    for where, info in index.storage_data.items():
        key = (where.fqn, tuple(where.offset) if where.offset is not None else None)
        assert key not in stored, f"{key} stored twice"
        stored[key] = info
    chunks = {(k, tuple(c.offsets)) for k, md in index.state_dict_metadata.items()
              if isinstance(md, TensorStorageMetadata) for c in md.chunks}
    assert chunks <= set(stored), sorted(chunks - set(stored))[:3]
    files = {n: os.path.getsize(os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir) if n.endswith(".distcp")}
    assert sum(files.values()) == sum(info.length for info in stored.values())  # no byte written twice
    by_rank: dict = {}
    for key, info in stored.items():
        if key in chunks:
            rank = int(info.relative_path.split("_")[2])
            by_rank[rank] = by_rank.get(rank, 0) + info.length
    return by_rank


@pytest.mark.slow
def test_fully_parallel_save_writes_each_tensor_once_and_loads_at_dp1(tmp_path, capsys):
    spread, rank0 = str(tmp_path / "spread"), str(tmp_path / "rank0")
    argv = TINY + NO_DROPOUT + MOCK + ["--train-iters", "6", "--save-interval", "4"]  # dense: all replicated
    log = torchrun(argv + ["--save", spread])
    torchrun(argv + ["--save", rank0, "--no-ckpt-fully-parallel-save"])
    for it in (4, 6):
        assert_identical(iteration_dir(spread, it), iteration_dir(rank0, it), args_differ=DIFFER)
    spread_bytes, rank0_bytes = _tensor_bytes_by_rank(iteration_dir(spread, 4)), _tensor_bytes_by_rank(iteration_dir(rank0, 4))
    total = sum(spread_bytes.values())
    assert total == pytest.approx(sum(rank0_bytes.values()), rel=0.01)  # the same tensors, once each
    assert min(spread_bytes.get(r, 0) for r in (0, 1)) > 0.3 * total, spread_bytes  # both ranks write
    assert rank0_bytes.get(1, 0) < 0.05 * total, rank0_bytes  # without it rank 0 writes them all

    # resumed at DP 1 (one process): weights and optimizer load; the 2-rank run's losses (up to
    # the order of the data-parallel reduction)
    dp1 = _only(spread, 4, str(tmp_path / "dp1"))
    capsys.readouterr()
    losses = training.pretrain(argv + ["--load", dp1, "--save", dp1])["train_losses"]
    out = capsys.readouterr().out
    assert f"loaded {iteration_dir(dp1, 4)} at iteration 4: weights, optimizer" in out, out
    two = train_log(log)
    assert losses == pytest.approx([two[5], two[6]], rel=1e-5)
