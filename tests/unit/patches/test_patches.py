"""Each runtime patch of ``bam_megatron/patches`` against the installed library.

These tests read what a patch relies on in megatron-core / torch (a name, a signature, a piece of
source). When an upstream release changes it, the test fails and names the patch to revisit,
instead of the patch silently doing something else. What a patch does to running processes (the
checkpoint writers' helpers, torchrun's agent) is tested in ``tests/integration/patches``.
"""

import importlib.metadata
import inspect
import re

import pytest
import torch

from bam_megatron.patches import (
    cpu_runtime,
    dcp_safe_reads,
    megatron_datasets,
    megatron_moe,
    megatron_save_workers,
    torchrun_signals,
)

# Each patch module and the library whose installed release must be the one it targets.
TARGETS = [(cpu_runtime, "megatron-core"), (megatron_moe, "megatron-core"), (megatron_datasets, "megatron-core"),
           (megatron_save_workers, "megatron-core"), (dcp_safe_reads, "megatron-core"), (torchrun_signals, "torch")]


def _release(version: str) -> list:
    """The numeric release parts of a version string (``"2.13.0+cpu"`` -> ``[2, 13, 0]``)."""
    return [int(part) for part in re.match(r"\d+(?:\.\d+)*", version).group(0).split(".")]


@pytest.mark.parametrize("patch,library", TARGETS, ids=[p.__name__.rsplit(".", 1)[1] for p, _ in TARGETS])
def test_each_patch_targets_the_installed_library(patch, library):
    """The installed release of the library a patch changes is the one the patch was written for
    (``TARGET_VERSION``: a release, or a release series such as torch ``2.13``)."""
    target = _release(patch.TARGET_VERSION)
    installed = _release(importlib.metadata.version(library))
    assert installed[: len(target)] == target, (
        f"{library} {importlib.metadata.version(library)} is installed, {patch.__name__} targets "
        f"{patch.TARGET_VERSION}: revisit it"
    )


def test_megatron_moe_router_still_tests_te_general_gemm():
    from megatron.core.transformer.moe import moe_utils

    source = inspect.getsource(moe_utils.RouterGatingLinearFunction)
    assert "te_general_gemm is not None" in source
    megatron_moe.apply_megatron_compat()
    assert hasattr(moe_utils, "te_general_gemm")  # defined (None without Transformer Engine)


def test_cpu_runtime_targets_megatron_rng_entry_points():
    from megatron.core.tensor_parallel import random as mp_random

    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        assert callable(getattr(mp_random, name)), name
    params = list(inspect.signature(mp_random._set_cuda_rng_state).parameters)
    assert params[:1] == ["new_state"]
    assert cpu_runtime._RNG_WARNING in inspect.getsource(mp_random)
    fork = inspect.getsource(mp_random.CudaRNGStatesTracker.fork)
    assert "_set_cuda_rng_state" in fork and "_get_cuda_rng_state" in fork


@pytest.mark.parametrize("name", ["current_device", "Stream", "Event", "current_stream", "default_stream",
                                  "stream", "set_stream", "synchronize", "get_rng_state", "set_rng_state",
                                  "manual_seed"])
def test_cpu_runtime_replaces_existing_torch_cuda_functions(name):
    assert hasattr(torch.cuda, name), f"torch.cuda.{name} is gone: revisit patches/cpu_runtime.py"


def test_megatron_datasets_patch_still_needed_and_fits():
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    source = inspect.getsource(BlendedDataset._build_indices)
    assert "torch.distributed.get_rank()" in source and "path_to_cache" in source
    params = list(inspect.signature(BlendedMegatronDatasetBuilder.build_generic_dataset).parameters)
    assert params[:3] == ["cls", "is_built_on_rank", "synchronize_ranks"]
    assert megatron_datasets.BlendedDataset.__name__ == BlendedDataset.__name__  # same cache hash


def test_save_workers_patch_fits_megatron_core_checkpoint_writer():
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    assert hasattr(fsa, "_results_queue") and callable(fsa._get_write_results_queue)
    assert "_results_queue" in inspect.getsource(fsa._get_write_results_queue)
    assert "Manager()" in inspect.getsource(fsa._get_write_results_queue)  # what the patch replaces
    multiproc = inspect.getsource(fsa.FileSystemWriterAsync.write_preloaded_data_multiproc)
    assert "FileSystemWriterAsync.write_preloaded_data" in multiproc and 'get_context("fork")' in multiproc
