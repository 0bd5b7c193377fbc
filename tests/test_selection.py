"""No epoch (and no probe strength) is chosen on test clips: on the report split, whose
validation clips are its test clips, a run tests its last epoch and the probe holds out training
clips to choose its strength."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from mtt.probe import run_probe
from mtt.tracking import MlflowTracker
from mtt.train import train
from tests.helpers import LEARNABLE, TINY, compose_cfg


def test_report_preset_tests_the_last_epoch(cache_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tiny = [o for o in TINY if not o.startswith("trainer.epochs")]
    cfg = compose_cfg(["+experiment=report/prelim", *tiny, "trainer.epochs=3", f"tracking.uri={uri}"], cache=cache_dir)
    with MlflowTracker(uri, "report", "prelim") as tracker:
        metrics = train(cfg, tracker)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.tags["selection"] == "last"
    assert run.data.metrics["best_epoch"] == 2 and run.data.metrics["epochs_trained"] == 3
    assert metrics["val_roc_auc"] == run.data.metrics["val_roc_auc"]  # the last epoch's, not a maximum


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
