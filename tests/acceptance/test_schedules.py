"""The learning-rate schedule of a resumed run follows Megatron-LM's rules, and says where it is.

* a longer --train-iters (so a longer decay) without a flag: one-line refusal naming both values;
* with --override-opt-param-scheduler: the learning rates of a fresh run with the new schedule,
  at the same iterations (never the old schedule's decayed-to-zero tail) — for a longer
  --train-iters and for each other schedule flag alone (--lr, --min-lr, --lr-warmup-iters,
  --lr-decay-iters, --lr-decay-style), and the start-up line states the new values;
* with --use-checkpoint-opt-param-scheduler: the checkpoint's schedule continues;
* --no-load-optim (not --finetune): the schedule continues from the loaded iteration;
* the first log lines state the schedule: step, total, current learning rate.
"""

from __future__ import annotations

import pytest
from support.training import BAM, MOCK, NO_DROPOUT, TINY, error_lines, lr_log, run_main

from bam_megatron import training

BASE = TINY + NO_DROPOUT + BAM + MOCK + ["--min-lr", "3e-4"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run of 10 iterations (cosine decay over 10) checkpointed at 10."""
    ckpt = str(tmp_path_factory.mktemp("sched") / "ckpt")
    training.pretrain(BASE + ["--train-iters", "10", "--save", ckpt])
    return ckpt


def _lrs(argv, capsys):
    rc, out, err = run_main(argv, capsys)
    assert rc == 0, err
    return lr_log(out), out


def test_longer_schedule_is_refused_without_a_flag(saved, capsys):
    rc, _out, err = run_main(BASE + ["--train-iters", "20", "--load", saved], capsys)
    assert rc == 1
    lines = error_lines(err)
    assert len(lines) == 1 and "--train-iters 20" in lines[0] and "10" in lines[0], err
    assert "--override-opt-param-scheduler" in lines[0] and "--use-checkpoint-opt-param-scheduler" in lines[0]


def test_override_gives_a_fresh_runs_learning_rates(saved, tmp_path, capsys):
    fresh, _ = _lrs(BASE + ["--train-iters", "20"], capsys)
    resumed, out = _lrs(BASE + ["--train-iters", "20", "--load", saved, "--override-opt-param-scheduler"], capsys)
    assert sorted(resumed) == list(range(11, 21))
    for it in range(11, 21):
        assert resumed[it] == pytest.approx(fresh[it], rel=1e-6), it
    assert resumed[11] > 1e-3  # mid-decay of the new schedule, not the old schedule's end (3e-4)
    assert "[schedule] iteration 10 of 20" in out and "--override-opt-param-scheduler" in out


@pytest.fixture(scope="module")
def halfway(tmp_path_factory):
    """A 12-iteration run (cosine, warm-up 2, --lr 3e-3, --min-lr 3e-4) stopped and saved at 6."""
    ckpt = str(tmp_path_factory.mktemp("sched_half") / "ckpt")
    training.pretrain(BASE + ["--train-iters", "12", "--save", ckpt, "--exit-interval", "6"])
    return ckpt


CHANGES = {
    "lr": (["--lr", "1e-3"], "from 0.001 to 0.0003"),
    "min-lr": (["--min-lr", "1.5e-3"], "from 0.003 to 0.0015"),
    "warm-up": (["--lr-warmup-iters", "8"], "warm-up 8 iterations"),
    "decay-iters": (["--lr-decay-iters", "30"], "decay to iteration 30"),
    "decay-style": (["--lr-decay-style", "linear"], "linear decay"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_override_applies_each_schedule_flag(halfway, change, capsys):
    """Resuming at 6 with one schedule flag changed and --override-opt-param-scheduler: the
    learning rates of iterations 7..12 are a fresh run's with the same flags (not the
    checkpoint's, whose param groups carry the old --lr / --min-lr), and the [schedule] line
    states the new value."""
    flags, stated = CHANGES[change]
    argv = BASE + ["--train-iters", "12"] + flags
    fresh, _ = _lrs(argv, capsys)
    resumed, out = _lrs(argv + ["--load", halfway, "--override-opt-param-scheduler"], capsys)
    assert sorted(resumed) == list(range(7, 13))
    for it in range(7, 13):
        assert resumed[it] == pytest.approx(fresh[it], rel=1e-6), (it, resumed, fresh)
    line = next(x for x in out.splitlines() if x.startswith("[schedule]"))
    assert "iteration 6 of 12" in line and stated in line, line


def test_override_applies_the_weight_decay(halfway, capsys):
    """A new --weight-decay (and a weight-decay schedule) takes effect on resume."""
    rc, out, err = run_main(BASE + ["--train-iters", "12", "--load", halfway, "--weight-decay", "0.1"], capsys)
    assert rc == 1 and "--start-weight-decay 0.1 differs from the 0.01" in err, err
    _, out = _lrs(BASE + ["--train-iters", "12", "--load", halfway, "--weight-decay", "0.1",
                          "--override-opt-param-scheduler"], capsys)
    assert "; weight decay 0.1;" in out
    _, out = _lrs(BASE + ["--train-iters", "12", "--load", halfway, "--weight-decay-incr-style", "linear",
                          "--start-weight-decay", "0", "--end-weight-decay", "0.12",
                          "--override-opt-param-scheduler"], capsys)
    assert "; weight decay linear from 0 to 0.12 (now 0.06);" in out


def test_checkpoint_schedule_continues_with_its_flag(saved, capsys):
    resumed, out = _lrs(BASE + ["--train-iters", "14", "--load", saved, "--use-checkpoint-opt-param-scheduler"], capsys)
    assert sorted(resumed) == list(range(11, 15))
    assert all(lr == pytest.approx(3e-4) for lr in resumed.values())  # past the old decay: min LR
    assert "[schedule] iteration 10 of 14" in out and "the checkpoint's" in out


def test_no_load_optim_continues_the_schedule(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    argv = BASE + ["--train-iters", "10"]
    full, _ = _lrs(argv, capsys)
    training.pretrain(argv + ["--save", ckpt, "--exit-interval", "5"])
    resumed, out = _lrs(argv + ["--load", ckpt, "--no-load-optim"], capsys)
    assert sorted(resumed) == list(range(6, 11))
    for it in range(6, 11):
        assert resumed[it] == pytest.approx(full[it], rel=1e-6), it  # not restarted at warm-up
    assert "[schedule] iteration 5 of 10" in out and "continued from the checkpoint's step" in out
