"""Tests for the tokenizers, tools/preprocess_data.py and the megatron-core datasets/loaders."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from megatron.core.tokenizers import MegatronTokenizerBase  # noqa: E402

import preprocess_data  # noqa: E402
from bam_megatron.data import (  # noqa: E402
    DataConfigError,
    PretrainingSampler,
    build_data_iterator,
    build_data_loader,
    build_datasets,
    parse_data_path,
    parse_named_data_paths,
    train_valid_test_num_samples,
)
from bam_megatron.tokenizer import (  # noqa: E402
    GPT2BPETokenizer,
    TokenizerConfigError,
    build_tokenizer,
    padded_vocab_size,
)

# NullTokenizer corpora: "code" documents use ids 0..49, "math" documents ids 50..99.
NULL_VOCAB = 100
EOD = NULL_VOCAB
DOMAIN_RANGES = {"code": (0, 50), "math": (50, 100)}


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def _text_docs():
    docs = []
    for i in range(60):
        docs.append({"text": f"def f_{i}(x):\n    return x * {i} + {i * i % 7}\n",
                     "title": f"function {i}"})
    for i in range(60):
        docs.append({"text": f"What is {i} + {2 * i + 1}? The answer is {3 * i + 1}. "
                             "Café, naïve, 中文 🙂  tabs\tand  spaces",
                     "title": f"sum {i}"})
    docs.append({"text": "", "title": "empty text"})
    docs.append({"text": ["First piece. ", "Second piece<|endoftext|>after."],
                 "title": "a list"})
    return docs


def _write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def _null_docs(lo, hi, n, seed):
    rng = numpy.random.default_rng(seed)
    return [{"text": " ".join(str(int(t)) for t in rng.integers(lo, hi, rng.integers(5, 60)))}
            for _ in range(n)]


def _preprocess(argv):
    return preprocess_data.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def text_corpus(work):
    path = work / "text.jsonl"
    docs = _text_docs()
    _write_jsonl(path, docs)
    return path, docs


@pytest.fixture(scope="module")
def bpe_files(work, text_corpus):
    """A small byte-level BPE trained here: tokenizer.json plus its vocab.json/merges.txt."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _, docs = text_corpus
    texts = []
    for d in docs:
        texts.extend(d["text"] if isinstance(d["text"], list) else [d["text"]])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts * 3, trainer)
    folder = work / "bpe"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))
    return {"dir": folder, "json": folder / "tokenizer.json", "vocab": folder / "vocab.json",
            "merges": folder / "merges.txt", "hf": tok}


@pytest.fixture(scope="module")
def null_data(work):
    """Two NullTokenizer domains, each with a train and a held-out validation file."""
    prefixes = {}
    for seed, (name, (lo, hi)) in enumerate(DOMAIN_RANGES.items()):
        for part, n in (("train", 200), ("valid", 40)):
            src = work / f"{name}_{part}.jsonl"
            _write_jsonl(src, _null_docs(lo, hi, n, seed * 10 + (part == "valid")))
            out = work / f"{name}_{part}"
            _preprocess(["--input", src, "--output-prefix", out, "--tokenizer-type",
                         "NullTokenizer", "--vocab-size", NULL_VOCAB, "--append-eod",
                         "--workers", 1])
            prefixes[(name, part)] = f"{out}_text_document"
    return prefixes


@pytest.fixture(scope="module")
def null_tok():
    return build_tokenizer("NullTokenizer", vocab_size=NULL_VOCAB)


def _read_documents(prefix):
    """Documents (concatenated sequences) of an indexed dataset, via megatron-core."""
    ds = IndexedDataset(prefix)
    bounds = ds.document_indices
    docs = []
    for d in range(len(bounds) - 1):
        seqs = [ds[i] for i in range(bounds[d], bounds[d + 1])]
        docs.append(numpy.concatenate(seqs).tolist() if seqs else [])
    return ds, docs


def _domain_of(tokens):
    """Which NullTokenizer domain a sample's (non-eod, non-pad) tokens come from."""
    t = tokens[(tokens != EOD)]
    found = {name for name, (lo, hi) in DOMAIN_RANGES.items()
             if bool(((t >= lo) & (t < hi)).any())}
    return found


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------


def test_padded_vocab_size():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 8) == 51200
    assert padded_vocab_size(32000, 128, 2) == 32000
    assert padded_vocab_size(101, 8, 1) == 104
    with pytest.raises(ValueError, match="tp must be a positive int"):
        padded_vocab_size(100, 128, 0)


def test_null_tokenizer_is_megatron_core_and_eod_is_last(null_tok):
    assert isinstance(null_tok, MegatronTokenizerBase)
    assert null_tok.vocab_size == NULL_VOCAB + 1
    assert null_tok.eod == NULL_VOCAB == null_tok.vocab_size - 1
    assert null_tok.tokenize("3 14 15") == [3, 14, 15]
    assert null_tok.detokenize([3, 14, 15]) == "3 14 15"


@pytest.mark.parametrize(
    "ttype, kwargs, match",
    [
        ("GPT2BPETokenizer", {}, r"GPT2BPETokenizer needs --vocab-file"),
        ("GPT2BPETokenizer", {"vocab_file": "MISSING/v.json", "merge_file": "x"},
         r"--vocab-file not found: MISSING/v\.json"),
        ("GPT2BPETokenizer", {"vocab_file": "VOCAB", "merge_file": "MISSING/m.txt"},
         r"--merge-file not found: MISSING/m\.txt"),
        ("HuggingFaceTokenizer", {"tokenizer_model": "MISSING/tokenizer.json"},
         r"--tokenizer-model not found: MISSING/tokenizer\.json"),
        ("SentencePieceTokenizer", {"tokenizer_model": "MISSING/sp.model"},
         r"--tokenizer-model not found: MISSING/sp\.model"),
        ("NullTokenizer", {}, r"NullTokenizer needs --vocab-size"),
        ("BertWordPieceCase", {}, r"unknown --tokenizer-type 'BertWordPieceCase'"),
    ],
)
def test_tokenizer_errors_name_flag_and_path(ttype, kwargs, match, tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<|endoftext|>": 0}))
    kwargs = {k: str(v).replace("MISSING", str(tmp_path / "nope")).replace(
        "VOCAB", str(vocab)) for k, v in kwargs.items()}
    match = match.replace("MISSING", re.escape(str(tmp_path / "nope")))
    with pytest.raises(TokenizerConfigError, match=match) as info:
        build_tokenizer(ttype, **kwargs)
    assert "\n" not in str(info.value)


def test_gpt2_bpe_engines_match_hf_bytelevel(bpe_files, text_corpus):
    _, docs = text_corpus
    hf = bpe_files["hf"]
    fast = build_tokenizer("GPT2BPETokenizer", vocab_file=str(bpe_files["vocab"]),
                           merge_file=str(bpe_files["merges"]))
    slow = GPT2BPETokenizer(str(bpe_files["vocab"]), str(bpe_files["merges"]), engine="python")
    assert fast._tokenizer.engine == "tokenizers" and slow._tokenizer.engine == "python"
    assert fast.eod == hf.token_to_id("<|endoftext|>") == slow.eod
    assert fast.vocab_size == hf.get_vocab_size()
    texts = [d["text"] for d in docs if isinstance(d["text"], str) and d["text"]]
    texts.append("  leading spaces, 'quotes' we'll\n\n\r\nend\t ")
    for text in texts:
        ids = fast.tokenize(text)
        assert ids == slow.tokenize(text) == hf.encode(text, add_special_tokens=False).ids
        assert fast.detokenize(ids) == text == slow.detokenize(ids)
    # a literal end-of-text marker is the single eod id, in both engines
    ids = fast.tokenize("a<|endoftext|>b")
    assert ids == slow.tokenize("a<|endoftext|>b")
    assert ids.count(fast.eod) == 1 and len(ids) == 3


def test_hf_tokenizer_from_local_tokenizer_json(bpe_files, tmp_path):
    hf = bpe_files["hf"]
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(bpe_files["dir"]))
    assert isinstance(tok, MegatronTokenizerBase)
    assert tok.eod == hf.token_to_id("<|endoftext|>")
    assert tok.pad == hf.token_to_id("<pad>")
    text = "What is 7 + 15? The answer is 22."
    assert tok.tokenize(text) == hf.encode(text, add_special_tokens=False).ids
    assert tok.detokenize(tok.tokenize(text)) == text
    # truncation stored in tokenizer.json must not cut documents
    from tokenizers import Tokenizer

    truncating = Tokenizer.from_file(str(bpe_files["json"]))
    truncating.enable_truncation(max_length=4)
    path = tmp_path / "tokenizer.json"
    truncating.save(str(path))
    tok2 = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
    assert len(truncating.encode(text).ids) == 4
    assert tok2.tokenize(text) == tok.tokenize(text) and len(tok2.tokenize(text)) > 4
    # eos from tokenizer_config.json wins over the built-in guesses
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    tok3 = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
    assert tok3.eod == hf.token_to_id("<pad>")


def test_sentencepiece_tokenizer(work, text_corpus):
    spm = pytest.importorskip("sentencepiece")
    import io

    _, docs = text_corpus
    lines = [d["text"] for d in docs if isinstance(d["text"], str) and d["text"]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 4), model_writer=model,
                                   vocab_size=120, model_type="bpe", minloglevel=2,
                                   hard_vocab_limit=False)
    path = work / "sp.model"
    path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(path))
    assert tok.eod == sp.eos_id()
    assert tok.vocab_size == sp.get_piece_size()
    text = "What is 3 + 7? The answer is 10."
    assert tok.tokenize(text) == sp.encode(text)
    with pytest.raises(TokenizerConfigError, match="is not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(work / "text.jsonl"))


# --------------------------------------------------------------------------------------------
# tools/preprocess_data.py
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


def test_preprocess_runs_as_a_script_with_one_line_errors(tmp_path):
    missing = tmp_path / "x.jsonl"
    proc = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(missing), "--output-prefix",
         str(tmp_path / "n"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"preprocess_data.py: error: --input file not found: {missing}")


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------


def test_parse_data_path(null_data):
    code, math = null_data[("code", "train")], null_data[("math", "train")]
    assert parse_data_path([code]) == ([code], None)
    assert parse_data_path([code, math]) == ([code, math], None)
    assert parse_data_path(["0.3", code, "0.7", math]) == ([code, math], [0.3, 0.7])
    assert parse_data_path(f"3 {code} 7 {math}") == ([code, math], [3.0, 7.0])
    with pytest.raises(DataConfigError, match=r"odd number of items \(3\)"):
        parse_data_path(["0.3", code, "0.7"])
    with pytest.raises(DataConfigError, match=r"expected a weight at position 3, got 'x'"):
        parse_data_path(["0.3", code, "x", math])
    with pytest.raises(DataConfigError, match=r"'0.5' at position 2 looks like a weight"):
        parse_data_path([code, "0.5"])
    with pytest.raises(DataConfigError, match=r"must be > 0"):
        parse_data_path(["0", code])
    with pytest.raises(DataConfigError, match=r"--data-path: .*nowhere_text_document\.bin not "
                                              r"found; make it with: python tools/preprocess"):
        parse_data_path(["/nowhere_text_document"])
    with pytest.raises(DataConfigError, match=r"without '\.bin'"):
        parse_data_path([code + ".bin"])
    os.rename(code + ".idx", code + ".idx.moved")
    try:
        with pytest.raises(DataConfigError, match=r"code_train_text_document\.idx not found"):
            parse_data_path([code])
    finally:
        os.rename(code + ".idx.moved", code + ".idx")


def test_parse_named_data_paths(null_data, tmp_path):
    code, math = null_data[("code", "valid")], null_data[("math", "valid")]
    named = parse_named_data_paths([f"code:{code}", math])
    assert list(named.items()) == [("code", code), ("math_valid_text_document", math)]
    with pytest.raises(DataConfigError, match=r"duplicate validation set name 'x'"):
        parse_named_data_paths([f"x:{code}", f"x:{math}"])
    with pytest.raises(DataConfigError, match=r"no weights"):
        parse_named_data_paths(["0.5", code])
    with pytest.raises(DataConfigError, match=r"--valid-sets: .*nope\.bin not found"):
        parse_named_data_paths([f"a:{tmp_path / 'nope'}"])


def test_num_samples_megatron_rule():
    assert train_valid_test_num_samples(global_batch_size=8, train_iters=100, eval_iters=5,
                                        eval_interval=20) == (800, (100 // 20 + 1) * 5 * 8, 40)
    assert train_valid_test_num_samples(global_batch_size=8, train_samples=1000, eval_iters=2,
                                        full_validation=True) == (1000, None, 16)
    with pytest.raises(DataConfigError, match="train_iters"):
        train_valid_test_num_samples(global_batch_size=8)


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------

SEQ = 32


def test_blended_dataset_proportions_shapes_and_cache(null_data, null_tok, tmp_path):
    code, math = null_data[("code", "train")], null_data[("math", "train")]
    kwargs = dict(data_path=["0.3", code, "0.7", math], split="90,5,5", train_iters=50,
                  global_batch_size=8, eval_iters=2, eval_interval=25, seed=7,
                  data_cache_path=str(tmp_path / "cache"))
    ds = build_datasets(null_tok, SEQ, **kwargs)
    assert ds.num_samples == (400, 48, 16)
    assert len(ds.train) >= 400 and len(ds.valid) >= 48 and len(ds.test) >= 16
    counts = {"code": 0, "math": 0}
    for i in range(len(ds.train)):
        sample = ds.train[i]
        assert sample["tokens"].shape == (SEQ,) and sample["tokens"].dtype == torch.int64
        assert sample["labels"].shape == (SEQ,) and sample["loss_mask"].shape == (SEQ,)
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        assert "attention_mask" not in sample  # not needed without reset_attention_mask
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
        domain = _domain_of(sample["tokens"])
        assert domain == {["code", "math"][int(sample["dataset_id"])]}
        counts[domain.pop()] += 1
    share = counts["code"] / len(ds.train)
    assert 0.27 <= share <= 0.33 and counts["math"] > 0
    # the single-process cache (megatron-core's BlendedDataset needs a process group there)
    names = os.listdir(tmp_path / "cache")
    assert any(n.endswith("BlendedDataset-train-dataset_index.npy") for n in names)
    again = build_datasets(null_tok, SEQ, **kwargs)
    for i in (0, 17, len(ds.train) - 1):
        assert torch.equal(again.train[i]["tokens"], ds.train[i]["tokens"])


def test_named_validation_sets(null_data, null_tok):
    code_v, math_v = null_data[("code", "valid")], null_data[("math", "valid")]
    ds = build_datasets(
        null_tok, SEQ, data_path=[null_data[("code", "train")], null_data[("math", "train")]],
        split="100,0,0", train_iters=10, global_batch_size=4, eval_iters=3,
        valid_sets=[f"code:{code_v}", math_v],
    )
    assert ds.valid is None and ds.test is None  # split gives no valid/test part
    assert list(ds.valid_sets) == ["code", "math_valid_text_document"]
    for name, domain in (("code", "code"), ("math_valid_text_document", "math")):
        vset = ds.valid_sets[name]
        assert len(vset) >= 12
        for i in range(len(vset)):
            assert _domain_of(vset[i]["tokens"]) == {domain}
    # a single named set is still a dict of one dataset
    one = build_datasets(null_tok, SEQ, valid_sets=[f"m:{math_v}"], train_iters=1,
                         global_batch_size=2, eval_iters=1)
    assert one.train is None and list(one.valid_sets) == ["m"]
    assert _domain_of(one.valid_sets["m"][0]["tokens"]) == {"math"}


def test_per_split_paths_and_args_file(null_data, null_tok, tmp_path):
    code, math = null_data[("code", "train")], null_data[("math", "train")]
    ds = build_datasets(null_tok, SEQ, train_data_path=[code], valid_data_path=[math],
                        train_iters=5, global_batch_size=4, eval_iters=1)
    assert _domain_of(ds.train[0]["tokens"]) == {"code"}
    assert _domain_of(ds.valid[0]["tokens"]) == {"math"}
    assert ds.test is None
    # without data_cache_path megatron-core caches beside the data, in a folder named
    # after the prefix
    assert os.path.isdir(os.path.join(code, "cache", "GPTDataset_indices"))
    spec = tmp_path / "splits.json"
    spec.write_text(json.dumps({"train": f"1 {math} 1 {code}", "valid": [code], "test": []}))
    ds2 = build_datasets(null_tok, SEQ, per_split_data_args_path=str(spec), train_iters=5,
                         global_batch_size=4, eval_iters=1)
    assert _domain_of(ds2.valid[0]["tokens"]) == {"code"}
    domains = set()
    for i in range(len(ds2.train)):
        domains |= _domain_of(ds2.train[i]["tokens"])
    assert domains == {"code", "math"}


def test_mock_data(null_tok):
    ds = build_datasets(null_tok, SEQ, mock_data=True, train_iters=3, global_batch_size=2,
                        eval_iters=1)
    assert len(ds.train) >= 6
    batch = next(build_data_iterator(ds.train, micro_batch_size=2))
    assert batch["tokens"].shape == (2, SEQ) and batch["tokens"].max() < null_tok.vocab_size


def test_reset_position_ids_attention_mask_and_eod_loss_mask(null_data, null_tok):
    ds = build_datasets(null_tok, SEQ, data_path=[null_data[("code", "train")]], split="1,0,0",
                        train_iters=20, global_batch_size=4, reset_position_ids=True,
                        reset_attention_mask=True, eod_mask_loss=True)
    checked = 0
    for i in range(len(ds.train)):
        s = ds.train[i]
        eods = (s["tokens"] == EOD).nonzero().flatten().tolist()
        if not eods or eods[0] == SEQ - 1:
            continue
        e = eods[0]
        assert s["loss_mask"][e] == 0 and bool((s["loss_mask"][:e] == 1).all())
        assert s["position_ids"][e + 1] == 0 and s["position_ids"][e] == e
        mask = s["attention_mask"]
        assert mask.shape == (1, SEQ, SEQ) and mask.dtype == torch.bool
        assert bool(mask[0, e + 1, e]) and not bool(mask[0, e, e])  # True = masked
        checked += 1
    assert checked > 5


def test_build_datasets_errors(null_data, null_tok, tmp_path):
    code = null_data[("code", "train")]
    base = dict(train_iters=2, global_batch_size=2)
    with pytest.raises(DataConfigError, match="only one data source"):
        build_datasets(null_tok, SEQ, data_path=[code], train_data_path=[code], **base)
    with pytest.raises(DataConfigError, match=r"missing_text_document\.bin not found"):
        build_datasets(null_tok, SEQ, data_path=[str(tmp_path / "missing_text_document")],
                       **base)
    with pytest.raises(DataConfigError, match="--split must be"):
        build_datasets(null_tok, SEQ, data_path=[code], split="a,b", **base)
    with pytest.raises(DataConfigError, match="no data"):
        build_datasets(null_tok, SEQ, **base)
    # 200 documents: 969,30,1 leaves the test split empty; megatron-core would loop forever
    with pytest.raises(DataConfigError, match=r"the test split of .*code_train_text_document "
                                              r"gets 0 of its 200 documents and no tokens"):
        build_datasets(null_tok, SEQ, data_path=[code], split="969,30,1", eval_iters=1, **base)


# --------------------------------------------------------------------------------------------
# sampler / loader
# --------------------------------------------------------------------------------------------


def _batches(dataset, **kwargs):
    return [b["tokens"] for b in build_data_loader(dataset, **kwargs)]


def test_sampler_resume_and_data_parallel(null_data, null_tok):
    ds = build_datasets(null_tok, SEQ, data_path=[null_data[("math", "train")]], split="1,0,0",
                        train_iters=10, global_batch_size=4).train
    full = _batches(ds, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=1)
    assert len(full) == len(ds) // 2 and full[0].shape == (2, SEQ)
    for consumed in (2, 6, 10):
        resumed = _batches(ds, micro_batch_size=2, consumed_samples=consumed,
                           data_parallel_rank=0, data_parallel_size=1)
        assert len(resumed) == len(full) - consumed // 2
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[consumed // 2:]))
    # two data-parallel ranks split each global micro-step; together they see the dp=1 order
    ranks = [_batches(ds, micro_batch_size=2, data_parallel_rank=r, data_parallel_size=2)
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(ds) // 4
    for k in range(len(ranks[0])):
        assert torch.equal(torch.cat([ranks[0][k], ranks[1][k]]),
                           torch.cat([full[2 * k], full[2 * k + 1]]))
    resumed = _batches(ds, micro_batch_size=2, consumed_samples=8, data_parallel_rank=1,
                       data_parallel_size=2)
    assert all(torch.equal(a, b) for a, b in zip(resumed, ranks[1][2:]))
    # re-iterating a loader restarts at its consumed_samples (fixed validation batches)
    loader = build_data_loader(ds, micro_batch_size=2, consumed_samples=4,
                               data_parallel_rank=0, data_parallel_size=1)
    first, second = [b["tokens"] for b in loader], [b["tokens"] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(DataConfigError, match="past the end of its data"):
        PretrainingSampler(len(ds), len(ds), 2, 0, 1)
    sampler = PretrainingSampler(10, 0, 3, 0, 1, drop_last=False)
    assert list(sampler) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]] and len(sampler) == 4


def test_cyclic_iterator_wraps_to_start(null_data, null_tok):
    ds = build_datasets(null_tok, SEQ, data_path=[null_data[("code", "valid")]], split="1,0,0",
                        train_iters=1, global_batch_size=2).train
    n = len(ds) // 2
    it = build_data_iterator(ds, micro_batch_size=2, consumed_samples=2, cyclic=True,
                             data_parallel_rank=0, data_parallel_size=1)
    seen = [next(it)["tokens"] for _ in range(n)]  # n - 1 batches, then the wrap
    assert torch.equal(seen[-1], _batches(ds, micro_batch_size=2, data_parallel_rank=0,
                                          data_parallel_size=1)[0])


# --------------------------------------------------------------------------------------------
# torch.distributed (gloo, 2 processes)
# --------------------------------------------------------------------------------------------

_DIST_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    code, math, cache = sys.argv[5], sys.argv[6], sys.argv[7]
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank,
                                         world_size=world)
    from bam_megatron.tokenizer import build_tokenizer
    from bam_megatron.data import build_datasets, build_data_iterator, DataConfigError
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    kw = dict(data_path=["0.4", code, "0.6", math], split="90,10,0", train_iters=6,
              global_batch_size=4, eval_iters=1, data_cache_path=cache,
              valid_sets=["c:" + code])
    ds = build_datasets(tok, 16, **kw)
    it = build_data_iterator(ds.train, micro_batch_size=2)
    batch = next(it)
    res = {"len": len(ds.train), "first": ds.train[0]["tokens"].tolist(),
           "valid_c": len(ds.valid_sets["c"]), "batch": batch["tokens"].tolist()}
    ds2 = build_datasets(tok, 16, is_built_on_rank=lambda: rank == 0, **kw)
    res["none_on_rank1"] = ds2.train is None and ds2.valid_sets["c"] is None
    try:
        build_datasets(tok, 16, is_built_on_rank=lambda: rank == 1, **kw)
        res["rank0_check"] = "no error"
    except DataConfigError as e:
        res["rank0_check"] = str(e)
    json.dump(res, open(out, "w"))
    torch.distributed.destroy_process_group()
    """
)


def test_distributed_build_gloo_two_ranks(null_data, tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(_DIST_SCRIPT)
    init = f"file://{tmp_path / 'pg_init'}"
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", init, str(tmp_path / f"r{r}.json"),
             null_data[("code", "train")], null_data[("math", "train")], str(cache)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert r0["len"] == r1["len"] >= 24
    assert r0["first"] == r1["first"] and r0["valid_c"] == r1["valid_c"] > 0
    # data-parallel ranks (dp = world size here) get different micro-batches
    assert r0["batch"] != r1["batch"]
    assert r1["none_on_rank1"] is True
    for res in (r0, r1):
        assert "must be True on global rank 0" in res["rank0_check"]
    assert any(n.endswith("BlendedDataset-train-dataset_index.npy") for n in os.listdir(cache))
