"""Megatron-LM's data flags, parsed and checked: blends, named validation sets, splits, counts.

* ``--data-path``: one blend split into train/valid/test by ``--split`` (``"969,30,1"``). A blend
  is ``["prefix"]``, ``["p1", "p2"]`` (weighted by size) or ``["0.3", "code", "0.7", "web"]``
  (weight/prefix pairs).
* ``--valid-data-path NAME:PREFIX ...``: named per-domain validation sets (Megatron-LM's
  ``--multiple-validation-sets`` plus names).
* Sample counts follow Megatron-LM's ``get_train_valid_test_num_samples``.

Every problem is a one-line ``DataConfigError`` naming the flag.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import numpy

from bam_megatron.data.index_check import check_indexed_dataset
from bam_megatron.errors import DataConfigError

Blend = Tuple[List[str], Optional[List[float]]]

_PREPROCESS_HINT = (
    "make it with: python tools/preprocess_data.py --input DOCS.jsonl --output-prefix OUT "
    "--tokenizer-type ... --append-eod (writes OUT_text_document.bin/.idx)"
)


def _as_number(text: str) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value


def _entries(paths: Union[str, Sequence[str]], flag: str) -> List[str]:
    if paths is None:
        raise DataConfigError(f"{flag}: no value given")
    if isinstance(paths, (str, os.PathLike)):
        paths = str(paths).split()
    entries = [str(p).strip() for p in paths]
    entries = [e for e in entries if e]
    if not entries:
        raise DataConfigError(f"{flag}: empty list")
    return entries


def check_prefix_exists(prefix: str, flag: str = "--data-path") -> None:
    """Raise :class:`DataConfigError` unless ``prefix.bin`` and ``prefix.idx`` both exist and
    belong together (``index_check.check_indexed_dataset``)."""
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            raise DataConfigError(
                f"{flag}: give the dataset prefix without {suffix!r}: "
                f"{prefix[: -len(suffix)]}"
            )
    for suffix in (".bin", ".idx"):
        path = prefix + suffix
        if not os.path.isfile(path):
            raise DataConfigError(f"{flag}: {path} not found; {_PREPROCESS_HINT}")
    check_indexed_dataset(prefix, flag)


def parse_data_path(
    paths: Union[str, Sequence[str]],
    *,
    check_files: bool = True,
    flag: str = "--data-path",
) -> Blend:
    """Parse a Megatron blend list into megatron-core's ``(prefixes, weights)`` form.

    ``["prefix"]`` and ``["p1", "p2", ...]`` give ``(prefixes, None)`` (megatron-core then
    weighs by dataset size); ``["0.3", "code", "0.7", "web"]`` gives
    ``(["code", "web"], [0.3, 0.7])`` (weights need not sum to 1). A string is split on
    whitespace. Errors (one line): an odd count or a non-numeric weight in a weighted list, a
    number among prefixes, a weight <= 0, a missing ``prefix.bin`` / ``prefix.idx``.
    """
    entries = _entries(paths, flag)
    if _as_number(entries[0]) is not None:
        if len(entries) % 2 == 1:
            raise DataConfigError(
                f"{flag}: weights and prefixes must alternate (weight prefix weight prefix ...), "
                f"got an odd number of items ({len(entries)})"
            )
        prefixes: List[str] = []
        weights: Optional[List[float]] = []
        for i in range(0, len(entries), 2):
            weight = _as_number(entries[i])
            if weight is None:
                raise DataConfigError(
                    f"{flag}: expected a weight at position {i + 1}, got {entries[i]!r}"
                )
            if not math.isfinite(weight) or weight <= 0:
                raise DataConfigError(
                    f"{flag}: weight at position {i + 1} must be > 0, got {entries[i]!r}"
                )
            prefix = entries[i + 1]
            if _as_number(prefix) is not None:
                raise DataConfigError(
                    f"{flag}: expected a dataset prefix at position {i + 2}, got the number "
                    f"{prefix!r}"
                )
            weights.append(weight)
            prefixes.append(prefix)
    else:
        for i, entry in enumerate(entries):
            if _as_number(entry) is not None:
                raise DataConfigError(
                    f"{flag}: {entry!r} at position {i + 1} looks like a weight but "
                    f"{entries[0]!r} is not; give prefixes only or weight/prefix pairs"
                )
        prefixes, weights = entries, None
    if check_files:
        for prefix in prefixes:
            check_prefix_exists(prefix, flag)
    return prefixes, weights


_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def parse_named_data_paths(
    entries: Union[str, Sequence[str]],
    *,
    check_files: bool = True,
    flag: str = "--valid-sets",
) -> "OrderedDict[str, str]":
    """``["name:prefix", "prefix", ...]`` -> ordered ``{name: prefix}``.

    An entry without a name is named after the prefix's file name (its basename). Names are
    letters, digits, ``_``, ``-`` and ``.``; duplicates are an error, as are weights (every
    set is evaluated on its own).
    """
    result: "OrderedDict[str, str]" = OrderedDict()
    for i, entry in enumerate(_entries(entries, flag)):
        name, sep, rest = entry.partition(":")
        if sep and _NAME_RE.match(name) and rest:
            prefix = rest.strip()
        else:
            name, prefix = "", entry
        if _as_number(prefix) is not None:
            raise DataConfigError(
                f"{flag}: {prefix!r} at position {i + 1} looks like a weight; validation sets "
                "take name:prefix entries, no weights"
            )
        if not name:
            name = os.path.basename(prefix.rstrip("/"))
        if not name:
            raise DataConfigError(f"{flag}: cannot name the entry {entry!r}; write name:prefix")
        if name in result:
            raise DataConfigError(f"{flag}: duplicate validation set name {name!r}")
        if check_files:
            check_prefix_exists(prefix, flag)
        result[name] = prefix
    return result


def parse_split(split: str) -> List[float]:
    """Validate a Megatron ``--split`` string (``"969,30,1"``) -> normalized 3 fractions."""
    parts = [p.strip() for p in re.split(r"[,/]", str(split))]
    if not 1 <= len(parts) <= 3 or any(_as_number(p) is None for p in parts):
        raise DataConfigError(
            f"--split must be up to 3 comma-separated numbers (train,valid,test), got {split!r}"
        )
    values = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    if any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise DataConfigError(f"--split needs non-negative numbers with a positive sum: {split!r}")
    total = sum(values)
    return [v / total for v in values]


SPLIT_NAMES = ("train", "valid", "test")


def check_splits_have_tokens(
    prefixes: Sequence[str],
    bookends: Sequence[Optional[Tuple[float, float]]],
    sizes: Sequence[Optional[int]],
    flag: str,
) -> None:
    """Refuse a split that would be built from zero tokens.

    megatron-core 0.16.1's ``GPTDataset._get_num_epochs`` adds epochs until the requested
    sample count is covered, which never ends when the split's documents hold no tokens
    (e.g. ``--split 969,30,1`` on a file of a few hundred documents gives the test split
    none): the build would hang instead of failing.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        index = IndexedDataset(prefix)
        # copy: the arrays view an mmap that IndexedDataset.__del__ closes
        lengths = numpy.array(index.sequence_lengths, dtype=numpy.int64)
        del index
        n = int(lengths.shape[0])
        for i, name in enumerate(SPLIT_NAMES):
            if bookends[i] is None or sizes[i] is None:
                continue
            beg = int(round(bookends[i][0] * float(n)))
            end = int(round(bookends[i][1] * float(n)))
            if int(lengths[beg:end].sum()) == 0:
                raise DataConfigError(
                    f"{flag}: the {name} split of {prefix} gets {end - beg} of its {n} "
                    f"documents and no tokens; change the split (e.g. --split 98,2,0, or 0 for "
                    f"an unused split) or add data"
                )


def train_valid_test_num_samples(
    *,
    global_batch_size: int,
    train_iters: Optional[int] = None,
    train_samples: Optional[int] = None,
    eval_iters: int = 0,
    eval_interval: Optional[int] = None,
    full_validation: bool = False,
) -> Tuple[int, Optional[int], int]:
    """Megatron-LM's ``get_train_valid_test_num_samples``.

    valid is ``None`` with ``full_validation`` (megatron-core then builds one epoch).
    """
    if global_batch_size is None or global_batch_size < 1:
        raise DataConfigError(f"global batch size must be >= 1, got {global_batch_size!r}")
    if train_samples is not None:
        train = int(train_samples)
        iters = train_iters if train_iters is not None else math.ceil(train / global_batch_size)
    elif train_iters is not None:
        train = int(train_iters) * global_batch_size
        iters = int(train_iters)
    else:
        raise DataConfigError("give train_iters (--train-iters) or train_samples (--train-samples)")
    if eval_iters < 0:
        raise DataConfigError(f"--eval-iters must be >= 0, got {eval_iters}")
    if full_validation:
        valid = None
    else:
        evals = (iters // eval_interval + 1) if eval_interval else 1
        valid = evals * eval_iters * global_batch_size
    test = eval_iters * global_batch_size
    return train, valid, test
