"""One writer per checkpoint directory: a lock file that names its holder.

``<save>/.bam_save.lock`` holds one JSON object: host, PID, the process's start time, the SLURM
job id and restart count when there is one, and when it was taken. Global rank 0 takes it before
training starts (``O_CREAT | O_EXCL``: two runs cannot both succeed) and removes it when the run
ends. A second run on the same directory stops with one line naming the holder.

A lock left by a run that was killed (kill -9, a node failure, a preempted SLURM job) is stale and
is taken over, with one line saying so:

- same host, and the holder's PID is gone or now belongs to another process (start time differs);
- the same SLURM job id with another restart count (a requeued job: its previous incarnation is
  dead by definition);
- ``force``: the user says the holder is gone (``--force-save-lock``).

A holder on another host cannot be checked from here, so it is trusted unless ``force``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Optional

from bam_megatron.errors import CheckpointError

LOCK_FILE = ".bam_save.lock"


def _stat_fields(pid: int) -> Optional[list]:
    """The fields of ``/proc/PID/stat`` after pid and comm (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _process_start_time(pid: int) -> Optional[float]:
    """Start time of ``pid`` (seconds since boot, from /proc), or None when it does not exist or
    cannot be read."""
    fields = _stat_fields(pid)
    try:
        return float(fields[19])  # starttime, field 22 of stat (after pid and comm)
    except (TypeError, IndexError, ValueError):
        return None


def _alive(pid: int, start: Optional[float]) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs (a zombie, dead but not
    yet reaped by its parent, does not: e.g. a killed rank of a killed launcher)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    fields = _stat_fields(pid)
    if fields and fields[0] in ("Z", "X"):
        return False
    now_start = _process_start_time(pid)
    return start is None or now_start is None or abs(now_start - start) < 1e-6


def _identity() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start": _process_start_time(pid),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "taken": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _stale_reason(holder: dict, me: dict) -> Optional[str]:
    """Why ``holder`` is known to be dead, or None when it may be alive."""
    if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1)), holder.get("start")):
        return f"process {holder.get('pid')} on {holder.get('host')} is gone"
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"] and (
        holder.get("slurm_restart_count") != me["slurm_restart_count"]
    ):
        return f"SLURM job {me['slurm_job_id']} was requeued"
    return None


@dataclass
class SaveLock:
    """The lock on one ``--save`` directory (see the module docstring)."""

    directory: str
    path: str
    held: bool = False

    @classmethod
    def acquire(cls, directory: str, force: bool = False, log=print) -> "SaveLock":
        """Take the lock of ``directory`` (created if needed).

        Raises:
            CheckpointError: another live run holds it.
        """
        lock = cls(directory, os.path.join(directory, LOCK_FILE))
        me = _identity()
        for _ in range(3):  # a stale lock removed between our read and our create: try again
            try:
                os.makedirs(directory, exist_ok=True)
                if lock._create(me):
                    return lock
            except OSError as exc:
                reason = (exc.strerror or type(exc).__name__).lower()
                raise CheckpointError(f"--save {directory} cannot be written ({reason}); choose a writable folder") from None
            holder = lock.read()
            if holder is None:
                continue
            reason = "--force-save-lock" if force else _stale_reason(holder, me)
            if reason is None:
                raise CheckpointError(
                    f"--save {directory} is in use by another run (host {holder.get('host')}, PID "
                    f"{holder.get('pid')}, since {holder.get('taken')}); wait for it, choose another "
                    f"--save, or if that run is gone add --force-save-lock"
                )
            log(f"[checkpoint] taking over the lock of {directory} from host {holder.get('host')} "
                f"PID {holder.get('pid')} ({reason})")
            try:
                os.unlink(lock.path)
            except FileNotFoundError:
                pass
        raise CheckpointError(f"cannot take the lock {lock.path}: it keeps changing; is another run starting?")

    def _create(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        self.held = True
        return True

    def read(self) -> Optional[dict]:
        """The holder's record, None when there is no lock; an unreadable lock counts as held by
        an unknown run on this host (taken over only when that PID is gone)."""
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {"host": "?", "pid": -1}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": socket.gethostname(), "pid": -1, "taken": "?"}

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if not self.held:
            return
        holder = self.read()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.held = False
