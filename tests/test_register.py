"""`python -m mtt.compare EXPERIMENT --register NAME`: the best run of the best group, chosen by
validation (never by a test metric), becomes a new model version that `models:/NAME/latest` tags with."""

from __future__ import annotations

import json

import numpy as np
from mlflow.tracking import MlflowClient

from mtt.analysis.compare import main as compare_main
from mtt.data.datasets import index_from_config
from mtt.serving.tag import main as tag_main
from mtt.tracking.records import load_predictions
from mtt.tracking.runs import MlflowTracker, download_artifacts
from mtt.training.train import train
from tests.helpers import TINY, compose_cfg

# Scores written over the trained runs' own (a tiny run's are noise): group A has the better mean
# validation score (0.70 vs 0.65) and, within it, A0 the better one (0.80), while A1 and B0 have
# the better test scores. Registration must pick A0.
SCORES = {"A0": (0.80, 0.50), "A1": (0.60, 0.95), "B0": (0.65, 0.99)}  # run: (selected val, test) ROC-AUC


def test_register_picks_the_best_validation_run_and_models_latest_tags_with_it(tmp_path, cache_dir, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    ids = {}
    for name, (val, test) in SCORES.items():
        group, seed = name[0], int(name[1])
        cfg = compose_cfg(
            [*TINY, f"tracking.uri={uri}", f"trainer.seed={seed}", *(["head.dropout=0.3"] if group == "B" else [])],
            cache=cache_dir,
        )
        with MlflowTracker(uri, "reg", name, tags={"mtt.group": group, "mtt.group_name": f"group-{group}"}) as t:
            train(cfg, t)
        ids[name] = t.run_id
        # A later step: these become the run's latest values, which the comparison reads.
        client.log_metric(t.run_id, "selected_val_roc_auc", val, step=100)
        client.log_metric(t.run_id, "test_roc_auc", test, step=100)

    register = [
        "reg",
        "--register",
        "tagger",
        "--tracking-uri",
        uri,
        "--resamples",
        "100",
        "--out",
        str(tmp_path / "c.png"),
    ]
    assert compare_main(register) == 0
    assert f"registered run {ids['A0']}" in capsys.readouterr().err
    (version,) = client.search_model_versions("name = 'tagger'")
    assert version.run_id == ids["A0"] and int(version.version) == 1
    assert "group-A (2 seed(s)" in version.description and ids["A0"] in version.description
    assert "selected_val_roc_auc = 0.8" in version.description
    assert version.tags["mtt.group"] == "A" and version.tags["monitor"] == "val_roc_auc"

    # Registering again makes a new version of the same model.
    assert compare_main(register) == 0
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'tagger'")) == [1, 2]

    # models:/tagger/latest tags a test clip with A0's model: the probabilities A0's evaluation logged.
    pred = load_predictions(download_artifacts(uri, ids["A0"], "test_predictions.npz", tmp_path / "p"))
    index = index_from_config(cfg.data, progress=False)
    clip = index.audio_path(list(index.clip_ids).index(int(pred.clip_ids[0])))
    capsys.readouterr()
    assert tag_main([str(clip), "--model", "models:/tagger/latest", "--tracking-uri", uri, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "models:/tagger/latest" and doc["tags"] == list(pred.tags)
    (tagged,) = doc["files"]
    probs = np.array([tagged["probabilities"][t] for t in pred.tags])
    np.testing.assert_allclose(probs, pred.probabilities[0], rtol=0, atol=1e-5)


def test_register_refuses_a_run_without_a_model(tmp_path, capsys):
    """A run logged before runs carried model/ is compared, but cannot become a model version."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with MlflowTracker(uri, "old", "old-run") as t:
        t.log_params(
            {
                "data.split": "standard",
                "data.tags": "all",
                "data.drop_untagged": True,
                "eval.aggregate": "mean",
                "eval.patches_per_clip": None,
            }
        )
        t.set_tags({"feature_store": "f", "test_clips_sha256": "s"})
        t.log_metrics({"selected_val_roc_auc": 0.7, "test_roc_auc": 0.7}, step=1)
    assert compare_main(["old", "--register", "tagger", "--tracking-uri", uri, "--out", str(tmp_path / "c.png")]) == 2
    assert f"run {t.run_id} has no model/" in capsys.readouterr().err
    assert MlflowClient(uri).search_registered_models() == []
