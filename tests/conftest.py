import shutil
import tempfile

import pytest


@pytest.fixture
def single_process():
    """A one-process (gloo on CPU) megatron-core setup, torn down afterwards."""
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    info = init_distributed(seed=1234)
    yield info
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
