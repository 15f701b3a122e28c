import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def single_process():
    """A one-process (gloo on CPU) megatron-core setup, torn down afterwards."""
    from bam_megatron.distributed import destroy_distributed, init_distributed

    info = init_distributed(seed=1234)
    yield info
    destroy_distributed()
