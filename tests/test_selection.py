"""Which epoch is tested: the best validation epoch's model where the split has a validation set
of its own, and none chosen on test clips where it does not: on the report split, whose
validation clips are its test clips, a run tests its last epoch and the probe holds out training
clips to choose its strength. Validation scores are scripted (``scripted_validation``) so that
the best epoch is not the last whatever the tiny model learns: each rule gives another answer."""

from __future__ import annotations

import numpy as np
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import mtt.training.train
from mtt.core import distributed
from mtt.tracking.records import PREDICTIONS, load_predictions
from mtt.tracking.runs import MlflowTracker
from mtt.training.evaluate import split_scores
from mtt.training.probe import run_probe
from mtt.training.train import prepare, train
from tests.helpers import LEARNABLE, TINY, compose_cfg


def scripted_validation(monkeypatch, roc_aucs: list[float]) -> None:
    """Each epoch's validation ROC-AUC, in order, whatever the model does (the monitored metric
    and the curve); the test split is scored apart (mtt.training.evaluate.log_test), for real."""
    real, script = mtt.training.train.clip_metrics, iter(roc_aucs)
    monkeypatch.setattr(
        mtt.training.train, "clip_metrics", lambda labels, probs: {**real(labels, probs), "roc_auc": next(script)}
    )


def test_report_preset_tests_the_last_epoch(cache_dir, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tiny = [o for o in TINY if not o.startswith("trainer.epochs")]
    cfg = compose_cfg(["+experiment=report/prelim", *tiny, "trainer.epochs=3", f"tracking.uri={uri}"], cache=cache_dir)
    scripted_validation(monkeypatch, [0.9, 0.6, 0.5])  # best at epoch 0: selecting on it would test epoch 0
    with MlflowTracker(uri, "report", "prelim") as tracker:
        metrics = train(cfg, tracker)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.tags["selection"] == "last"
    assert run.data.metrics["best_epoch"] == 2 and run.data.metrics["epochs_trained"] == 3
    assert metrics["val_roc_auc"] == run.data.metrics["val_roc_auc"] == 0.5  # the last epoch's, not a maximum
    assert run.data.metrics["selected_val_roc_auc"] == 0.5


def test_the_test_metrics_are_those_of_the_best_validation_epoch(cache_dir, tmp_path, monkeypatch):
    """Best epoch 1 of 4: the logged test predictions (and metrics) are the epoch-1 model's,
    the best checkpoint's, not the last epoch's."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose_cfg(
        [*LEARNABLE, "trainer.epochs=4", "trainer.patience=null", "trainer.lr_schedule=none", f"tracking.uri={uri}"],
        cache=cache_dir,
    )
    scripted_validation(monkeypatch, [0.6, 0.9, 0.7, 0.8])
    with MlflowTracker(uri, "std", "best") as tracker:
        metrics = train(cfg, tracker)
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.tags["selection"] == "best_val"
    assert run.data.metrics["best_epoch"] == 1 and run.data.metrics["epochs_trained"] == 4
    assert run.data.metrics["selected_val_roc_auc"] == metrics["val_roc_auc"] == 0.9
    logged = load_predictions(client.download_artifacts(tracker.run_id, PREDICTIONS, str(tmp_path)))
    p = prepare(cfg)  # the same data and model; the best checkpoint's weights
    p.model.load_state_dict(
        load_file(client.download_artifacts(tracker.run_id, "checkpoint/best.safetensors", str(tmp_path)))
    )
    best, _ = split_scores(distributed.Dist(), p.model, p.inputs, p.test, cfg, p.device, p.from_backbone, p.amp, p.grid)
    assert np.array_equal(logged.clip_ids, p.test.clip_ids)
    np.testing.assert_allclose(logged.probabilities, best, rtol=0, atol=1e-6)


def test_default_recipe_on_the_report_split_drops_test_driven_stopping(cache_dir, tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose_cfg(
        [*LEARNABLE, "data.split=report", "trainer.epochs=4", "trainer.patience=1", f"tracking.uri={uri}"],
        cache=cache_dir,
    )
    with MlflowTracker(uri, "report", "default") as tracker:
        train(cfg, tracker)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.tags["selection"] == "last" and run.data.metrics["epochs_trained"] == 4  # no early stop
    assert [m.value for m in MlflowClient(uri).get_metric_history(tracker.run_id, "lr")] == [1e-3] * 4
    assert "ignoring trainer.patience=1" in caplog.text


def test_standard_split_selects_on_validation(cache_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose_cfg([*LEARNABLE, "trainer.epochs=2", f"tracking.uri={uri}"], cache=cache_dir)
    with MlflowTracker(uri, "std", "default") as tracker:
        train(cfg, tracker)
    assert MlflowClient(uri).get_run(tracker.run_id).data.tags["selection"] == "best_val"


def test_probe_on_the_report_split_chooses_on_held_out_training_clips(cache_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose_cfg([*LEARNABLE, "data.split=report", f"tracking.uri={uri}"], cache=cache_dir)
    with MlflowTracker(uri, "report", "probe") as tracker:
        run_probe(cfg, tracker)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.tags["probe_validation"] == "carved_from_train"
    train_clips, val_clips, test_clips = (int(run.data.params[f"derived.{k}_clips"]) for k in ("train", "val", "test"))
    assert val_clips == round(0.1 * (train_clips + val_clips)) and test_clips == 96 // 4  # the report's quarter
