"""One command line for the first run and every requeue, and the SLURM templates that use it.

* ``--load X --save X --pretrained-checkpoint SEED`` starts from SEED (weights only) the first
  time, and from X afterwards;
* ``--load`` of an absent or empty folder starts from scratch with one warning;
  ``--exit-on-missing-checkpoint`` makes it an error;
* ``examples/slurm/seed.sbatch`` without SLURM (stub ``scontrol`` / ``sbatch`` commands; a
  one-node job starts its ranks with ``tools/torchrun.py``): USR1 (what ``#SBATCH
  --signal=B:USR1@300`` sends) makes the run save and stop, the job requeues itself, and the same
  script resumes and finishes; ``submit.sh`` creates ``logs/``. ``test_slurm.py`` runs every
  template on a real SLURM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from support import REPO_ROOT
from support.training import (
    MOCK,
    NO_DROPOUT,
    TINY,
    _tail,
    error_lines,
    finish,
    free_port,
    read_until,
    run_main,
    subprocess_env,
)

from bam_megatron import training
from bam_megatron.checkpoint.opener import read_tracker

DENSE = TINY + NO_DROPOUT + MOCK


def test_branch_command_starts_from_the_seed_then_resumes_itself(tmp_path, capsys):
    seed, branch = str(tmp_path / "seed"), str(tmp_path / "branch")
    training.pretrain(DENSE + ["--train-iters", "4", "--save", seed])
    command = DENSE + ["--train-iters", "6", "--load", branch, "--save", branch, "--pretrained-checkpoint", seed,
                       "--exit-interval", "3"]
    rc, out, err = run_main(command, capsys)
    assert rc == 0, err
    assert f"--load {branch} holds no checkpoint yet: starting from --pretrained-checkpoint {seed}" in out
    assert f"loaded {seed}/iter_0000004 at iteration 0" in out and "weights only" in out
    assert read_tracker(branch) == 3
    rc, out, err = run_main(command, capsys)
    assert rc == 0, err
    assert f"loaded {branch}/iter_0000003 at iteration 3" in out and "holds no checkpoint" not in out
    assert read_tracker(branch) == 6


def test_missing_load_starts_from_scratch_unless_told_otherwise(tmp_path, capsys):
    empty = str(tmp_path / "nothing_yet")
    rc, out, err = run_main(DENSE + ["--train-iters", "3", "--load", empty, "--save", empty], capsys)
    assert rc == 0, err
    assert f"WARNING: --load {empty} holds no checkpoint yet: starting from scratch" in out
    assert read_tracker(empty) == 3
    other = str(tmp_path / "other")
    rc, _out, err = run_main(DENSE + ["--train-iters", "3", "--load", other, "--exit-on-missing-checkpoint"], capsys)
    assert rc == 1 and len(error_lines(err)) == 1 and "--exit-on-missing-checkpoint" in err


_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "requeue $2" >> "$STUB_LOG" ;;
esac
"""
_SBATCH = """#!/usr/bin/env bash
echo "sbatch $*" >> "$STUB_LOG"
"""


@pytest.fixture
def slurm(tmp_path):
    """Stub scontrol / sbatch on PATH and the environment a batch job would see."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", _SCONTROL), ("sbatch", _SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = subprocess_env()
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_LOG=str(tmp_path / "stub.log"), SLURM_JOB_ID="4242",
        SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", GPUS_PER_NODE="1", MASTER_PORT=str(free_port()),
        PYTHON=sys.executable, CKPT_DIR=str(tmp_path / "ckpt"), WANDB_MODE="disabled",
        MODEL_ARGS=" ".join(TINY[:TINY.index("--vocab-size")] + NO_DROPOUT),
        TOKENIZER_ARGS="--tokenizer-type NullTokenizer --vocab-size 128", DATA_ARGS="--mock-data",
        TRAIN_ITERS="40", SAVE_INTERVAL="100", MBS="4", GBS="8",
        EXTRA_ARGS="--lr-warmup-iters 2 --log-interval 1 --eval-iters 1 --eval-interval 1000",
    )
    return env, tmp_path


def test_seed_template_saves_on_usr1_requeues_and_resumes(slurm):
    env, tmp = slurm
    proc = subprocess.Popen(["bash", "examples/slurm/seed.sbatch"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        read_until(proc, r"iteration\s+3/", seen)
        os.kill(proc.pid, signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@300 does
        log = finish(proc, seen)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, _tail(log)
    stopped = read_tracker(os.path.join(env["CKPT_DIR"], "seed"))
    assert 3 <= stopped < 40, _tail(log)
    assert "received SIGUSR1" in log and "requeueing job 4242" in log, _tail(log)
    assert (tmp / "stub.log").read_text().splitlines() == ["requeue 4242"]

    again = subprocess.run(["bash", "examples/slurm/seed.sbatch"], cwd=REPO_ROOT, env=dict(env, SLURM_RESTART_COUNT="1"),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, _tail(again.stdout + again.stderr)
    assert f"at iteration {stopped}" in again.stdout and "[slurm] finished: iteration 40 of 40" in again.stdout
    assert read_tracker(os.path.join(env["CKPT_DIR"], "seed")) == 40
    assert (tmp / "stub.log").read_text().splitlines() == ["requeue 4242"]  # no second requeue


def test_submit_creates_the_log_folder(slurm, tmp_path):
    env, tmp = slurm
    work = tmp_path / "checkout"
    (work / "examples" / "slurm").mkdir(parents=True)
    script = os.path.join(REPO_ROOT, "examples", "slurm", "submit.sh")
    (work / "examples" / "slurm" / "submit.sh").write_text(open(script).read())
    proc = subprocess.run(["bash", "examples/slurm/submit.sh", "examples/slurm/seed.sbatch", "--qos=high"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (work / "logs").is_dir()
    assert (tmp / "stub.log").read_text().strip() == "sbatch --qos=high examples/slurm/seed.sbatch"


def test_templates_are_valid_bash_and_use_the_requeue_pattern():
    folder = os.path.join(REPO_ROOT, "examples", "slurm")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        check = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert check.returncode == 0, (name, check.stderr)
        text = open(path).read()
        if name in ("seed.sbatch", "branch.sbatch", "bam.sbatch"):
            assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text and "run_training" in text, name
        if name.endswith(".sbatch"):
            assert "--output=logs/" in text, name
    common = open(os.path.join(folder, "common.sh")).read()
    assert "data/tokenizer/tokenizer.json" in common and os.path.isfile(os.path.join(REPO_ROOT, "data", "tokenizer", "tokenizer.json"))
    assert textwrap.dedent(common).count("--exit-signal-handler") == 1
