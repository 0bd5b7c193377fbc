"""A run's MLflow status is true: FAILED (with the error) for an exception in training, FAILED
with a clear message when the loss blows up, KILLED for Ctrl-C (also during data preparation)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from mtt.tracking.journal import Journal
from mtt.tracking.runs import MlflowTracker, Stopped, stop_on_signals
from mtt.training.train import train
from tests.helpers import REPO_ROOT, TINY, compose_cfg


def _error_txt(client: MlflowClient, run_id: str, tmp_path) -> str:
    return open(client.download_artifacts(run_id, "error.txt", str(tmp_path))).read()


def test_exception_in_training_marks_the_run_failed(tiny_cfg, tmp_path, monkeypatch):
    cfg = compose_cfg(
        [*TINY, f"tracking.uri={tiny_cfg.tracking.uri}", "steps=fixed", "steps.n=3"], cache=tiny_cfg.paths.cache
    )
    calls = []
    real_step = torch.optim.Adam.step

    def failing_step(self, *args, **kwargs):  # the optimiser breaks at its second step
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected optimiser failure")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(RuntimeError, match="injected"):
        with MlflowTracker(cfg.tracking.uri, "unit", "fails") as tracker:
            train(cfg, tracker)
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: injected optimiser failure"
    assert "failing_step" in _error_txt(client, tracker.run_id, tmp_path)  # the full traceback


def test_exploding_loss_stops_the_run(tiny_cfg, tmp_path):
    # Adam moves every weight by ~lr per step: with lr=1e30 the logits overflow within steps.
    cfg = compose_cfg(
        [
            *TINY,
            f"tracking.uri={tiny_cfg.tracking.uri}",
            "trainer.lr=1e30",
            "trainer.epochs=3",
            "steps=fixed",
            "steps.n=10",
        ],
        cache=tiny_cfg.paths.cache,
    )
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at epoch 0"):
        with MlflowTracker(cfg.tracking.uri, "unit", "explodes") as tracker:
            train(cfg, tracker)
    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("FloatingPointError: loss is")
    assert "trainer.lr=1e+30 too high" in run.data.tags["error"]
    assert "val_loss" not in run.data.metrics  # it stopped before a single epoch was logged


def test_sigterm_ends_the_run_killed_and_puts_the_handler_back(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stopped:
        with stop_on_signals(), MlflowTracker(uri, "unit", "stopped", cache=tmp_path / "cache") as tracker:
            tracker.log_metrics({"val_loss": 1.0}, step=0)
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm, docker and `timeout` send
            time.sleep(30)  # the handler raises in here
    assert stopped.value.signum == signal.SIGTERM and str(stopped.value) == "stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.tags["killed_by"] == "SIGTERM"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "val_loss")] == [0]
    assert Journal(tracker.journal.folder).last_status() == "KILLED"


def test_a_stopped_entry_point_exits_with_one_line_and_the_signal_status(capsys):
    from mtt.run import cli

    def stopped():
        raise Stopped(signal.SIGTERM)

    with pytest.raises(SystemExit) as exited:
        cli(stopped, "mtt.run")
    assert exited.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "mtt.run: stopped by SIGTERM\n"


def test_nonfinite_inputs_are_named_with_their_files_not_blamed_on_the_lr(tiny_cfg, monkeypatch):
    """NaN in what the model reads (a damaged store) is the data's fault: the error names the
    store, the clips and their files, and how to rebuild it; not trainer.lr. Poisoned in memory
    (every training clip of the frozen backbone's cache, its row checksums taken from the poisoned
    rows as a store computed with NaN would carry them), so the shared cache stays clean."""
    import numpy as np

    import mtt.training.train
    from mtt.features.store import row_checksums

    real_prepare = mtt.training.train.prepare

    def poisoned(*args, **kwargs):
        p = real_prepare(*args, **kwargs)
        p.inputs.patches = np.array(p.inputs.patches)
        for c in p.train.clip_ids:
            p.inputs.patches[p.inputs.rows(c)] = np.nan
        p.inputs.checksums = row_checksums(p.inputs.patches)
        poisoned.p = p
        return p

    monkeypatch.setattr(mtt.training.train, "prepare", poisoned)
    cfg = compose_cfg(
        [*TINY, f"tracking.uri={tiny_cfg.tracking.uri}", "steps=fixed", "steps.n=3"], cache=tiny_cfg.paths.cache
    )
    with pytest.raises(FloatingPointError) as info:
        with MlflowTracker(cfg.tracking.uri, "unit", "nan inputs") as tracker:
            train(cfg, tracker)
    p, message = poisoned.p, str(info.value)
    first = int(p.train.clip_ids[0])
    row = list(p.index.clip_ids).index(first)
    assert message.startswith("non-finite input features (NaN or inf) at epoch 0 step 0, not the learning rate: ")
    assert f"{p.inputs.path} holds them for clip(s) (the first 5) {first} ({p.index.audio_path(row)})" in message
    assert "delete it to have it rebuilt" in message and "trainer.lr" not in message
    assert p.inputs.path != p.store.path  # the cache was named, the clean feature store was not
    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("FloatingPointError: non-finite input")


# A run long enough to be stopped during an epoch: 6 epochs of 40 tiny steps.
SIX_EPOCHS = [*TINY[:-1], "trainer.device=cpu", "trainer.epochs=6", "steps=fixed", "steps.n=40"]


def start_run(args: list[str], uri: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen(
        [sys.executable, "-m", "mtt.run", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_run(proc: subprocess.Popen, uri: str, experiment: str, points: int | None, timeout: float = 120) -> str:
    """Poll the store until the experiment has a run (with ``points`` val_loss points); its id."""
    client = MlflowClient(uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
        try:
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id]) if exp else []
        except Exception:  # the store is still being created by the subprocess
            runs = []
        if runs and (points is None or len(client.get_metric_history(runs[0].info.run_id, "val_loss")) >= points):
            return runs[0].info.run_id
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no run in {experiment!r} with {points} val_loss points after {timeout} s")


@pytest.mark.slow
def test_ctrl_c_during_training_marks_the_run_killed(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/m.db"
    proc = start_run(
        [
            *TINY[:-1],
            "trainer.device=cpu",
            "trainer.epochs=200",
            "steps=fixed",
            "steps.n=5",
            f"paths.cache={cache_dir}",
            "tracking.experiment=sigint",
        ],
        uri,
    )
    run_id = wait_for_run(proc, uri, "sigint", points=1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert 1 <= len(MlflowClient(uri).get_metric_history(run_id, "val_loss")) < 200


@pytest.mark.slow
def test_ctrl_c_during_data_preparation_is_killed_and_leaves_nothing_corrupt(tmp_path):
    # A fresh cache: the features are computed inside the run, for seconds (the dataset itself is
    # generated before the run exists: its index is read first, mtt.training.preflight).
    cache = tmp_path / "cache"
    data = [
        "data.synth.clips_per_folder=6",
        "data.synth.seconds=4.0",
        *TINY[2:-1],
        "trainer.device=cpu",
        f"paths.cache={cache}",
        "tracking.experiment=prep",
    ]
    uri = f"sqlite:///{tmp_path}/m.db"
    proc = start_run(data, uri)
    run_id = wait_for_run(proc, uri, "prep", points=None)
    # Interrupt once the feature store is being built (its first shards are written): data
    # preparation is under way, and 96 clips leave seconds to spare.
    deadline = time.monotonic() + 120
    while not list(cache.glob("features/*/shards/*")):
        assert proc.poll() is None and time.monotonic() < deadline, "no data preparation seen"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert "train_loss" not in client.get_run(run_id).data.metrics, "SIGINT came after data preparation"
    # The same command again completes on what the interrupted one left behind.
    proc = start_run(data, uri)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("prep").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]


@pytest.mark.slow
def test_sigterm_during_an_epoch_ends_the_run_killed_and_resume_continues_it(tmp_path, cache_dir):
    """What Slurm, docker and `timeout` send: the run ends KILLED with the epochs it finished (its
    checkpoint and journal), the process says so in one line with status 143, and
    trainer.resume=true continues the same run."""
    from mtt.tracking.checkpoint import last_epoch, run_dir

    uri = f"sqlite:///{tmp_path}/m.db"
    args = [*SIX_EPOCHS, f"paths.cache={cache_dir}"]
    proc = start_run([*args, "tracking.experiment=sigterm"], uri)
    run_id = wait_for_run(proc, uri, "sigterm", points=1)  # epoch 0 is in: epoch 1 is under way
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    stderr = proc.stderr.read()
    assert stderr.strip().splitlines()[-1] == "mtt.run: stopped by SIGTERM" and "Traceback" not in stderr
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["killed_by"] == "SIGTERM"
    done = last_epoch(run_dir(cache_dir, run_id))
    assert done < 5 and [m.step for m in client.get_metric_history(run_id, "val_loss")] == list(range(done + 1))

    resumed = start_run([*args, "tracking.experiment=sigterm", "trainer.resume=true"], uri)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("sigterm").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    assert "killed_by" not in run.data.tags
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == [0, 1, 2, 3, 4, 5]
