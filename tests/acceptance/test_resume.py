"""Acceptance tests of resuming and moving checkpoints between layouts: torchrun at TP2 / PP2 /
EP2 resuming one-process checkpoints, two "nodes" on localhost, a run killed with SIGKILL (one
and two processes) resuming bit for bit, and a one-process checkpoint evaluating to the same loss
at every layout. Helpers and fixtures: ``support/training.py``, ``conftest.py``."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
from support import REPO_ROOT as ROOT  # noqa: E402
from support.training import (
    BAM,
    GOOD_ARGS,
    GOOD_ITERS,
    MOCK,
    NO_DROPOUT,
    SAVED_LINE,
    SCRIPT,
    TINY,
    _tail,
    assert_complete,
    aux_log,
    error_lines,
    free_port,
    iter_dirs,
    run_main,
    subprocess_env,
    torchrun,
    train_log,
    valid_log,
)

from bam_megatron import training
from bam_megatron.checkpoint.layout import TRACKER
from bam_megatron.checkpoint.opener import read_tracker
from bam_megatron.checkpoint.opener import resolve_checkpoint_dir as resolve_load_dir

# ------------------------------------------------------------------------------------ 2. torchrun

LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "ep2": ["--expert-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}


def _assert_matches_good(out, good, first_iteration, tol=2e-3):
    """Training lines from ``first_iteration`` on and the final validation agree with the
    one-process run: lm loss, and the MoE aux losses (means over the whole global batch)."""
    losses, aux = train_log(out), aux_log(out)
    assert sorted(losses) == list(range(first_iteration, GOOD_ITERS + 1))
    for it, loss in losses.items():
        assert math.isfinite(loss)
        assert loss == pytest.approx(good["losses"][it - 1], abs=tol), (it, loss, good["losses"][it - 1])
        assert aux[it] == pytest.approx(good["aux"][it], rel=tol), (it, aux[it], good["aux"][it])
    iteration, valid = valid_log(out)["valid"]
    assert iteration == GOOD_ITERS and math.isfinite(valid)
    assert valid == pytest.approx(good["valid"], abs=tol)


@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_torchrun_resumes_one_process_checkpoint(layout, good):
    """Two processes at TP2 (+ sequence parallel) / PP2 resume the one-process checkpoint
    (weights and optimizer state resharded) and train on: the losses of the one-process run,
    finite final validation."""
    half = GOOD_ITERS // 2
    out = torchrun(GOOD_ARGS + LAYOUTS[layout] + ["--load", os.path.join(good["root"], f"iter_{half:07d}")])
    assert f"loaded {good['root']}/iter_{half:07d} at iteration {half}" in out
    _assert_matches_good(out, good, half + 1)


def test_torchrun_ep2_trains_from_one_process_weights(good):
    """EP2 (2 data-parallel ranks, 1 micro-batch each) resumes the one-process weights with a
    fresh optimizer and trains: the first step sees the same weights and data, so the same lm
    loss and aux losses; every loss and the final validation loss are finite."""
    half = GOOD_ITERS // 2
    out = torchrun(GOOD_ARGS + LAYOUTS["ep2"] + [
        "--load", os.path.join(good["root"], f"iter_{half:07d}"), "--no-load-optim"])
    assert f"at iteration {half}" in out
    losses, aux = train_log(out), aux_log(out)
    assert sorted(losses) == list(range(half + 1, GOOD_ITERS + 1))
    assert all(math.isfinite(x) for x in losses.values())
    assert losses[half + 1] == pytest.approx(good["losses"][half], rel=1e-5)
    assert aux[half + 1] == pytest.approx(good["aux"][half + 1], rel=1e-5)
    assert losses[GOOD_ITERS] < losses[half + 1]
    iteration, valid = valid_log(out)["valid"]
    assert iteration == GOOD_ITERS and math.isfinite(valid)


def test_torchrun_ep2_refuses_one_process_optimizer_state(good):
    """EP1 keeps one optimizer, EP2 a dense + expert pair: resuming the one-process optimizer
    state at EP2 is a clear error that names the way out (--no-load-optim), before training."""
    half = GOOD_ITERS // 2
    proc = torchrun(GOOD_ARGS + LAYOUTS["ep2"] + ["--load", os.path.join(good["root"], f"iter_{half:07d}")],
                    check=False)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 2, proc.stderr  # one whole line from each rank
    assert all(line.startswith("pretrain_bam.py: error: checkpoint ") and line.count("error:") == 1
               for line in lines), proc.stderr
    assert all("--no-load-optim" in line and "--expert-model-parallel-size" in line for line in lines)
    assert train_log(proc.stdout) == {}


def test_two_nodes_on_localhost(tmp_path):
    """Two torchrun agents (--nnodes 2, one process each) rendezvous on localhost and train an
    EP2 BAM model across the 'nodes'."""
    port = free_port()
    argv = TINY + NO_DROPOUT + BAM + MOCK + ["--train-iters", "3", "--expert-model-parallel-size", "2"]
    procs, logs = [], []
    for node in range(2):
        log = open(tmp_path / f"node{node}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), SCRIPT, *argv],
            cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
        ))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    assert codes == [0, 0], "\n".join(_tail(t) for t in texts)
    assert "[data]" in texts[0]  # rank 0 lives on node 0
    assert sorted(train_log(texts[1])) == [1, 2, 3]  # the last rank (node 1) logs
    assert train_log(texts[0]) == {}
    assert math.isfinite(valid_log(texts[1])["valid"][1])


# ------------------------------------------------------------------------------------ 3. resume


def test_killed_run_resumes_exactly(tmp_path):
    """SIGKILL after the checkpoint at iteration K, resume with --load: every later loss (and
    the final validation loss) equals the uninterrupted run's, with dropout on."""
    n, k = 8, 4
    argv = TINY + BAM + MOCK + ["--hidden-dropout", "0.2", "--attention-dropout", "0.2", "--train-iters", str(n)]
    reference = training.pretrain(argv)
    assert len(reference["train_losses"]) == n

    ckpt = str(tmp_path / "ckpt")
    cmd = [sys.executable, SCRIPT, *argv, "--save", ckpt, "--save-interval", str(k)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            seen.append(line)
            saved = SAVED_LINE.search(line)
            if saved and saved.group(1).endswith(f"iter_{k:07d}"):
                os.killpg(proc.pid, signal.SIGKILL)  # the run and its checkpoint writer helpers
                break
            assert time.monotonic() < deadline, "no checkpoint line in time"
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        proc.stdout.close()
    log = "".join(seen)
    assert proc.returncode == -signal.SIGKILL, _tail(log)
    # the killed run agrees with the reference up to K (as far as the log's digits go)
    killed = train_log(log)
    assert set(range(1, k + 1)) <= set(killed)
    for it in range(1, k + 1):
        assert killed[it] == pytest.approx(reference["train_losses"][it - 1], rel=1e-6)

    # what the kill left behind: the tracker at K, and nothing half-written that looks valid
    assert read_tracker(ckpt) == k
    assert resolve_load_dir(ckpt) == os.path.join(ckpt, f"iter_{k:07d}")
    for name in iter_dirs(ckpt):
        assert_complete(os.path.join(ckpt, name))
    # (and the lock of the killed run, which the next run takes over)
    assert set(os.listdir(ckpt)) <= {TRACKER, f"iter_{k:07d}", f"iter_{n:07d}.tmp", ".bam_save.lock"}

    resumed = training.pretrain(argv + ["--load", ckpt, "--save", ckpt])
    assert resumed["iteration"] == n
    assert resumed["train_losses"] == reference["train_losses"][k:]  # exact on CPU
    assert resumed["valid"] == reference["valid"]
    assert read_tracker(ckpt) == n
    assert iter_dirs(ckpt) == [f"iter_{k:07d}", f"iter_{n:07d}"]
    assert not [name for name in os.listdir(ckpt) if name.endswith(".tmp")]


@pytest.mark.parametrize("layout,optim", [("dp2", "distributed"), ("ep2", "distributed"), ("ep2", "plain")])
def test_two_process_run_resumes_exactly(layout, optim, tmp_path, capsys):
    """Two processes (data parallel, or EP2 with its chain of a dense and an expert optimizer;
    plain or --use-distributed-optimizer with Adam moments sharded over data-parallel ranks): an
    8-step run saves at step 4; resuming from that checkpoint gives the same losses 5-8 (exact on
    CPU). Distributed-optimizer state saved at DP2 also resumes in one process (DP1); at another
    TP size, or into the plain optimizer, it is refused with one line naming --no-load-optim."""
    n, k = 8, 4
    argv = TINY + NO_DROPOUT + BAM + MOCK + ["--train-iters", str(n)] + LAYOUTS.get(layout, [])
    if optim == "distributed":
        argv.append("--use-distributed-optimizer")
    ckpt = str(tmp_path / "ckpt")
    reference = train_log(torchrun(argv + ["--save", ckpt, "--save-interval", str(k)]))
    assert sorted(reference) == list(range(1, n + 1))
    half = os.path.join(ckpt, f"iter_{k:07d}")

    out = torchrun(argv + ["--load", half])
    assert "starting the optimizer fresh" not in out
    resumed = train_log(out)
    assert sorted(resumed) == list(range(k + 1, n + 1))
    for it in resumed:
        assert resumed[it] == pytest.approx(reference[it], rel=1e-6), it
    if layout != "dp2":
        return

    one = training.pretrain(argv + ["--load", half])  # DP1: the DP2 shards gathered
    for it, loss in enumerate(one["train_losses"], start=k + 1):
        assert loss == pytest.approx(reference[it], rel=1e-4), it

    proc = torchrun(argv + LAYOUTS["tp2"] + ["--load", half], check=False)
    assert proc.returncode != 0 and train_log(proc.stdout) == {}
    lines = error_lines(proc.stderr)
    assert lines and all("distributed-optimizer state saved at TP 1" in line and "--no-load-optim" in line
                         for line in lines), proc.stderr
    plain = [a for a in argv if a != "--use-distributed-optimizer"]
    rc, out, err = run_main(plain + ["--load", half], capsys)
    assert rc == 1 and train_log(out) == {}
    assert err.count("\n") == 1 and "saved with --use-distributed-optimizer" in err and "--no-load-optim" in err


# ------------------------------------------------------------------------------------ 4. layouts


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_loads_at_other_layout(layout, good):
    """Saved by one process, evaluated (--skip-train) at TP2 / EP2 / PP2: same validation loss."""
    out = torchrun(GOOD_ARGS + LAYOUTS[layout] + ["--load", good["root"], "--skip-train"])
    assert f"at iteration {GOOD_ITERS}" in out
    assert train_log(out) == {}
    iteration, valid = valid_log(out)["valid"]
    assert iteration == GOOD_ITERS
    assert valid == pytest.approx(good["valid"], abs=1e-5)


def test_checkpoint_reloads_in_one_process(good, capsys):
    summary = training.pretrain(GOOD_ARGS + ["--load", good["root"], "--skip-train"])
    assert summary["train_losses"] == [] and summary["iteration"] == GOOD_ITERS
    assert summary["valid"]["valid"] == pytest.approx(good["valid"], abs=1e-6)
    assert f"validation loss at iteration {GOOD_ITERS}" in capsys.readouterr().out

