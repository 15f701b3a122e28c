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

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from bam_megatron.data.blends import (
    SPLIT_NAMES,
    Blend,
    check_splits_have_tokens,
    parse_data_path,
    parse_named_data_paths,
    parse_split,
    train_valid_test_num_samples,
)
from bam_megatron.data.sampler import PretrainingSampler, build_data_iterator, build_data_loader
from bam_megatron.errors import DataConfigError
from bam_megatron.patches.megatron_datasets import BlendedDatasetBuilder as _Builder

logger = logging.getLogger(__name__)

# Named validation sets are sampled with this seed whatever --seed says, so that runs (and the
# evaluation tool) with different seeds are measured on the same samples.
VALIDATION_SEED = 1234


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
    per_split = (train_data_path, valid_data_path, test_data_path, per_split_data_args_path)
    _check_sources(data_path, any(p is not None for p in per_split), mock_data, valid_sets, seq_length)
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
    is_built_on_rank = is_built_on_rank or _all_ranks
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
        create_attention_mask=bool(reset_attention_mask) if create_attention_mask is None else create_attention_mask,
        num_dataset_builder_threads=num_dataset_builder_threads,
        mid_level_dataset_surplus=mid_level_dataset_surplus,
    )
    result = Datasets(None, None, None, OrderedDict(), num_samples, None)
    config = _main_config(data_path, split, per_split, mock_data, num_samples, common)
    if config is not None:
        _check_config_tokens(config, num_samples, split)
        cls = MockGPTDataset if config.mock else GPTDataset
        result.train, result.valid, result.test = _Builder(cls, list(num_samples), is_built_on_rank, config).build()
        result.config = config
    if named_valid is not None:
        result.valid_sets, vconfig = _build_named_valid(
            named_valid, config, common, full_validation, num_samples, is_built_on_rank
        )
        result.config = result.config or vconfig
    return result


def _check_sources(data_path, per_split_given: bool, mock_data: bool, valid_sets, seq_length) -> None:
    """Exactly one data source (named validation sets may come alone)."""
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


def _main_config(data_path, split, per_split, mock_data, num_samples, common) -> Optional[GPTDatasetConfig]:
    """megatron-core's dataset config of the (one) data source, or None for named sets only."""
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
        return GPTDatasetConfig(blend=blend, split=split, **common)
    if any(p is not None for p in per_split):
        blend_per_split = _per_split_blends(*per_split)
        for blend, n, name in zip(blend_per_split, num_samples, SPLIT_NAMES):
            if blend is not None and blend[1] is not None and n is None:
                raise DataConfigError(
                    f"--{name}-data-path has weights, which need a sample count; "
                    "full_validation builds one epoch: drop the weights"
                )
        return GPTDatasetConfig(blend_per_split=blend_per_split, **common)
    if mock_data:
        return GPTDatasetConfig(**common)
    return None


def _check_config_tokens(config: GPTDatasetConfig, num_samples, split) -> None:
    """Every split that is asked for samples has tokens (see ``check_splits_have_tokens``)."""
    if config.blend is not None:
        check_splits_have_tokens(config.blend[0], config.split_matrix, num_samples, f"--split {split}")
    elif config.blend_per_split is not None:
        for i, blend in enumerate(config.blend_per_split):
            if blend is not None:
                bookends = [None, None, None]
                bookends[i] = (0.0, 1.0)
                check_splits_have_tokens(blend[0], bookends, num_samples, f"--{SPLIT_NAMES[i]}-data-path")


def _build_named_valid(named, config, common, full_validation, num_samples, is_built_on_rank):
    """One validation dataset per named prefix (the whole file); ``(sets, config)``."""
    prefixes = list(named.values())
    _warn_on_overlap(prefixes, config)
    vconfig = GPTDatasetConfig(
        blend_per_split=[None, (prefixes, None), None],
        multiple_validation_sets=True,
        full_validation=full_validation,
        **{**common, "random_seed": VALIDATION_SEED},
    )
    valid_size = None if full_validation else num_samples[1]
    check_splits_have_tokens(prefixes, [None, (0.0, 1.0), None], [None, valid_size, None], "--valid-sets")
    _, built, _ = _Builder(GPTDataset, [None, valid_size, None], is_built_on_rank, vconfig).build()
    # megatron-core returns a list for several prefixes but a bare dataset for one
    # (blended_megatron_dataset_builder.py: the single-prefix branch comes first).
    if not isinstance(built, list):
        built = [built]
    if len(built) != len(prefixes):
        raise RuntimeError(f"expected {len(prefixes)} validation sets, got {len(built)}")
    return OrderedDict(zip(named.keys(), built)), vconfig


class PaddedDataset(torch.utils.data.Dataset):
    """``dataset`` followed by copies of its first samples, with a zero loss mask, up to a
    multiple of ``multiple`` samples: whole global batches in which every real sample counts once."""

    def __init__(self, dataset, multiple: int):
        self.dataset, self.real = dataset, len(dataset)
        self.length = -(-self.real // multiple) * multiple if self.real else 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index % self.real]
        if index < self.real:
            return item
        item = dict(item)
        item["loss_mask"] = torch.zeros_like(item["loss_mask"])
        return item


def pad_to_multiple(dataset, multiple: int) -> PaddedDataset:
    """See ``PaddedDataset``."""
    return PaddedDataset(dataset, multiple)


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
