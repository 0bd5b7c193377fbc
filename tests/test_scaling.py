"""Engines a lab outgrows one machine with: Hydra's submitit launcher (local executor here)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from mtt.run import run_name
from tests.helpers import TINY, run_module, sweep_children


def test_slurm_launcher_exposes_the_keys_a_lab_sets():
    from hydra import compose, initialize_config_dir

    from mtt.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu"
    assert (launcher.gpus_per_task, launcher.cpus_per_task, launcher.mem_gb) == (1, 8, 32)
    assert (launcher.timeout_min, launcher.array_parallelism) == (240, 16)


def test_run_names_leave_out_storage_and_display_overrides():
    assert (
        run_name(
            [
                "+head=autopool",
                "trainer.epochs=2",
                "paths.cache=/tmp/x",
                "tracking.uri=sqlite:///a.db",
                "trainer.progress=false",
            ]
        )
        == "head=autopool,epochs=2"
    )
    assert run_name([]) == "default"


@pytest.mark.slow
def test_submitit_local_sweep_into_a_new_store(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/new.db"  # does not exist yet
    run_module(
        [
            "mtt.run",
            "-m",
            "hydra/launcher=submitit_local",
            "+head=gap2,autopool",
            *TINY,
            "trainer.epochs=2",
            f"paths.cache={cache_dir}",
            f"tracking.uri={uri}",
            "tracking.experiment=cluster",
        ],
        cwd=tmp_path,
    )
    client = MlflowClient(uri)
    everywhere = client.search_runs([e.experiment_id for e in client.search_experiments()])
    runs = sweep_children(client, "cluster")  # submitit's jobs are children of the sweep's parent run
    assert len(runs) == 2 and len(everywhere) == 3
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["pool.name"] for r in runs) == ["autopool", "gap"]
    for r in runs:
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_roc_auc", "val_pr_auc"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [0, 1], key
