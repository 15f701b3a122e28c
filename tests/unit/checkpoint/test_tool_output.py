"""The tools' one output transaction: complete or absent, a previous output replaced only with
--force and only once the new one is complete, SIGTERM and disk errors as one line, and
the temporary folder of a live tool left alone (that of a killed one:
``tests/integration/checkpoint/test_killed_tool_output.py``)."""

import errno
import glob
import os
import signal

import pytest

from bam_megatron.checkpoint.tool_output import OutputTransaction, remove_stale_temporaries
from bam_megatron.errors import UpcycleError


def _write(out, name="model.bin", data=b"x"):
    with open(os.path.join(out.tmp, name), "wb") as f:
        f.write(data)


def test_complete_output_appears_at_once_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "out"
    with OutputTransaction(str(target), sync=False) as out:
        _write(out)
        assert not target.exists() and os.path.isdir(out.tmp)
    assert sorted(os.listdir(target)) == ["model.bin"]  # the owner record does not travel
    with OutputTransaction(str(target), sync=False) as out:
        _write(out, "new.bin")
    assert sorted(os.listdir(target)) == ["new.bin"] and not glob.glob(str(target) + ".*")


class _Writer:
    closed = False

    def close(self):
        self.closed = True


def test_a_failure_removes_the_temporary_folder_and_closes_the_writers(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    writer = _Writer()
    with pytest.raises(ZeroDivisionError):
        with OutputTransaction(str(target), sync=False) as out:
            out.keep(writer)
            _write(out)
            1 / 0
    assert writer.closed and (target / "old.bin").read_bytes() == b"old"
    assert not glob.glob(str(target) + ".tmp-*")


def test_a_full_disk_is_one_line_of_the_tools_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(UpcycleError, match=r"^no space left on device while writing .*; nothing was written; free space"):
        with OutputTransaction(str(target), error=UpcycleError, sync=False):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not target.exists() and not glob.glob(str(target) + ".tmp-*")


def test_sigterm_unwinds_the_transaction(tmp_path):
    target = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(UpcycleError, match="stopped by SIGTERM; nothing was written"):
        with OutputTransaction(str(target), error=UpcycleError, sync=False) as out:
            _write(out)
            signal.raise_signal(signal.SIGTERM)
    assert not target.exists() and not glob.glob(str(target) + ".tmp-*")
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the transaction's only inside it


def test_a_live_tools_folder_is_left_alone(tmp_path):
    target = str(tmp_path / "out")
    with OutputTransaction(target, sync=False) as out:
        assert remove_stale_temporaries(target) == []  # this process is alive
        assert os.path.isdir(out.tmp)
