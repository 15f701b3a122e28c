"""Helpers of the data tests: corpora written as jsonl, preprocessing, reading indexed datasets back."""


import json

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

from bam_megatron.cli.preprocess import preprocess  # noqa: E402

# NullTokenizer corpora: "code" documents use ids 0..49, "math" documents ids 50..99.
NULL_VOCAB = 100


EOD = NULL_VOCAB


DOMAIN_RANGES = {"code": (0, 50), "math": (50, 100)}


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
    return preprocess([str(a) for a in argv])


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


def build_null_data(work):
    """Two NullTokenizer domains under ``work``, each with a train and a held-out validation file:
    ``{(domain, "train" | "valid"): prefix}``."""
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
