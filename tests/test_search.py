"""Optuna searches (``hydra/sweeper=optuna``, mtt/analysis/search.py) as a user runs them:
``python -m mtt.run -m +experiment=search`` on the tiny data, read back from the study's
database and the MLflow store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient

from mtt.core.paths import REPO_ROOT
from tests.helpers import TINY, run_module, sweep_children

# 3 epochs without early stopping: the best epoch need not be the last.
SEARCH = [
    "-m",
    "+experiment=search",
    *TINY[:-3],
    "trainer.epochs=3",
    "trainer.patience=null",
    "trainer.progress=false",
    "trainer.device=cpu",
]


def study_of(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="search-search", storage=f"sqlite:///{tmp_path}/optuna.db")


def by_params(trial: optuna.trial.FrozenTrial, runs: list) -> object:
    """The finished child run that trial ran: the one whose params are the trial's."""
    (run,) = [
        r
        for r in runs
        if r.info.status == "FINISHED"
        and all(float(r.data.params[k]) == pytest.approx(float(v), rel=1e-12) for k, v in trial.params.items())
    ]
    return run


def check_study_against_runs(tmp_path, study: optuna.Study, runs: list) -> None:
    """Every complete trial's value is its run's best-epoch val_roc_auc; the best trial is the best run."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in complete:
        run = by_params(t, runs)
        history = [m.value for m in client.get_metric_history(run.info.run_id, "val_roc_auc")]
        assert len(history) == 3
        assert t.value == pytest.approx(max(history)) == pytest.approx(run.data.metrics["selected_val_roc_auc"])
    best_run = max(
        (r for r in runs if r.info.status == "FINISHED"), key=lambda r: r.data.metrics["selected_val_roc_auc"]
    )
    assert study.best_value == pytest.approx(best_run.data.metrics["selected_val_roc_auc"])
    assert by_params(study.best_trial, runs).data.metrics["selected_val_roc_auc"] == pytest.approx(study.best_value)


@pytest.mark.slow
def test_search_makes_its_trials_children_and_the_study_best_is_the_best_run(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_module(
        ["mtt.run", *SEARCH, "hydra.sweeper.n_trials=4", f"paths.cache={cache_dir}"], env={"MLFLOW_TRACKING_URI": uri}
    )
    runs = sweep_children(MlflowClient(uri), "search")  # one parent, FINISHED, every run its child
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.params["pool.name"] == "autopool" for r in runs)
    study = study_of(tmp_path)  # beside the MLflow store
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    searched = {"trainer.lr", "head.dropout", "head.blocks", "pool.alpha_init"}  # head.width: fixed by TINY
    assert all(set(t.params) == searched for t in study.trials)
    assert len({t.params["trainer.lr"] for t in study.trials}) == 4
    check_study_against_runs(tmp_path, study, runs)


@pytest.mark.slow
def test_an_interrupted_search_resumes_under_the_same_parent(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["mtt.run", *SEARCH, "hydra.sweeper.n_trials=3", f"paths.cache={cache_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": uri}
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = MlflowClient(uri)

    def progress() -> tuple[list[str], list[str]]:
        try:
            trials = [t.state.name for t in study_of(tmp_path).trials]
            exp = client.get_experiment_by_name("search")
            runs = client.search_runs([exp.experiment_id], "tags.mlflow.parentRunId LIKE '%'") if exp else []
        except Exception:  # noqa: BLE001 - the study or the store does not exist yet
            return [], []
        return trials, sorted(r.info.status for r in runs)

    deadline = time.monotonic() + 300
    state = ([], [])
    while time.monotonic() < deadline and proc.poll() is None:  # Ctrl-C while trial 1 trains
        state = progress()
        if state == (["COMPLETE", "RUNNING"], ["FINISHED", "RUNNING"]):
            break
        time.sleep(0.1)
    assert state == (["COMPLETE", "RUNNING"], ["FINISHED", "RUNNING"]), (
        state,
        (tmp_path / "first.log").read_text()[-3000:],
    )
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    log.close()
    interrupted = study_of(tmp_path).trials[1]
    assert interrupted.state == optuna.trial.TrialState.RUNNING  # as the interrupted process left it

    run_module(args, env={"MLFLOW_TRACKING_URI": uri})  # the same command again
    study = study_of(tmp_path)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # 3 finished + the interrupted one
    assert study.trials[2].params == interrupted.params  # asked again, as it was
    assert study.trials[3].params != study.trials[0].params  # a resumed sampler draws new points
    runs = sweep_children(MlflowClient(uri), "search")  # still one parent, FINISHED again
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3 + ["KILLED"]
    check_study_against_runs(tmp_path, study, runs)
