"""The programs' entry points: --help answers before torch is imported; user errors are one line,
other errors keep their traceback."""

import subprocess
import sys

import pytest

PROGRAMS = [
    ("bam_megatron.training", "pretrain_bam.py"),
    ("bam_megatron.cli.upcycle", "upcycle_bam.py"),
    ("bam_megatron.cli.inspect_checkpoint", "inspect_checkpoint.py"),
    ("bam_megatron.cli.evaluate", "evaluate_bam.py"),
    ("bam_megatron.cli.preprocess", "preprocess_data.py"),
    ("bam_megatron.cli.build_sample_data", "build_sample_data.py"),
    ("bam_megatron.cli.hf_import", "hf_import.py"),
    ("bam_megatron.cli.hf_export", "hf_export.py"),
    ("bam_megatron.cli.serve", "serve.py"),
    ("bam_megatron.cli.generate", "generate.py"),
    ("bam_megatron.cli.build_tasks", "build_tasks.py"),
    ("bam_megatron.cli.domain_embeddings", "domain_embeddings.py"),
    ("bam_megatron.cli.add_expert", "add_expert.py"),
]

_HELP = """
import sys
from {module} import main
try:
    main(["--help"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
heavy = sorted(m for m in ("torch", "megatron") if m in sys.modules)
assert not heavy, f"--help imported {{heavy}}"
"""


@pytest.mark.parametrize("module,name", PROGRAMS, ids=[p[1] for p in PROGRAMS])
def test_help_answers_without_importing_torch(module, name):
    proc = subprocess.run([sys.executable, "-c", _HELP.format(module=module)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_user_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from bam_megatron import errors
    from bam_megatron.training import program

    def user_error(argv):
        raise errors.CheckpointError("checkpoint x is damaged; restore it")

    monkeypatch.setattr(program, "pretrain", user_error)
    assert program.main([]) == 1
    assert capsys.readouterr().err == "pretrain_bam.py: error: checkpoint x is damaged; restore it\n"

    def bug(argv):
        raise ValueError("internal")

    monkeypatch.setattr(program, "pretrain", bug)
    with pytest.raises(ValueError, match="internal"):
        program.main([])
