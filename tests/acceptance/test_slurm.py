"""The SLURM templates (``examples/slurm/``) on a real one-node SLURM: slurmctld + slurmd + munge
as ``scripts/local_slurm.sh`` starts them, CPU + gloo, tiny settings, two ranks per job.

* ``seed.sbatch`` with the ranks started by srun, preempted with ``scancel --signal=USR1 --batch``
  (what ``#SBATCH --signal=B:USR1@300`` does) after a periodic save: it saves at the current
  iteration, requeues itself, resumes, and ends at ``--train-iters`` with the same tensors
  (model and optimizer) as an uninterrupted seed job;
* ``branch.sbatch`` (one node: ``tools/torchrun.py``) preempted with ``scancel --signal=TERM
  --full``, which signals every process of the job (batch shell, launcher, ranks, checkpoint
  helpers): the same;
* ``upcycle.sbatch`` mixes the seed and the branch, ``bam.sbatch`` trains the mix,
  ``evaluate.sbatch`` reports both models' perplexity;
* after every job, no process of it is left.

SLURM holds a requeued job until the job credentials of its previous run expire (``AuthInfo=
cred_expire``: 10 s in ``scripts/local_slurm.sh``'s configuration, 120 s by default). Where no SLURM runs and none can be started (slurmctld not
installed, not root) the module is skipped with the reason; with ``BAM_REQUIRE_SLURM=1`` (what CI
sets once ``scripts/local_slurm.sh start`` succeeded) that is a failure instead.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from support import REPO_ROOT
from support.training import NO_DROPOUT, SAVED_LINE, TINY, free_port

from bam_megatron.checkpoint.layout import iteration_dir
from bam_megatron.checkpoint.opener import open_checkpoint, read_tracker, tensor_reader

SETUP = os.path.join(REPO_ROOT, "scripts", "local_slurm.sh")
SLURM_DIR = os.environ.get("BAM_SLURM_DIR", "/var/tmp/bam-slurm")
ITERS, SAVE_INTERVAL = 30, 5
TRAINING = ["--gpus-per-node=0", "--ntasks-per-node=2"]  # overrides the templates' 8 GPUs


def _unavailable(reason: str):
    if os.environ.get("BAM_REQUIRE_SLURM") == "1":
        pytest.fail(f"BAM_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    """The environment of a client of the running one-node SLURM (started here if needed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=os.path.join(SLURM_DIR, "slurm.conf"), BAM_SLURM_DIR=SLURM_DIR)
    started = False
    if subprocess.run(["bash", SETUP, "status"], env=env, capture_output=True).returncode != 0:
        if not shutil.which("slurmctld") or not shutil.which("slurmd"):
            _unavailable("no SLURM here: slurmctld/slurmd are not installed "
                         "(`bash scripts/local_slurm.sh start` installs and starts them, as root)")
        if os.geteuid() != 0:
            _unavailable("no SLURM running here, and starting one (scripts/local_slurm.sh) needs root")
        out = subprocess.run(["bash", SETUP, "start"], env=env, capture_output=True, text=True, timeout=600)
        if out.returncode == 2:
            _unavailable(out.stderr.strip())
        assert out.returncode == 0, out.stderr
        started = True
    yield env
    if started:
        subprocess.run(["bash", SETUP, "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Submitting and following jobs; settings every template reads from the environment."""
    root = tmp_path_factory.mktemp("slurm")
    env = dict(cluster)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(
        PYTHON=sys.executable, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
        GPUS_PER_NODE="2", MBS="4", GBS="8", TRAIN_ITERS=str(ITERS), SAVE_INTERVAL=str(SAVE_INTERVAL),
        MODEL_ARGS=" ".join(TINY[:TINY.index("--vocab-size")] + NO_DROPOUT),
        TOKENIZER_ARGS="--tokenizer-type NullTokenizer --vocab-size 128", DATA_ARGS="--mock-data",
        EXTRA_ARGS="--lr-warmup-iters 2 --log-interval 1 --eval-iters 1 --eval-interval 1000",
    )
    return Jobs(env, str(root))


class Jobs:
    def __init__(self, env: dict, root: str):
        self.env, self.root = env, root

    def run(self, *args, env=None, timeout: float = 60) -> str:
        out = subprocess.run(list(args), cwd=REPO_ROOT, env=env or self.env, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, f"{' '.join(args)}: {out.stderr}"
        return out.stdout

    def submit(self, template: str, *flags: str, **settings: str) -> str:
        """``sbatch`` a template from the repository root with ``settings`` added to the
        environment it passes on; the job id. Logs go to ``root``."""
        out = self.run("sbatch", "--parsable", f"--output={self.root}/%x-%j.out", *flags,
                       os.path.join("examples", "slurm", template), env={**self.env, **settings})
        return out.strip().split(";")[0]

    def log(self, job: str) -> str:
        names = [n for n in os.listdir(self.root) if n.endswith(f"-{job}.out")]
        return open(os.path.join(self.root, names[0])).read() if names else ""

    def state(self, job: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job)
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job: str, done, what: str, timeout: float = 600) -> dict:
        """Poll the job until ``done(state)``; the state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(job)
            if done(state):
                return state
            assert time.monotonic() < deadline, f"job {job} not {what} in {timeout} s: {state}\n{_tail(self.log(job))}"
            time.sleep(0.5)

    def wait_line(self, job: str, pattern: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log(job)):
            state = self.state(job)["JobState"]
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} {state}:\n{_tail(self.log(job))}"
            assert time.monotonic() < deadline, f"job {job}: no line {pattern!r} in {timeout} s:\n{_tail(self.log(job))}"
            time.sleep(0.2)

    def completed(self, job: str, timeout: float = 600) -> dict:
        """Wait for the job to end; it must have COMPLETED with exit 0, leaving no process."""
        state = self.wait(job, lambda s: s["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"),
                          "ended", timeout)
        assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{_tail(self.log(job))}"
        assert_no_process_left(job)
        return state

    def preempt(self, job: str, *scancel: str) -> int:
        """After a periodic save, signal the job with ``scancel``; it must save, requeue itself
        and leave no process. The iteration it stopped at."""
        self.wait_line(job, SAVED_LINE.pattern)
        self.run("scancel", *scancel, job)
        self.wait(job, lambda s: int(s["Restarts"]) >= 1 and s["JobState"] == "PENDING", "requeued")
        log = self.log(job)
        stopped = re.search(r"\[exit\] received SIG\w+: stopping after iteration (\d+)", log)
        assert stopped and f"requeueing job {job}" in log, _tail(log)
        assert_no_process_left(job)
        return int(stopped.group(1))


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def job_processes(job: str) -> list:
    """PIDs of the processes whose environment says they belong to SLURM job ``job``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if f"SLURM_JOB_ID={job}".encode() in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            pass
    return found


def assert_no_process_left(job: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while job_processes(job) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not job_processes(job), f"processes of job {job} left: {job_processes(job)}"


def assert_same_tensors(a: str, b: str) -> None:
    """Every tensor (model and optimizer state) of checkpoint folders ``a`` and ``b`` is equal."""
    ca, cb = open_checkpoint(a), open_checkpoint(b)  # every file verified against its checksum
    keys = sorted(ca.tensor_entries())
    assert keys == sorted(cb.tensor_entries())
    assert any(k.startswith("optimizer") for k in keys) and any(k.startswith("decoder") for k in keys), keys[:5]
    ra, rb = tensor_reader(ca), tensor_reader(cb)
    for key in keys:
        assert torch.equal(ra.read_full(key), rb.read_full(key)), f"{key} differs between {a} and {b}"


def _final(ckpt: str, iters: int = ITERS) -> str:
    assert read_tracker(ckpt) == iters
    return iteration_dir(ckpt, iters)


@pytest.fixture(scope="module")
def reference(jobs):
    """Uninterrupted seed and branch (code) jobs: ``CKPT_DIR`` holding ``seed`` and ``expert_code``."""
    ckpt = os.path.join(jobs.root, "reference")
    seed = jobs.submit("seed.sbatch", *TRAINING, CKPT_DIR=ckpt)
    jobs.completed(seed)
    branch = jobs.submit("branch.sbatch", *TRAINING, CKPT_DIR=ckpt, DOMAIN="code")
    jobs.completed(branch)
    for name, job in (("seed", seed), ("expert_code", branch)):
        _final(os.path.join(ckpt, name))
        assert f"[slurm] finished: iteration {ITERS} of {ITERS}" in jobs.log(job), _tail(jobs.log(job))
    return ckpt


def test_seed_job_preempted_with_usr1_to_the_batch_shell(jobs, reference):
    ckpt = os.path.join(jobs.root, "usr1")
    job = jobs.submit("seed.sbatch", *TRAINING, CKPT_DIR=ckpt, LAUNCHER="srun", MASTER_PORT=str(free_port()))
    stopped = jobs.preempt(job, "--signal=USR1", "--batch")
    assert SAVE_INTERVAL <= stopped < ITERS and read_tracker(os.path.join(ckpt, "seed")) == stopped
    jobs.completed(job)
    log = jobs.log(job)
    assert "(srun)" in log and "received SIGUSR1" in log and "BrokenPipeError" not in log, _tail(log)
    assert f"at iteration {stopped}" in log and f"[slurm] finished: iteration {ITERS} of {ITERS}" in log, _tail(log)
    assert jobs.state(job)["Restarts"] == "1"
    assert_same_tensors(_final(os.path.join(ckpt, "seed")), _final(os.path.join(reference, "seed")))


def test_branch_job_preempted_with_term_to_every_process(jobs, reference):
    ckpt = os.path.join(jobs.root, "term")
    seed = os.path.join(reference, "seed")
    job = jobs.submit("branch.sbatch", *TRAINING, CKPT_DIR=ckpt, DOMAIN="code", SEED_CKPT=seed)
    stopped = jobs.preempt(job, "--signal=TERM", "--full")
    assert SAVE_INTERVAL <= stopped < ITERS and read_tracker(os.path.join(ckpt, "expert_code")) == stopped
    jobs.completed(job)
    log = jobs.log(job)
    assert "(tools/torchrun.py)" in log and "BrokenPipeError" not in log, _tail(log)
    assert f"starting from --pretrained-checkpoint {seed}" in log, _tail(log)
    assert f"at iteration {stopped}" in log and f"[slurm] finished: iteration {ITERS} of {ITERS}" in log, _tail(log)
    assert_same_tensors(_final(os.path.join(ckpt, "expert_code")), _final(os.path.join(reference, "expert_code")))


def test_upcycle_mix_and_evaluate_jobs(jobs, reference, corpus):
    upcycle = jobs.submit("upcycle.sbatch", "--cpus-per-task=1", "--mem=1G", CKPT_DIR=reference, DOMAINS="code")
    jobs.completed(upcycle)
    assert read_tracker(os.path.join(reference, "bam_upcycled")) is not None, _tail(jobs.log(upcycle))

    mix = jobs.submit("bam.sbatch", "--nodes=1", *TRAINING, CKPT_DIR=reference, TRAIN_ITERS="4", SAVE_INTERVAL="100",
                      PARALLEL_ARGS="--expert-model-parallel-size 1")
    jobs.completed(mix)
    assert "[slurm] finished: iteration 4 of 4" in jobs.log(mix), _tail(jobs.log(mix))

    data = os.path.join(jobs.root, "data")
    os.makedirs(data)
    for ext in (".bin", ".idx"):
        os.symlink(corpus["code"] + ext, os.path.join(data, "code_valid_text_document" + ext))
    out = os.path.join(jobs.root, "results")
    evaluate = jobs.submit("evaluate.sbatch", "--gpus-per-node=0", CKPT_DIR=reference, DATA_DIR=data, DOMAINS="code",
                           OUT_DIR=out, MBS="4", GBS="4", EXTRA_ARGS="")
    jobs.completed(evaluate)
    with open(os.path.join(out, "results.csv")) as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"seed", "BAM"}, rows
    assert all(math.isfinite(float(row["code_ppl"])) for row in rows.values()), rows
