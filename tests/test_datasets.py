"""Datasets are dispatched on data.name through mtt.data.datasets: the built-in ones, one
registered by a test, and a clear error for a name nobody registered."""

from types import SimpleNamespace

import numpy as np
import pytest

from mtt.data import datasets
from mtt.data.index import ClipIndex


def test_unknown_dataset_name_is_refused_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"data.name='fma': no such dataset; known: mtat, toy"):
        datasets.index_from_config(SimpleNamespace(name="fma"))


def test_a_registered_dataset_is_what_its_name_selects(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.DATASETS, "_entries", dict(datasets.DATASETS._entries))  # leave the registry as found
    seen = []

    @datasets.register("two_clips")
    def two_clips(data_cfg, progress):
        seen.append((data_cfg.root, progress))
        return ClipIndex(
            root=tmp_path,
            tags=("rock",),
            clip_ids=np.array([1, 2]),
            paths=("0/a.mp3", "c/b.mp3"),
            labels=np.array([[1], [0]], dtype=np.uint8),
            splits={"train": np.array([0]), "valid": np.array([1]), "test": np.array([1])},
        )

    index = datasets.index_from_config(SimpleNamespace(name="two_clips", root=str(tmp_path)), progress=False)
    assert seen == [(str(tmp_path), False)] and index.tags == ("rock",)
    with pytest.raises(ValueError, match="already registered"):
        datasets.register("two_clips")(lambda data_cfg, progress: index)


def test_toy_without_synth_parameters_says_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="data.name=toy needs data.synth"):
        datasets.index_from_config(SimpleNamespace(name="toy", root=str(tmp_path), synth=None))
