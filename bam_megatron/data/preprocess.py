"""The work of ``tools/preprocess_data.py`` (Megatron-LM's tool; flags and format in
``bam_megatron/cli/preprocess.py``): jsonl lines tokenized (in worker processes with
``--workers``) and written with megatron-core's ``IndexedDatasetBuilder``; partial outputs are
removed when a line is bad."""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
import time
from typing import Dict, Iterable, Iterator, List, Tuple

from bam_megatron.data.tokenizers import TokenizerConfigError, build_tokenizer_from_args
from bam_megatron.errors import BAMError, PreprocessError

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
            except Exception as e:  # e.g. NullTokenizer text that is not ids below --vocab-size
                why = str(e) if isinstance(e, BAMError) else f"{type(e).__name__}: {e}"
                return ("error", lineno, f"{where}: line {lineno}: key {key!r} cannot be "
                                         f"tokenized ({why})", nbytes)
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


def _results(args, lines, tokenizer):
    """(status, lineno, payload, nbytes) per input line, from worker processes when
    ``--workers`` > 1; returns ``(results, pool or None)``."""
    if args.workers > 1:
        ctx = multiprocessing.get_context("fork") if hasattr(os, "fork") else multiprocessing.get_context()
        pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(args,))
        return pool.imap(_encode_line, lines, chunksize=32), pool
    _init_worker(args, tokenizer)
    return map(_encode_line, lines), None


class _Counts:
    """Documents, skipped lines and bytes read so far, with progress lines."""

    def __init__(self, log_interval: int):
        self.log_interval, self.start = log_interval, time.time()
        self.documents = self.skipped = self.bytes = 0

    def rate(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        return f"{self.documents / elapsed:.1f} docs/s, {self.bytes / elapsed / 1024 / 1024:.2f} MB/s"

    def document(self) -> None:
        self.documents += 1
        if self.documents % self.log_interval == 0:
            _log(f"Processed {self.documents} documents ({self.rate()}).")


def _consume(args, results: Iterable, builders, stats, counts: _Counts) -> None:
    """Add every encoded document to its key's builder."""
    try:
        for status, _lineno, payload, nbytes in results:
            counts.bytes += nbytes
            if status == "error":
                raise PreprocessError(payload)
            if status == "skip":
                counts.skipped += 1
                continue
            for key, (ids, lens) in payload.items():
                builders[key].add_document(ids, lens)
                stats[key]["documents"] += 1
                stats[key]["tokens"] += len(ids)
                stats[key]["empty"] += int(len(ids) == 0)
            counts.document()
    except UnicodeDecodeError as e:  # only possible for a corrupt .gz stream
        raise PreprocessError(f"{args.input}: cannot read input ({e})") from None
    except (OSError, EOFError) as e:
        raise PreprocessError(f"{args.input}: cannot read input ({e})") from None


def _discard(builders, paths) -> None:
    """Remove the partial outputs of a failed run."""
    for key, builder in builders.items():
        try:
            builder.data_file.close()
        except Exception:
            pass
        for path in paths[key]:
            if os.path.exists(path):
                os.remove(path)


def _report(counts: _Counts, paths, stats) -> None:
    _log(f"Done: {counts.documents} documents in {max(time.time() - counts.start, 1e-9):.1f} s "
         f"({counts.rate()})" + (f", {counts.skipped} blank line(s) skipped" if counts.skipped else "") + ".")
    for key, (bin_path, idx_path) in paths.items():
        s = stats[key]
        s["bin"], s["idx"] = bin_path, idx_path
        _log(f"  {key}: {s['documents']} documents ({s['empty']} empty), {s['tokens']} tokens "
             f"-> {bin_path}, {idx_path}")


def run(args: argparse.Namespace) -> Dict[str, dict]:
    """Do the work described by ``args``; returns per-key statistics.

    Raises :class:`PreprocessError` for bad input/flags (one-line message); partial outputs are
    removed.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if not os.path.isfile(args.input):
        raise PreprocessError(f"--input file not found: {args.input}")
    try:
        tokenizer = build_tokenizer_from_args(args)
    except TokenizerConfigError as e:
        raise PreprocessError(str(e)) from None
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    paths = {key: output_paths(args.output_prefix, key) for key in args.json_keys}
    stats = {key: {"documents": 0, "tokens": 0, "empty": 0} for key in args.json_keys}
    _log(f"Opening {args.input} (tokenizer {args.tokenizer_type}, vocab size "
         f"{tokenizer.vocab_size}, eod {tokenizer.eod}, dtype {dtype.__name__}, "
         f"{args.workers} worker(s))")
    builders: Dict[str, IndexedDatasetBuilder] = {}
    pool, ok, counts = None, False, _Counts(args.log_interval)
    try:
        for key, (bin_path, _) in paths.items():
            builders[key] = IndexedDatasetBuilder(bin_path, dtype=dtype)
        with _open_input(args.input) as stream:
            results, pool = _results(args, _numbered_lines(stream), tokenizer)
            _consume(args, results, builders, stats, counts)
        for key, (_, idx_path) in paths.items():
            builders[key].finalize(idx_path)
        ok = True
    finally:
        if pool is not None:
            pool.close() if ok else pool.terminate()
            pool.join()
        if not ok:
            _discard(builders, paths)
    _report(counts, paths, stats)
    return stats
