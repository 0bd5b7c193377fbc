"""mtt.compare on a small hand-logged MLflow store: table rows, PNG size, plotted data."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch
from mlflow.tracking import MlflowClient

from mtt.compare import DPI, FIGURE_INCHES, compare, default_png, main
from mtt.models.pooling import AutoPool, GlobalAveragePool, log_alphas
from mtt.tracking import MlflowTracker

HISTORY = {"a": [0.6, 0.7, 0.8], "b": [0.5, 0.55]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module: creating MLflow's sqlite schema takes seconds."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    for name, values in HISTORY.items():
        with MlflowTracker(uri, "exp", name) as t:
            t.log_params({"head": {"blocks": 2 if name == "a" else 3, "output": "softmax"}, "pool": {"name": "gap"},
                          "steps": {"policy": "cached"}, "trainer": {"epochs": len(values)},
                          "derived": {"steps_per_epoch": 7}})
            for step, v in enumerate(values):
                t.log_metrics({"val_roc_auc": v, "val_loss": 1 - v}, step=step)
            t.log_metrics({"test_accuracy": 0.98, "test_accuracy_all_negative": 0.981, "test_roc_auc": values[-1]},
                          step=len(values))
    with MlflowTracker(uri, "exp", "linear_probe", tags={"mtt.reference": "linear_probe"}) as t:
        t.log_metrics({"test_roc_auc": 0.9, "test_accuracy_all_negative": 0.981}, step=0)
    return uri


def test_compare_table_png_and_series(store, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert main(["exp", "--tracking-uri", store, "--out", str(out), "--metrics", "val_roc_auc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "status", "head"]
    rows = [line for line in lines if line.startswith(("a ", "b "))]
    assert [r.split()[0] for r in rows] == ["a", "b"]
    assert "3 blocks" in rows[1] and "cached (7/ep)" in rows[0] and "0.9810" in rows[0]
    # The reference comes after the trained runs, labelled, without the columns it has no use for.
    assert lines[-3].split()[:7] == ["linear_probe", "[reference]", "FINISHED", "-", "-", "-", "-"]
    assert "0.9000" in lines[-3]
    assert matplotlib.image.imread(out).shape[:2] == (FIGURE_INCHES[1] * DPI, FIGURE_INCHES[0] * DPI)
    result = compare("exp", ["val_roc_auc", "val_loss"], tmp_path / "two.png", store)
    assert result.series["val_roc_auc"] == {"a": ([0, 1, 2], HISTORY["a"]), "b": ([0, 1], HISTORY["b"])}
    assert result.series["val_loss"]["b"] == ([0, 1], [pytest.approx(0.5), pytest.approx(0.45)])
    assert matplotlib.image.imread(result.png).shape[:2] == (FIGURE_INCHES[1] * DPI, 2 * FIGURE_INCHES[0] * DPI)


def test_missing_experiment_is_named(store, capsys):
    assert main(["nope", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "exp" in err


def test_default_png_sits_next_to_the_store(tmp_path):
    assert default_png(f"sqlite:///{tmp_path}/m.db", "report/x") == tmp_path / "compare-report_x.png"


def test_autopool_alphas_are_logged(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    pool = AutoPool(4, constraint="cap", alpha_max=1.0)
    with torch.no_grad():
        pool.alpha.copy_(torch.tensor([0.5, -2.0, 3.0, 0.0]))
    pool.project_()  # as after an optimiser step
    with MlflowTracker(uri, "alpha", "r") as t:
        log_alphas(pool, t, step=3)
        log_alphas(GlobalAveragePool(), t, step=3)  # no alphas: nothing logged, no error
    run = MlflowClient(uri).get_run(t.run_id)
    assert run.data.metrics["alpha_max"] == 1.0 and run.data.metrics["alpha_min"] == -1.0
    assert run.data.metrics["alpha_mean"] == pytest.approx(0.125)
    path = MlflowClient(uri).download_artifacts(t.run_id, "autopool_alpha.json", str(tmp_path))
    saved = json.loads(open(path).read())
    assert saved["alpha"] == [0.5, -1.0, 1.0, 0.0] and saved["constraint"] == "cap" and saved["cap"] == 1.0
