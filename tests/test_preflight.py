"""Values that used to fail late, after the MLflow run existed (a FAILED run and a traceback), or
never (a batch that grows memory forever), are refused before any run: one line, exit status 2
(issue 25, item 5). ``data.root`` is checked with the config (``exit_if_invalid``), what depends
on the data once its index is read (``mtt.preflight``)."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from mtt.config import MAX_RUN_NAME
from mtt.data.datasets import index_from_config
from mtt.preflight import training_patches
from mtt.preprocess import build_feature_store
from mtt.run import clipped_run_name
from tests.helpers import TINY, TINY_MODEL, compose_cfg, run_module


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data=mtat", "data.root=/nonexistent/mtat"],
            "data.root=/nonexistent/mtat: no such folder (download MTAT "
            "into it first: python -m mtt.data.download data=mtat data.root=/nonexistent/mtat)",
        ),
        (
            ["data=mtat", "data.root=/etc/hostname"],
            "data.root=/etc/hostname: a file, not a folder (expected the folder holding annotations_final.csv)",
        ),
        (
            ["data=mtat"],
            "data.root is not set: data=mtat needs data.root=DIR, the folder holding annotations_final.csv and 0-f",
        ),
        (
            [f"tracking.experiment={'x' * 600}"],
            f"tracking.experiment={'x' * 40}... (600 characters): expected a non-empty name of at most 256 characters",
        ),
    ],
)
def test_a_bad_data_root_or_name_is_refused_before_the_store_exists(tmp_path, overrides, message):
    cache, store = tmp_path / "cache", tmp_path / "m.db"
    proc = run_module(
        ["mtt.run", *TINY_MODEL, *overrides, f"paths.cache={cache}", f"tracking.uri=sqlite:///{store}"], check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert not store.exists() and not cache.exists()


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One generated TINY dataset for the module's commands."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize(
    "command, override, message",
    [
        (
            "mtt.run",
            "data.tags=freq999",
            "data.tags=freq999: expected freqN with N <= 188, the number of tags in the annotations",
        ),
        (
            "mtt.preprocess",
            "data.tags=freq999",
            "data.tags=freq999: expected freqN with N <= 188, the number of tags in the annotations",
        ),
        (
            "mtt.run",
            "trainer.batch_size=100000000",
            "trainer.batch_size=100000000: expected at most 48, the "
            "patches of the 24 training clips (a bigger batch only repeats them, and a huge one exhausts memory "
            "before the first step)",
        ),
    ],
)
def test_what_the_data_cannot_support_is_refused_before_any_run(tmp_path, tiny_cache, command, override, message):
    store = tmp_path / "m.db"
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.create_experiment("mtt")  # a store that exists: MLflow prints nothing
    proc = run_module(
        [command, *TINY, override, f"paths.cache={tiny_cache}", f"tracking.uri=sqlite:///{store}"], check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert client.search_runs([experiment]) == []


def test_the_batch_bound_is_the_training_patches_the_store_then_holds(tmp_path):
    """The bound is computed from the index before any feature exists; it must be the patches the
    training split then really has (here 24 clips x 2 patches; 1 each with patches_per_clip=1)."""
    cfg = compose_cfg(TINY, cache=tmp_path)
    index = index_from_config(cfg.data, progress=False)
    store = build_feature_store(index, cfg.features, progress=False)
    train = index.clip_ids[index.subset("train")]
    assert training_patches(cfg, index) == int(np.sum([store.count(c) for c in train])) == 48
    assert training_patches(compose_cfg([*TINY, "stream.patches_per_clip=1"], cache=tmp_path), index) == 24


def test_a_run_name_built_from_many_overrides_fits_mlflow():
    long = ",".join(f"key{i}=value{i}" for i in range(40))
    assert len(long) > MAX_RUN_NAME
    name = clipped_run_name(long)
    assert len(name) == MAX_RUN_NAME and name.endswith("...") and long.startswith(name[:-3])
    assert clipped_run_name("head=autopool") == "head=autopool"
