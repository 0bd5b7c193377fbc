"""Checkpoints round-trip exactly, and a training killed with SIGKILL resumes into the same MLflow
run: one point per epoch, and the same final numbers as an uninterrupted run."""

from __future__ import annotations

import random
import signal

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_status import SIX_EPOCHS, start_run, wait_for_run

from mtt.tracking.checkpoint import TrainState, config_hash, load_last, resume_choice, save_last
from mtt.tracking.runs import MlflowTracker
from tests.helpers import TINY, compose_cfg, run_module


def test_last_checkpoint_restores_model_optimiser_and_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = TrainState(
        epoch=4,
        best_score=0.5,
        best_epoch=3,
        history={"val_loss": [1.0, 0.5]},
        last_metrics={"val_loss": 0.5},
        last_timestamp=123,
    )
    save_last(tmp_path, model, opt, state)
    expected = torch.rand(2), np.random.rand(2), random.random()
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed into place

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    restored = load_last(tmp_path, fresh, fresh_opt)
    assert restored == state
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    got = torch.rand(2), np.random.rand(2), random.random()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_config_hash_ignores_resume_and_progress_only(cache_dir):
    base = compose_cfg(TINY, cache=cache_dir)
    assert config_hash(base) == config_hash(
        compose_cfg([*TINY, "trainer.resume=true", "trainer.progress=true"], cache=cache_dir)
    )
    assert config_hash(base) != config_hash(compose_cfg([*TINY, "trainer.lr=0.5"], cache=cache_dir))
    assert [resume_choice(v) for v in (None, False, "false", True, "true", "abc123")] == [
        None,
        None,
        None,
        "latest",
        "latest",
        "abc123",
    ]


def test_a_resumed_run_drops_its_error_tag_and_logs_a_step_once(tmp_path):
    """A run that failed after logging its test metrics, resumed: FINISHED without the old error,
    one point per metric and step (the first: what the store had)."""
    uri, cache = f"sqlite:///{tmp_path}/m.db", tmp_path / "cache"
    with pytest.raises(RuntimeError):
        with MlflowTracker(uri, "r", "failed", cache=cache) as first:
            first.log_metrics({"test_roc_auc": 0.5}, step=3)
            raise RuntimeError("disk full")
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).data.tags["error"] == "RuntimeError: disk full"
    with MlflowTracker(uri, "r", "failed", resume_run_id=first.run_id, cache=cache) as again:
        again.log_metrics({"test_roc_auc": 0.6, "test_pr_auc": 0.4}, step=3)  # the test phase again
        again.log_metrics({"test_roc_auc": 0.7}, step=4)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    assert "error" not in run.data.tags and "killed_by" not in run.data.tags
    history = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "test_roc_auc"))
    assert history == [(3, 0.5), (4, 0.7)]
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "test_pr_auc")] == [(3, 0.4)]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_continues_the_same_run(tmp_path, cache_dir, workers):
    """With and without DataLoader workers (whose loader must not draw from the restored RNG)."""
    uri = f"sqlite:///{tmp_path}/m.db"
    args = [
        *TINY[:-1],
        "trainer.device=cpu",
        "trainer.epochs=4",
        "trainer.deterministic=true",
        "steps=fixed",
        "steps.n=40",
        f"stream.num_workers={workers}",
        f"paths.cache={cache_dir}",
    ]
    # The reference: the same config, uninterrupted (its own experiment).
    run_module(["mtt.run", *args, "tracking.experiment=reference"], env={"MLFLOW_TRACKING_URI": uri})
    client = MlflowClient(uri)
    reference = client.search_runs([client.get_experiment_by_name("reference").experiment_id])[0]

    proc = start_run([*args, "tracking.experiment=resumed"], uri)
    run_id = wait_for_run(proc, uri, "resumed", points=2)
    assert proc.poll() is None, "the training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could mark it

    run_module(
        ["mtt.run", *args, "tracking.experiment=resumed", "trainer.resume=true"], env={"MLFLOW_TRACKING_URI": uri}
    )
    runs = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # no second run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    for key in ("val_loss", "train_loss", "val_roc_auc"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [0, 1, 2, 3], key
        ref = {m.step: m.value for m in client.get_metric_history(reference.info.run_id, key)}
        assert {m.step: m.value for m in history} == ref, key
    finals = {k: v for k, v in reference.data.metrics.items() if k.startswith("test_")}
    assert finals and {k: run.data.metrics[k] for k in finals} == finals


@pytest.mark.slow
def test_sigkill_then_close_stale_ends_the_run_killed_with_its_last_epoch(tmp_path, cache_dir):
    """kill -9 leaves a run RUNNING; `mtt.sync --close-stale` sees its process gone and ends it
    KILLED with the epochs it finished; trainer.resume=true continues it."""
    from mtt.tracking.checkpoint import last_epoch, run_dir

    uri = f"sqlite:///{tmp_path}/m.db"
    args = [*SIX_EPOCHS, f"paths.cache={cache_dir}"]
    proc = start_run([*args, "tracking.experiment=stale"], uri)
    run_id = wait_for_run(proc, uri, "stale", points=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could mark it
    folder = run_dir(cache_dir, run_id)

    closed = run_module(["mtt.sync", "--close-stale", str(folder)])
    done = last_epoch(folder)
    assert f"closed run {run_id} " in closed.stdout and f"is gone; KILLED after epoch {done};" in closed.stdout
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "is gone" in run.data.tags["killed_by"]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == list(range(done + 1))
    again = run_module(["mtt.sync", "--close-stale", str(folder)])  # nothing left to close or ship
    assert "0 closed as KILLED, 0 shipped, 1 already shipped" in again.stdout

    run_module(["mtt.run", *args, "tracking.experiment=stale", "trainer.resume=true"], env={"MLFLOW_TRACKING_URI": uri})
    (run,) = client.search_runs([client.get_experiment_by_name("stale").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == [0, 1, 2, 3, 4, 5]
