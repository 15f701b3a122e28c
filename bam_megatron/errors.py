"""The project's user-facing errors.

``BAMError`` is the one base class of every error a *user* can cause (a bad flag, a missing or
damaged file, a layout that does not fit, a full disk). Its message is one line that names the
problem and the fix; the programs print it as ``<program>: error: <message>`` and exit 1.
Every other exception is a bug (ours or a library's) and keeps its traceback.

The subclasses also derive from the built-in class that describes them (``ValueError`` for bad
settings, ``RuntimeError`` for conditions met while running), so callers may catch either.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


class BAMError(Exception):
    """A user error; the message is one line naming the problem and the fix.

    ``same_on_every_rank``: every process of a launched job finds this error alike (arguments,
    files, a collective decision), so one process per node prints it (``reports_job_errors``)."""

    same_on_every_rank = False


class ConfigError(BAMError, ValueError):
    """Settings that cannot work together (flags, model shape, parallel layout)."""


class BAMConfigError(ConfigError):
    """An invalid model / parallelism setting of a BAM model."""


class LayoutError(ConfigError):
    """Parallel sizes that do not tile the world size."""


class DataConfigError(ConfigError):
    """Bad data flags or missing / damaged data files."""


class TokenizerConfigError(ConfigError):
    """A tokenizer that cannot be built from the given flags / files."""


class CheckpointError(BAMError, RuntimeError):
    """A checkpoint that is missing, damaged, locked or does not fit the model."""


class UpcycleError(BAMError, ValueError):
    """Bad input for the Mix phase (or the other checkpoint tools)."""


class HFError(BAMError, ValueError):
    """A Hugging Face model folder or checkpoint the Hugging Face tools cannot convert exactly."""


class TrainingError(BAMError, RuntimeError):
    """A condition that stops training (bad input found up front, too many NaN steps)."""


class PreprocessError(BAMError):
    """A problem with the input or the flags of data preprocessing."""


class PatchTargetError(BAMError, RuntimeError):
    """An installed torch / megatron-core that a patch of ``bam_megatron/patches`` was not made
    for: another release, or a changed name or signature the patch relies on."""


def reports_job_errors() -> bool:
    """Whether this process prints an error that every process of the job finds alike: the first
    process of each node (``LOCAL_RANK`` 0, set by torchrun and the SLURM launcher; ``RANK``
    without it) and a process started on its own. One line per node rather than per rank, so
    that a problem only one node has (a path missing there) is still printed."""
    local = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))
    return local.strip() in ("", "0")


def human_bytes(n: float) -> str:
    """``1.50 GiB`` / ``3.20 MiB`` / ``512 B``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


class InferenceError(BAMError, ValueError):
    """A request the model cannot serve: a prompt longer than its context, a malformed prompt
    or task file, sampling settings out of range."""


def one_line(exc: BaseException) -> str:
    """``"<Type>: <first line of the message>"`` for quoting a library error in a user error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _chain(exc: BaseException):
    """``exc`` and every exception inside it: its cause and context, and the per-rank failures
    that torch DCP / megatron-core wrap (``CheckpointException.failures``)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]


def disk_error(exc: BaseException) -> Optional[str]:
    """The disk condition (``"no space left on device"`` ...) somewhere in ``exc`` — its chain, or
    the per-rank failures that torch DCP / megatron-core wrap (sometimes only as text, e.g.
    ``RuntimeError("Worker failure: [Errno 28] ...")``) — or None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return DISK_ERRNOS[e.errno]
        text = str(e) if not hasattr(e, "failures") else ""
        for code, what in DISK_ERRNOS.items():
            if f"[Errno {code}]" in text:
                return what
    return None


def user_error_in(exc: BaseException) -> Optional[BAMError]:
    """The ``BAMError`` a library wrapped (e.g. raised by one of our callbacks inside a torch DCP
    load, which re-raises it as a ``CheckpointException``), or None."""
    return next((e for e in _chain(exc) if isinstance(e, BAMError)), None)


__all__ = [
    "BAMConfigError",
    "BAMError",
    "CheckpointError",
    "ConfigError",
    "DISK_ERRNOS",
    "DataConfigError",
    "HFError",
    "InferenceError",
    "LayoutError",
    "PatchTargetError",
    "PreprocessError",
    "TokenizerConfigError",
    "TrainingError",
    "UpcycleError",
    "disk_error",
    "one_line",
    "reports_job_errors",
    "user_error_in",
]
