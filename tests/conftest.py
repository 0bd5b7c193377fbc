"""Shared fixtures: configs composed through Hydra's compose API with small overrides, a tiny
generated dataset, a throwaway MLflow store. The helpers they use are in ``tests.helpers``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY, compose_cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (generated dataset, feature stores) shared by the whole session."""
    return tmp_path_factory.mktemp("mtt-cache")


@pytest.fixture
def tiny_cfg(cache_dir, tmp_path):
    """The tiny setup, tracking into a fresh sqlite store under tmp_path."""
    return compose_cfg([*TINY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cache=cache_dir)
