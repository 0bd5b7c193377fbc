"""The linear-probe reference: clip embeddings, regularisation chosen on validation, and a run
logged beside the trained ones under the same metric names."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mtt.analysis.compare import load_runs
from mtt.features.store import PatchStore, pack
from mtt.tracking.runs import MlflowTracker
from mtt.training.probe import REFERENCE, REFERENCE_TAG, clip_embeddings, fit_probe, run_probe
from mtt.training.train import clip_metrics, train
from tests.helpers import LEARNABLE, TINY, compose_cfg, run_module


def test_clip_embedding_is_mean_and_std_of_the_pooled_patches(tmp_path):
    rng = np.random.default_rng(0)
    clips = {7: rng.normal(size=(3, 4, 2, 2)), 9: rng.normal(size=(1, 4, 2, 2))}
    store = pack(tmp_path / "s", {c: len(v) for c, v in clips.items()}, lambda c: clips[c], (4, 2, 2), {})
    emb = clip_embeddings(PatchStore(tmp_path / "s"), np.array([9, 7]))
    for row, c in zip(emb, (9, 7)):
        pooled = clips[c].astype(np.float16).astype(np.float64).mean(axis=(2, 3))  # stored as float16
        np.testing.assert_allclose(row, np.concatenate([pooled.mean(0), pooled.std(0)]), rtol=1e-12)
    assert emb.shape == (2, 8) and store.item_shape == (4, 2, 2)
    assert np.all(emb[0, 4:] == 0)  # one patch: no spread


def test_regularisation_strength_is_chosen_on_validation(learning):
    rng = np.random.default_rng(1 + learning.seed)
    # 100 training clips, 30 features of which 2 carry the labels: the strengths score differently.
    w = np.zeros((30, 3))
    w[:2] = rng.normal(size=(2, 3)) * 3

    def data(n):
        x = rng.normal(size=(n, 30))
        return x, (x @ w + rng.normal(size=(n, 3)) > 1).astype(np.uint8)

    (xt, yt), (xv, yv) = data(100), data(400)
    probe, scores = fit_probe(xt, yt, xv, yv, [1e-3, 0.1, 100.0])
    assert [s["C"] for s in scores] == [1e-3, 0.1, 100.0]
    best = max(scores, key=lambda s: s["val_roc_auc"])
    assert probe.C == best["C"]
    assert clip_metrics(yv, probe.predict(xv))["roc_auc"] == pytest.approx(best["val_roc_auc"])
    assert len({round(s["val_roc_auc"], 6) for s in scores}) == 3  # so the choice is not a tie
    learning.at_least("best val_roc_auc", best["val_roc_auc"], 0.7, baseline=0.5)  # the signal is found


def test_a_tag_without_both_classes_gets_its_training_rate(learning):
    x = np.random.default_rng(2 + learning.seed).normal(size=(60, 4))
    y = np.stack([x[:, 0] > 0, np.zeros(60, bool)], axis=1).astype(np.uint8)
    probe, _ = fit_probe(x, y, x, y, [1.0])
    p = probe.predict(x)
    assert np.all(p[:, 1] == 0.0)
    learning.at_least("roc_auc", clip_metrics(y, p)["roc_auc"], 0.95, baseline=0.5)


def test_probe_run_is_a_labelled_reference_with_the_trained_runs_metric_names(cache_dir, tmp_path, learning):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [*LEARNABLE, f"tracking.uri={uri}", "trainer.epochs=2", f"trainer.seed={learning.seed}"]
    cfg = compose_cfg(overrides, cache=cache_dir)
    with MlflowTracker(uri, "both", "head") as trained:
        train(cfg, trained)
    with MlflowTracker(uri, "both", "linear_probe") as ref:
        metrics = run_probe(cfg, ref)
    client = MlflowClient(uri)
    run, head = client.get_run(ref.run_id), client.get_run(trained.run_id)
    assert run.data.tags[REFERENCE_TAG] == REFERENCE and REFERENCE_TAG not in head.data.tags
    evaluation = {k for k in head.data.metrics if k.startswith(("val_", "test_"))}
    assert evaluation <= set(run.data.metrics), evaluation - set(run.data.metrics)
    assert float(run.data.params["probe.selected_C"]) in cfg.probe.C
    assert run.data.tags["feature_store"] == head.data.tags["feature_store"]  # the same features
    assert run.data.params["derived.truncated_clips"] == head.data.params["derived.truncated_clips"] == "0"
    learning.at_least("probe test_roc_auc", metrics["test_roc_auc"], 0.7, baseline=0.5)  # a probe on them learns
    rows = load_runs("both", uri)
    assert [r["reference"] for r in rows] == [None, REFERENCE]
    assert rows[1]["label"].endswith("[reference]")


@pytest.mark.slow
def test_cli_probe_logs_into_the_experiment(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/x.db"
    run_module(
        ["mtt.probe", *TINY, f"paths.cache={cache_dir}", "tracking.experiment=demo"], env={"MLFLOW_TRACKING_URI": uri}
    )
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("linear_probe,")
    assert run.data.tags[REFERENCE_TAG] == REFERENCE and "test_roc_auc" in run.data.metrics
