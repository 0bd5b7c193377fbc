"""A 2-epoch `python -m mtt.run` records everything a reader needs (docs/records-and-resume.md "Records, checkpoints,
resume, tagging"), read back through the MLflow client."""

from __future__ import annotations

import csv
import subprocess

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mtt.data.tags import TAGS
from mtt.tracking.records import GIT_COMMIT, GIT_DIRTY, git_state, plot_curves, versions
from tests.helpers import RUN_ARTIFACTS, TINY, run_module


def test_git_state_of_a_folder_outside_git_is_unknown(tmp_path):
    assert git_state(tmp_path) == {GIT_COMMIT: "unknown", GIT_DIRTY: "unknown"}


def test_git_state_sees_a_dirty_tree(tmp_path):
    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    clean = git_state(tmp_path)
    assert len(clean[GIT_COMMIT]) == 40 and clean[GIT_DIRTY] == "false"
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {**clean, GIT_DIRTY: "true"}


def test_versions_name_every_library():
    v = versions()
    assert set(v) == {
        "version.python",
        "version.torch",
        "version.mlflow",
        "version.hydra-core",
        "version.pescador",
        "version.numpy",
        "version.librosa",
    }
    assert all(x[0].isdigit() for x in v.values())


def test_plots_are_pngs(tmp_path):
    paths = plot_curves({"train_loss": [0.7, 0.5], "val_loss": [0.6, 0.55], "val_roc_auc": [0.5, 0.6]}, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "accuracy.png", "auc.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


@pytest.mark.slow
def test_two_epoch_run_has_every_record(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/m.db"
    run_module(
        [
            "mtt.run",
            *TINY[:-2],
            "trainer.epochs=2",
            "trainer.device=cpu",
            f"paths.cache={cache_dir}",
            "tracking.experiment=records",
        ],
        env={"MLFLOW_TRACKING_URI": uri},
    )
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("records").experiment_id])
    rid, tags, params = run.info.run_id, run.data.tags, run.data.params
    assert run.info.status == "FINISHED"
    # Code and environment, in MLflow's system tags where it has them (the UI's Source column).
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.source.git.dirty"] in ("true", "false")
    assert tags["mlflow.source.name"] == "mtt.run" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.runName"] == run.info.run_name
    assert "steps per epoch" in tags["mlflow.note.content"]
    assert sorted(t.value for d in run.inputs.dataset_inputs for t in d.tags) == ["test", "train", "valid"]
    for lib in ("python", "torch", "mlflow", "hydra-core", "pescador", "numpy", "librosa"):
        assert tags[f"version.{lib}"][0].isdigit(), lib
    # Data, weights, seed, device, steps, sweep.
    assert len(tags["feature_store"]) >= 8
    assert tags["weights_source"] == "none" and tags["backbone_pretrained"] == "False"
    assert "weights_sha256" in tags
    assert tags["seed"] == params["trainer.seed"] == "0"
    assert tags["device"] == params["derived.device"] == "cpu"
    assert tags["steps_policy"] == params["steps.policy"] == "patches"  # the default
    assert tags["steps_per_epoch"] == params["derived.steps_per_epoch"] and int(tags["steps_per_epoch"]) >= 1
    assert tags["sweep_id"].startswith(str(cache_dir / "outputs"))
    assert len(tags["config_hash"]) == 16
    # Metrics: per epoch at step=epoch, the all-negative baseline beside accuracy, AUCs.
    for key in (
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "val_accuracy_all_negative",
        "val_roc_auc",
        "val_pr_auc",
    ):
        assert [m.step for m in client.get_metric_history(rid, key)] == [0, 1], key
    for key in ("test_loss", "test_accuracy", "test_accuracy_all_negative", "test_roc_auc", "test_pr_auc"):
        assert key in run.data.metrics, key
    # Artifacts: config, best checkpoint, per-tag table, plots.
    files = {a.path for a in client.list_artifacts(rid)} | {
        a.path for d in ("checkpoint", "plots") for a in client.list_artifacts(rid, d)
    }
    assert RUN_ARTIFACTS <= files
    local = client.download_artifacts(rid, "", str(tmp_path / "art"))
    assert yaml.safe_load(open(f"{local}/config.yaml"))["trainer"]["epochs"] == 2
    with open(f"{local}/per_tag_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["tag"] for r in rows] == list(TAGS) and set(rows[0]) == {"tag", "positives", "roc_auc", "pr_auc"}
    assert sum(int(r["positives"]) for r in rows) > 0
    assert open(f"{local}/plots/auc.png", "rb").read(4) == b"\x89PNG"
