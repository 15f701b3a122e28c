"""One way to open a checkpoint: no module outside ``checkpoint/opener`` unpickles checkpoint
files, reads recorded arguments or trackers by itself."""

import os
import re

from support import REPO_ROOT

OPENER = os.path.join("bam_megatron", "checkpoint", "opener")
# (pattern, what it means); a patch that swaps torch DCP's unpicklers names them in its docstring.
FORBIDDEN = [
    (re.compile(r"\btorch\.load\("), "torch.load"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bread_common\b"), "a common-state reader"),
    (re.compile(r"\.read_metadata\(\)"), "torch DCP's unpickling index reader"),
    (re.compile(r"latest_checkpointed_iteration\.txt"), "the tracker's name"),
]
ALLOWED = {os.path.join("bam_megatron", "checkpoint", "layout.py"): {"the tracker's name"}}


def _sources():
    for folder in ("bam_megatron", "tools", "bench"):
        for root, _dirs, files in os.walk(os.path.join(REPO_ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    yield os.path.relpath(path, REPO_ROOT), path


def _code(text: str) -> str:
    """``text`` without docstrings and comments (what the module executes)."""
    text = re.sub(r'"""(?:.|\n)*?"""', "", text)
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def test_only_the_opener_reads_checkpoint_files():
    offenders = []
    for rel, path in _sources():
        if rel.startswith(OPENER):
            continue
        with open(path, encoding="utf-8") as f:
            code = _code(f.read())
        for pattern, what in FORBIDDEN:
            if what in ALLOWED.get(rel, set()):
                continue
            if pattern.search(code):
                offenders.append(f"{rel}: {what}")
    assert not offenders, offenders


def test_every_checkpoint_program_takes_the_open_flags():
    """Each program that reads checkpoints parses --no-checkpoint-checksums and
    --trust-checkpoint-code through the one function that defines them."""
    programs = ["upcycle", "add_expert", "hf_export", "generate", "evaluate", "domain_embeddings", "inspect_checkpoint"]
    for name in programs:
        with open(os.path.join(REPO_ROOT, "bam_megatron", "cli", f"{name}.py"), encoding="utf-8") as f:
            assert "add_open_args(" in f.read(), name
    with open(os.path.join(REPO_ROOT, "bam_megatron", "training", "arguments.py"), encoding="utf-8") as f:
        assert "add_open_args(" in f.read()
