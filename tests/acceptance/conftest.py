"""Fixtures of the training acceptance tests: one thread per module, the reference run
``good``, and a small indexed corpus made with ``tools/preprocess_data.py``."""

import contextlib
import io
import json
import os
import random

import pytest
import torch
from support.training import GOOD_ARGS, GOOD_ITERS, aux_log

from bam_megatron import training
from bam_megatron.checkpoint.opener import read_tracker

# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread in this process, like the OMP_NUM_THREADS=1 subprocesses (same
    arithmetic, so a one-process run here and one in a subprocess agree bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def good(tmp_path_factory):
    """A one-process BAM run of GOOD_ITERS steps, checkpointed halfway and at the end (one
    intra-op thread, like the tests' subprocesses)."""
    root = str(tmp_path_factory.mktemp("good") / "ckpt")
    log = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(log):
        summary = training.pretrain(GOOD_ARGS + ["--save", root, "--save-interval", str(GOOD_ITERS // 2)])
    torch.set_num_threads(threads)
    assert len(summary["train_losses"]) == GOOD_ITERS and summary["iteration"] == GOOD_ITERS
    assert read_tracker(root) == GOOD_ITERS
    aux = aux_log(log.getvalue())
    assert sorted(aux) == list(range(1, GOOD_ITERS + 1))
    return {"root": root, "losses": summary["train_losses"], "valid": summary["valid"]["valid"], "aux": aux}


def _write_corpus(path: str, seed: int, docs: int) -> None:
    """Documents of consecutive token ids (a learnable pattern) as NullTokenizer text."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            start, length = rng.randrange(128), rng.randrange(20, 80)
            f.write(json.dumps({"text": " ".join(str((start + k) % 128) for k in range(length))}) + "\n")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Indexed datasets built with tools/preprocess_data.py: a training corpus and a 'code' set."""
    from bam_megatron.cli.preprocess import preprocess
    d = tmp_path_factory.mktemp("corpus")
    prefixes = {}
    for name, seed, docs in (("web", 1, 400), ("code", 2, 100)):
        jsonl = str(d / f"{name}.jsonl")
        _write_corpus(jsonl, seed, docs)
        stats = preprocess([
            "--input", jsonl, "--output-prefix", str(d / name), "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "128", "--append-eod", "--workers", "1",
        ])
        assert stats["text"]["documents"] == docs
        prefixes[name] = str(d / f"{name}_text_document")
        assert os.path.isfile(prefixes[name] + ".bin") and os.path.isfile(prefixes[name] + ".idx")
    return prefixes

