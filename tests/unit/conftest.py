"""The quick tier runs unpatched: a test (or a module's fixture) that needs megatron-core's CPU
runtime enters it for its own duration (``init_distributed`` enters it, ``destroy_distributed`` leaves it), so no
test depends on which tests ran before it."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def no_cpu_runtime_outside_its_scope():
    """The CPU runtime is off when a module starts and again when its fixtures are torn down."""
    from bam_megatron.patches.cpu_runtime import cpu_mode_active

    assert not cpu_mode_active(), "the CPU runtime was left on by a test before this module"
    yield
    assert not cpu_mode_active(), "a test or fixture of this module left the CPU runtime on"
