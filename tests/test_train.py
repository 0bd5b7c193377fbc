"""End to end on the tiny generated dataset: train, evaluate, and read the MLflow run back."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from mtt.tracking import MlflowTracker, download_artifacts
from mtt.train import clip_metrics, clip_probabilities, prepare, train
from tests.helpers import TINY, compose_cfg, run_module, sweep_children

EPOCH_METRICS = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_roc_auc", "val_pr_auc"]
FINAL_METRICS = ["test_loss", "test_accuracy", "test_roc_auc", "test_pr_auc"]


def test_one_epoch_run_is_recorded(tiny_cfg, tmp_path):
    with MlflowTracker(tiny_cfg.tracking.uri, "unit", "tiny") as tracker:
        metrics = train(tiny_cfg, tracker)
    client = MlflowClient(tiny_cfg.tracking.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0], key
    # The logged test metrics are what train() returns and what the logged checkpoint scores on
    # the test clips, evaluated here on its own (whether a 1-epoch run learns: tests/test_recipe.py).
    assert {k: run.data.metrics[k] for k in FINAL_METRICS} == {k: metrics[k] for k in FINAL_METRICS}
    p = prepare(tiny_cfg)
    best = download_artifacts(tiny_cfg.tracking.uri, tracker.run_id, "checkpoint/best.safetensors", tmp_path)
    p.model.load_state_dict(load_file(best))
    probs = clip_probabilities(p.model, p.inputs, p.test, tiny_cfg, p.device, p.from_backbone, p.amp)
    for key, value in clip_metrics(p.test.labels, probs).items():
        if not math.isnan(value):
            assert run.data.metrics[f"test_{key}"] == pytest.approx(value, abs=1e-6), key
    assert run.data.metrics["test_accuracy_all_negative"] == pytest.approx(1 - p.test.labels.mean())
    assert run.data.params["head.blocks"] == "2" and run.data.params["pool.name"] == "gap"
    assert run.data.tags["backbone_pretrained"] == "False"
    assert int(run.data.params["derived.steps_per_epoch"]) >= 1
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts


def test_exception_marks_the_run_failed(tiny_cfg, tmp_path):
    cfg = compose_cfg(
        [*TINY, f"tracking.uri={tiny_cfg.tracking.uri}", "steps.policy=fixed", "steps.n=0"], cache=tiny_cfg.paths.cache
    )
    with pytest.raises(ValueError, match="steps.n"):
        with MlflowTracker(cfg.tracking.uri, "unit", "bad") as tracker:
            train(cfg, tracker)
    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and "steps.n" in run.data.tags["error"]


@pytest.mark.slow
def test_cli_autopool_two_epochs(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/x.db"
    run_module(
        ["mtt.run", "+head=autopool", *TINY, "trainer.epochs=2", f"paths.cache={cache_dir}"],
        env={"MLFLOW_TRACKING_URI": uri},
    )
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("val_roc_auc", "train_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1]
    assert run.data.params["pool.name"] == "autopool"
    assert run.data.tags["choice.head"] == "autopool"


@pytest.mark.slow
def test_cli_multirun_three_heads(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/x.db"
    run_module(
        ["mtt.run", "-m", "+head=gap2,gap3,autopool", *TINY, f"paths.cache={cache_dir}", "tracking.experiment=sweep"],
        env={"MLFLOW_TRACKING_URI": uri},
    )
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep")
    runs = sweep_children(client, "sweep")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.info.run_name.split(",")[0] for r in runs) == ["head=autopool", "head=gap2", "head=gap3"]
    assert sorted((r.data.params["head.blocks"], r.data.params["pool.name"]) for r in runs) == [
        ("2", "autopool"),
        ("2", "gap"),
        ("3", "gap"),
    ]
    assert len({r.info.run_name for r in runs}) == 3
    # One `-m` call, one sweep id: the runs of this sweep can be filtered together.
    (sweep,) = {r.data.tags["sweep_id"] for r in runs}
    # (the parent run carries the sweep id too)
    assert "multirun" in sweep and len(client.search_runs([exp.experiment_id], f"tags.sweep_id = '{sweep}'")) == 4


def test_finetuning_the_last_conv_trains_through_the_backbone(tiny_cfg):
    cfg = compose_cfg(
        [*TINY, f"tracking.uri={tiny_cfg.tracking.uri}", "backbone.finetune_last=1"], cache=tiny_cfg.paths.cache
    )
    with MlflowTracker(cfg.tracking.uri, "unit", "finetune") as tracker:
        train(cfg, tracker)
    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["derived.backbone_cached"] == "False"  # conv maps change while training


def test_artifacts_live_beside_the_sqlite_store_not_in_the_working_directory(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with MlflowTracker(tiny_cfg.tracking.uri, "where", "a") as tracker:
        tracker.log_text("hello", "note.txt")
    assert not (tmp_path / "mlruns").exists()
    db_dir = tiny_cfg.tracking.uri[len("sqlite:///") :].rsplit("/", 1)[0]
    assert list((Path(db_dir) / "mlartifacts" / "where").rglob("note.txt"))
