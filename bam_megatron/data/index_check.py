"""Is an indexed dataset (``PREFIX.idx`` + ``PREFIX.bin``) whole and its own? Checked cheaply
before megatron-core opens it (whose own checks are assertions and a traceback from ``__del__``).

Megatron's index (``.idx``) layout: the 9-byte magic ``MMIDIDX\\0\\0``, version ``<Q`` (1), dtype
code ``<B``, sequence count S ``<Q``, document count D ``<Q`` (34 bytes), then ``int32[S]``
sequence lengths, ``int64[S]`` byte offsets into ``.bin`` and ``int64[D+1]``-ish document indices
(``D`` entries). ``check_indexed_dataset`` verifies the header, that the file has exactly the
size the header describes, that there is at least one non-empty document, and that ``.bin`` holds
exactly the bytes the index points to — an ``.idx`` of another dataset or a truncated file fails
here, with one line naming the file. ``max_token_id`` scans ``.bin`` (about a second per GB) for
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
    with open(idx, "rb") as f:
        f.seek(HEADER_BYTES)
        lengths = numpy.frombuffer(f.read(4 * sequences), dtype=numpy.int32)
        pointers = numpy.frombuffer(f.read(8 * sequences), dtype=numpy.int64)
    itemsize = numpy.dtype(dtype).itemsize
    described = int(pointers[-1]) + int(lengths[-1]) * itemsize
    size = os.path.getsize(bin_path)
    if int(lengths.sum()) == 0:
        raise DataConfigError(f"{flag}: {prefix} holds only empty documents (no tokens)")
    if size != described:
        cause = ("the .bin is truncated" if size < described else
                 "the .idx belongs to another dataset")
        raise DataConfigError(
            f"{flag}: {idx} does not describe {bin_path} ({size} bytes on disk, the index points to "
            f"{described}): {cause}; {_FIX}"
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
