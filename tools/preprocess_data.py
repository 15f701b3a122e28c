#!/usr/bin/env python
"""Tokenize a jsonl corpus into Megatron's indexed dataset format (.bin + .idx).

Same flags and output as Megatron-LM's tools/preprocess_data.py: for every ``--json-keys`` key
it writes ``<output-prefix>_<key>_document.bin`` / ``.idx`` with megatron-core's
``IndexedDatasetBuilder`` (token dtype uint16 when the vocabulary has fewer than 65500
entries, else int32), one document per input line, optionally ending in the tokenizer's eod
token (``--append-eod``). A key may hold a string or a list of strings (the pieces are
concatenated, as Megatron-LM does for pre-split sentences).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/code \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 4

Blank lines are skipped. A line that is not valid JSON, lacks a key, or is not UTF-8 stops
the run with a one-line error naming the line; partial outputs are removed.
``--input`` may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
import time
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

# megatron-core warns on import when Transformer Engine / Apex are absent; irrelevant here.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from bam_megatron.tokenizer import (  # noqa: E402
    TokenizerConfigError,
    add_tokenizer_args,
    build_tokenizer_from_args,
)


class PreprocessError(Exception):
    """A problem with the input or the flags; the message is one line."""


# --------------------------------------------------------------------------------------------
# Encoding (runs in the worker processes)
# --------------------------------------------------------------------------------------------

_WORKER_STATE: dict = {}


def _init_worker(args: argparse.Namespace, tokenizer=None) -> None:
    if tokenizer is None:
        tokenizer = build_tokenizer_from_args(args)
    _WORKER_STATE["tokenizer"] = tokenizer
    _WORKER_STATE["json_keys"] = list(args.json_keys)
    _WORKER_STATE["append_eod"] = bool(args.append_eod)
    _WORKER_STATE["input"] = args.input


def _encode_line(item: Tuple[int, bytes]):
    """Tokenize one jsonl line.

    Returns ``("ok", lineno, {key: (ids, sentence_lens)}, nbytes)``, ``("skip", lineno, None,
    nbytes)`` for a blank line, or ``("error", lineno, message, nbytes)``.
    """
    lineno, raw = item
    nbytes = len(raw)
    where = f"{_WORKER_STATE['input']}:{lineno}"
    if not raw.strip():
        return ("skip", lineno, None, nbytes)
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return ("error", lineno, f"{where}: line {lineno} is not valid UTF-8 ({e.reason} at "
                                 f"byte {e.start})", nbytes)
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        return ("error", lineno, f"{where}: line {lineno} is not valid JSON ({e.msg}, column "
                                 f"{e.colno})", nbytes)
    if not isinstance(data, dict):
        return ("error", lineno, f"{where}: line {lineno} is a JSON {type(data).__name__}, "
                                 "expected an object", nbytes)
    tokenizer = _WORKER_STATE["tokenizer"]
    out: Dict[str, Tuple[List[int], List[int]]] = {}
    for key in _WORKER_STATE["json_keys"]:
        if key not in data:
            present = ", ".join(repr(k) for k in list(data)[:8]) or "none"
            return ("error", lineno, f"{where}: line {lineno} has no key {key!r} (keys present: "
                                     f"{present}; choose with --json-keys)", nbytes)
        text = data[key]
        if isinstance(text, str):
            pieces = [text]
        elif isinstance(text, list) and all(isinstance(t, str) for t in text):
            pieces = text
        else:
            return ("error", lineno, f"{where}: line {lineno}: key {key!r} holds a "
                                     f"{type(text).__name__}, expected a string or a list of "
                                     "strings", nbytes)
        doc_ids: List[int] = []
        sentence_lens: List[int] = []
        for piece in pieces:
            try:
                ids = tokenizer.tokenize(piece)
            except Exception as e:  # e.g. a NullTokenizer line that is not integers
                return ("error", lineno, f"{where}: line {lineno}: key {key!r} cannot be "
                                         f"tokenized ({type(e).__name__}: {e})", nbytes)
            if len(ids) > 0:
                doc_ids.extend(ids)
                sentence_lens.append(len(ids))
        if len(doc_ids) > 0 and _WORKER_STATE["append_eod"]:
            doc_ids.append(tokenizer.eod)
            sentence_lens[-1] += 1
        out[key] = (doc_ids, sentence_lens)
    return ("ok", lineno, out, nbytes)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize a jsonl file into Megatron .bin/.idx indexed datasets.",
    )
    add_tokenizer_args(parser)
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True, help="Path to the input jsonl file.")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="Space-separated JSON keys to extract (one output per key).")
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="Append the tokenizer's eod token to the end of every document.")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True,
                       help="Output path without suffix; <prefix>_<key>_document.bin/.idx")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="Number of tokenizer worker processes.")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="Print progress every this many documents.")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.log_interval < 1:
        parser.error(f"--log-interval must be >= 1, got {args.log_interval}")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys has duplicates: {args.json_keys}")
    return args


def output_paths(output_prefix: str, key: str) -> Tuple[str, str]:
    """The .bin and .idx paths Megatron-LM's tool writes for one json key."""
    base = f"{output_prefix}_{key}_document"
    return base + ".bin", base + ".idx"


def _open_input(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _numbered_lines(stream) -> Iterator[Tuple[int, bytes]]:
    for lineno, raw in enumerate(stream, start=1):
        yield lineno, raw


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> Dict[str, dict]:
    """Do the work described by ``args``; returns per-key statistics.

    Raises :class:`PreprocessError` for bad input/flags (one-line message).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if not os.path.isfile(args.input):
        raise PreprocessError(f"--input file not found: {args.input}")
    try:
        tokenizer = build_tokenizer_from_args(args)
    except TokenizerConfigError as e:
        raise PreprocessError(str(e)) from None

    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    paths = {key: output_paths(args.output_prefix, key) for key in args.json_keys}
    builders: Dict[str, IndexedDatasetBuilder] = {}
    stats = {key: {"documents": 0, "tokens": 0, "empty": 0} for key in args.json_keys}
    _log(f"Opening {args.input} (tokenizer {args.tokenizer_type}, vocab size "
         f"{tokenizer.vocab_size}, eod {tokenizer.eod}, dtype {dtype.__name__}, "
         f"{args.workers} worker(s))")

    pool = None
    ok = False
    try:
        for key, (bin_path, _) in paths.items():
            builders[key] = IndexedDatasetBuilder(bin_path, dtype=dtype)

        stream = _open_input(args.input)
        with stream:
            lines = _numbered_lines(stream)
            if args.workers > 1:
                ctx = multiprocessing.get_context("fork") if hasattr(os, "fork") else (
                    multiprocessing.get_context())
                pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(args,))
                results: Iterable = pool.imap(_encode_line, lines, chunksize=32)
            else:
                _init_worker(args, tokenizer)
                results = map(_encode_line, lines)

            start = time.time()
            count = 0
            skipped = 0
            total_bytes = 0
            try:
                for status, lineno, payload, nbytes in results:
                    total_bytes += nbytes
                    if status == "error":
                        raise PreprocessError(payload)
                    if status == "skip":
                        skipped += 1
                        continue
                    for key, (ids, lens) in payload.items():
                        builders[key].add_document(ids, lens)
                        stats[key]["documents"] += 1
                        stats[key]["tokens"] += len(ids)
                        stats[key]["empty"] += int(len(ids) == 0)
                    count += 1
                    if count % args.log_interval == 0:
                        elapsed = max(time.time() - start, 1e-9)
                        _log(f"Processed {count} documents ({count / elapsed:.1f} docs/s, "
                             f"{total_bytes / elapsed / 1024 / 1024:.2f} MB/s).")
            except UnicodeDecodeError as e:  # only possible for a corrupt .gz stream
                raise PreprocessError(f"{args.input}: cannot read input ({e})") from None
            except (OSError, EOFError) as e:
                raise PreprocessError(f"{args.input}: cannot read input ({e})") from None

        for key, (_, idx_path) in paths.items():
            builders[key].finalize(idx_path)
        ok = True
    finally:
        if pool is not None:
            if ok:
                pool.close()
            else:
                pool.terminate()
            pool.join()
        if not ok:
            for key, builder in builders.items():
                try:
                    builder.data_file.close()
                except Exception:
                    pass
                for path in paths[key]:
                    if os.path.exists(path):
                        os.remove(path)

    elapsed = max(time.time() - start, 1e-9)
    _log(f"Done: {count} documents in {elapsed:.1f} s ({count / elapsed:.1f} docs/s, "
         f"{total_bytes / elapsed / 1024 / 1024:.2f} MB/s)"
         + (f", {skipped} blank line(s) skipped" if skipped else "") + ".")
    for key, (bin_path, idx_path) in paths.items():
        s = stats[key]
        s["bin"], s["idx"] = bin_path, idx_path
        _log(f"  {key}: {s['documents']} documents ({s['empty']} empty), {s['tokens']} tokens "
             f"-> {bin_path}, {idx_path}")
    return stats


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """Command-line entry point. Errors exit with status 1 and a one-line message."""
    args = get_args(argv)
    try:
        return run(args)
    except PreprocessError as e:
        raise SystemExit(f"preprocess_data.py: error: {e}") from None


if __name__ == "__main__":
    main()
