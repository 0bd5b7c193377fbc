"""torchrun with two CPU processes (Gloo): one MLflow run, disjoint shards, exact evaluation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from mtt.core.paths import REPO_ROOT
from mtt.data.datasets import index_from_config
from mtt.features.preprocess import build_feature_store
from mtt.models import build_model
from mtt.tracking.runs import download_artifacts
from mtt.training.backbone_cache import build_backbone_cache, cache_key
from mtt.training.train import clip_metrics, clip_probabilities, split_of
from tests.helpers import TINY, compose_cfg
from tests.helpers.http_server import free_port

EPOCH_METRICS = ["train_loss", "train_accuracy", "train_clip_coverage", "train_draws_per_clip"]
EPOCH_METRICS += ["val_loss", "val_chunk_loss", "val_accuracy", "val_roc_auc", "val_pr_auc"]


def descendants(pid: int) -> list[int]:
    """The ids of every living process below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/ddp.db"
    overrides = [*TINY, "trainer.epochs=3", f"paths.cache={cache_dir}", "tracking.experiment=ddp"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "mtt.run", *overrides],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, "only rank 0 may create a run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["derived.world_size"] == "2"
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2], key

    # The ranks' training clips are disjoint and together are the training split.
    cfg = compose_cfg([*TINY, "trainer.epochs=3"], cache=cache_dir)
    index = index_from_config(cfg.data, progress=False)
    store = build_feature_store(index, cfg.features, progress=False)
    shards = json.loads((tmp_path / download_artifacts(uri, run.info.run_id, "ddp_shards.json", tmp_path)).read_text())
    a, b = set(shards["0"]), set(shards["1"])
    assert a and b and not a & b
    assert a | b == set(split_of(index, store, "train").clip_ids.tolist())

    # The logged test metrics equal a single-process evaluation of the saved checkpoint.
    best = download_artifacts(uri, run.info.run_id, "checkpoint/best.safetensors", tmp_path)
    model = build_model(cfg, len(index.tags))
    model.load_state_dict(load_file(best))
    model.backbone.to(memory_format=torch.channels_last)  # as the run laid it out: the same cache key
    cache = build_backbone_cache(
        store,
        model.encode,
        cache_key(store, None, cfg.backbone, model.backbone),
        f"{cache_dir}/backbone",
        torch.device("cpu"),
        progress=False,
    )
    cpu = torch.device("cpu")
    for split, step in (("test", None), ("valid", int(run.data.metrics["best_epoch"]))):
        # test_*: of the best checkpoint; val_* at the best epoch: of the same weights. Both were
        # computed by two ranks, each on half the clips: with BatchNorm statistics that differ
        # between ranks they would not equal one process's evaluation of rank 0's checkpoint.
        clips = split_of(index, store, split)
        single = clip_metrics(clips.labels, clip_probabilities(model, cache, clips, cfg, cpu, True, None))
        prefix = "test" if split == "test" else "val"
        for key, value in single.items():
            if np.isnan(value):
                continue
            logged = (
                run.data.metrics[f"test_{key}"]
                if step is None
                else {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"val_{key}")}[step]
            )
            assert logged == pytest.approx(value, abs=1e-5), f"{prefix}_{key}"


@pytest.mark.slow
def test_torchrun_epoch_mode_draws_every_training_clip_once_per_epoch(tmp_path, cache_dir):
    """stream.mode=epoch under torchrun: each rank passes over its own shard of the 24 training
    clips in batches of 5 (batch 10 over 2 ranks), ceil(24 / 10) = 3 steps on both (5, 5, 2 each),
    and the coverage logged is the ranks' together: every clip exactly once per epoch."""
    uri = f"sqlite:///{tmp_path}/epoch.db"
    overrides = [*TINY, "trainer.epochs=2", "stream.mode=epoch", "steps=epoch", "trainer.batch_size=10"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "mtt.run", *overrides],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": uri, "MTT_CACHE": str(cache_dir)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["derived.train_clips"] == "24" and run.data.params["derived.steps_per_epoch"] == "3"
    for key in ("train_clip_coverage", "train_draws_per_clip"):
        assert [m.value for m in client.get_metric_history(run.info.run_id, key)] == [1.0, 1.0], key


@pytest.mark.slow
def test_torchrun_run_resumes_after_sigkill(tmp_path, cache_dir):
    """A torchrun job killed after two epochs continues into the same run under torchrun."""
    import time

    uri = f"sqlite:///{tmp_path}/resume.db"
    args = [
        *TINY,
        "trainer.epochs=4",
        "trainer.deterministic=true",
        "steps=fixed",
        "steps.n=40",
        f"paths.cache={cache_dir}",
        "tracking.experiment=ddp-resume",
    ]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": uri}

    def launch(*extra):
        return subprocess.Popen(
            [torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "mtt.run", *args, *extra],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    client = MlflowClient(uri)
    proc, run_id, deadline = launch(), None, time.monotonic() + 300
    while run_id is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:] if proc.poll() else ""
        exp = None
        try:
            exp = client.get_experiment_by_name("ddp-resume")
            runs = client.search_runs([exp.experiment_id]) if exp else []
        except Exception:  # the store is still being created
            runs = []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "val_loss")) >= 2:
            run_id = runs[0].info.run_id
        time.sleep(0.1)
    # torchrun starts its ranks in sessions of their own, so its process group does not hold
    # them: kill torchrun and every process it started, by id, at once, as a node failure or
    # `scancel --signal=KILL` would. Nothing else on the machine is touched.
    job = [proc.pid, *descendants(proc.pid)]
    assert len(job) >= 3, "torchrun and its two ranks"
    for pid in job:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert client.get_run(run_id).info.status == "RUNNING"

    again = launch("trainer.resume=true")
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("ddp-resume").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["resumes"] == "1"
    for key in EPOCH_METRICS:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 1, 2, 3], key
