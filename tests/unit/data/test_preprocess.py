"""``tools/preprocess_data.py``: indexed datasets equal to direct tokenization, one-line errors."""

import os

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from support.data import EOD, _preprocess, _read_documents

from bam_megatron.data.tokenizers import (  # noqa: E402
    build_tokenizer,
)

# --------------------------------------------------------------------------------------------


def _tok_args(kind, bpe_files):
    if kind == "gpt2":
        return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", bpe_files["vocab"],
                "--merge-file", bpe_files["merges"]]
    if kind == "hf":
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                bpe_files["json"]]
    raise ValueError(kind)


@pytest.mark.parametrize("kind, workers, append_eod", [("gpt2", 2, True), ("hf", 1, False)])
def test_preprocess_roundtrip_matches_direct_tokenization(
    kind, workers, append_eod, text_corpus, bpe_files, tmp_path
):
    src, docs = text_corpus
    out = tmp_path / "out"
    argv = ["--input", src, "--output-prefix", out, "--json-keys", "text", "title",
            "--workers", workers, "--log-interval", 50] + _tok_args(kind, bpe_files)
    if append_eod:
        argv.append("--append-eod")
    stats = _preprocess(argv)
    tok = (build_tokenizer("GPT2BPETokenizer", vocab_file=str(bpe_files["vocab"]),
                           merge_file=str(bpe_files["merges"])) if kind == "gpt2" else
           build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(bpe_files["json"])))
    for key in ("text", "title"):
        prefix = f"{out}_{key}_document"
        assert stats[key]["bin"] == prefix + ".bin"
        ds, got = _read_documents(prefix)
        assert ds.index.dtype == numpy.uint16  # vocab < 65500, as Megatron-LM picks
        assert len(got) == len(docs)
        for doc, ids in zip(docs, got):
            pieces = doc[key] if isinstance(doc[key], list) else [doc[key]]
            expected = [i for p in pieces for i in tok.tokenize(p)]
            if append_eod and expected:
                expected.append(tok.eod)
            assert ids == expected
    # the empty document stays, with no tokens (no lone eod)
    _, got = _read_documents(f"{out}_text_document")
    assert got[-2] == []
    # a list of strings is one document with one sequence per piece
    ds = IndexedDataset(f"{out}_text_document")
    last = len(docs) - 1
    assert ds.document_indices[last + 1] - ds.document_indices[last] == 2


def test_preprocess_is_deterministic_across_worker_counts(text_corpus, bpe_files, tmp_path):
    src, _ = text_corpus
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        _preprocess(["--input", src, "--output-prefix", out, "--workers", workers,
                     "--append-eod"] + _tok_args("gpt2", bpe_files))
        outputs.append([(out.parent / f"{out.name}_text_document{s}").read_bytes()
                        for s in (".bin", ".idx")])
    assert outputs[0] == outputs[1]
    assert len(outputs[0][0]) > 1000


def test_preprocess_null_tokenizer_appends_vocab_size_as_eod(null_data):
    ds, docs = _read_documents(null_data[("code", "train")])
    assert len(docs) == 200
    assert all(d[-1] == EOD and all(0 <= t < 50 for t in d[:-1]) for d in docs)


def test_preprocess_logs_progress(text_corpus, bpe_files, tmp_path, capsys):
    src, docs = text_corpus
    _preprocess(["--input", src, "--output-prefix", tmp_path / "p", "--log-interval", 40,
                 "--workers", 2] + _tok_args("gpt2", bpe_files))
    err = capsys.readouterr().err
    assert err.count("Processed ") == len(docs) // 40
    assert "docs/s" in err and "MB/s" in err


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"text": "a"}', '{"text": "b"}', '{"text": "c"', '{"text": "d"}'],
         r"bad\.jsonl:3: line 3 is not valid JSON"),
        (['{"text": "a"}', '{"body": "b"}'], r"line 2 has no key 'text' \(keys present: 'body'"),
        (['{"text": 5}'], r"line 1: key 'text' holds a int, expected a string"),
        (['["text"]'], r"line 1 is a JSON list, expected an object"),
    ],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_bad_input_one_line_error(lines, match, workers, bpe_files, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=match) as info:
        _preprocess(["--input", src, "--output-prefix", out, "--workers", workers]
                    + _tok_args("gpt2", bpe_files))
    assert "\n" not in str(info.value.code)
    assert not os.path.exists(f"{out}_text_document.bin")  # partial output removed
    assert not os.path.exists(f"{out}_text_document.idx")


@pytest.mark.parametrize("text, match", [
    ("1 2 299", r"line 2: key 'text' cannot be tokenized \(token id 299 is outside the NullTokenizer's "
                r"vocabulary 0\.\.127 \(--vocab-size 128\)\)"),
    ("1 2 128", r"token id 128 is outside"),  # 128 is the eod id, not text
    ("hello", r"line 2: key 'text' cannot be tokenized \(the NullTokenizer reads text as space-separated "
              r"token ids 0\.\.127, and 'hello' is not a number\)"),
])
def test_preprocess_null_tokenizer_refuses_ids_outside_its_vocabulary(text, match, tmp_path):
    src = tmp_path / "ids.jsonl"
    src.write_text('{"text": "0 1 127"}\n' + f'{{"text": "{text}"}}\n')
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=match) as info:
        _preprocess(["--input", src, "--output-prefix", out, "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"])
    assert "\n" not in str(info.value.code)
    assert not os.path.exists(f"{out}_text_document.bin") and not os.path.exists(f"{out}_text_document.idx")


def test_preprocess_bad_utf8_and_missing_files(bpe_files, tmp_path):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(SystemExit, match=r"line 2 is not valid UTF-8"):
        _preprocess(["--input", src, "--output-prefix", tmp_path / "o"]
                    + _tok_args("gpt2", bpe_files))
    with pytest.raises(SystemExit, match=r"--input file not found: .*nope\.jsonl"):
        _preprocess(["--input", tmp_path / "nope.jsonl", "--output-prefix", tmp_path / "o"]
                    + _tok_args("gpt2", bpe_files))
    with pytest.raises(SystemExit, match=r"--vocab-file not found: .*missing\.json"):
        _preprocess(["--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type",
                     "GPT2BPETokenizer", "--vocab-file", tmp_path / "missing.json",
                     "--merge-file", bpe_files["merges"]])


# --------------------------------------------------------------------------------------------
# parsing
