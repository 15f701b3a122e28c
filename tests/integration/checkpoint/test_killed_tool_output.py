"""The temporary folder of a tool killed with SIGKILL (``checkpoint/tool_output.py``) is removed by
the next run on the same output."""

import glob
import os
import signal
import subprocess
import sys

from bam_megatron.checkpoint.tool_output import OutputTransaction


def _write(out, name="model.bin", data=b"x"):
    with open(os.path.join(out.tmp, name), "wb") as f:
        f.write(data)


def test_the_folder_of_a_killed_tool_is_removed_by_the_next_run(tmp_path):
    target = str(tmp_path / "out")
    code = ("import os, signal, sys\nfrom bam_megatron.checkpoint.tool_output import OutputTransaction\n"
            "with OutputTransaction(sys.argv[1], sync=False) as out:\n"
            "    open(os.path.join(out.tmp, 'half.bin'), 'wb').write(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, target], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = glob.glob(target + ".tmp-*")
    assert len(left) == 1 and os.path.isfile(os.path.join(left[0], "half.bin"))
    with OutputTransaction(target, sync=False) as out:
        assert not os.path.exists(left[0])  # removed before this run writes
        _write(out)
    assert os.listdir(target) == ["model.bin"] and not glob.glob(target + ".tmp-*")
