"""Is an indexed dataset (``PREFIX.idx`` + ``PREFIX.bin``) whole and its own? Checked cheaply
before megatron-core opens it (whose own checks are assertions and a traceback from ``__del__``).

Megatron's index (``.idx``) layout: the 9-byte magic ``MMIDIDX\\0\\0``, version ``<Q`` (1), dtype
code ``<B``, sequence count S ``<Q``, document count D ``<Q`` (34 bytes), then ``int32[S]``
sequence lengths, ``int64[S]`` byte offsets into ``.bin`` and ``int64[D+1]``-ish document indices
(``D`` entries). ``check_indexed_dataset`` verifies the header, that the file has exactly the
size the header describes, that the pointer table is the running sum of the lengths and the
document index runs from sequence 0 to S without going back (the tables megatron-core trusts when
it reads), that there is at least one non-empty document, and that ``.bin`` holds exactly the
bytes the index points to — an ``.idx`` of another dataset, a damaged table or a truncated file
fails here, with one line naming the file (12 bytes per sequence are read: milliseconds per
million documents). ``max_token_id`` scans ``.bin`` (about a second per GB) for
ids the model's vocabulary cannot hold.
"""

from __future__ import annotations

import os
import struct

import numpy

from bam_megatron.errors import DataConfigError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64,
          6: numpy.float64, 7: numpy.float32, 8: numpy.uint16}
_FIX = "re-run tools/preprocess_data.py for it"
_CHUNK = 1 << 22  # table entries read at a time


def _header(idx: str):
    with open(idx, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or raw[:9] != MAGIC:
        raise DataConfigError(f"{idx} is not a Megatron dataset index (bad header); {_FIX}")
    version, code, sequences, documents = struct.unpack("<QBQQ", raw[9:])
    if version != 1 or code not in DTYPES:
        raise DataConfigError(f"{idx} has an unknown index version {version} or token type {code}; {_FIX}")
    return DTYPES[code], sequences, documents


def check_indexed_dataset(prefix: str, flag: str = "--data-path") -> None:
    """Raise ``DataConfigError`` (one line naming the file) unless ``prefix`` is whole."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    dtype, sequences, documents = _header(idx)
    expected = HEADER_BYTES + 12 * sequences + 8 * documents
    actual = os.path.getsize(idx)
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise DataConfigError(f"{flag}: {idx} is {what} ({actual} bytes, the header describes {expected}); {_FIX}")
    if sequences == 0:
        raise DataConfigError(f"{flag}: {prefix} holds no documents (an empty dataset); give a dataset with data")
    described = _check_pointers(idx, flag, sequences, numpy.dtype(dtype).itemsize)
    _check_documents(idx, flag, sequences, documents)
    size = os.path.getsize(bin_path)
    if described == 0:
        raise DataConfigError(f"{flag}: {prefix} holds only empty documents (no tokens)")
    if size != described:
        cause = ("the .bin is truncated" if size < described else
                 "the .idx belongs to another dataset")
        raise DataConfigError(
            f"{flag}: {idx} does not describe {bin_path} ({size} bytes on disk, the index points to "
            f"{described}): {cause}; {_FIX}"
        )


def _check_pointers(idx: str, flag: str, sequences: int, itemsize: int) -> int:
    """Every sequence length is >= 0 and every pointer is where the lengths before it put it
    (``pointer[0] = 0``, ``pointer[i+1] = pointer[i] + length[i] * itemsize``: what megatron-core
    writes, and what it trusts when reading). Read in chunks; returns the bytes ``.bin`` must
    have."""
    lengths = numpy.memmap(idx, dtype=numpy.int32, mode="r", offset=HEADER_BYTES, shape=(sequences,))
    pointers = numpy.memmap(idx, dtype=numpy.int64, mode="r", offset=HEADER_BYTES + 4 * sequences, shape=(sequences,))
    position = 0
    for start in range(0, sequences, _CHUNK):
        part = lengths[start:start + _CHUNK].astype(numpy.int64)
        negative = numpy.flatnonzero(part < 0)
        if negative.size:
            i = start + int(negative[0])
            raise DataConfigError(f"{flag}: {idx} is damaged: sequence {i} has the length {int(lengths[i])}; {_FIX}")
        ends = position + numpy.cumsum(part * itemsize)
        expected = numpy.concatenate(([position], ends[:-1]))
        wrong = numpy.flatnonzero(pointers[start:start + _CHUNK] != expected)
        if wrong.size:
            i = start + int(wrong[0])
            raise DataConfigError(
                f"{flag}: {idx} is damaged: sequence {i} points to byte {int(pointers[i])} of the .bin, where "
                f"the lengths before it put it at byte {int(expected[wrong[0]])} (a corrupted pointer table); {_FIX}"
            )
        position = int(ends[-1])
    return position


def _check_documents(idx: str, flag: str, sequences: int, documents: int) -> None:
    """The document index starts at sequence 0, never goes back and ends at the last sequence
    (megatron-core cuts documents with it)."""
    if documents == 0:
        raise DataConfigError(f"{flag}: {idx} is damaged: it has no document index; {_FIX}")
    offset = HEADER_BYTES + 12 * sequences
    docs = numpy.memmap(idx, dtype=numpy.int64, mode="r", offset=offset, shape=(documents,))
    if int(docs[0]) != 0 or int(docs[-1]) != sequences:
        raise DataConfigError(
            f"{flag}: {idx} is damaged: its document index runs from sequence {int(docs[0])} to {int(docs[-1])}, "
            f"not from 0 to {sequences} (a corrupted document index); {_FIX}"
        )
    for start in range(0, documents - 1, _CHUNK):
        part = docs[start:start + _CHUNK + 1]
        back = numpy.flatnonzero(numpy.diff(part) < 0)
        if back.size:
            i = start + int(back[0]) + 1
            raise DataConfigError(
                f"{flag}: {idx} is damaged: document {i} starts at sequence {int(docs[i])}, before document "
                f"{i - 1} (sequence {int(docs[i - 1])}) (a corrupted document index); {_FIX}"
            )


def max_token_id(prefix: str) -> int:
    """The largest token id in ``prefix.bin`` (reads the whole file)."""
    dtype, _sequences, _documents = _header(prefix + ".idx")
    data = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
    return int(data.max()) if data.size else -1


def check_token_ids(prefixes, vocab_size: int, flag: str, budget_bytes: int = 1 << 30) -> None:
    """Before training, where cheap (the ``.bin`` files together at most ``budget_bytes``):
    every token id fits the model's vocabulary. Larger data is checked batch by batch instead."""
    prefixes = list(prefixes)
    if sum(os.path.getsize(p + ".bin") for p in prefixes) > budget_bytes:
        return
    for prefix in prefixes:
        top = max_token_id(prefix)
        if top >= vocab_size:
            raise DataConfigError(
                f"{flag}: {prefix} holds token id {top}, outside the model's vocabulary of {vocab_size}: it was "
                "tokenized with another tokenizer; re-run tools/preprocess_data.py with the model's tokenizer"
            )
