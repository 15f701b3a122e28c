"""megatron-core 0.16.x: ``BlendedDataset`` with an index cache but no process group.

``BlendedDataset._build_indices`` calls ``torch.distributed.get_rank()`` unguarded when
``path_to_cache`` is set and the cache misses, which fails without a process group (tools and
tests build datasets in one process). ``BlendedDataset`` below builds the indices in memory with
megatron-core's own code in that case and saves them under megatron-core's file names (the class
keeps megatron-core's name, so its cache hash is the same). ``BlendedDatasetBuilder`` is
megatron-core's builder making this class instead of its own. Both are plain subclasses; nothing
of megatron-core is modified, so there is nothing to enter or leave: the builder runs ``check()``
when it is made (megatron-core-private ``_build_indices`` overridden, the builder's static
``build_generic_dataset`` re-dispatched), and fails in one line when megatron-core does not fit.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Tuple

import numpy
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset as _MCoreBlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

from bam_megatron.patches.target import MEGATRON_CORE, Check

TARGETS = (MEGATRON_CORE,)
_CONFIG = "megatron.core.datasets.blended_megatron_dataset_config.BlendedMegatronDatasetConfig"


def check() -> None:
    """Raise ``PatchTargetError`` unless megatron-core still has what the subclasses rely on."""
    c = Check("megatron_datasets", *TARGETS)
    c.source("megatron-core", "megatron.core.datasets.blended_dataset.BlendedDataset._build_indices",
             "torch.distributed.get_rank()", "path_to_cache")
    c.source("megatron-core", "megatron.core.datasets.blended_dataset.BlendedDataset.__init__",
             "unique_description_hash", "unique_description", "self.split", "self.config")
    c.params("megatron-core", "megatron.core.datasets.blended_megatron_dataset_builder.BlendedMegatronDatasetBuilder"
             ".build_generic_dataset", "cls", "is_built_on_rank", "synchronize_ranks", leading=True)
    c.has("megatron-core", *(f"{_CONFIG}.{name}" for name in ("path_to_cache", "defer_npy_index_mmap", "fast_cache_load")))


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


class BlendedDatasetBuilder(BlendedMegatronDatasetBuilder):
    """BlendedMegatronDatasetBuilder that builds our BlendedDataset (see above)."""

    def __init__(self, *args, **kwargs):
        check()
        super().__init__(*args, **kwargs)

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is _MCoreBlendedDataset:
            cls = BlendedDataset
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args
        )
