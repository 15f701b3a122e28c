"""The names the upcycle tool records for the experts: given, or the seeds' directory names."""

import pytest

from bam_megatron.errors import UpcycleError
from bam_megatron.upcycle.plan import UpcycleOptions, check_options, default_expert_name, expert_names


def test_default_names_are_the_checkpoint_directories(tmp_path):
    assert default_expert_name("runs/qs/expert_code") == "expert_code"
    assert default_expert_name("runs/qs/expert_code/") == "expert_code"
    assert default_expert_name("runs/qs/seed/iter_0000300") == "seed"
    assert default_expert_name("ckpt/law/release") == "law"
    assert expert_names(["a/seed", "b/math"], UpcycleOptions()) == ["seed", "math"]


def test_given_names_win_and_are_checked():
    assert expert_names(["x", "y"], UpcycleOptions(expert_names=["seed", " code "])) == ["seed", "code"]
    check_options(2, UpcycleOptions(expert_names=["seed", "code"]))
    with pytest.raises(UpcycleError, match="--expert-names has 1 names for 2 seeds"):
        check_options(2, UpcycleOptions(expert_names=["seed"]))
    with pytest.raises(UpcycleError, match="non-empty"):
        check_options(2, UpcycleOptions(expert_names=["seed", " "]))
