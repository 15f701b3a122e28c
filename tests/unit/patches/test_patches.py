"""Each runtime patch of ``bam_megatron/patches`` against the installed library.

These tests read what a patch relies on in megatron-core / torch (a name, a signature, a piece of
source). When an upstream release changes it, the test fails and names the patch to revisit,
instead of the patch silently doing something else.
"""

import inspect

import megatron.core
import pytest
import torch

from bam_megatron.patches import cpu_runtime, megatron_datasets, megatron_moe, megatron_save_workers


def test_patches_name_the_megatron_core_release_they_target():
    for patch in (cpu_runtime, megatron_moe, megatron_datasets, megatron_save_workers):
        assert patch.TARGET_VERSION == "0.16.1", patch.__name__
    assert megatron.core.__version__.startswith("0.16."), (
        f"megatron-core {megatron.core.__version__}: revisit every module of bam_megatron/patches"
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
    megatron_save_workers.apply()
    assert getattr(fsa.FileSystemWriterAsync.write_preloaded_data, "_dies_with_parent", False)
    assert fsa._results_queue is not None
