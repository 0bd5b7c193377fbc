"""A real `mlflow server` with a database backend, two jobs logging to it at once, and a clear
early error for a server that is not there."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mtt.core.paths import REPO_ROOT
from tests.helpers import TINY, run_module
from tests.helpers.http_server import free_port, wait_until_answering
from tests.helpers.mlflow_server import MlflowServer


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free loopback port, sqlite backend, served artifacts; stopped after."""
    with MlflowServer(tmp_path) as server:
        yield server.uri


@contextlib.contextmanager
def make_server(state: Path, **variables: str):
    """``make mlflow-server`` as the README runs it (a free loopback port, its files under
    ``state``), in a process group of its own; yields its URI; stopped by that group's id."""
    port = free_port()
    args = [f"{k}={v}" for k, v in {"SERVER_PORT": port, "SERVER_STATE": state, **variables}.items()]
    proc = subprocess.Popen(
        ["make", "-C", str(REPO_ROOT), "mlflow-server", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(uri + "/health", proc, 120, lambda: proc.stderr.read().decode())
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_server_anyone_can_reach_without_login_is_warned_about():
    from mtt.tracking.server import exposure_warning

    for host in ("0.0.0.0", "10.1.2.3", "mlflow.lab", "::"):
        warning = exposure_warning(host, None)
        assert "without authentication" in warning and "SERVER_AUTH=basic" in warning
        assert exposure_warning(host, "basic") is None
    assert all(exposure_warning(h, None) is None for h in ("127.0.0.1", "127.0.1.1", "localhost", "::1"))


def test_basic_auth_config_and_secret_are_written_once(tmp_path, monkeypatch):
    from mtt.tracking.server import parse_args, server_command

    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY", raising=False)
    args = parse_args(["--db", "sqlite:///x.db", "--artifacts", "a", "--auth", "basic", "--state", str(tmp_path)])
    cmd, env = server_command(args)
    assert cmd[-2:] == ["--app-name", "basic-auth"]
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert "default_permission = EDIT" in config and f"sqlite:///{tmp_path.resolve()}/basic_auth.db" in config
    assert (tmp_path / "flask_secret_key").stat().st_mode & 0o077 == 0  # the owner's alone
    assert server_command(args)[1]["MLFLOW_FLASK_SERVER_SECRET_KEY"] == env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    plain, _ = server_command(parse_args(["--db", "sqlite:///x.db", "--artifacts", "a"]))
    assert "--app-name" not in plain


@pytest.mark.slow
def test_basic_auth_server_refuses_anonymous_runs_and_records_signed_in_ones(tmp_path, cache_dir, monkeypatch):
    """make mlflow-server SERVER_AUTH=basic: a run without a login fails before any work, naming
    the variables to set; with the admin's login it is recorded."""
    password = "a-long-admin-password"
    run = [*TINY, f"paths.cache={cache_dir}", "tracking.experiment=locked"]
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", password)  # the admin's, on the first start
    with make_server(tmp_path / "state", SERVER_AUTH="basic") as uri:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(uri + "/api/2.0/mlflow/experiments/search?max_results=5", timeout=10)
        assert refused.value.code == 401
        anonymous = run_module(["mtt.run", *run], env={"MLFLOW_TRACKING_URI": uri}, check=False)
        assert anonymous.returncode != 0
        assert "MLFLOW_TRACKING_USERNAME" in anonymous.stderr and uri in anonymous.stderr, anonymous.stderr[-3000:]
        # One line from the launch hook, not a warning followed by the job's 401 traceback.
        (line,) = anonymous.stderr.strip().splitlines()
        assert line.startswith("error: ") and "HTTP 401" in line and anonymous.returncode == 1
        login = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        run_module(["mtt.run", *run], env={"MLFLOW_TRACKING_URI": uri, **login})
        for key, value in login.items():
            monkeypatch.setenv(key, value)
        client = MlflowClient(uri)
        (found,) = client.search_runs([client.get_experiment_by_name("locked").experiment_id])
    assert found.info.status == "FINISHED" and "test_roc_auc" in found.data.metrics


EPOCH_METRICS = [
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_accuracy_all_negative",
    "val_roc_auc",
    "val_pr_auc",
    "lr",
]
FINAL_METRICS = [
    "test_loss",
    "test_accuracy",
    "test_accuracy_all_negative",
    "test_roc_auc",
    "test_pr_auc",
    "best_epoch",
    "epochs_trained",
]
ARTIFACTS = {
    "config.yaml",
    "per_tag_test.csv",
    "plots/loss.png",
    "plots/accuracy.png",
    "plots/auc.png",
    "checkpoint/best.safetensors",
    "checkpoint/best.json",
}


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, folder):
        out |= artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def two_parallel_jobs_are_recorded(uri: str, cache_dir: Path, tmp_path: Path) -> list:
    """Two 2-epoch ``mtt.run`` jobs at once against the server at ``uri``; checks every run,
    metric point and artifact through the server, and returns the runs."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": uri}
    # Build the shared dataset and features once, so the two jobs only race on the server.
    run_module(["mtt.preprocess", *TINY[:2], f"paths.cache={cache_dir}"])
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mtt.run",
                f"+head={head}",
                *TINY,
                "trainer.epochs=2",
                "trainer.patience=null",
                f"paths.cache={cache_dir}",
                "tracking.experiment=team",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for head in ("gap2", "autopool")
    ]
    for job in jobs:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("team").experiment_id])
    assert sorted(r.data.params["pool.name"] for r in runs) == ["autopool", "gap"]
    for run in runs:
        rid = run.info.run_id
        assert run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(rid, key)] == [0, 1], key
        for key in FINAL_METRICS:
            assert [m.step for m in client.get_metric_history(rid, key)] == [2], key
        assert ARTIFACTS <= artifact_paths(client, rid)
        # The artifact went through the server and comes back byte for byte.
        best = client.download_artifacts(rid, "checkpoint/best.safetensors", str(tmp_path / rid))
        assert Path(best).read_bytes() == (cache_dir / "checkpoints" / rid / "best.safetensors").read_bytes()
    return runs


@pytest.mark.slow
def test_two_jobs_log_to_a_shared_server(mlflow_server, cache_dir, tmp_path):
    two_parallel_jobs_are_recorded(mlflow_server, cache_dir, tmp_path)


def postgres_bin() -> Path:
    """The folder of the PostgreSQL server programs (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail(
            "PostgreSQL's server programs are not installed (Debian: apt-get install postgresql; .ci/run provisions it)"
        )
    return Path(initdb).resolve().parent


@pytest.fixture
def postgres():
    """A PostgreSQL server of this test's own: a cluster initialised in a temporary folder, on a
    free loopback port, with a database ``mlflow``; yields its port and stops the server by its
    process id. PostgreSQL refuses to run as root, so under root it runs as the ``postgres`` user."""
    import psycopg

    bin_dir, port = postgres_bin(), free_port()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="mtt-pg-"))  # not under pytest's root-only tmp_path
    data = folder / "data"
    if as_user:
        shutil.chown(folder, "postgres")
    init = subprocess.run(
        [
            *as_user,
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, f"initdb failed ({init.returncode}): {init.stdout[-1500:]} {init.stderr[-1500:]}"
    server = subprocess.Popen(
        [
            *as_user,
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(folder),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    pid = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
                    conn.execute("CREATE DATABASE mlflow")
                break
            except psycopg.OperationalError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[-3000:]
                time.sleep(0.2)
        pid = int((data / "postmaster.pid").read_text().split()[0])  # the server itself, not runuser
        yield port
    finally:
        if pid is None and (data / "postmaster.pid").exists():
            pid = int((data / "postmaster.pid").read_text().split()[0])
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        server.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_lab_server_on_postgresql(postgres, tmp_path, cache_dir):
    """README's lab server on a real PostgreSQL: make mlflow-server SERVER_DB=postgresql://... (which
    stopped at "No module named 'psycopg'" before the driver was in the lock),
    two jobs at once; every run and metric point is in the database, every artifact is served."""
    import psycopg

    db = f"postgresql://postgres@127.0.0.1:{postgres}/mlflow"
    with make_server(tmp_path / "state", SERVER_DB=db) as uri:
        runs = two_parallel_jobs_are_recorded(uri, cache_dir, tmp_path)
        client = MlflowClient(uri)
        served = {
            run.info.run_id: sorted(
                (m.key, m.step, m.value)
                for key in run.data.metrics
                for m in client.get_metric_history(run.info.run_id, key)
            )
            for run in runs
        }
    with psycopg.connect(db) as conn:
        assert {row[0] for row in conn.execute("SELECT run_uuid FROM runs")} == set(served)
        for run_id, points in served.items():  # what the server answered is what PostgreSQL holds
            stored = conn.execute("SELECT key, step, value FROM metrics WHERE run_uuid = %s", (run_id,)).fetchall()
            assert sorted(stored) == points and len(points) >= 2 * 8 + 7


@pytest.mark.parametrize("mode", [[], ["-m"]], ids=["run", "sweep"])
def test_a_store_the_launch_cannot_prepare_ends_it_in_one_line(tmp_path, mode):
    """Hydra turns an exception in a launch callback into a warning and starts the jobs anyway:
    the launch hook itself ends the launch, with the reason on one line."""
    uri = f"http://127.0.0.1:{free_port()}"
    proc = run_module(
        ["mtt.run", *mode, f"paths.cache={tmp_path}"], env={"MLFLOW_TRACKING_URI": uri}, check=False, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: MLflow tracking server {uri} is not reachable ([Errno 111] Connection refused); start it "
        "(make mlflow-server) or set tracking.uri / MLFLOW_TRACKING_URI"
    ]
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_unreachable_server_fails_early_naming_it(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run_module(
        ["mtt.run", f"paths.cache={tmp_path}"], env={"MLFLOW_TRACKING_URI": uri}, check=False, timeout=120
    )
    assert proc.returncode != 0 and time.monotonic() - start < 30
    assert uri in proc.stderr and "not reachable" in proc.stderr
    assert not (tmp_path / "toy-v1").exists() and not (tmp_path / "features").exists()
