"""Fixtures of the multi-process data tests: two small NullTokenizer domains."""

import pytest
from support.data import build_null_data


@pytest.fixture(scope="module")
def null_data(tmp_path_factory):
    """``{(domain, "train" | "valid"): prefix}`` of two NullTokenizer domains."""
    return build_null_data(tmp_path_factory.mktemp("data"))
