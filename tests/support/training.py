"""Shared pieces of the training acceptance tests: the tiny model's flags, log-line parsers,
torchrun / in-process launchers and checkpoint inspection helpers."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

from bam_megatron import training
from support import REPO_ROOT as ROOT  # noqa: E402
from support.checkpoints import common_state

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
    assert int(common_state(ckpt_dir)["iteration"]) == int(os.path.basename(ckpt_dir)[len("iter_"):])


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if "error:" in line]



LR_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? learning rate: (\S+) \|")


def lr_log(text: str) -> dict:
    """``{iteration: learning rate}`` from the training lines of a log."""
    return {int(m.group(1)): float(m.group(2)) for m in LR_LINE.finditer(text)}


def start_run(argv, env=None):
    """``pretrain_bam.py argv`` as a child process (its own session), stdout+stderr piped."""
    return subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=ROOT, env=env or subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def read_until(proc, pattern, seen: list, timeout: float = 300):
    """Read ``proc``'s output lines into ``seen`` until one matches ``pattern`` (the match)."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found
        assert time.monotonic() < deadline, f"no line matching {pattern!r} in time:\n{_tail(''.join(seen))}"
    raise AssertionError(f"the run ended without a line matching {pattern!r}:\n{_tail(''.join(seen))}")


def finish(proc, seen: list, timeout: float = 300) -> str:
    """Wait for ``proc`` (killing its session if it overstays); the whole log."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        seen.append(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return "".join(seen)


def descendants(pid: int) -> list:
    """PIDs of every process below ``pid``."""
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pids) -> list:
    """The PIDs among ``pids`` that still run (zombies count as gone)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


BAM_TORCHRUN = os.path.join(ROOT, "tools", "torchrun.py")


def start_torchrun(argv, nproc: int = 2, plain: bool = False):
    """``pretrain_bam.py argv`` on ``nproc`` ranks under ``tools/torchrun.py`` (or, ``plain``,
    torch's own torchrun) as a child process in its own session, stdout+stderr piped."""
    launcher = ["-m", "torch.distributed.run"] if plain else [BAM_TORCHRUN]
    cmd = [sys.executable, *launcher, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), SCRIPT, *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def process_groups(pid: int) -> set:
    """The process groups of ``pid`` and every process below it (torchrun starts each rank in
    a session of its own)."""
    groups = set()
    for p in [pid, *descendants(pid)]:
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    return groups


def signal_every_process(pid: int, sig: int) -> set:
    """Send ``sig`` to every process of the run under ``pid`` at once, as a scheduler does to a
    job step: each process group of the tree gets it. Returns those groups."""
    groups = process_groups(pid)
    for group in groups:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass
    return groups


def group_members(groups) -> list:
    """PIDs of the live (non-zombie) processes in any of ``groups``."""
    import psutil

    found = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) in groups and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


# How long a test waits for the processes of an ended run to be gone. When the lifetime rules
# work they go within moments; a process they fail to end stays for good. So the deadline is
# generous (a loaded machine must not fail the test) and costs nothing when the rules work.
GONE_WITHIN_S = 60


def left_after(groups, seconds: float = GONE_WITHIN_S) -> list:
    """Poll until no process of ``groups`` is left or ``seconds`` pass; the ones left (killed
    then, so that they do not disturb the next test)."""
    deadline = time.monotonic() + seconds
    while group_members(groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = group_members(groups)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
