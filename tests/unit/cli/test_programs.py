"""The programs' entry points: user errors are one line, other errors keep their traceback
(``--help`` without torch: ``tests/integration/cli/test_programs_as_processes.py``)."""

import pytest


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
