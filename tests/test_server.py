"""A real `mlflow server` with a database backend, two jobs logging to it at once, and a clear
early error for a server that is not there."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, run_module
from tests.http_server import free_port
from tests.mlflow_server import MlflowServer
from mtt.config import REPO_ROOT


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free loopback port, sqlite backend, served artifacts; stopped after."""
    with MlflowServer(tmp_path) as server:
        yield server.uri


@pytest.mark.slow
def test_two_jobs_log_to_a_shared_server(mlflow_server, cache_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": mlflow_server}
    # Build the shared dataset and features once, so the two jobs only race on the server.
    run_module(["mtt.preprocess", *TINY[:2], f"paths.cache={cache_dir}"])
    jobs = [subprocess.Popen([sys.executable, "-m", "mtt.run", f"+head={head}", *TINY, "trainer.epochs=2",
                              f"paths.cache={cache_dir}", "tracking.experiment=team"],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for head in ("gap2", "autopool")]
    for job in jobs:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("team").experiment_id])
    assert sorted(r.data.params["pool.name"] for r in runs) == ["autopool", "gap"]
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_loss", "val_roc_auc"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1]
        assert "test_roc_auc" in run.data.metrics
        assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
        assert {"checkpoint/best.safetensors", "checkpoint/best.json"} <= \
            {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}


@pytest.mark.slow
def test_unreachable_server_fails_early_naming_it(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run_module(["mtt.run", f"paths.cache={tmp_path}"], env={"MLFLOW_TRACKING_URI": uri}, check=False,
                      timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 30
    assert uri in proc.stderr and "not reachable" in proc.stderr
    assert not (tmp_path / "toy-v1").exists() and not (tmp_path / "features").exists()
