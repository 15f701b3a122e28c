"""How the checkpoint tools write their output: atomically, never over an input, never half.

Every tool builds its output under ``<output>.tmp-<random>`` next to it and renames it to
``<output>`` only when complete (``move_into_place``; with ``--force`` a previous output is moved
aside at that moment and deleted afterwards), so nothing that looks complete exists after a
failure. ``check_output`` and ``check_free_space`` run before anything is written;
``finish_checkpoint`` turns a ``PartWriter``'s parts into Megatron-LM's layout (one
``iter_0000000``, tracker last).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from typing import Callable, Dict, Sequence, Type

from bam_megatron.checkpoint.layout import COMMON_FILE, CONFIG_FILE, MEGATRON_CONFIG, TRACKER, iteration_dir
from bam_megatron.errors import BAMError, HFError, disk_error

GIB = 1024**3


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


def new_temporary(output: str) -> str:
    """Create and return ``<output>.tmp-<random>`` (the parent is created if needed)."""
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = f"{output}.tmp-{secrets.token_hex(4)}"
    os.makedirs(tmp)
    return tmp


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


def move_into_place(tmp: str, output: str, sync: bool) -> None:
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


def raise_disk_error(exc: BaseException, tmp: str, output: str, error: Type[BAMError] = HFError) -> None:
    """After a failed write (``tmp`` already removed): a full disk, a quota, a read-only or
    failing file system becomes one line (``error``); anything else is left to propagate."""
    what = None if isinstance(exc, (KeyboardInterrupt, SystemExit)) else disk_error(exc)
    if what:
        kept = "the existing output is untouched" if os.path.lexists(output) else "nothing was written"
        raise error(f"{what} while writing {tmp}; {kept}; free space or choose another --output") from None
