"""Damaged, foreign or empty data, found before training (or at the first batch) with one line
naming the file: truncated .idx / .bin, an .idx of another dataset, an empty dataset, token ids
the model's vocabulary cannot hold, a corrupt .idx header, a corrupted pointer table or document
index (which would otherwise pass and fail, or not, when training reaches the documents),
--micro-batch-size 0."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from support.training import BAM, NO_DROPOUT, TINY, error_lines, run_main

from bam_megatron.cli.preprocess import preprocess


def _make(folder, name: str, docs, vocab: int = 128) -> str:
    jsonl = os.path.join(folder, f"{name}.jsonl")
    with open(jsonl, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": " ".join(str(t) for t in doc)}) + "\n")
    preprocess(["--input", jsonl, "--output-prefix", os.path.join(folder, name), "--tokenizer-type", "NullTokenizer",
                "--vocab-size", str(vocab), "--append-eod", "--workers", "1", "--log-interval", "100000"])
    return os.path.join(folder, f"{name}_text_document")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bad_data"))
    good = _make(d, "good", [[(i + k) % 100 for k in range(60)] for i in range(200)])
    other = _make(d, "other", [[(i + k) % 100 for k in range(37)] for i in range(150)])
    wide = _make(d, "wide", [[500 + k for k in range(40)] for _ in range(50)], vocab=1000)
    return {"dir": d, "good": good, "other": other, "wide": wide}


def _case(data, case: str):
    d = os.path.join(data["dir"], case)
    os.makedirs(d, exist_ok=True)
    prefix = os.path.join(d, "web_text_document")
    for ext in (".bin", ".idx"):
        shutil.copyfile(data["good"] + ext, prefix + ext)
    if case == "truncated-idx":
        with open(prefix + ".idx", "r+b") as f:
            f.truncate(os.path.getsize(prefix + ".idx") - 16)
        return prefix, [".idx", "truncated"]
    if case == "truncated-bin":
        with open(prefix + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(prefix + ".bin") // 2)
        return prefix, [".bin", "truncated"]
    if case == "idx-of-another-dataset":
        shutil.copyfile(data["other"] + ".idx", prefix + ".idx")
        return prefix, [".idx", "another dataset"]
    if case == "corrupt-idx":
        with open(prefix + ".idx", "r+b") as f:
            f.write(b"GARBAGE!!")
        return prefix, [".idx", "bad header"]
    if case == "corrupted-pointer-table":  # the header, the sizes and the last pointer still agree
        _poke_index(prefix, table="pointers", entry=100, value=10**9)
        return prefix, [".idx", "sequence 100", "pointer table"]
    if case == "corrupted-document-index":
        _poke_index(prefix, table="documents", entry=50, value=10**6)
        return prefix, [".idx", "document 50", "document index"]
    if case == "empty":
        empty = _make(d, "empty", [])
        return empty, ["no documents"]
    if case == "token-ids-beyond-vocabulary":
        return data["wide"], ["token id", "vocabulary"]
    raise ValueError(case)


CASES = ["truncated-idx", "truncated-bin", "idx-of-another-dataset", "corrupt-idx", "corrupted-pointer-table",
         "corrupted-document-index", "empty", "token-ids-beyond-vocabulary"]


def _poke_index(prefix: str, table: str, entry: int, value: int) -> None:
    """Overwrite one int64 of the ``.idx``'s pointer table or document index in place."""
    with open(prefix + ".idx", "r+b") as f:
        header = f.read(34)
        sequences = struct.unpack("<Q", header[18:26])[0]
        start = 34 + 4 * sequences + (0 if table == "pointers" else 8 * sequences)
        f.seek(start + 8 * entry)
        f.write(struct.pack("<q", value))


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_one_line_before_training(case, data, capsys):
    prefix, words = _case(data, case)
    argv = TINY + NO_DROPOUT + BAM + ["--train-iters", "4", "--data-path", prefix, "--split", "100,0,0"]
    rc, out, err = run_main(argv, capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "iteration " not in out


def test_micro_batch_size_zero_is_refused(capsys):
    rc, _out, err = run_main(TINY + ["--mock-data", "--train-iters", "4", "--micro-batch-size", "0"], capsys)
    assert rc == 2 and "--micro-batch-size must be at least 1" in err
