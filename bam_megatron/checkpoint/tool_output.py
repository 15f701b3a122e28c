"""How the tools write their output: one transaction, atomic, never over an input, never half.

    check_output(output, inputs, force, UpcycleError, name)        # before any work
    check_free_space(output, nbytes, UpcycleError)
    with OutputTransaction(output, error=UpcycleError, sync=True) as out:
        writer = out.keep(PartWriter(os.path.join(out.tmp, "parts"), ...))
        ...                                                         # write under out.tmp
        out.finish_checkpoint(writer, plan, common)                 # a checkpoint: Megatron-LM's layout
    # the output is complete and in place

Every tool that writes a checkpoint or a Hugging Face folder (``upcycle_bam.py``,
``add_expert.py``, ``hf_import.py``, ``hf_export.py``) builds it under ``<output>.tmp-<random>``
next to it and renames it to ``<output>`` only when complete: with ``--force`` a previous output
is moved aside at that moment and deleted afterwards, so nothing that looks complete exists
after a failure. On any failure the temporary folder is removed, the writers are closed and a
full disk, a quota or a read-only file system becomes one line (``error``); SIGTERM inside the
transaction takes the same path. A temporary folder that a killed tool left behind (it records
its host and process) is removed by the next transaction on the same output.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import secrets
import shutil
import signal
import socket
import threading
from typing import Callable, Dict, List, Sequence, Type

from bam_megatron.checkpoint.layout import COMMON_FILE, CONFIG_FILE, MEGATRON_CONFIG, TRACKER, iteration_dir
from bam_megatron.errors import BAMError, CheckpointError, disk_error

GIB = 1024**3
OWNER_FILE = ".bam-tool-owner"


def existing_ancestor(path: str) -> str:
    """The nearest existing directory at or above ``path``."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output(output: str, inputs: Sequence[str], force: bool, error: Type[BAMError], name: Callable[[int], str]) -> None:
    """``output`` must not overlap any input (``name(i)`` names input ``i`` in the message) and
    must not exist unless ``force``.

    Raises:
        error: one line naming the problem.
    """
    out_real = os.path.realpath(output)
    for i, p in enumerate(inputs):
        real = os.path.realpath(p)
        if out_real == real or real.startswith(out_real + os.sep) or out_real.startswith(real + os.sep):
            raise error(f"output {output} overlaps {name(i)} ({p}); choose another output path")
    if os.path.lexists(output) and not force:
        raise error(f"output {output} exists; pass --force to replace it (or choose another path)")


def check_free_space(output: str, need: int, error: Type[BAMError]) -> None:
    """At least ``need`` bytes free where ``output`` will be written."""
    free = shutil.disk_usage(existing_ancestor(os.path.dirname(os.path.abspath(output)))).free
    if need > free:
        raise error(f"the output needs about {need / GIB:.2f} GiB but only {free / GIB:.2f} GiB are free at {output}")


def _owner_alive(tmp: str) -> bool:
    """Whether the process that made ``tmp`` may still run (unknown owners count as alive)."""
    try:
        with open(os.path.join(tmp, OWNER_FILE)) as f:
            owner = json.load(f)
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(output: str) -> List[str]:
    """Remove the ``<output>.tmp-*`` folders of tools on this host that are gone; returns them."""
    removed = []
    for tmp in glob.glob(glob.escape(os.path.abspath(output)) + ".tmp-*"):
        if os.path.isdir(tmp) and not _owner_alive(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def finish_checkpoint(tmp: str, writer, plan: Dict, common: dict, sync: bool, checksums: bool = True) -> None:
    """Merge ``writer``'s parts into ``tmp/iter_0000000``, then write the common state,
    ``metadata.json``, the per-file checksums (unless ``checksums`` is False: a tool whose inputs
    were not verified does not vouch for its output) and the tracker, in that order, after all
    data is on disk."""
    import torch

    from bam_megatron.checkpoint import integrity
    from bam_megatron.checkpoint.dcp_writer import fsync_dir, write_file

    final = iteration_dir(tmp, 0)
    writer.merge(final, plan)
    buf = io.BytesIO()
    torch.save(common, buf)
    write_file(os.path.join(final, COMMON_FILE), buf.getvalue(), sync)
    write_file(os.path.join(final, CONFIG_FILE), json.dumps(MEGATRON_CONFIG).encode(), sync)
    if checksums:
        integrity.write_manifest(final, integrity.checksum_files(final, integrity.checkpoint_files(final)))
    write_file(os.path.join(tmp, TRACKER), b"0", sync)
    shutil.rmtree(writer.parts_dir)
    if sync:
        fsync_dir(final)
        fsync_dir(tmp)


def _move_into_place(tmp: str, output: str, sync: bool) -> None:
    """Rename the complete ``tmp`` to ``output``; a previous output (only with ``force``) is
    moved aside first and deleted afterwards."""
    from bam_megatron.checkpoint.dcp_writer import fsync_dir

    old = None
    if os.path.lexists(output):
        old = f"{output}.old-{secrets.token_hex(4)}"
        os.replace(output, old)
    os.replace(tmp, output)
    if sync:
        fsync_dir(os.path.dirname(os.path.abspath(output)))
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(old)


class _Terminated(BaseException):
    """SIGTERM inside a transaction: unwinds it like Ctrl-C."""


class OutputTransaction:
    """One tool output written atomically (see the module docstring)."""

    def __init__(self, output: str, *, error: Type[BAMError] = CheckpointError, sync: bool = True):
        self.output = os.path.abspath(output)
        self.error, self.sync = error, sync
        self.tmp = None
        self._kept: list = []
        self._previous_handler = None

    def keep(self, closable):
        """Register a writer (anything with ``close()``) to close if the transaction fails."""
        self._kept.append(closable)
        return closable

    def finish_checkpoint(self, writer, plan: Dict, common: dict, checksums: bool = True) -> None:
        """Turn ``writer``'s parts into Megatron-LM's layout under the temporary folder."""
        finish_checkpoint(self.tmp, writer, plan, common, self.sync, checksums)

    def __enter__(self) -> "OutputTransaction":
        remove_stale_temporaries(self.output)
        os.makedirs(os.path.dirname(self.output), exist_ok=True)
        self.tmp = f"{self.output}.tmp-{secrets.token_hex(4)}"
        os.makedirs(self.tmp)
        with open(os.path.join(self.tmp, OWNER_FILE), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._terminate)
        return self

    @staticmethod
    def _terminate(_signum, _frame):
        raise _Terminated()

    def __exit__(self, exc_type, exc, _tb) -> bool:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        if exc is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.tmp, OWNER_FILE))
            _move_into_place(self.tmp, self.output, self.sync)
            return False
        for closable in self._kept:
            with contextlib.suppress(Exception):  # the original error matters more than a failing writer
                closable.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, _Terminated):
            raise self.error(f"stopped by SIGTERM; nothing was written to {self.output}") from None
        what = None if isinstance(exc, (KeyboardInterrupt, SystemExit)) else disk_error(exc)
        if what:
            kept = "the existing output is untouched" if os.path.lexists(self.output) else "nothing was written"
            raise self.error(f"{what} while writing {self.tmp}; {kept}; free space or choose another --output") from None
        return False
