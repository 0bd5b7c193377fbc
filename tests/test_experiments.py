"""The `experiment` group: every preset composes to the report's settings, works from any
working directory, and the report sweep yields four finished runs that mtt.compare reads."""

from __future__ import annotations

import re

import matplotlib.image
import pytest
from hydra.errors import MissingConfigException
from mlflow.tracking import MlflowClient

from mtt.analysis.compare import DEFAULT_METRICS, DPI, FIGURE_INCHES, compare
from mtt.core.paths import REPO_ROOT
from tests.helpers import TINY, compose_cfg, run_module, sweep_children

EXPERIMENTS = REPO_ROOT / "experiments"
REPORT = ["report/autopool", "report/prelim", "report/revised_steps", "report/three_blocks"]
# What the report did, per experiment (each preset's opening comment and docs/recipe-and-report.md "Reproducing the
# report" say where the values come from); the same keys are checked in MLflow.
COMMON = {
    "head.output": "softmax",
    "data.split": "report",
    "data.tags": "all",
    "data.drop_untagged": False,
    "stream.patches_per_clip": 1,
    "stream.mode": "with_replacement",  # the report's pescador mux, not the epoch mode
    "eval.patches_per_clip": 1,
    "trainer.batch_size": 32,
    "tracking.experiment": "report",
    "backbone.freeze": True,
    "head.bias_init": "zero",
    "trainer.patience": None,
    "trainer.lr_schedule": "none",
    "trainer.lr": 0.001,
}
EXPECTED = {
    "report/prelim": {**COMMON, "steps.policy": "declared", "head.blocks": 2, "pool.name": "gap", "trainer.epochs": 12},
    "report/revised_steps": {
        **COMMON,
        "steps.policy": "cached",
        "head.blocks": 2,
        "pool.name": "gap",
        "trainer.epochs": 12,
    },
    "report/three_blocks": {
        **COMMON,
        "steps.policy": "cached",
        "head.blocks": 3,
        "pool.name": "gap",
        "trainer.epochs": 5,
    },
    "report/autopool": {
        **COMMON,
        "steps.policy": "cached",
        "head.blocks": 2,
        "pool.name": "autopool",
        "trainer.epochs": 12,
    },
    "modern": {
        "head.output": "sigmoid",
        "data.tags": "top50",
        "data.split": "standard",
        "eval.patches_per_clip": None,
        "eval.aggregate": "mean",
        "tracking.experiment": "modern",
        "backbone.weights": "none",
    },
    # An Optuna search (tests/test_search.py runs it): AutoPool, so that its alpha can be searched.
    "search": {"pool.name": "autopool", "tracking.experiment": "search", "head.blocks": 2},
    # Won et al. 2020's recipe (the preset's header cites where each value comes from)
    "anchors/shortchunk_res": {
        "backbone.name": "shortchunk_res",
        "backbone.freeze": False,
        "features.name": "mel_db",
        "features.patch_frames": 231,
        "pool.name": "max",
        "head.name": "dense_bn",
        "head.width": 512,
        "head.dropout": 0.5,
        "trainer.batch_size": 16,
        "trainer.epochs": 200,
        "trainer.optimizer": "adam",
        "trainer.lr": 1e-4,
        "trainer.weight_decay": 1e-4,
        "trainer.lr_schedule": "phases",
        "trainer.nesterov": True,
        "trainer.monitor": "val_chunk_loss",  # their selection: mean chunk-level validation BCE
        "trainer.precision": "fp32",
        "trainer.patience": None,
        "head.bias_init": "default",  # PyTorch's initial bias, as theirs
        "eval.patches_per_clip": 16,
        "eval.spacing": "even",
        "eval.chunk_samples": 59049,
        "data.tags": "top50",
        "stream.mode": "epoch",  # every training clip once per epoch, at a random offset
        "steps.policy": "epoch",
    },
    "anchors/transfer_vs_scratch": {"tracking.experiment": "transfer_vs_scratch"},
    # its arms, swept by it: both scored over every chunk of the same top-50 test clips
    "anchors/arms/vggish_gap3": {
        "backbone.name": "vggish",
        "head.blocks": 3,
        "data.tags": "top50",
        "eval.patches_per_clip": None,
        "tracking.experiment": "transfer_vs_scratch",
    },
    "anchors/arms/shortchunk_res": {
        "backbone.name": "shortchunk_res",
        "trainer.batch_size": 16,
        "data.tags": "top50",
        "eval.patches_per_clip": None,
        "tracking.experiment": "transfer_vs_scratch",
    },
}
ARMS = [name for name in EXPECTED if name.startswith("anchors/arms/")]


def select(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def test_every_preset_file_is_an_option_and_checked():
    files = sorted(p.relative_to(EXPERIMENTS).with_suffix("").as_posix() for p in EXPERIMENTS.rglob("*.yaml"))
    assert files == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_composes_to_its_settings(name):
    cfg = compose_cfg([f"+experiment={name}"])
    for key, value in EXPECTED[name].items():
        assert select(cfg, key) == value, (name, key)


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - set(ARMS)))
def test_preset_opens_with_its_experiment_and_command(name):
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    header = text.split("\n\n")[0]
    assert re.search(rf"python -m mtt.run (-m )?\+experiment={name} ", header)  # a sweep preset runs with -m
    if name == "anchors/shortchunk_res":  # trained from scratch: no pretrained stack, real data
        assert "data=mtat" in header and ".9129" in header  # and the published figure
    else:  # the real run needs the pretrained stack (the sweep passes it to its VGGish arm only)
        assert "backbone.weights=audioset" in header or "MTT_TRANSFER_WEIGHTS=audioset" in header


@pytest.mark.parametrize("name", ARMS)
def test_an_arm_says_which_sweep_it_belongs_to_and_that_sweep_runs_it(name):
    header = (EXPERIMENTS / f"{name}.yaml").read_text().split("\n\n")[0]
    assert "One arm of anchors/transfer_vs_scratch" in header
    text = (EXPERIMENTS / "anchors/transfer_vs_scratch.yaml").read_text()
    assert re.search(rf"\+experiment/anchors/arms: .*\b{name.split('/')[-1]}\b", text)


def test_report_presets_state_valid_is_test():
    assert "valid == test" in (EXPERIMENTS / "report/prelim.yaml").read_text()
    cfg = compose_cfg(["+experiment=report/prelim"])
    assert cfg.data.split == "report"


def test_command_line_overrides_a_preset():
    cfg = compose_cfg(["+experiment=report/three_blocks", "trainer.epochs=2", "data=mtat", "data.root=/x"])
    assert cfg.trainer.epochs == 2 and cfg.head.blocks == 3
    assert cfg.data.tags == "all"  # the preset beats data=mtat's top50


def test_missing_preset_fails_naming_it():
    with pytest.raises(MissingConfigException, match="report/nope"):
        compose_cfg(["+experiment=report/nope"])


def test_presets_from_another_working_directory(tmp_path):
    """The group is found through the repository, not the cwd; a typo fails loudly."""
    ok = run_module(["mtt.run", "+experiment=report/three_blocks", "--cfg", "job"], cwd=tmp_path)
    assert re.search(r"^  blocks: 3$", ok.stdout, re.M) and re.search(r"^  epochs: 5$", ok.stdout, re.M)
    bad = run_module(["mtt.run", "+experiment=report/nope", "--cfg", "job"], cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "report/nope" in bad.stderr
    assert "report/prelim" in bad.stderr  # and lists what exists


@pytest.fixture(scope="module")
def report_sweep(tmp_path_factory, cache_dir):
    """The report sweep, run as a user would from a foreign cwd, on the tiny embedded data with
    every preset's own epochs (each epoch is one step here)."""
    work = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{work}/mlflow.db"
    tiny = [o for o in TINY if not o.startswith("trainer.epochs")]
    run_module(
        ["mtt.run", "-m", "+experiment=glob(report/*)", *tiny, f"paths.cache={cache_dir}"],
        env={"MLFLOW_TRACKING_URI": uri},
        cwd=work,
    )
    return work, uri


@pytest.mark.slow
def test_report_sweep_gives_four_finished_runs_with_the_reports_settings(report_sweep):
    _, uri = report_sweep
    client = MlflowClient(uri)
    runs = sweep_children(client, "report")
    by_name = {r.data.tags["choice.experiment"]: r for r in runs}
    assert sorted(by_name) == REPORT and {r.info.status for r in runs} == {"FINISHED"}
    for name, run in by_name.items():
        for key, value in EXPECTED[name].items():
            assert run.data.params[key] == str(value), (name, key)
        epochs = EXPECTED[name]["trainer.epochs"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_roc_auc")]
        assert steps == list(range(epochs)), name
    alpha = by_name["report/autopool"]
    assert "autopool_alpha.json" in [a.path for a in client.list_artifacts(alpha.info.run_id)]
    assert {"alpha_mean", "alpha_max"} <= set(alpha.data.metrics)
    assert "alpha_mean" not in by_name["report/prelim"].data.metrics


@pytest.mark.slow
def test_compare_reads_the_report_sweep(report_sweep):
    work, uri = report_sweep
    out = work / "curves.png"
    proc = run_module(["mtt.compare", "report", "--tracking-uri", uri, "--out", str(out)], cwd=work)
    lines = proc.stdout.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    rows = [line for line in lines[rule + 1 :] if line.startswith("experiment=")]
    assert len(rows) == 4 and str(out) in proc.stdout  # four presets: four groups of one seed each
    assert all(row.split()[1] == "1" and ("2xsof" in row or "3xsof" in row) for row in rows)
    assert sum("3xsof" in row for row in rows) == 1 and sum("autopool" in row for row in rows) == 1
    assert matplotlib.image.imread(out).shape[:2] == (FIGURE_INCHES[1] * DPI, FIGURE_INCHES[0] * DPI * 2)
    # The data the plot is built from: each run's logged history, one series per run.
    result = compare("report", DEFAULT_METRICS, work / "again.png", uri)
    client = MlflowClient(uri)
    for metric, by_group in result.series.items():
        assert len(by_group) == 4
        for group in result.groups:  # one seed each: the curve is that run's logged history
            logged = sorted((m.step, m.value) for m in client.get_metric_history(group.runs[0]["run_id"], metric))
            curve = by_group[group.label]
            assert (curve["steps"], curve["mean"]) == ([s for s, _ in logged], [v for _, v in logged])
            assert curve["low"] == curve["high"] == curve["mean"]
