"""Training data: megatron-core GPT datasets, blends, per-domain validation sets, loaders.

The datasets are megatron-core's own (``GPTDatasetConfig`` + ``BlendedMegatronDatasetBuilder``
+ ``GPTDataset`` / ``MockGPTDataset``) and follow Megatron-LM's flags:

* ``data_path`` (``--data-path``): one blend split into train/valid/test by ``split``
  (``--split``, e.g. ``"969,30,1"``). A blend is ``["prefix"]``, ``["p1", "p2"]`` (weighted by
  size) or ``["0.3", "code", "0.7", "web"]`` (weight/prefix pairs).
* ``train_data_path`` / ``valid_data_path`` / ``test_data_path`` / ``per_split_data_args_path``
  (``--train-data-path`` ... ``--per-split-data-args-path``): a separate blend per split.
* ``valid_sets``: per-domain validation sets, Megatron-LM's ``--valid-data-path`` with
  ``--multiple-validation-sets`` plus names: ``["code:/d/code_valid_text_document",
  "/d/math_valid_text_document"]`` -> ``{"code": ds, "math_valid_text_document": ds}``. Each
  set is its own dataset (its whole file is validation data), so the trainer can report one
  validation loss per domain. Usable together with either of the above.

Sample counts follow Megatron-LM: train = ``train_samples`` or ``train_iters x global batch``;
valid = ``(train_iters // eval_interval + 1) x eval_iters x global batch`` (one epoch with
``full_validation``); test = ``eval_iters x global batch``.

Distributed: every rank must call :func:`build_datasets`. megatron-core builds each dataset on
global rank 0 first (writing the index cache), then a barrier, then on the other ranks (reading
the cache), so rank 0 must build (``is_built_on_rank()`` true there) and the cache folder must
be visible to all ranks (a shared filesystem across nodes). Without ``data_cache_path`` the
GPTDataset indices go to ``<prefix>/cache/GPTDataset_indices/`` (a folder named after the
prefix, beside the .bin/.idx).

Batches from :func:`build_data_loader` are dicts of stacked tensors as GPTDataset produces
them: ``tokens``, ``labels`` ([b, s] int64), ``loss_mask`` ([b, s] float32),
``position_ids`` ([b, s] int64), ``attention_mask`` ([b, 1, s, s] bool, True = masked; only
when created) and, for blends, ``dataset_id`` ([b], index into the blend's prefixes).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset as _MCoreBlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

__all__ = [
    "DataConfigError",
    "Datasets",
    "PretrainingSampler",
    "build_data_iterator",
    "build_data_loader",
    "build_datasets",
    "megatron_is_dataset_built_on_rank",
    "parse_data_path",
    "parse_named_data_paths",
    "parse_split",
    "train_valid_test_num_samples",
]

logger = logging.getLogger(__name__)

Blend = Tuple[List[str], Optional[List[float]]]

_PREPROCESS_HINT = (
    "make it with: python tools/preprocess_data.py --input DOCS.jsonl --output-prefix OUT "
    "--tokenizer-type ... --append-eod (writes OUT_text_document.bin/.idx)"
)


class DataConfigError(ValueError):
    """Bad data flags or missing data files; the message is one line."""


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


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
    """Raise :class:`DataConfigError` unless ``prefix.bin`` and ``prefix.idx`` both exist."""
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


_SPLIT_NAMES = ("train", "valid", "test")


def _check_splits_have_tokens(
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
        for i, name in enumerate(_SPLIT_NAMES):
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


# --------------------------------------------------------------------------------------------
# megatron-core builder, made to work without torch.distributed
# --------------------------------------------------------------------------------------------


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class BlendedDataset(_MCoreBlendedDataset):
    """megatron-core's BlendedDataset, usable with a cache folder in a single process.

    megatron-core 0.16.1 calls ``torch.distributed.get_rank()`` unguarded when
    ``path_to_cache`` is set and the cache misses, which fails without a process group. In
    that case the indices are built in memory by megatron-core and saved here under the same
    file names (the class keeps megatron-core's name, so its cache hash is the same).
    """

    def _build_indices(self) -> Tuple[numpy.ndarray, numpy.ndarray]:
        cfg = self.config
        if (
            torch.distributed.is_initialized()
            or not cfg.path_to_cache
            or cfg.defer_npy_index_mmap
            or cfg.fast_cache_load
        ):
            return super()._build_indices()
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.split.name}-"
        path_desc, path_index, path_sample = (
            os.path.join(cfg.path_to_cache, base + s)
            for s in ("description.txt", "dataset_index.npy", "dataset_sample_index.npy")
        )
        if all(os.path.isfile(p) for p in (path_desc, path_index, path_sample)):
            return (
                numpy.load(path_index, allow_pickle=True, mmap_mode="r"),
                numpy.load(path_sample, allow_pickle=True, mmap_mode="r"),
            )
        quiet_cfg = copy.copy(cfg)
        quiet_cfg.path_to_cache = None
        mcore_logger = logging.getLogger(_MCoreBlendedDataset.__module__)
        drop = _DropMessage("path_to_cache is None")
        self.config = quiet_cfg
        mcore_logger.addFilter(drop)
        try:
            dataset_index, dataset_sample_index = super()._build_indices()
        finally:
            self.config = cfg
            mcore_logger.removeFilter(drop)
        os.makedirs(cfg.path_to_cache, exist_ok=True)
        with open(path_desc, "wt") as f:
            f.write(self.unique_description)
        numpy.save(path_index, dataset_index, allow_pickle=True)
        numpy.save(path_sample, dataset_sample_index, allow_pickle=True)
        return dataset_index, dataset_sample_index


class _Builder(BlendedMegatronDatasetBuilder):
    """BlendedMegatronDatasetBuilder that builds our BlendedDataset (see above)."""

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is _MCoreBlendedDataset:
            cls = BlendedDataset
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args
        )


def megatron_is_dataset_built_on_rank() -> bool:
    """Megatron-LM's choice: tensor-parallel rank 0 of the first and last pipeline stages.

    With it, other ranks get ``None`` datasets and must receive their batches from TP rank 0
    (a broadcast in the training step). True everywhere when model parallelism is not set up.
    """
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return True
    return (
        ps.is_pipeline_first_stage(ignore_virtual=True)
        or ps.is_pipeline_last_stage(ignore_virtual=True)
    ) and ps.get_tensor_model_parallel_rank() == 0


def _all_ranks() -> bool:
    return True


def _check_rank_zero_builds(is_built_on_rank: Callable[[], bool]) -> None:
    """megatron-core writes the index caches on global rank 0 only; other ranks then read
    them. If rank 0 did not build, the others would fail on missing cache files, so refuse
    up front, on every rank (one collective)."""
    if not torch.distributed.is_initialized():
        return
    flag = [bool(is_built_on_rank()) if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(flag, src=0)
    if not flag[0]:
        raise DataConfigError(
            "is_built_on_rank() must be True on global rank 0: megatron-core builds the "
            "dataset index caches there first and the other ranks read them"
        )


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@dataclass
class Datasets:
    """What :func:`build_datasets` returns. Datasets are ``None`` where not built (a split
    with no data, a zero split fraction, or a rank where ``is_built_on_rank()`` is False)."""

    train: Optional[torch.utils.data.Dataset]
    valid: Optional[torch.utils.data.Dataset]
    test: Optional[torch.utils.data.Dataset]
    valid_sets: "OrderedDict[str, Optional[torch.utils.data.Dataset]]" = field(
        default_factory=OrderedDict
    )
    num_samples: Tuple[Optional[int], Optional[int], Optional[int]] = (None, None, None)
    config: Optional[GPTDatasetConfig] = None

    def summary(self) -> str:
        def size(ds) -> str:
            return "-" if ds is None else str(len(ds))

        parts = [f"train {size(self.train)}", f"valid {size(self.valid)}",
                 f"test {size(self.test)}"]
        parts += [f"valid[{name}] {size(ds)}" for name, ds in self.valid_sets.items()]
        return "samples: " + ", ".join(parts)


def build_datasets(
    tokenizer,
    seq_length: int,
    *,
    data_path: Optional[Union[str, Sequence[str]]] = None,
    split: Optional[str] = "969,30,1",
    train_data_path: Optional[Union[str, Sequence[str]]] = None,
    valid_data_path: Optional[Union[str, Sequence[str]]] = None,
    test_data_path: Optional[Union[str, Sequence[str]]] = None,
    per_split_data_args_path: Optional[str] = None,
    valid_sets: Optional[Union[str, Sequence[str]]] = None,
    mock_data: bool = False,
    train_iters: Optional[int] = None,
    train_samples: Optional[int] = None,
    global_batch_size: int = 1,
    eval_iters: int = 0,
    eval_interval: Optional[int] = None,
    full_validation: bool = False,
    num_samples: Optional[Tuple[Optional[int], Optional[int], Optional[int]]] = None,
    seed: int = 1234,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: Optional[bool] = None,
    data_cache_path: Optional[str] = None,
    mmap_bin_files: bool = True,
    num_dataset_builder_threads: int = 1,
    mid_level_dataset_surplus: float = 0.005,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> Datasets:
    """Build train/valid/test GPT datasets (and named validation sets) with megatron-core.

    Give exactly one data source: ``data_path`` (+ ``split``), per-split paths
    (``train_data_path`` / ``valid_data_path`` / ``test_data_path``, or
    ``per_split_data_args_path``: a JSON file ``{"train": [...], "valid": [...], "test":
    [...]}``), or ``mock_data=True``; ``valid_sets`` may be added to any of them (or given
    alone). Sample counts come from ``train_iters``/``train_samples``, ``global_batch_size``,
    ``eval_iters``, ``eval_interval`` (:func:`train_valid_test_num_samples`) unless
    ``num_samples`` is given.

    ``create_attention_mask``: ``None`` (default) makes the [1, s, s] mask only when
    ``reset_attention_mask`` needs it (otherwise the model's causal mask is enough).
    ``is_built_on_rank``: default every rank builds (no broadcast needed in the training
    step); :func:`megatron_is_dataset_built_on_rank` is Megatron-LM's choice. Must be True on
    global rank 0.

    Must be called on every rank when torch.distributed is initialized.
    """
    per_split_given = any(
        p is not None
        for p in (train_data_path, valid_data_path, test_data_path, per_split_data_args_path)
    )
    sources = [name for name, on in (("data_path", data_path is not None),
                                     ("per-split data paths", per_split_given),
                                     ("mock_data", bool(mock_data))) if on]
    if len(sources) > 1:
        raise DataConfigError(f"give only one data source, got {' and '.join(sources)}")
    if not sources and valid_sets is None:
        raise DataConfigError(
            "no data: give data_path (--data-path), per-split data paths, valid_sets, "
            "or mock_data=True"
        )
    if not isinstance(seq_length, int) or seq_length < 1:
        raise DataConfigError(f"seq_length must be a positive int, got {seq_length!r}")

    if num_samples is None:
        num_samples = train_valid_test_num_samples(
            global_batch_size=global_batch_size,
            train_iters=train_iters,
            train_samples=train_samples,
            eval_iters=eval_iters,
            eval_interval=eval_interval,
            full_validation=full_validation,
        )
    num_samples = tuple(num_samples)
    if len(num_samples) != 3:
        raise DataConfigError(f"num_samples must be (train, valid, test), got {num_samples!r}")

    named_valid = (
        parse_named_data_paths(valid_sets, flag="--valid-sets") if valid_sets is not None else None
    )

    if create_attention_mask is None:
        create_attention_mask = bool(reset_attention_mask)
    if is_built_on_rank is None:
        is_built_on_rank = _all_ranks
    _check_rank_zero_builds(is_built_on_rank)

    common = dict(
        random_seed=seed,
        sequence_length=seq_length,
        path_to_cache=data_cache_path,
        mmap_bin_files=mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        num_dataset_builder_threads=num_dataset_builder_threads,
        mid_level_dataset_surplus=mid_level_dataset_surplus,
    )

    result = Datasets(None, None, None, OrderedDict(), num_samples, None)

    config: Optional[GPTDatasetConfig] = None
    if data_path is not None:
        blend = parse_data_path(data_path, flag="--data-path")
        if split is None:
            raise DataConfigError("--data-path needs --split (e.g. 969,30,1)")
        parse_split(split)
        if blend[1] is not None and any(n is None for n in num_samples):
            raise DataConfigError(
                "a weighted --data-path blend needs a sample count for every split; "
                "full_validation builds one epoch, which only works with unweighted blends"
            )
        config = GPTDatasetConfig(blend=blend, split=split, **common)
    elif per_split_given:
        blend_per_split = _per_split_blends(
            train_data_path, valid_data_path, test_data_path, per_split_data_args_path
        )
        for blend, n, name in zip(blend_per_split, num_samples, ("train", "valid", "test")):
            if blend is not None and blend[1] is not None and n is None:
                raise DataConfigError(
                    f"--{name}-data-path has weights, which need a sample count; "
                    "full_validation builds one epoch: drop the weights"
                )
        config = GPTDatasetConfig(blend_per_split=blend_per_split, **common)
    elif mock_data:
        config = GPTDatasetConfig(**common)

    if config is not None:
        if config.blend is not None:
            _check_splits_have_tokens(config.blend[0], config.split_matrix, num_samples,
                                      f"--split {split}")
        elif config.blend_per_split is not None:
            for i, blend in enumerate(config.blend_per_split):
                if blend is not None:
                    bookends = [None, None, None]
                    bookends[i] = (0.0, 1.0)
                    _check_splits_have_tokens(blend[0], bookends, num_samples,
                                              f"--{_SPLIT_NAMES[i]}-data-path")
        cls = MockGPTDataset if config.mock else GPTDataset
        train, valid, test = _Builder(cls, list(num_samples), is_built_on_rank, config).build()
        result.train, result.valid, result.test = train, valid, test
        result.config = config

    if named_valid is not None:
        named = named_valid
        prefixes = list(named.values())
        _warn_on_overlap(prefixes, config)
        vconfig = GPTDatasetConfig(
            blend_per_split=[None, (prefixes, None), None],
            multiple_validation_sets=True,
            full_validation=full_validation,
            **common,
        )
        valid_size = None if full_validation else num_samples[1]
        _check_splits_have_tokens(prefixes, [None, (0.0, 1.0), None], [None, valid_size, None],
                                  "--valid-sets")
        _, built, _ = _Builder(
            GPTDataset, [None, valid_size, None], is_built_on_rank, vconfig
        ).build()
        # megatron-core returns a list for several prefixes but a bare dataset for one
        # (blended_megatron_dataset_builder.py: the single-prefix branch comes first).
        if not isinstance(built, list):
            built = [built]
        if len(built) != len(prefixes):
            raise RuntimeError(f"expected {len(prefixes)} validation sets, got {len(built)}")
        result.valid_sets = OrderedDict(zip(named.keys(), built))
        if result.config is None:
            result.config = vconfig
    return result


def _warn_on_overlap(valid_prefixes: Sequence[str], config: Optional[GPTDatasetConfig]) -> None:
    """A named validation set that is also training data measures nothing useful."""
    if config is None or config.mock:
        return
    if config.blend is not None:
        train_on = config.split_matrix[0] is not None
        train_prefixes = set(config.blend[0]) if train_on else set()
    elif config.blend_per_split is not None and config.blend_per_split[0] is not None:
        train_prefixes = set(config.blend_per_split[0][0])
    else:
        train_prefixes = set()
    norm = {os.path.abspath(p) for p in train_prefixes}
    for prefix in valid_prefixes:
        if os.path.abspath(prefix) in norm:
            logger.warning(
                "validation set %s is also training data (the whole file is used for "
                "validation)", prefix
            )


def _per_split_blends(train_path, valid_path, test_path, args_path) -> List[Optional[Blend]]:
    if args_path is not None:
        if any(p is not None for p in (train_path, valid_path, test_path)):
            raise DataConfigError(
                "--per-split-data-args-path and --train/valid/test-data-path are exclusive"
            )
        import json

        if not os.path.isfile(args_path):
            raise DataConfigError(f"--per-split-data-args-path not found: {args_path}")
        try:
            with open(args_path, "r") as f:
                spec = json.load(f)
        except json.JSONDecodeError as e:
            raise DataConfigError(
                f"--per-split-data-args-path {args_path} is not valid JSON ({e.msg}, line "
                f"{e.lineno})"
            ) from None
        if not isinstance(spec, dict):
            raise DataConfigError(
                f"--per-split-data-args-path {args_path}: expected an object with train/valid/"
                "test keys"
            )
        train_path, valid_path, test_path = (spec.get(k) for k in ("train", "valid", "test"))
    blends: List[Optional[Blend]] = []
    for name, paths in (("train", train_path), ("valid", valid_path), ("test", test_path)):
        if paths is None or (not isinstance(paths, str) and len(paths) == 0):
            blends.append(None)
        else:
            blends.append(parse_data_path(paths, flag=f"--{name}-data-path"))
    if not any(blends):
        raise DataConfigError("per-split data paths are all empty")
    return blends


# --------------------------------------------------------------------------------------------
# Sampler / loader
# --------------------------------------------------------------------------------------------


class PretrainingSampler:
    """Deterministic batch sampler with Megatron-LM's ``MegatronPretrainingSampler`` order.

    Global sample ``consumed_samples + k * (mbs * dp) + dp_rank * mbs + j`` goes to data-
    parallel rank ``dp_rank`` as item ``j`` of its ``k``-th micro-batch. ``consumed_samples``
    counts samples of all data-parallel ranks (Megatron-LM's ``consumed_train_samples``), so
    resuming from it continues exactly where an uninterrupted run would be. No shuffling here:
    megatron-core's datasets are already shuffled.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise DataConfigError(f"the dataset is empty (total samples {total_samples})")
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise DataConfigError(
                f"micro_batch_size and data_parallel_size must be >= 1, got "
                f"{micro_batch_size} and {data_parallel_size}"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataConfigError(
                f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})"
            )
        if not 0 <= consumed_samples < total_samples:
            raise DataConfigError(
                f"consumed samples {consumed_samples} is not below the dataset size "
                f"{total_samples}: the run is past the end of its data (build the datasets "
                "for more samples)"
            )
        step = micro_batch_size * data_parallel_size
        if drop_last and total_samples - consumed_samples < step:
            raise DataConfigError(
                f"only {total_samples - consumed_samples} samples left, fewer than one "
                f"micro-batch on every data-parallel rank ({micro_batch_size} x "
                f"{data_parallel_size})"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        step = self.micro_batch_size * self.data_parallel_size
        left = self.total_samples - self.consumed_samples
        full, rest = divmod(left, step)
        partial = 0
        if not self.drop_last and rest > self.data_parallel_rank * self.micro_batch_size:
            partial = 1
        return full + partial

    def __iter__(self) -> Iterator[List[int]]:
        mbs = self.micro_batch_size
        step = mbs * self.data_parallel_size
        offset = self.data_parallel_rank * mbs
        base = self.consumed_samples
        while base + step <= self.total_samples:
            yield list(range(base + offset, base + offset + mbs))
            base += step
        if not self.drop_last:
            start = base + offset
            stop = min(start + mbs, self.total_samples)
            if start < stop:
                yield list(range(start, stop))


def _data_parallel_defaults(rank: Optional[int], size: Optional[int]) -> Tuple[int, int]:
    if rank is not None and size is not None:
        return rank, size
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        rank = ps.get_data_parallel_rank() if rank is None else rank
        size = ps.get_data_parallel_world_size() if size is None else size
    elif torch.distributed.is_initialized():
        # no model parallelism set up: every rank is a data-parallel rank
        rank = torch.distributed.get_rank() if rank is None else rank
        size = torch.distributed.get_world_size() if size is None else size
    return (0 if rank is None else rank), (1 if size is None else size)


def build_data_loader(
    dataset: Optional[torch.utils.data.Dataset],
    *,
    micro_batch_size: int,
    consumed_samples: int = 0,
    data_parallel_rank: Optional[int] = None,
    data_parallel_size: Optional[int] = None,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> Optional[torch.utils.data.DataLoader]:
    """A DataLoader of micro-batches for this data-parallel rank (``None`` for no dataset).

    Data-parallel rank/size default to megatron-core's ``parallel_state`` when it is
    initialized, else to the torch.distributed rank/world size, else 0/1. Iterating the loader again starts again at ``consumed_samples``
    (handy for a fixed validation set).
    """
    if dataset is None:
        return None
    rank, size = _data_parallel_defaults(data_parallel_rank, data_parallel_size)
    sampler = PretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=rank,
        data_parallel_size=size,
        drop_last=drop_last,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def build_data_iterator(
    dataset: Optional[torch.utils.data.Dataset],
    *,
    micro_batch_size: int,
    consumed_samples: int = 0,
    data_parallel_rank: Optional[int] = None,
    data_parallel_size: Optional[int] = None,
    num_workers: int = 0,
    cyclic: bool = False,
    pin_memory: bool = False,
) -> Optional[Iterator[Dict[str, torch.Tensor]]]:
    """Iterator of micro-batch dicts, the ``data_iterator`` megatron-core's schedules take.

    ``cyclic=True`` starts over from sample 0 after the end (same order every pass).
    """
    loader = build_data_loader(
        dataset,
        micro_batch_size=micro_batch_size,
        consumed_samples=consumed_samples,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    if loader is None:
        return None
    if not cyclic:
        return iter(loader)

    def _cycle():
        yield from loader
        again = loader
        if consumed_samples:
            again = build_data_loader(
                dataset,
                micro_batch_size=micro_batch_size,
                consumed_samples=0,
                data_parallel_rank=data_parallel_rank,
                data_parallel_size=data_parallel_size,
                num_workers=num_workers,
                pin_memory=pin_memory,
            )
        while True:
            yield from again

    return _cycle()
