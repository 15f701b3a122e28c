"""Acceptance tests of the training program (``pretrain_bam.py`` / ``bam_megatron.training``).

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
* wandb (offline) and TensorBoard receive the logged losses;
* bad inputs stop with one error line before training and leave a good checkpoint intact; a
  diverging run (NaN) skips steps, then stops without saving anything after the NaN;
* ``--finetune`` starts a new run at iteration 0 with a fresh optimizer;
  ``--keep-last-checkpoints`` keeps only the newest checkpoints.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch

from bam_megatron import training
from bam_megatron.train_checkpoint import TRACKER, read_common, read_tracker, resolve_load_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "pretrain_bam.py")

TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--vocab-size", "128", "--micro-batch-size", "4", "--global-batch-size", "8",
    "--lr", "3e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
    "--log-interval", "1", "--eval-iters", "2", "--eval-interval", "1000",
]
NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]
BAM = [
    "--bam-attn-experts", "2", "--num-experts", "2", "--moe-router-topk", "1",
    "--moe-router-pre-softmax", "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001",
]
MOCK = ["--mock-data"]

# The shared checkpoint: a BAM model trained GOOD_ITERS steps, saved every GOOD_ITERS // 2.
GOOD_ITERS = 8
GOOD_ARGS = TINY + NO_DROPOUT + BAM + MOCK + ["--train-iters", str(GOOD_ITERS)]

TRAIN_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*? lm loss: (\S+) \|")
VALID_LINE = re.compile(r"validation loss(?: \((\S+)\))? at iteration (\d+) \| lm loss value: (\S+) \|")
SKIP_LINE = re.compile(r"\[train\] iteration (\d+): .*; step skipped \((\d+)/(\d+) allowed\)")
SAVED_LINE = re.compile(r"\[checkpoint\] saved (\S+)")
AUX_LINE = re.compile(r"iteration\s+(\d+)/.*? z_loss: (\S+) \| load_balancing_loss: (\S+) \|")


# ------------------------------------------------------------------------------------ helpers


def train_log(text: str) -> dict:
    """``{iteration: lm loss}`` from the training lines of a log."""
    return {int(m.group(1)): float(m.group(3)) for m in TRAIN_LINE.finditer(text)}


def aux_log(text: str) -> dict:
    """``{iteration: (z_loss, load_balancing_loss)}`` from the training lines of a MoE run."""
    return {int(m.group(1)): (float(m.group(2)), float(m.group(3))) for m in AUX_LINE.finditer(text)}


def valid_log(text: str) -> dict:
    """``{name: (iteration, loss)}`` of the last validation line of each set ('valid' unnamed)."""
    return {(m.group(1) or "valid"): (int(m.group(2)), float(m.group(3))) for m in VALID_LINE.finditer(text)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def torchrun(argv, nproc: int = 2, timeout: float = 300, check: bool = True):
    """Run pretrain_bam.py under torchrun on one node. Returns stdout (asserting exit code 0), or
    with ``check=False`` the CompletedProcess."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), SCRIPT, *argv,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if not check:
        return proc
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
    return proc.stdout


def run_main(argv, capsys):
    """``training.main(argv)`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = training.main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(root: str) -> dict:
    """``{relative path: sha256}`` of every file under ``root``."""
    result = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return result


def iter_dirs(root: str) -> list:
    """Names of the directories that look like checkpoints (``iter_NNNNNNN``), sorted."""
    return sorted(n for n in os.listdir(root) if re.fullmatch(r"iter_\d{7}", n))


def assert_complete(ckpt_dir: str) -> None:
    """A directory named like a checkpoint must be a whole, readable one."""
    for name in ("metadata.json", ".metadata", "common.pt"):
        assert os.path.isfile(os.path.join(ckpt_dir, name)), f"{ckpt_dir} lacks {name}"
    assert glob.glob(os.path.join(ckpt_dir, "*.distcp")), f"{ckpt_dir} has no tensor files"
    assert int(read_common(ckpt_dir)["iteration"]) == int(os.path.basename(ckpt_dir)[len("iter_"):])


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if "error:" in line]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread in this process, like the OMP_NUM_THREADS=1 subprocesses (same
    arithmetic, so a one-process run here and one in a subprocess agree bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def good(tmp_path_factory, one_thread):
    """A one-process BAM run of GOOD_ITERS steps, checkpointed halfway and at the end."""
    root = str(tmp_path_factory.mktemp("good") / "ckpt")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        summary = training.pretrain(GOOD_ARGS + ["--save", root, "--save-interval", str(GOOD_ITERS // 2)])
    assert len(summary["train_losses"]) == GOOD_ITERS and summary["iteration"] == GOOD_ITERS
    assert read_tracker(root) == GOOD_ITERS
    aux = aux_log(log.getvalue())
    assert sorted(aux) == list(range(1, GOOD_ITERS + 1))
    return {"root": root, "losses": summary["train_losses"], "valid": summary["valid"]["valid"], "aux": aux}


def _write_corpus(path: str, seed: int, docs: int) -> None:
    """Documents of consecutive token ids (a learnable pattern) as NullTokenizer text."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            start, length = rng.randrange(128), rng.randrange(20, 80)
            f.write(json.dumps({"text": " ".join(str((start + k) % 128) for k in range(length))}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Indexed datasets built with tools/preprocess_data.py: a training corpus and a 'code' set."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.remove(os.path.join(ROOT, "tools"))
    d = tmp_path_factory.mktemp("corpus")
    prefixes = {}
    for name, seed, docs in (("web", 1, 400), ("code", 2, 100)):
        jsonl = str(d / f"{name}.jsonl")
        _write_corpus(jsonl, seed, docs)
        stats = preprocess_data.main([
            "--input", jsonl, "--output-prefix", str(d / name), "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "128", "--append-eod", "--workers", "1",
        ])
        assert stats["text"]["documents"] == docs
        prefixes[name] = str(d / f"{name}_text_document")
        assert os.path.isfile(prefixes[name] + ".bin") and os.path.isfile(prefixes[name] + ".idx")
    return prefixes


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
    assert set(os.listdir(ckpt)) <= {TRACKER, f"iter_{k:07d}", f"iter_{n:07d}.tmp"}

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


def test_nan_steps_are_skipped_then_stop_without_saving(good, tmp_path, capsys):
    """--lr 1e30 blows the weights up after one step: the NaN steps are skipped and counted,
    the run stops after --max-skipped-nan-iters with its message, and no checkpoint is written
    from the NaN on; the checkpoints from before still load."""
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(good["root"], ckpt)
    last_good = f"iter_{GOOD_ITERS:07d}"
    before = snapshot(os.path.join(ckpt, last_good))
    argv = GOOD_ARGS + [
        "--train-iters", str(GOOD_ITERS + 10), "--load", ckpt, "--no-load-optim", "--save", ckpt,
        "--save-interval", "1", "--lr", "1e30", "--lr-warmup-iters", "0", "--max-skipped-nan-iters", "2",
    ]
    rc, out, err = run_main(argv, capsys)
    assert rc == 1, (_tail(out), _tail(err))
    lines = error_lines(err)
    assert len(lines) == 1 and "--max-skipped-nan-iters 2" in lines[0], err
    assert "Traceback" not in err

    # one finite (huge) step, then NaN: skipped steps counted 1/2, 2/2, 3/2, then the stop
    first = GOOD_ITERS + 1
    assert sorted(train_log(out)) == [first]
    skips = [(int(m.group(1)), int(m.group(2)), int(m.group(3))) for m in SKIP_LINE.finditer(out)]
    assert skips == [(first + 1, 1, 2), (first + 2, 2, 2), (first + 3, 3, 2)]

    # saved: the step before the NaN; nothing from the NaN on
    assert iter_dirs(ckpt) == sorted([f"iter_{GOOD_ITERS // 2:07d}", last_good, f"iter_{first:07d}"])
    assert read_tracker(ckpt) == first
    assert not [name for name in os.listdir(ckpt) if name.endswith(".tmp")]
    assert snapshot(os.path.join(ckpt, last_good)) == before
    summary = training.pretrain(GOOD_ARGS + ["--load", os.path.join(ckpt, last_good), "--skip-train"])
    assert summary["valid"]["valid"] == pytest.approx(good["valid"], abs=1e-6)


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
    assert f"[checkpoint] loaded {good['root']}/iter_{GOOD_ITERS:07d} at iteration 0" in out
    assert summary["iteration"] == steps
    assert sorted(train_log(out)) == list(range(1, steps + 1))
    first_line = next(line for line in out.splitlines() if TRAIN_LINE.search(line))
    assert "consumed samples:            8 |" in first_line
    assert "learning rate: 1.500000E-03" in first_line  # warm-up restarts: lr/2 at step 1 of 2
    # the seed's weights: far better than a new model's first step
    assert summary["train_losses"][0] < good["losses"][0] - 0.5

    assert iter_dirs(branch) == [f"iter_{steps - 1:07d}", f"iter_{steps:07d}"]
    assert read_tracker(branch) == steps
    common = read_common(os.path.join(branch, f"iter_{steps:07d}"))
    assert common["iteration"] == steps
    assert common["consumed_train_samples"] == steps * 8
    assert common["opt_param_scheduler"]["num_steps"] == steps * 8
    assert float(common["optimizer"]["state"]["common_step"]) == steps  # Adam restarted
    assert snapshot(good["root"]) == before
