"""Each module of ``bam_megatron/patches`` against the installed libraries, through its own
run-time ``check()``: the release it targets and the shape it relies on. When an upstream release
changes what a patch touches, entering the patch (and this test) fails in one line naming the
library, the installed release and the targeted one, instead of the patch silently doing
something else. Entering and leaving the CPU runtime: ``test_cpu_runtime_scope.py``; what the
process patches do to real processes: ``tests/integration/patches``."""

import importlib
import os
import platform

import megatron.core
import pytest
import torch

from bam_megatron.errors import PatchTargetError
from bam_megatron.patches import MODULES, entered
from bam_megatron.patches.target import Release, version_tuple

PATCHES_DIR = os.path.dirname(importlib.import_module("bam_megatron.patches").__file__)
MACHINERY = {"__init__", "target", "run"}


def _module(name):
    return importlib.import_module(f"bam_megatron.patches.{name}")


def test_every_module_of_patches_is_listed_with_its_targets():
    found = {name[:-3] if name.endswith(".py") else name for name in os.listdir(PATCHES_DIR)
             if name.endswith(".py") or os.path.isfile(os.path.join(PATCHES_DIR, name, "__init__.py"))}
    assert found - MACHINERY == set(MODULES)
    for name in MODULES:
        module = _module(name)
        assert callable(module.check), name
        assert module.TARGETS and all(isinstance(r, Release) for r in module.TARGETS), name


@pytest.mark.parametrize("name", MODULES)
def test_patch_fits_the_installed_libraries(name):
    _module(name).check()


def _outside(release: Release) -> str:
    """A release of ``release.library`` that the patch must refuse."""
    if release.below is not None:
        return ".".join(str(x) for x in release.below) + ".0"
    lower = list(release.minimum)
    lower[-1] -= 1
    return ".".join(str(x) for x in lower) + ".0"


def _install(monkeypatch, library: str, version: str) -> None:
    if library == "torch":
        monkeypatch.setattr(torch, "__version__", version)
    elif library == "megatron-core":
        monkeypatch.setattr(megatron.core, "__version__", version)
    else:
        monkeypatch.setattr(platform, "python_version", lambda: version)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", MODULES)
def test_patch_refuses_a_release_it_does_not_target_in_one_line(name, monkeypatch):
    for release in _module(name).TARGETS:
        with monkeypatch.context() as m:
            version = _outside(release)
            assert not release.fits(version)
            _install(m, release.library, version)
            with pytest.raises(PatchTargetError) as excinfo:
                _module(name).check()
        message = _one_line(excinfo)
        assert f"{release.library} {version} is installed" in message, message
        assert release.describe() in message and release.requirement() in message, message


def test_version_tuples_read_local_and_pre_release_tags():
    assert version_tuple(torch.__version__)[:2] == tuple(int(x) for x in torch.__version__.split(".")[:2])
    assert version_tuple("2.14.0+cu128") > version_tuple("2.6.0a0+git1234") >= (2, 6)


def test_a_changed_torch_name_fails_entry_in_one_line_and_changes_nothing(monkeypatch):
    from bam_megatron.patches.cpu_runtime import cpu_mode_active, cpu_runtime

    current_device = torch.cuda.current_device
    monkeypatch.delattr(torch.cuda, "Stream")
    with pytest.raises(PatchTargetError) as excinfo:
        with cpu_runtime():
            pass
    message = _one_line(excinfo)
    assert f"torch {torch.__version__} has no torch.cuda.Stream" in message, message
    assert "patches/cpu_runtime" in message
    assert torch.cuda.current_device is current_device and not cpu_mode_active() and entered() == []


def test_a_changed_megatron_core_line_fails_in_one_line(monkeypatch):
    from megatron.core.transformer.moe import moe_utils

    from bam_megatron.patches import megatron_moe

    class RouterGatingLinearFunction:  # a release whose router no longer tests the name
        pass

    monkeypatch.setattr(moe_utils, "RouterGatingLinearFunction", RouterGatingLinearFunction)
    with pytest.raises(PatchTargetError) as excinfo:
        megatron_moe.check()
    message = _one_line(excinfo)
    assert f"megatron-core {megatron.core.__version__} changed" in message and "te_general_gemm is not None" in message


def test_a_changed_signature_fails_in_one_line(monkeypatch):
    from torch.distributed.elastic.multiprocessing import api

    from bam_megatron.patches import torchrun_signals

    monkeypatch.setattr(api, "_terminate_process_handler", lambda signal_number, frame, extra: None)
    with pytest.raises(PatchTargetError) as excinfo:
        torchrun_signals.check()
    assert "changed the parameters of torch.distributed.elastic.multiprocessing.api._terminate_process_handler" in _one_line(excinfo)


def test_megatron_moe_defines_the_name_only_while_entered():
    from megatron.core.transformer.moe import moe_utils

    from bam_megatron.patches.megatron_moe import te_general_gemm_defined

    before = vars(moe_utils).get("te_general_gemm", "absent")
    with te_general_gemm_defined():
        assert hasattr(moe_utils, "te_general_gemm")  # None without Transformer Engine
        assert entered() == ["megatron_moe"]
    assert vars(moe_utils).get("te_general_gemm", "absent") == before
    assert entered() == []


def test_blended_dataset_subclass_keeps_megatron_cores_cache_name():
    from megatron.core.datasets.blended_dataset import BlendedDataset

    from bam_megatron.patches import megatron_datasets

    assert megatron_datasets.BlendedDataset.__name__ == BlendedDataset.__name__  # same cache hash


def test_run_patches_are_held_from_init_to_destroy_distributed():
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    assert entered() == []
    init_distributed(seed=1)
    try:
        expected = {"megatron_moe", "megatron_save_workers"} | (set() if torch.cuda.is_available() else {"cpu_runtime"})
        assert set(entered()) == expected
    finally:
        destroy_distributed()
    assert entered() == []
    destroy_distributed()  # idempotent
    assert entered() == []
