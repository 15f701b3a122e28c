"""Fixtures of the Hugging Face tests: never touch the network, keep transformers' copies of
remote model code private to this session, tiny random models per module."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Each case of ``IMPORT_CASES`` saved as a Hugging Face folder: name -> (folder, model)."""
    from support.hf import make_hf_model
    from support.hf_cases import IMPORT_CASES

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, (cls, overrides)) in enumerate(IMPORT_CASES.items()):
        folder = str(root / name)
        out[name] = (folder, make_hf_model(folder, cls, seed=i, **overrides))
    return out
