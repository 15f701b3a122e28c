"""A helper process of a run (``bam_megatron/parallel/lifetime.py``) ignores every stop signal
of the run and dies with its parent, even of kill -9, also when the parent died before the helper
asked for the death signal."""

import os
import signal
import subprocess
import sys
import time

import pytest
from support import REPO_ROOT

from bam_megatron.parallel import lifetime

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux only")


def _signals(pid: int, field: str) -> set:
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line.split()[1] for line in f if line.startswith(field + ":")), 16)
    return {sig for sig in signal.Signals if mask & (1 << (sig - 1))}


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# A parent that forks one helper (helper_process_init first), prints its pid and waits.
_PARENT = """
import multiprocessing as mp, sys, time
from bam_megatron.parallel.lifetime import helper_process_init

def helper(ready):
    helper_process_init()
    ready.set()
    time.sleep(600)

ready = mp.get_context("fork").Event()
p = mp.get_context("fork").Process(target=helper, args=(ready,))
p.start()
assert ready.wait(60)
print(p.pid, flush=True)
time.sleep(600)
"""


@linux_only
def test_a_helper_ignores_stop_signals_and_dies_with_its_parent():
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True, env=env)
    try:
        helper = int(parent.stdout.readline())
        assert set(lifetime.STOP_SIGNALS) <= _signals(helper, "SigIgn")
        for sig in lifetime.STOP_SIGNALS:  # an ignored signal is discarded when it is sent
            os.kill(helper, sig)
        assert not _gone(helper)
        parent.kill()  # kill -9: the helper must follow
        parent.wait(timeout=30)
        deadline = time.monotonic() + 60  # at once when it works; a helper left stays for good
        while not _gone(helper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(helper), "the helper outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# A parent that forks one helper and exits at once; the helper calls helper_process_init only
# once its parent is gone (the race of a rank killed while it starts a helper).
_ORPHAN_PARENT = """
import multiprocessing as mp, os, time
from bam_megatron.parallel.lifetime import helper_process_init

def helper(parent):
    deadline = time.monotonic() + 60
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.01)
    helper_process_init()
    time.sleep(600)

p = mp.get_context("fork").Process(target=helper, args=(os.getpid(),))
p.start()
print(p.pid, flush=True)
os._exit(0)
"""


@linux_only
def test_a_helper_whose_parent_died_before_it_started_exits():
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_PARENT], stdout=subprocess.PIPE, text=True, env=env)
    with parent.stdout:  # (the helper holds the pipe too: read its pid, not to the end)
        helper = int(parent.stdout.readline())
    parent.wait(timeout=60)
    deadline = time.monotonic() + 30
    while not _gone(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _gone(helper):
        os.kill(helper, signal.SIGKILL)
        pytest.fail("a helper whose parent was already gone lived on")
