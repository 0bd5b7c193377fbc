"""Parallel sweeps into one sqlite store: nothing fails, nothing is lost, nothing is misfiled."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from mtt.tracking.runs import MlflowTracker, prepare_store, sweep_targets
from mtt.training.train import train
from tests.helpers import TINY, compose_cfg, run_module, sweep_children

HEADS = ["gap2", "gap3", "autopool", "autopool3"]
EPOCH_METRICS = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_roc_auc", "val_pr_auc"]


def test_prepare_store_creates_the_schema_and_experiment_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/new.db"
    exp_id = prepare_store(uri, "fresh")
    assert prepare_store(uri, "fresh") == exp_id  # idempotent
    assert MlflowClient(uri).get_experiment_by_name("fresh").experiment_id == exp_id


def test_sweep_targets_cover_swept_tracking_values(cache_dir):
    cfg = compose_cfg(["tracking.experiment=e1"], cache=cache_dir)
    assert sweep_targets(cfg.tracking, ["+head=gap2,gap3", "tracking.experiment=e1"]) == [(None, "e1")]
    assert sweep_targets(cfg.tracking, ["tracking.experiment=a,b", "tracking.uri=sqlite:///x.db"]) == [
        (None, "a"),
        (None, "b"),
    ]


@pytest.mark.slow
def test_four_parallel_jobs_into_a_new_store_three_times(tmp_path, cache_dir):
    common = [
        *TINY[:-3],
        "trainer.epochs=2",
        "trainer.progress=false",
        "trainer.device=cpu",
        f"paths.cache={cache_dir}",
    ]
    # Build the tiny dataset, feature store and backbone cache once, so the jobs measure the
    # tracking store (concurrent builders are safe too: they serialise on a lock).
    warm = compose_cfg(
        [*common, f"tracking.uri=sqlite:///{tmp_path}/warm.db", "steps.policy=fixed", "steps.n=1", "trainer.epochs=1"]
    )
    with MlflowTracker(warm.tracking.uri, "warm") as tracker:
        train(warm, tracker)
    for attempt in range(3):
        uri = f"sqlite:///{tmp_path}/store{attempt}.db"  # does not exist yet
        experiment = f"parallel-{attempt}"
        run_module(
            [
                "mtt.run",
                "-m",
                "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=4",
                f"+head={','.join(HEADS)}",
                *common,
                f"tracking.uri={uri}",
                f"tracking.experiment={experiment}",
            ]
        )
        client = MlflowClient(uri)
        everywhere = client.search_runs([e.experiment_id for e in client.search_experiments()])
        runs = sweep_children(client, experiment)  # and the sweep's one parent run
        assert len(everywhere) == len(runs) + 1 == 5, f"attempt {attempt}: runs misfiled or lost"
        assert {r.info.status for r in runs} == {"FINISHED"}
        assert sorted(r.data.tags["choice.head"] for r in runs) == sorted(HEADS)
        for r in runs:
            for key in EPOCH_METRICS:
                assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [0, 1], (attempt, key)
            assert "test_roc_auc" in r.data.metrics
