"""The ``--save`` lock of a run whose rank is dead but not yet reaped (a zombie: e.g. a rank
killed with its launcher, waiting for init) is stale and taken over."""

import json
import os
import sys

import pytest

from bam_megatron.checkpoint.lock import LOCK_FILE, SaveLock, _identity, _process_start_time


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux only")
def test_a_zombie_holds_no_lock(tmp_path):
    pid = os.fork()
    if pid == 0:
        os._exit(0)  # a child that ends and is not reaped yet: a zombie
    try:
        with open(f"/proc/{pid}/stat") as f:
            while f.read().rsplit(")", 1)[1].split()[0] != "Z":
                f.seek(0)
        holder = dict(_identity(), pid=pid, start=_process_start_time(pid))
        (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
        lines = []
        lock = SaveLock.acquire(str(tmp_path), log=lines.append)
        assert lock.held and lines and f"PID {pid}" in lines[0] and "is gone" in lines[0]
        lock.release()
    finally:
        os.waitpid(pid, 0)
