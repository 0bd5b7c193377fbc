"""Shared fixtures: configs composed through Hydra's compose API with small overrides, a tiny
generated dataset, a throwaway MLflow store, the seeds and checks of learning tests. The helpers
they use are in ``tests.helpers``. Tests marked ``cuda`` are skipped where torch sees no CUDA
device."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY, compose_cfg
from tests.helpers.learning import Learning, seeds_from_env

NO_CUDA = "no CUDA device"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (generated dataset, feature stores) shared by the whole session."""
    return tmp_path_factory.mktemp("mtt-cache")


@pytest.fixture
def tiny_cfg(cache_dir, tmp_path):
    """The tiny setup, tracking into a fresh sqlite store under tmp_path."""
    return compose_cfg([*TINY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cache=cache_dir)


def pytest_generate_tests(metafunc):
    """A test that takes ``learning`` runs once per seed of $MTT_LEARNING_SEEDS, marked ``learning``
    (tests/helpers/learning.py)."""
    if "learning" in metafunc.fixturenames:
        try:
            seeds = seeds_from_env()
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None
        params = [pytest.param(s, id=f"seed{s}", marks=pytest.mark.learning) for s in seeds]
        metafunc.parametrize("learning", params, indirect=True)


@pytest.fixture
def learning(request) -> Learning:
    """The seed a learning test trains or draws with, and its checks (``at_least``, ``at_most``)."""
    node = request.node
    others = {k: v for k, v in node.callspec.params.items() if k != "learning"}  # the test's own parameters
    name = f"{node.path.name}::{node.originalname}" + (f"[{others}]" if others else "")
    return Learning(test=name, seed=request.param)


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
