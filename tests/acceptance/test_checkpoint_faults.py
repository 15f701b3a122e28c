"""Checkpoint directories under faults: concurrent writers, re-saves cut short, damaged files,
full and read-only disks. Each case is one line naming the problem, and a good checkpoint is
never destroyed or half-written.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import signal
import socket
import subprocess

import pytest
from support.training import (
    GOOD_ARGS,
    GOOD_ITERS,
    _tail,
    assert_complete,
    error_lines,
    finish,
    read_until,
    run_main,
    snapshot,
    start_run,
)

from bam_megatron import training
from bam_megatron.checkpoint import save as save_module
from bam_megatron.checkpoint.layout import TRACKER, iteration_dir
from bam_megatron.checkpoint.lock import LOCK_FILE
from bam_megatron.checkpoint.opener import read_tracker, resolve_checkpoint_dir
from bam_megatron.cli import inspect_checkpoint

HALF = GOOD_ITERS // 2


def _copy(good, tmp_path) -> str:
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(good["root"], ckpt)
    return ckpt


def _one_line(err: str) -> str:
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------ writers


def test_second_run_on_one_save_refuses_and_a_stale_lock_is_taken_over(good, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    first = start_run(GOOD_ARGS + ["--train-iters", "400", "--save", ckpt, "--save-interval", "2"])
    seen = []
    try:
        read_until(first, r"iteration\s+1/", seen)
        rc, _out, err = run_main(GOOD_ARGS + ["--save", ckpt], capsys)
        line = _one_line(err)
        assert rc == 1 and f"PID {first.pid}" in line and socket.gethostname() in line, line
        read_until(first, r"\[checkpoint\] saved .*iter_0000004", seen)
        before = snapshot(os.path.join(ckpt, "iter_0000004"))
        os.kill(first.pid, signal.SIGKILL)
        finish(first, seen, timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert snapshot(os.path.join(ckpt, "iter_0000004")) == before  # the refused run wrote nothing
    assert os.path.isfile(os.path.join(ckpt, LOCK_FILE))  # left by the killed run
    rc, out, err = run_main(GOOD_ARGS + ["--train-iters", "6", "--load", ckpt, "--save", ckpt,
                                         "--override-opt-param-scheduler"], capsys)
    assert rc == 0, err
    assert f"taking over the lock of {ckpt}" in out and f"process {first.pid}" in out
    assert read_tracker(ckpt) == 6 and not os.path.exists(os.path.join(ckpt, LOCK_FILE))


def test_saving_over_a_newer_checkpoint_needs_a_flag(good, tmp_path, capsys):
    ckpt = _copy(good, tmp_path)
    before = snapshot(ckpt)
    rc, _out, err = run_main(GOOD_ARGS + ["--train-iters", "3", "--save", ckpt], capsys)
    line = _one_line(err)
    assert rc == 1 and f"iteration {GOOD_ITERS}" in line and "--allow-save-rewind" in line
    assert snapshot(ckpt) == before
    rc, _out, err = run_main(GOOD_ARGS + ["--train-iters", "3", "--save", ckpt, "--allow-save-rewind"], capsys)
    assert rc == 0, err
    assert read_tracker(ckpt) == 3


# ------------------------------------------------------------------------------------ re-save


def test_every_cut_of_a_resave_leaves_a_loadable_checkpoint(good, tmp_path, monkeypatch):
    """A kill at any step of publishing a re-save of the tracker's iteration: the directory
    still resolves to a complete checkpoint of that iteration."""
    src = _copy(good, tmp_path)
    real_replace = os.replace
    for cut in range(1, 4):  # the three renames: old copy aside, new copy in, tracker
        root = str(tmp_path / f"cut{cut}")
        shutil.copytree(src, root)
        final = iteration_dir(root, GOOD_ITERS)
        shutil.copytree(final, final + ".tmp")  # the new copy, complete
        calls = []

        def replace(a, b, calls=calls, cut=cut):
            calls.append((a, b))
            if len(calls) == cut:
                raise KeyboardInterrupt("killed")  # stands for kill -9 between two steps
            return real_replace(a, b)

        monkeypatch.setattr(save_module.os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            save_module._publish(root, final + ".tmp", final, GOOD_ITERS, keep_last=None)
        monkeypatch.setattr(save_module.os, "replace", real_replace)
        assert read_tracker(root) == GOOD_ITERS
        resolved = resolve_checkpoint_dir(root)
        assert os.path.isfile(os.path.join(resolved, "metadata.json")), (cut, os.listdir(root))


def test_a_complete_leftover_is_loaded_when_the_tracked_folder_is_missing(good, tmp_path, capsys):
    ckpt = _copy(good, tmp_path)
    final = iteration_dir(ckpt, GOOD_ITERS)
    os.rename(final, final + ".tmp")  # killed between "old aside" and "new into place"
    rc, out, err = run_main(GOOD_ARGS + ["--train-iters", str(GOOD_ITERS + 2), "--load", ckpt, "--save", ckpt,
                                         "--override-opt-param-scheduler"], capsys)
    assert rc == 0, err
    assert "complete copy" in out and f"at iteration {GOOD_ITERS}" in out
    assert read_tracker(ckpt) == GOOD_ITERS + 2


# ------------------------------------------------------------------------------------ damage


def _damage(ckpt: str, case: str) -> str:
    """Damage the latest checkpoint of ``ckpt``; returns the word the error must name."""
    it = iteration_dir(ckpt, GOOD_ITERS)
    data = sorted(n for n in os.listdir(it) if n.endswith(".distcp"))[0]
    path = os.path.join(it, data)
    if case == "truncated-distcp":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        return data
    if case == "missing-metadata":
        os.remove(os.path.join(it, ".metadata"))
        return ".metadata"
    if case == "flipped-zip-header":
        common = os.path.join(it, "common.pt")
        raw = bytearray(open(common, "rb").read())
        raw[0:4] = b"XXXX"
        open(common, "wb").write(bytes(raw))
        return "common.pt"
    if case == "non-utf8-tracker":
        open(os.path.join(ckpt, TRACKER), "wb").write(b"\xff\xfe8")
        return TRACKER
    if case == "flipped-tensor-bits":
        raw = bytearray(open(path, "rb").read())
        raw[len(raw) // 2] ^= 0x10
        open(path, "wb").write(bytes(raw))
        return data
    raise ValueError(case)


DAMAGE = ["truncated-distcp", "missing-metadata", "flipped-zip-header", "non-utf8-tracker", "flipped-tensor-bits"]


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_checkpoint_is_one_line_naming_the_file(case, good, tmp_path, capsys):
    ckpt = _copy(good, tmp_path)
    word = _damage(ckpt, case)
    rc, _out, err = run_main(GOOD_ARGS + ["--train-iters", str(GOOD_ITERS + 2), "--load", ckpt, "--save", ckpt,
                                          "--override-opt-param-scheduler"], capsys)
    line = _one_line(err)
    assert rc == 1 and word in line, line
    assert "usage:" not in err
    assert case == "non-utf8-tracker" or read_tracker(ckpt) == GOOD_ITERS
    if case != "non-utf8-tracker":
        rc = inspect_checkpoint.main([iteration_dir(ckpt, GOOD_ITERS), "--verify"])
        assert rc == 1 and word in _one_line(capsys.readouterr().err)


def test_verify_passes_a_whole_checkpoint(good, capsys):
    assert inspect_checkpoint.main([good["root"], "--verify"]) == 0
    out = capsys.readouterr().out
    assert "match their checksums" in out


# ------------------------------------------------------------------------------------ disks


def _unshare_available() -> bool:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


def test_full_disk_during_save_is_one_line_and_keeps_the_previous_checkpoint(good, tmp_path, capsys, monkeypatch):
    """A save that hits a full disk: one line naming the cause and the intact previous
    checkpoint; the half-written folder is removed. (The writers fail as the kernel makes them
    fail: ENOSPC raised from inside megatron-core's writer processes.)"""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    ckpt = _copy(good, tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsa, "_write_item", full_disk)  # what every tensor write of the save calls
    rc, _out, err = run_main(GOOD_ARGS + ["--train-iters", str(GOOD_ITERS + 2), "--load", ckpt, "--save", ckpt,
                                          "--override-opt-param-scheduler", "--save-interval", "1"], capsys)
    monkeypatch.undo()
    line = _one_line(err)
    assert rc == 1 and "no space left on device" in line and iteration_dir(ckpt, GOOD_ITERS) in line, line
    assert read_tracker(ckpt) == GOOD_ITERS
    assert not [n for n in os.listdir(ckpt) if n.endswith(".tmp")]
    assert_complete(iteration_dir(ckpt, GOOD_ITERS))


@pytest.mark.skipif(not _unshare_available(), reason="needs user namespaces (unshare -rm) to mount a small tmpfs")
def test_real_full_and_read_only_disks(good, tmp_path):
    """The same on real file systems: a 4 MiB tmpfs that holds one checkpoint but not the next,
    and a read-only one (found before training). Where user namespaces are off it is skipped
    with that reason, and ``test_full_and_read_only_disks_everywhere`` still runs both cases."""
    from support.training import SCRIPT, subprocess_env

    small, ro = tmp_path / "small", tmp_path / "ro"
    small.mkdir()
    ro.mkdir()
    args = " ".join(GOOD_ARGS)
    script = f"""
set -u
mount -t tmpfs -o size=4m tmpfs {small} && mount -t tmpfs -o ro,size=1m tmpfs {ro} || exit 99
"{os.sys.executable}" {SCRIPT} {args} --save {small}/ckpt --save-interval 4 --keep-last-checkpoints 1 2>&1 | tail -n 3
echo "RC=${{PIPESTATUS[0]}}"; ls -a {small}/ckpt
"{os.sys.executable}" {SCRIPT} {args} --save {ro}/ckpt 2>&1 | tail -n 3
echo "RC=${{PIPESTATUS[0]}}"
"""
    proc = subprocess.run(["unshare", "-rm", "bash", "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode != 99, proc.stderr
    full, readonly = out.split("RC=")[1], out.split("RC=")[2]
    assert full.startswith("1") and "not enough free space" in out and "iter_0000004 is intact" in out, _tail(out)
    assert ".tmp" not in full and "iter_0000004" in full
    assert readonly.startswith("1") and "cannot be written (read-only file system)" in out, _tail(out)
    assert "iteration        1/" not in out.split("RC=")[1]  # nothing trained on the read-only disk


class _SmallDisk:
    """A file system of ``size`` bytes holding ``root``, as the save path sees it: for paths under
    ``root``, ``shutil.disk_usage`` reports what the files there leave free, and a write (Python's
    ``open``, which megatron-core's checkpoint writers use; they are forked and inherit it) that
    would go beyond the size fails with ENOSPC, as the kernel fails it."""

    def __init__(self, root: str, size: int, monkeypatch):
        self.root, self.size = root, size
        self._usage, self._open = shutil.disk_usage, builtins.open
        monkeypatch.setattr(shutil, "disk_usage", self.disk_usage)
        monkeypatch.setattr(builtins, "open", self.open)

    def _mine(self, path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(self.root + os.sep)

    def used(self) -> int:
        return save_module.directory_bytes(self.root)

    def disk_usage(self, path):
        if not self._mine(os.path.join(path, "x")):
            return self._usage(path)
        used = self.used()
        return shutil._ntuple_diskusage(self.size, used, max(0, self.size - used))

    def open(self, file, mode="r", *args, **kwargs):
        stream = self._open(file, mode, *args, **kwargs)
        return _Filling(stream, self, file) if self._mine(file) and set(mode) & set("wax+") else stream


class _Filling:
    """A file of a ``_SmallDisk``: ``write`` raises ENOSPC once the disk is full."""

    def __init__(self, stream, disk: _SmallDisk, name):
        self._stream, self._disk, self._name = stream, disk, name

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if self._disk.used() + size > self._disk.size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._name))
        return self._stream.write(data)

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.__exit__(*exc)


def _read_only(folder: str, monkeypatch) -> None:
    """``folder`` on a read-only file system: creating a folder or opening a file for writing under
    it fails with EROFS."""
    makedirs, os_open, py_open = os.makedirs, os.open, builtins.open

    def refuse(path):
        if os.path.abspath(path).startswith(folder + os.sep):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def fake_makedirs(path, *args, **kwargs):
        refuse(path)
        return makedirs(path, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return os_open(path, flags, *args, **kwargs)

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+"):
            refuse(file)
        return py_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", fake_makedirs)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(builtins, "open", fake_open)


def test_full_and_read_only_disks_everywhere(good, tmp_path, capsys, monkeypatch):
    """What ``test_real_full_and_read_only_disks`` checks, where no file system can be mounted:
    the disk is faked at the calls the save path makes (free space, file writes, folder and file
    creation). A 4 MiB disk holds one checkpoint but not the next: one line, the previous
    checkpoint intact, no half-written folder; a read-only disk is found before training."""
    small = str(tmp_path / "small")
    os.makedirs(small)
    _SmallDisk(small, 4 * 2**20, monkeypatch)
    rc, out, err = run_main(GOOD_ARGS + ["--save", f"{small}/ckpt", "--save-interval", "4",
                                         "--keep-last-checkpoints", "1"], capsys)
    monkeypatch.undo()
    line = _one_line(err)
    assert rc == 1 and "not enough free space" in line and f"{iteration_dir(small + '/ckpt', 4)} is intact" in line, line
    assert read_tracker(f"{small}/ckpt") == 4 and not [n for n in os.listdir(f"{small}/ckpt") if ".tmp" in n]
    assert_complete(iteration_dir(f"{small}/ckpt", 4))

    ro = str(tmp_path / "ro")
    os.makedirs(ro)
    _read_only(ro, monkeypatch)
    rc, out, err = run_main(GOOD_ARGS + ["--save", f"{ro}/ckpt"], capsys)
    monkeypatch.undo()
    assert rc == 1 and "cannot be written (read-only file system)" in _one_line(err)
    assert "iteration        1/" not in out and not os.path.exists(f"{ro}/ckpt")  # nothing trained


def test_unwritable_save_is_found_before_training(good, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc, out, err = run_main(GOOD_ARGS + ["--save", str(blocker / "ckpt")], capsys)
    assert rc == 1 and "cannot be written" in _one_line(err)
    assert "iteration " not in out


def test_checksums_are_written_and_can_be_skipped(good, tmp_path):
    manifest = json.load(open(os.path.join(resolve_checkpoint_dir(good["root"]), "checksums.json")))
    assert manifest["algorithm"] == "crc32" and any(n.endswith(".distcp") for n in manifest["files"])
    ckpt = str(tmp_path / "nochecksums")
    training.pretrain(GOOD_ARGS + ["--train-iters", "3", "--save", ckpt, "--no-checkpoint-checksums"])
    assert not os.path.exists(os.path.join(resolve_checkpoint_dir(ckpt), "checksums.json"))
