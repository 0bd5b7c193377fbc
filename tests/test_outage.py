"""Issue 16: a tracking server that goes down in the middle of a run never stops the training.

A real `mlflow server` is killed after the run's first epoch reaches it, for longer than the
MLflow client's retry budget (set short here, as the env vars allow); the training goes on
into its journal. The server comes back before the run ends (the run ships everything itself),
or after it (the run exits 0 naming `mtt.sync`, which ships it), or the training is killed
during the outage (`mtt.sync` ships what it journaled, `trainer.resume=true` continues it). In
every case the run ends up with exactly the metric points (steps, values) of a run without
the outage, its artifacts and its true status.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO_ROOT, RUN_ARTIFACTS, TINY, run_module
from tests.helpers.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

# steps.n=200: an epoch takes ~2 s, time enough to kill the server between two epochs.
ARGS = [
    *TINY[:-1],
    "trainer.device=cpu",
    "trainer.epochs=4",
    "trainer.deterministic=true",
    "steps=fixed",
    "steps.n=200",
]
# The client gives up on a dead server after ~1 s (default: 7 retries, minutes).
SHORT_BUDGET = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="module")
def reference(server, cache_dir) -> dict:
    """Every metric history of the same run without an outage: {key: [(step, value)]}."""
    run_module(
        ["mtt.run", *ARGS, f"paths.cache={cache_dir}", "tracking.experiment=reference"],
        env={"MLFLOW_TRACKING_URI": server.uri},
    )
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("reference").experiment_id])
    return histories(client, run.info.run_id)


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
        for k in client.get_run(run_id).data.metrics
    }


def artifacts(client: MlflowClient, run_id: str) -> set[str]:
    top = client.list_artifacts(run_id)
    return {a.path for a in top if not a.is_dir} | {
        b.path for a in top if a.is_dir for b in client.list_artifacts(run_id, a.path)
    }


def start(args: list[str], uri: str, log: Path) -> subprocess.Popen:
    env = {"PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": uri, **SHORT_BUDGET}
    return subprocess.Popen(
        [sys.executable, "-m", "mtt.run", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )


def wait(condition, proc: subprocess.Popen | None, what: str, timeout: float = 180):
    """Poll ``condition()`` until it returns something truthy (failing early if ``proc`` ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"training ended ({proc.returncode}) while waiting for {what}")
        try:
            got = condition()
        except Exception:  # the store or the file is not there yet
            got = None
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def first_epoch_then_outage(server: MlflowServer, proc: subprocess.Popen, experiment: str, cache: Path):
    """Wait until epoch 0 is in the store, kill the server, wait until the training journaled
    epoch 1 without it; returns (run id, journal path)."""
    client = MlflowClient(server.uri)

    def epoch0():
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        return runs and client.get_metric_history(runs[0].info.run_id, "val_loss") and runs[0].info.run_id

    run_id = wait(epoch0, proc, "epoch 0 in the store")
    server.stop()
    journal = cache / "checkpoints" / run_id / "journal.jsonl"
    wait(lambda: 1 in journaled_steps(journal), proc, "epoch 1 in the journal")
    # The outage really began before epoch 1: the server's own database has epoch 0 alone.
    assert [m.step for m in MlflowClient(server.backend).get_metric_history(run_id, "val_loss")] == [0]
    return run_id, journal


def journaled_steps(journal: Path) -> list[int]:
    steps = []
    for line in journal.read_text().splitlines():
        entry = json.loads(line)
        steps += [m["step"] for m in entry.get("metrics", ()) if m["key"] == "val_loss"]
    return steps


def test_server_back_before_the_run_ends(server, reference, cache_dir, tmp_path):
    server.start()
    proc = start(
        [*ARGS, f"paths.cache={cache_dir}", "tracking.experiment=back-early"], server.uri, tmp_path / "out.log"
    )
    run_id, _ = first_epoch_then_outage(server, proc, "back-early", cache_dir)
    server.start()
    assert proc.wait(timeout=300) == 0, (tmp_path / "out.log").read_text()[-3000:]
    out = (tmp_path / "out.log").read_text()
    assert "unreachable" in out and "mtt.sync" not in out  # it failed over, then shipped it all itself
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert histories(client, run_id) == reference
    assert artifacts(client, run_id) >= RUN_ARTIFACTS


def test_server_back_after_the_run_ends_then_sync(server, reference, cache_dir, tmp_path):
    server.start()
    proc = start(
        [*ARGS, f"paths.cache={cache_dir}", "tracking.experiment=back-late", "tracking.flush_timeout_s=2"],
        server.uri,
        tmp_path / "out.log",
    )
    run_id, journal = first_epoch_then_outage(server, proc, "back-late", cache_dir)
    assert proc.wait(timeout=300) == 0  # training succeeded: the outage is no failure
    out = (tmp_path / "out.log").read_text()
    (line,) = [x for x in out.splitlines() if "mtt.sync" in x]  # one line: where and how
    assert str(journal) in line
    command = re.search(r"ship it with: (python -m mtt\.sync .*)$", line).group(1).split()
    assert command == ["python", "-m", "mtt.sync", "--tracking-uri", server.uri, str(journal.parent)]
    assert MlflowClient(server.backend).get_run(run_id).info.status == "RUNNING"  # not shipped yet

    server.start()
    first = run_module(command[2:])
    assert f"shipped run {run_id}" in first.stdout and "status FINISHED" in first.stdout
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert histories(client, run_id) == reference
    assert artifacts(client, run_id) >= RUN_ARTIFACTS
    before = record(client, run_id)

    second = run_module(command[2:])  # changes nothing
    assert "0 shipped, 1 already shipped" in second.stdout
    assert record(client, run_id) == before


def record(client: MlflowClient, run_id: str) -> tuple:
    """A run as a second sync could change it: every point with its timestamp, params, tags, status."""
    run = client.get_run(run_id)
    points = {
        k: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k))
        for k in run.data.metrics
    }
    return points, run.data.params, run.data.tags, run.info.status, run.info.end_time, artifacts(client, run_id)


def test_killed_during_the_outage_sync_then_resume(server, reference, cache_dir, tmp_path):
    server.start()
    args = [*ARGS, f"paths.cache={cache_dir}", "tracking.experiment=killed"]
    proc = start(args, server.uri, tmp_path / "out.log")
    run_id, journal = first_epoch_then_outage(server, proc, "killed", cache_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    last = max(journaled_steps(journal))

    server.start()
    sync = run_module(["mtt.sync", str(journal.parent)])  # the journal knows its store
    assert "no final status" in sync.stdout
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # killed hard: resumable
    val_loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_loss"))
    assert val_loss == reference["val_loss"][: last + 1]  # everything up to its last epoch

    run_module(["mtt.run", *args, "trainer.resume=true"], env={"MLFLOW_TRACKING_URI": server.uri, **SHORT_BUDGET})
    runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # continued, not a second run
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["resumes"] == "1"
    assert histories(client, run_id) == reference
    assert artifacts(client, run_id) >= RUN_ARTIFACTS
