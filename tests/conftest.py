import pytest


@pytest.fixture
def single_process():
    """A one-process (gloo on CPU) megatron-core setup, torn down afterwards."""
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    info = init_distributed(seed=1234)
    yield info
    destroy_distributed()
