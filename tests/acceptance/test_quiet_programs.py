"""Programs run by hand print no library warnings (``bam_megatron/library_messages.py`` filters
the known ones once at program start; nothing is silenced from outside)."""

import os
import subprocess
import sys

from support import REPO_ROOT
from support.training import MOCK, NO_DROPOUT, TINY


def _run(*argv, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_training_and_the_tools_print_no_library_warnings(tmp_path):
    err = _run(os.path.join(REPO_ROOT, "pretrain_bam.py"), *TINY, *NO_DROPOUT, *MOCK, "--train-iters", "2",
               "--lr-warmup-iters", "1", "--save", "ckpt", cwd=tmp_path)
    err += _run(os.path.join(REPO_ROOT, "tools", "generate.py"), "--load", "ckpt", "--prompt-token-ids", "1,2,3",
                "--max-new-tokens", "2", "--output-format", "json", "-q", cwd=tmp_path)
    err += _run(os.path.join(REPO_ROOT, "tools", "upcycle_bam.py"), "-q", "-o", "moe", "ckpt", "ckpt", cwd=tmp_path)
    noisy = [line for line in err.splitlines() if "Warning" in line or "warnings.warn" in line or "path_to_cache" in line]
    assert not noisy, noisy
