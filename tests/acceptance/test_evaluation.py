"""Evaluation is reproducible: every evaluation of a run reads the same validation samples, the
training log and a later evaluation of the checkpoint (what tools/evaluate_bam.py runs) agree,
and --full-validation gives one value whatever the batch size."""

from __future__ import annotations

import pytest
from support.training import BAM, NO_DROPOUT, TINY

from bam_megatron import training

EVAL = ["--eval-iters", "2", "--micro-batch-size", "4", "--global-batch-size", "8"]


def _evaluate(ckpt, corpus, *extra):
    return training.pretrain(["--load", ckpt, "--use-checkpoint-args", "--skip-train", "--no-load-optim",
                              "--no-load-rng", "--valid-data-path", f"code:{corpus['code']}", *EVAL, *extra])


def test_training_log_and_a_later_evaluation_agree(corpus, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    argv = TINY + NO_DROPOUT + BAM + EVAL + ["--data-path", corpus["web"], "--split", "100,0,0",
                                             "--valid-data-path", f"code:{corpus['code']}",
                                             "--train-iters", "6", "--save", ckpt]
    trained = training.pretrain(argv)
    later = _evaluate(ckpt, corpus)
    assert later["valid"]["code"] == pytest.approx(trained["valid"]["code"], rel=1e-6)
    again = _evaluate(ckpt, corpus)
    assert again["valid"] == later["valid"]  # the same samples every time

    full8 = _evaluate(ckpt, corpus, "--full-validation")
    full16 = _evaluate(ckpt, corpus, "--full-validation", "--global-batch-size", "16", "--micro-batch-size", "8")
    assert full8["valid"]["code"] == pytest.approx(full16["valid"]["code"], rel=1e-5)
    assert full8["valid"]["code"] != pytest.approx(later["valid"]["code"], rel=1e-9)  # a whole pass, not 2 batches
