"""The test tiers are the directories: ``tests/unit`` is the quick tier (no model training, no
program or helper process started, no multi-process harness, no checkpoint writer; only the
preprocessing tool's own worker pool forks); everything in ``tests/integration`` and
``tests/acceptance`` is marked ``slow`` here, so ``-m "not slow"`` selects exactly
``tests/unit``."""

import os
import shutil
import tempfile

import pytest

UNIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unit") + os.sep


def pytest_collection_modifyitems(config, items):
    """``slow`` for every test outside ``tests/unit``; a ``slow`` mark set by hand inside it is an
    error (such a test belongs in ``tests/integration``)."""
    for item in items:
        in_unit = str(item.path).startswith(UNIT)
        if not in_unit:
            item.add_marker(pytest.mark.slow)
        elif item.get_closest_marker("slow") is not None:
            raise pytest.UsageError(f"{item.nodeid} is marked slow: move it to tests/integration")


@pytest.fixture
def single_process():
    """A one-process (gloo on CPU) megatron-core setup for one test: ``init_distributed`` enters the
    run's patches (the CPU runtime without a GPU), ``destroy_distributed`` leaves them."""
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    info = init_distributed(seed=1234)
    yield info
    destroy_distributed()


@pytest.fixture
def distributed():
    """``init_distributed(**kwargs)`` as a function, for tests that set megatron-core up with their
    own arguments (or expect it to refuse them); torn down after the test when it was set up."""
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    started = []

    def _init(**kwargs):
        info = init_distributed(**kwargs)
        started.append(info)
        return info

    yield _init
    if started:
        destroy_distributed()


@pytest.fixture(scope="session", autouse=True)
def private_remote_code_cache():
    """transformers copies ``trust_remote_code`` files into a cache named after the model folder
    (``.../transformers_modules/hf/``), shared by every process of the machine: a private one per
    session keeps concurrent runs from reading each other's half-written copies. Session-wide:
    the first in-process load fixes where ``transformers_modules`` is imported from."""
    from transformers import dynamic_module_utils

    folder = tempfile.mkdtemp(prefix="hf_modules_")
    previous = dynamic_module_utils.HF_MODULES_CACHE
    dynamic_module_utils.HF_MODULES_CACHE = folder
    yield folder
    dynamic_module_utils.HF_MODULES_CACHE = previous
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_patch_outlives_its_test():
    """Every patch a test enters (``init_distributed`` enters the run's: the CPU runtime, ...) is
    left by the end of the test, so that no later test runs patched; a test that leaves one
    entered fails, and the patches are left for the next test."""
    from bam_megatron.patches import entered

    before = entered()
    yield
    left = [name for name in entered() if name not in before]
    if left:
        from bam_megatron.parallel.distributed import destroy_distributed

        destroy_distributed()
        pytest.fail(f"the test left patches entered: {', '.join(left)} (init_distributed without destroy_distributed?)")
