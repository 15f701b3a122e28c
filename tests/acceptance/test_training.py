"""Acceptance tests of the training program (``pretrain_bam.py`` / ``bam_megatron.training.loop``).

One-process runs call ``training.pretrain`` (or ``training.main`` for the error paths) in this
process; multi-process runs launch ``torchrun`` and read the log lines the last rank prints.
Every model is tiny (2 layers, hidden 64, 4 heads, seq 32, vocab 128) so the file runs in a
few minutes on two CPU cores.

What is checked:

* dense and BAM models learn on mock data and on indexed data (made here with
  ``tools/preprocess_data.py``), with a named validation set;
* TP2 (+ sequence parallel), EP2 and PP2 runs through ``torchrun``, resuming a one-process
  checkpoint, and a two-"node" run on localhost;
* a run killed with SIGKILL after a checkpoint resumes to the same losses, bit for bit,
  dropout included (the RNG state is restored);
* a checkpoint saved by one process evaluates to the same validation loss at TP2, EP2 and PP2;
* wandb (offline) and TensorBoard receive the logged losses; a requeued run continues its wandb
  run;
* bad inputs stop with one error line before training and leave a good checkpoint intact (a
  diverging run: ``test_run_endings.py``);
* ``--finetune`` starts a new run at iteration 0 with a fresh optimizer;
  ``--keep-last-checkpoints`` keeps only the newest checkpoints.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import struct

import pytest
import torch
from support.checkpoints import common_state
from support.training import (
    BAM,
    GOOD_ARGS,
    GOOD_ITERS,
    MOCK,
    NO_DROPOUT,
    TINY,
    TRAIN_LINE,
    _tail,
    assert_complete,
    error_lines,
    iter_dirs,
    run_main,
    snapshot,
    train_log,
    valid_log,
)

from bam_megatron import training
from bam_megatron.checkpoint.opener import read_tracker
from bam_megatron.checkpoint.opener import resolve_checkpoint_dir as resolve_load_dir

# ------------------------------------------------------------------------------------ 1. learning


@pytest.mark.parametrize("model,data", [
    ("dense", "mock"), ("bam-kv-sharing", "mock"), ("dense", "indexed"), ("bam", "indexed"),
])
def test_loss_falls(model, data, corpus, capsys):
    argv = TINY + NO_DROPOUT + ["--train-iters", "20", "--eval-interval", "10"]
    if model.startswith("bam"):
        argv += BAM
    if model == "bam-kv-sharing":
        argv += ["--bam-kv-sharing", "--num-query-groups", "2", "--group-query-attention"]
    if data == "mock":
        argv += MOCK
    else:
        argv += ["--data-path", corpus["web"], "--split", "90,9,1", "--valid-data-path", f"code:{corpus['code']}"]
    summary = training.pretrain(argv)
    out = capsys.readouterr().out

    losses = summary["train_losses"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: first {losses[:3]}, last {losses[-3:]}"
    # the log shows the same losses as the summary
    logged = train_log(out)
    assert sorted(logged) == list(range(1, 21))
    assert logged[20] == pytest.approx(losses[-1], rel=1e-6)

    names = {"valid", "code"} if data == "indexed" else {"valid"}
    assert set(summary["valid"]) == names
    validated = valid_log(out)
    assert set(validated) == names
    for name in names:
        iteration, loss = validated[name]
        assert iteration == 20 and loss == pytest.approx(summary["valid"][name], rel=1e-6)
        assert math.isfinite(loss) and loss < first
    assert "validation loss at iteration 10" in out  # --eval-interval


# ------------------------------------------------------------------------------------ 5. logging


def wandb_records(path: str) -> list:
    """The records of a ``run-*.wandb`` file (LevelDB-style log of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32 * 1024, 7
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, pending, records = header, b"", []
    while pos + header <= len(data):
        if block - pos % block < header:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        pos += header
        payload = data[pos:pos + length]
        pos += length
        if kind == 0 and length == 0:  # zero padding
            continue
        if kind == 1:
            whole = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            whole, pending = pending + payload, b""
        else:
            raise AssertionError(f"unknown record type {kind} at byte {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(whole)
        records.append(record)
    return records


def test_wandb_continues_the_same_run_across_requeues(tmp_path, monkeypatch, capsys):
    """The wandb run id is kept in <save>/wandb/run_id: a requeued command (here stopped by
    --exit-interval and run again) logs to the same wandb run; a finished one starts none."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ckpt = tmp_path / "ckpt"
    command = TINY + NO_DROPOUT + MOCK + ["--train-iters", "4", "--load", str(ckpt), "--save", str(ckpt),
                                          "--exit-interval", "2", "--wandb-project", "bam-tests"]
    training.pretrain(command)
    training.pretrain(command)
    assert training.pretrain(command)["exit_reason"] == "already trained"
    run_id = (ckpt / "wandb" / "run_id").read_text().strip()
    runs = sorted(glob.glob(str(ckpt / "wandb" / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs), (run_id, runs)
    steps = []
    for run in runs:
        records = wandb_records(glob.glob(os.path.join(run, "run-*.wandb"))[0])
        assert {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"} == {run_id}
        steps.append(sorted(r.history.step.num for r in records if r.WhichOneof("record_type") == "history"
                            and any((i.key or "/".join(i.nested_key)) == "lm loss" for i in r.history.item)))
    assert steps == [[1, 2], [3, 4]]


def test_wandb_offline_and_tensorboard(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_dir, tb_dir = tmp_path / "wandb", tmp_path / "tb"
    summary = training.pretrain(TINY + NO_DROPOUT + MOCK + [
        "--train-iters", "6", "--log-interval", "2", "--eval-interval", "3",
        "--wandb-project", "bam-tests", "--wandb-exp-name", "tiny-dense", "--wandb-save-dir", str(wandb_dir),
        "--tensorboard-dir", str(tb_dir),
    ])
    out = capsys.readouterr().out
    logged = train_log(out)
    assert sorted(logged) == [2, 4, 6]

    files = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, os.listdir(wandb_dir)
    history = {}
    names = set()
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            names.add(record.run.display_name)
        if kind != "history":
            continue
        step = record.history.step.num
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            history.setdefault(key, {})[step] = json.loads(item.value_json)
    assert "tiny-dense" in names
    assert history["lm loss"] == {it: summary["train_losses"][it - 1] for it in (2, 4, 6)}
    for it in (2, 4, 6):
        assert history["lm loss"][it] == pytest.approx(logged[it], rel=1e-6)
    assert set(history["validation/lm loss"]) == {3, 6}
    assert history["validation/lm loss"][6] == summary["valid"]["valid"]
    assert set(history["learning-rate"]) == {2, 4, 6}

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = glob.glob(str(tb_dir / "events.out.tfevents.*"))
    assert len(events) == 1
    scalars = {}
    for event in EventFileLoader(events[0]).Load():
        for value in event.summary.value:
            number = value.simple_value if value.HasField("simple_value") else float(
                torch.tensor(list(value.tensor.float_val)).item())
            scalars.setdefault(value.tag, {})[event.step] = number
    assert set(scalars["lm loss"]) == {2, 4, 6}
    for it in (2, 4, 6):
        assert scalars["lm loss"][it] == pytest.approx(summary["train_losses"][it - 1], rel=1e-6)
    assert scalars["validation/lm loss"][6] == pytest.approx(summary["valid"]["valid"], rel=1e-6)


# ------------------------------------------------------------------------------------ 6. bad input


def _bad_cases(tmp, ckpt):
    junk = os.path.join(tmp, "not_a_checkpoint")
    os.makedirs(junk, exist_ok=True)
    open(os.path.join(junk, "notes.txt"), "w").write("hello\n")
    train = ["--train-iters", str(GOOD_ITERS + 4)]
    save = ["--save", ckpt, "--save-interval", "1"]
    return {
        "missing-data-path": (TINY + BAM + train + save + ["--data-path", os.path.join(tmp, "nowhere", "web_text_document")],
                              1, ["--data-path", "not found"]),
        "global-batch-size": (TINY + BAM + MOCK + train + save + ["--global-batch-size", "6"],
                              1, ["--global-batch-size 6", "--micro-batch-size 4"]),
        "checkpoint-args-without-load": (TINY + BAM + MOCK + train + save + ["--use-checkpoint-args"],
                                         2, ["--use-checkpoint-args", "--load"]),
        "other-model-shape": (TINY + BAM + MOCK + train + save + ["--load", ckpt, "--hidden-size", "32"],
                              1, ["--hidden-size", "64", "32"]),
        "vocabulary-too-big": (TINY + BAM + MOCK + train + save + ["--load", ckpt, "--vocab-size", "300"],
                               1, ["vocabulary", "384", "256"]),
        "load-not-a-checkpoint": (TINY + BAM + MOCK + train + save + ["--load", junk],
                                  1, ["--load", junk]),
        "tp-does-not-divide-heads": (TINY + BAM + MOCK + train + save + ["--tensor-model-parallel-size", "3"],
                                     2, ["--tensor-model-parallel-size 3", "--num-attention-heads 4"]),
    }


BAD_CASES = ["missing-data-path", "global-batch-size", "checkpoint-args-without-load", "other-model-shape",
             "vocabulary-too-big", "load-not-a-checkpoint", "tp-does-not-divide-heads"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line_and_keeps_checkpoint(case, good, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(good["root"], ckpt)
    before = snapshot(ckpt)
    argv, code, words = _bad_cases(str(tmp_path), ckpt)[case]

    rc, out, err = run_main(argv, capsys)
    assert rc == code, (rc, _tail(out), _tail(err))
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("pretrain_bam.py: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert train_log(out) == {} and "[checkpoint] saved" not in out  # stopped before training
    # the good checkpoint is untouched and still the one to load
    assert snapshot(ckpt) == before
    assert resolve_load_dir(ckpt) == os.path.join(ckpt, f"iter_{GOOD_ITERS:07d}")
    assert_complete(resolve_load_dir(ckpt))


# ------------------------------------------------------------------------------------ 7. branching


def test_finetune_starts_fresh_and_keeps_last_checkpoints(good, tmp_path, capsys):
    """--finetune from the seed: iteration 0, fresh optimizer and LR schedule, the seed's
    weights; --keep-last-checkpoints 2 leaves the two newest checkpoints."""
    before = snapshot(good["root"])
    branch = str(tmp_path / "branch")
    steps = 5
    summary = training.pretrain(GOOD_ARGS + [
        "--load", good["root"], "--finetune", "--train-iters", str(steps), "--save", branch,
        "--save-interval", "1", "--keep-last-checkpoints", "2",
    ])
    out = capsys.readouterr().out
    load_line = next(line for line in out.splitlines() if line.startswith("[checkpoint] loaded"))
    assert load_line.startswith(f"[checkpoint] loaded {good['root']}/iter_{GOOD_ITERS:07d} at iteration 0")
    # the optimizer is named once, and not as --no-load-optim (a flag this command has not)
    assert load_line.count("optimizer") == 1 and "--no-load-optim" not in load_line, load_line
    assert summary["iteration"] == steps
    assert sorted(train_log(out)) == list(range(1, steps + 1))
    first_line = next(line for line in out.splitlines() if TRAIN_LINE.search(line))
    assert "consumed samples:            8 |" in first_line
    assert "learning rate: 1.500000E-03" in first_line  # warm-up restarts: lr/2 at step 1 of 2
    # the seed's weights: far better than a new model's first step
    assert summary["train_losses"][0] < good["losses"][0] - 0.5

    assert iter_dirs(branch) == [f"iter_{steps - 1:07d}", f"iter_{steps:07d}"]
    assert read_tracker(branch) == steps
    common = common_state(os.path.join(branch, f"iter_{steps:07d}"))
    assert common["iteration"] == steps
    assert common["consumed_train_samples"] == steps * 8
    assert common["opt_param_scheduler"]["num_steps"] == steps * 8
    assert float(common["optimizer"]["state"]["common_step"]) == steps  # Adam restarted
    assert snapshot(good["root"]) == before
