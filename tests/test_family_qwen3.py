"""Qwen3 passes the correctness table (tests/family_table.py) on a tiny random checkpoint."""

from __future__ import annotations

import pytest

from tests.conftest import family_models
from tests.family_table import TABLE


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return family_models("qwen3", tmp_path_factory)


@pytest.mark.parametrize("check", TABLE, ids=lambda check: check.__name__)
def test_qwen3_table(models, images, check):
    sdpa, eager = models
    assert sdpa.family.name == "Qwen3"
    check(sdpa, eager, images)
