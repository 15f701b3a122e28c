"""How a long run ends when there is nothing (good) left to do.

* A finished command run again (its checkpoint is at ``--train-iters``: a requeued job that had
  finished, a pipeline script re-run) prints one line, exits 0 and changes nothing on disk — no
  file or folder created, changed or removed, no lock left (names, sizes, hashes and mtimes of
  files and folders compared) — in one process and under torchrun (the line printed once); an
  evaluation-only run (``--skip-train``) of the same checkpoint evaluates it and also changes
  nothing.
* A diverging run never moves the tracker to a checkpoint whose parameters or validation loss
  are not finite — whether it saves every step, saves at the end after skipped NaN steps, runs
  out of ``--max-skipped-nan-iters`` or stops at the first NaN with
  ``--check-for-nan-in-loss-and-grad``: the checkpoint the tracker names evaluates to a finite
  loss, and a run that stops does so with one line naming it, leaving the folder as it was.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil

import pytest
import torch
from support.training import (
    GOOD_ARGS,
    GOOD_ITERS,
    MOCK,
    NO_DROPOUT,
    SKIP_LINE,
    TINY,
    _tail,
    error_lines,
    iter_dirs,
    run_main,
    torchrun,
    train_log,
    valid_log,
)

from bam_megatron import training
from bam_megatron.checkpoint.layout import TRACKER, iteration_dir
from bam_megatron.checkpoint.opener import read_tracker
from bam_megatron.training import loop

LAST_GOOD = f"iter_{GOOD_ITERS:07d}"


def disk_state(root: str, folders: bool = True, data_cache: bool = True) -> dict:
    """``{relative path: (size, mtime_ns, sha256)}`` of every file and, with ``folders``,
    ``{folder/: mtime_ns}`` of every folder under ``root`` (a file created and removed again, such
    as a lock, changes its folder's mtime); without ``data_cache``, the dataset index cache (what a
    run that started training writes besides checkpoints) is left out."""
    state = {}
    for dirpath, _dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if not data_cache and (rel == "data_cache" or rel.startswith("data_cache" + os.sep)):
            continue
        if folders:
            state[rel + "/"] = os.stat(dirpath).st_mtime_ns
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            with open(path, "rb") as f:
                state[os.path.join(rel, name)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return state


def _copy(good, tmp_path) -> str:
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(good["root"], ckpt)
    return ckpt


# ------------------------------------------------------------------------------------ finished


def test_a_finished_command_run_again_changes_nothing(good, tmp_path, capsys):
    ckpt = _copy(good, tmp_path)
    command = GOOD_ARGS + ["--load", ckpt, "--save", ckpt, "--save-interval", str(GOOD_ITERS // 2)]
    before = disk_state(ckpt)
    rc, out, err = run_main(command, capsys)
    assert rc == 0, err
    assert out.splitlines() == [
        f"[train] already trained to iteration {GOOD_ITERS}; nothing to do "
        f"(--train-iters {GOOD_ITERS}, checkpoint {ckpt}/{LAST_GOOD})"
    ], out
    assert disk_state(ckpt) == before
    # a --train-iters below the checkpoint's is finished too
    rc, out, _err = run_main(command + ["--train-iters", str(GOOD_ITERS - 2)], capsys)
    assert rc == 0 and f"already trained to iteration {GOOD_ITERS}; nothing to do" in out
    assert disk_state(ckpt) == before
    # evaluation only: the checkpoint is evaluated, nothing is written
    rc, out, err = run_main(command + ["--skip-train"], capsys)
    assert rc == 0, err
    assert valid_log(out)["valid"] == (GOOD_ITERS, pytest.approx(good["valid"], abs=1e-6))
    assert "nothing to do" not in out and train_log(out) == {}
    assert disk_state(ckpt) == before


def test_a_finished_command_run_again_under_torchrun(good, tmp_path):
    ckpt = _copy(good, tmp_path)
    before = disk_state(ckpt)
    proc = torchrun(GOOD_ARGS + ["--load", ckpt, "--save", ckpt], nproc=2, check=False)
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    assert proc.stdout.count("nothing to do") == 1, proc.stdout
    assert disk_state(ckpt) == before


# ------------------------------------------------------------------------------------ diverging
#
# --lr 1e30 from the good checkpoint: one finite step makes the weights huge; from then on every
# step's loss or gradient is NaN/inf. What the huge weights give on the validation set (NaN, or a
# finite loss of saturated logits) depends on the last bits of the arithmetic, so the cases that
# save assert the property itself: whatever the tracker names evaluates to a finite loss, and a
# refused save is one line naming it.

DIVERGE = ["--lr", "1e30", "--lr-warmup-iters", "0", "--no-load-optim", "--train-iters", str(GOOD_ITERS + 10)]
FIRST_NAN = GOOD_ITERS + 2
CASES = {
    "save-every-step": ["--save-interval", "1"],
    "save-at-the-end": ["--save-interval", "1000"],  # after at most --max-skipped-nan-iters skipped steps
    "too-many-skipped-steps": ["--save-interval", "1000", "--max-skipped-nan-iters", "2"],
    "check-for-nan": ["--save-interval", "1000", "--check-for-nan-in-loss-and-grad"],
}


def _finite_loss(ckpt_dir: str) -> float:
    summary = training.pretrain(GOOD_ARGS + ["--load", ckpt_dir, "--skip-train"])
    return summary["valid"]["valid"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_diverging_run_never_saves_a_nonfinite_model(case, good, tmp_path, capsys):
    ckpt = _copy(good, tmp_path)
    before = disk_state(ckpt, folders=False, data_cache=False)  # the run held the lock of --save: folder mtimes move
    rc, out, err = run_main(GOOD_ARGS + DIVERGE + CASES[case] + ["--load", ckpt, "--save", ckpt], capsys)
    assert sorted(train_log(out))[:1] == [GOOD_ITERS + 1]
    lines = error_lines(err)
    assert "Traceback" not in err and len(lines) == rc, err
    tracked = iteration_dir(ckpt, read_tracker(ckpt))
    if rc:
        assert f"the last good checkpoint is {tracked}" in lines[0], lines[0]
    assert not [n for n in os.listdir(ckpt) if n.endswith(".tmp") or ".old-" in n]
    assert math.isfinite(_finite_loss(tracked))
    skips = [int(m.group(1)) for m in SKIP_LINE.finditer(out)]
    if case == "too-many-skipped-steps":
        assert rc == 1 and "more than --max-skipped-nan-iters 2" in lines[0], err
        assert skips == [FIRST_NAN, FIRST_NAN + 1, FIRST_NAN + 2]
    elif case == "check-for-nan":
        assert rc == 1 and f"iteration {FIRST_NAN}: " in lines[0] and "(--check-for-nan-in-loss-and-grad)" in lines[0]
        assert skips == []
    elif rc:
        assert "is not finite (its " in lines[0], lines[0]
    if rc:  # nothing was written: the tracker, the good checkpoints, no leftover
        assert tracked.endswith(LAST_GOOD) and disk_state(ckpt, folders=False, data_cache=False) == before


def test_a_diverging_run_from_scratch(tmp_path, capsys):
    """The reported case: --lr 1e12 from scratch, saving every step (it made a NaN model the
    latest checkpoint, and the validation printed PPL 4.85e8 for a NaN loss)."""
    save = str(tmp_path / "run")
    argv = TINY + NO_DROPOUT + MOCK + ["--train-iters", "8", "--lr", "1e12", "--lr-warmup-iters", "0",
                                       "--save", save, "--save-interval", "1"]
    rc, out, err = run_main(argv, capsys)
    lines = error_lines(err)
    assert "Traceback" not in err and len(lines) == rc, err
    assert "PPL: 4.851652E+08" not in out
    if os.path.exists(os.path.join(save, TRACKER)):
        tracked = iteration_dir(save, read_tracker(save))
        summary = training.pretrain(TINY + NO_DROPOUT + MOCK + ["--train-iters", "8", "--load", tracked, "--skip-train"])
        assert math.isfinite(summary["valid"]["valid"])
        assert not rc or f"the last good checkpoint is {tracked}" in lines[0]
    else:
        assert rc == 1 and f"the last good checkpoint is none in --save {save} yet" in lines[0], err
        assert iter_dirs(save) == []


def _spoil_after_step(monkeypatch, iteration: int, how: str) -> None:
    """A fault in the weights right after the optimizer step of ``iteration`` (the run itself is
    untouched): ``"parameters"`` puts an inf into the output layer; ``"validation"`` fills it
    with 3e38, finite, but every logit then overflows, so the validation loss is not finite."""
    step = loop.Trainer.optimizer_step

    def spoiled(self):
        norm = step(self)
        if self.state.iteration == iteration:
            weight = next(p for n, p in self.run.model[0].named_parameters() if n.endswith("output_layer.weight"))
            with torch.no_grad():
                if how == "parameters":
                    weight.view(-1)[0] = float("inf")
                else:
                    weight.fill_(3e38)
        return norm

    monkeypatch.setattr(loop.Trainer, "optimizer_step", spoiled)


@pytest.mark.parametrize("how,words", [("parameters", "its parameters are not finite"),
                                       ("validation", "its validation loss is ")])
def test_a_nonfinite_model_is_not_saved(how, words, good, tmp_path, capsys, monkeypatch):
    ckpt = _copy(good, tmp_path)
    bad = GOOD_ITERS + 2
    _spoil_after_step(monkeypatch, bad, how)
    rc, out, err = run_main(GOOD_ARGS + ["--train-iters", str(GOOD_ITERS + 4), "--override-opt-param-scheduler",
                                         "--load", ckpt, "--save", ckpt, "--save-interval", "1"], capsys)
    assert rc == 1, (_tail(out), _tail(err))
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    good_one = iteration_dir(ckpt, GOOD_ITERS + 1)
    assert f"the model at iteration {bad} is not finite ({words}" in lines[0], lines[0]
    assert f"the last good checkpoint is {good_one}" in lines[0], lines[0]
    assert read_tracker(ckpt) == GOOD_ITERS + 1 and iter_dirs(ckpt)[-1] == os.path.basename(good_one)
    assert not [n for n in os.listdir(ckpt) if n.endswith(".tmp") or ".old-" in n]
