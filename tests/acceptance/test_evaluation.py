"""Evaluation is reproducible: every evaluation of a run reads the same validation samples, the
training log and a later evaluation of the checkpoint (what tools/evaluate_bam.py runs) agree,
and --full-validation gives one value whatever the batch size."""

from __future__ import annotations

import csv

import pytest
from support.training import BAM, NO_DROPOUT, TINY

from bam_megatron import training
from bam_megatron.cli import evaluate

EVAL = ["--eval-iters", "2", "--micro-batch-size", "4", "--global-batch-size", "8"]


def _evaluate(ckpt, corpus, *extra):
    """The summary of the run tools/evaluate_bam.py starts for ``ckpt`` (its own arguments and
    command: ``cli/evaluate.py``)."""
    args, models, passthrough = evaluate.parse_args(["--model", f"m={ckpt}", "--valid-data-path", f"code:{corpus['code']}",
                                                     "--out-dir", "unused", *EVAL, *extra])
    return evaluate.evaluate_model(models[0][1], args, passthrough)


def test_training_log_and_a_later_evaluation_agree(corpus, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    argv = TINY + NO_DROPOUT + BAM + EVAL + ["--data-path", corpus["web"], "--split", "100,0,0",
                                             "--valid-data-path", f"code:{corpus['code']}",
                                             "--train-iters", "6", "--save", ckpt]
    trained = training.pretrain(argv)
    later = _evaluate(ckpt, corpus)
    assert later["valid"]["code"] == pytest.approx(trained["valid"]["code"], rel=1e-6)
    out = tmp_path / "results"
    assert evaluate.main(["--model", f"tiny={ckpt}", "--valid-data-path", f"code:{corpus['code']}",
                          "--out-dir", str(out), *EVAL]) == 0
    with open(out / "results.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["model"] == "tiny" and float(row["code_loss"]) == pytest.approx(trained["valid"]["code"], rel=1e-6)
    again = _evaluate(ckpt, corpus)
    assert again["valid"] == later["valid"]  # the same samples every time

    full8 = _evaluate(ckpt, corpus, "--full-validation")
    full16 = _evaluate(ckpt, corpus, "--full-validation", "--global-batch-size", "16", "--micro-batch-size", "8")
    assert full8["valid"]["code"] == pytest.approx(full16["valid"]["code"], rel=1e-5)
    assert full8["valid"]["code"] != pytest.approx(later["valid"]["code"], rel=1e-9)  # a whole pass, not 2 batches
