"""The programs started as processes: ``--help`` answers before torch is imported, an argument
error is found without importing torch, a user error is one line and exit status 1."""

import os
import subprocess
import sys

import pytest
from support import REPO_ROOT

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


MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--vocab-size", "128", "--mock-data", "--train-iters", "4", "--disable-bias-linear"]
MOE = ["--num-experts", "2", "--moe-router-topk", "1", "--moe-router-pre-softmax"]


def test_argument_checks_import_no_torch():
    """A layout error is found by finalize_args without importing torch (so it answers at once)."""
    code = (
        "import sys\n"
        "from bam_megatron.training import arguments as a\n"
        "p = a.build_parser()\n"
        f"args = p.parse_args({MODEL + MOE + ['--tensor-model-parallel-size', '2']!r})\n"
        "try:\n"
        "    a.finalize_args(args, p)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
        "print('torch' in sys.modules)\n"
    )
    env = dict(os.environ, WORLD_SIZE="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["BAMConfigError", "False"]


def test_preprocess_runs_as_a_script_with_one_line_errors(tmp_path):
    missing = tmp_path / "x.jsonl"
    proc = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(missing), "--output-prefix",
         str(tmp_path / "n"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"preprocess_data.py: error: --input file not found: {missing}")
