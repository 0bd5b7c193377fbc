"""Seeds as a sweep axis: one parent MLflow run per sweep, a child per job with its intervals and
predictions, and mtt.compare grouping the seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mtt.tracking.records import PREDICTIONS, load_predictions
from tests.helpers import TINY, run_module, sweep_children


def test_two_sweeps_in_the_same_second_get_their_own_folders_and_sweep_ids(tmp_path):
    """The sweep id is the sweep's folder: two sweeps started in the same second shared it (one
    parent run, one set of job folders overwritten by the other). (Single runs' folders carry
    microseconds: tests/test_config.py.)"""
    from datetime import datetime

    from hydra import compose, initialize_config_dir
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    from mtt.config import CONF_DIR, register_configs

    register_configs()  # the schema and mtt's resolver

    second = datetime(2026, 5, 4, 12, 0, 0)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            OmegaConf.register_new_resolver("now", second.strftime, use_cache=True, replace=True)
            launches = [
                compose(config_name="config", overrides=[f"paths.cache={tmp_path}"], return_hydra_config=True)
                for _ in range(3)
            ]
            job = compose(config_name="config", overrides=[f"paths.cache={tmp_path}"], return_hydra_config=True)
    finally:
        setup_globals()  # Hydra's own `now` again
    sweeps = [str(c.hydra.sweep.dir) for c in launches]
    assert all(d.startswith(f"{tmp_path}/multirun/2026-05-04/12-00-00-") for d in sweeps), sweeps
    assert len(set(sweeps)) == 3
    # A job's config gets the launch's resolved values as Hydra gives them (it copies the launch
    # config's resolver cache into each job's): every job of a sweep has its sweep's folder.
    OmegaConf.copy_cache(from_config=launches[1], to_config=job)
    assert str(job.hydra.sweep.dir) == sweeps[1]


CI = ["test_roc_auc_ci95_low", "test_roc_auc_ci95_high", "test_pr_auc_ci95_low", "test_pr_auc_ci95_high"]


@pytest.mark.slow
def test_two_heads_three_seeds_parent_children_and_groups(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/x.db"
    run_module(
        [
            "mtt.run",
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "+head=gap2,autopool",
            "trainer.seed=0,1,2",
            *TINY,
            "trainer.epochs=2",
            f"paths.cache={cache_dir}",
            "tracking.experiment=seeds",
        ],
        env={"MLFLOW_TRACKING_URI": uri},
        cwd=tmp_path,
    )
    client = MlflowClient(uri)
    children = sweep_children(client, "seeds")
    assert len(children) == 6 and {r.info.status for r in children} == {"FINISHED"}
    for r in children:
        m = r.data.metrics
        assert m["test_roc_auc_ci95_low"] <= m["test_roc_auc"] <= m["test_roc_auc_ci95_high"]
        assert set(CI) <= set(m)
        preds = load_predictions(client.download_artifacts(r.info.run_id, PREDICTIONS, str(tmp_path / r.info.run_id)))
        assert preds.probabilities.shape == (len(preds.clip_ids), len(preds.tags)) == preds.labels.shape
        assert int(r.data.tags["test_clips"]) == len(preds.clip_ids)
    # Runs that differ only in the seed share a group.
    groups = {}
    for r in children:
        groups.setdefault(r.data.tags["mtt.group"], []).append(r)
    assert sorted(len(g) for g in groups.values()) == [3, 3]
    for g in groups.values():
        assert sorted(r.data.params["trainer.seed"] for r in g) == ["0", "1", "2"]
        assert len({r.data.tags["mtt.group_name"] for r in g}) == 1 and "seed" not in g[0].data.tags["mtt.group_name"]

    proc = run_module(
        ["mtt.compare", "seeds", "--tracking-uri", uri, "--format", "json", "--out", str(tmp_path / "c.png")]
    )
    out = json.loads(proc.stdout)
    assert [g["n"] for g in out["groups"]] == [3, 3]
    for g in out["groups"]:
        runs = groups[g["id"]]
        assert g["metrics"]["test_roc_auc"]["mean"] == pytest.approx(
            np.mean([r.data.metrics["test_roc_auc"] for r in runs])
        )
    (pair_roc, pair_pr) = out["pairs"]  # the other group against the best
    assert pair_roc["metric"] == "test_roc_auc" and pair_roc["ci95"][0] <= pair_roc["ci95"][1]

    # The parent carries the sweep and, now that it ended, the same grouped summary.
    (parent,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("seeds").experiment_id])
        if r.data.tags.get("mtt.sweep") == "true"
    ]
    assert parent.data.params["sweep.overrides"].startswith("+head=gap2,autopool trainer.seed=0,1,2")
    summary = json.load(open(client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))))
    assert sorted(g["n"] for g in summary["groups"]) == [3, 3]
    name = summary["groups"][0]["name"].replace("=", ":").replace(",", " ")
    assert parent.data.metrics[f"{name}/test_roc_auc_mean"] == pytest.approx(
        summary["groups"][0]["metrics"]["test_roc_auc"]["mean"]
    )
    assert parent.data.metrics[f"{name}/test_roc_auc_n"] == 3


@pytest.mark.slow
def test_a_failed_job_ends_the_parent_failed_with_what_finished(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/x.db"
    # lr=1e30 blows the loss up: that job fails (and with it the sweep), the other finishes.
    proc = run_module(
        [
            "mtt.run",
            "-m",
            "trainer.lr=1e-3,1e30",
            *TINY,
            "steps=fixed",
            "steps.n=10",
            f"paths.cache={cache_dir}",
            "tracking.experiment=broken",
        ],
        env={"MLFLOW_TRACKING_URI": uri},
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    client = MlflowClient(uri)
    children = sweep_children(client, "broken", status="FAILED")
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    (parent,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("broken").experiment_id])
        if r.data.tags.get("mtt.sweep") == "true"
    ]
    summary = json.load(open(client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))))
    assert [g["n"] for g in summary["groups"]] == [1]


def test_the_launch_hook_pickles_while_it_holds_the_signal_handlers():
    """Hydra's joblib launcher pickles the callbacks into its workers after on_multirun_start,
    which holds the launching process's stop-signal handlers."""
    import pickle
    import signal

    from mtt.analysis.sweeps import PrepareTracking
    from mtt.tracking.runs import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    hook = PrepareTracking()
    hook._signals.enter_context(stop_on_signals())  # what on_multirun_start does
    try:
        assert isinstance(pickle.loads(pickle.dumps(hook)), PrepareTracking)
    finally:
        hook._signals.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_value_drawn_from_the_jobs_hydra_config_still_ends_the_sweep_parent(tmp_path, monkeypatch):
    """``tracking.run_name=head-${hydra:runtime.choices.head}`` cannot be resolved in the launching
    process (no job's Hydra config yet): the launch hook's value check used to raise there, Hydra
    turned that into a warning, the hook never recorded its sweep and the parent run stayed
    RUNNING. The value is the job's to check; the hook prepares and ends the sweep."""
    import sys

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from mtt.analysis.sweeps import PrepareTracking
    from mtt.config import CONF_DIR, register_configs
    from mtt.tracking.runs import sweep_parent

    register_configs()  # the schema and mtt's resolver
    uri = f"sqlite:///{tmp_path}/m.db"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose(
            config_name="config",
            overrides=[
                f"paths.cache={tmp_path}",
                f"tracking.uri={uri}",
                "tracking.experiment=ui",
                "tracking.run_name=head-${hydra:runtime.choices.head}",
            ],
            return_hydra_config=True,
        )
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # the launching process has none
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # on_multirun_start wraps it
    hook = PrepareTracking()
    hook.on_multirun_start(config)
    parent = sweep_parent(uri, "ui", str(config.hydra.sweep.dir))  # what the first job does
    hook.on_multirun_end(config)
    assert MlflowClient(uri).get_run(parent).info.status == "FINISHED"


def test_in_a_job_the_value_is_checked_as_it_resolves(monkeypatch):
    """What the launch leaves to the job is checked there: resolved, or refused when it cannot be."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import InterpolationResolutionError

    from mtt.config import CONF_DIR, complete, config_errors, register_configs

    register_configs()  # the schema and mtt's resolver

    def job(run_name: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            config = compose(
                config_name="config", overrides=[f"tracking.run_name={run_name}"], return_hydra_config=True
            )
        monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
        HydraConfig.instance().set_config(config)  # what Hydra does before a job's task
        return complete(config)  # what mtt's entry points do then (hydra_entry)

    long = "x" * 250
    assert config_errors(job(long + "-${hydra:runtime.choices.backbone}")) == [
        f"tracking.run_name={'x' * 40}... (257 characters): expected a name of at most 250 characters, or null"
    ]
    with pytest.raises(InterpolationResolutionError):
        config_errors(job("${no.such.key}"))
