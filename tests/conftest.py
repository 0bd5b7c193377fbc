"""Shared fixtures: configs composed through Hydra's compose API with small overrides, a tiny
generated dataset, a throwaway MLflow store. The helpers they use are in ``tests.helpers``.
Tests marked ``cuda`` are skipped where torch sees no CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY, compose_cfg

NO_CUDA = "no CUDA device"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (generated dataset, feature stores) shared by the whole session."""
    return tmp_path_factory.mktemp("mtt-cache")


@pytest.fixture
def tiny_cfg(cache_dir, tmp_path):
    """The tiny setup, tracking into a fresh sqlite store under tmp_path."""
    return compose_cfg([*TINY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cache=cache_dir)


def pytest_collection_modifyitems(config, items) -> None:
    """``@pytest.mark.cuda`` tests need a CUDA device: without one they are skipped, all with the
    same reason (a platform limit; ``make bench-gpu`` runs them on a GPU machine)."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))
