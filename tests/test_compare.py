"""mtt.compare on a hand-logged MLflow store: groups of seeds, intervals, paired verdicts, the
protocol guard, output formats and plotted curves."""

from __future__ import annotations

import json
import os
import stat

import matplotlib.image
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from mtt.analysis.compare import DPI, FIGURE_INCHES, compare, default_png, main
from mtt.metrics.tagging import tagging_metrics
from mtt.models.pooling import AutoPool, GlobalAveragePool, call_hook
from mtt.tracking.records import PREDICTIONS, digest_test_set, save_predictions
from mtt.tracking.runs import MlflowTracker

CLIPS = np.arange(100, 400, dtype=np.int64)  # 300 test clips
RNG = np.random.default_rng(0)
LABELS = (RNG.random((len(CLIPS), 5)) < 0.2).astype(np.uint8)
SIGNAL = LABELS.astype(int) * 2 - 1
TAGS = ("a", "b", "c", "d", "e")


def _probs(strength: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(size=LABELS.shape)
    return 1 / (1 + np.exp(-(strength * SIGNAL + noise)))


def log_run(
    uri,
    experiment,
    group,
    seed,
    probs,
    tmp_path,
    tags_set="all",
    reference=None,
    config=None,
    val=None,
    feature_store="fs1",
    test_digest=None,
    split="standard",
    patches=None,
    spacing="random",
):
    """A finished run as mtt.run logs one: group tags, protocol params/tags, curves, test metrics
    and test_predictions.npz. ``split="report"``: validated on its test clips (tag selection=last)."""
    tags = {
        "mtt.group": group,
        "mtt.group_name": f"head={group}",
        "config_hash": config or f"{group}-{seed}",
        "feature_store": feature_store,
        "test_clips_sha256": test_digest or digest_test_set(CLIPS, LABELS),
        "selection": "last" if split == "report" else "best_val",
    }
    if reference:
        tags["mtt.reference"] = reference
    with MlflowTracker(uri, experiment, f"head={group},seed={seed}", tags=tags) as t:
        t.log_params(
            {
                "head": {"blocks": 2, "output": "sigmoid"},
                "pool": {"name": "gap"},
                "steps": {"policy": "patches"},
                "trainer": {"epochs": 3, "seed": seed},
                "data": {"split": split, "tags": tags_set, "drop_untagged": True},
                "eval": {"aggregate": "mean", "patches_per_clip": patches, "spacing": spacing},
            }
        )
        curve = val or [0.6 + 0.1 * e + 0.01 * seed for e in range(3)]
        for step, v in enumerate(curve):
            t.log_metrics({"val_roc_auc": v, "val_loss": 1 - v}, step=step)
        m = {f"test_{k}": v for k, v in tagging_metrics(LABELS, probs).items()}
        t.log_metrics(
            {
                **m,
                "selected_val_roc_auc": max(curve),
                "best_epoch": int(np.argmax(curve)),
                "epochs_trained": len(curve),
            },
            step=3,
        )
        path = save_predictions(tmp_path / f"{t.run_id}.npz", CLIPS, TAGS, probs, LABELS)
        t.log_artifact(path.rename(path.with_name(PREDICTIONS)))
        path.with_name(PREDICTIONS).unlink()
    return t.run_id, m


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Groups good (3 seeds), same (the very same predictions as good), weak (3 seeds) and a
    reference; creating MLflow's sqlite schema takes seconds, so one store for the module."""
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    logged = {}
    for seed in range(3):
        good = _probs(2.0, seed)
        logged.setdefault("good", []).append(log_run(uri, "exp", "good", seed, good, tmp)[1])
        logged.setdefault("same", []).append(log_run(uri, "exp", "same", seed, good, tmp, val=[0.5, 0.55, 0.5])[1])
        logged.setdefault("weak", []).append(
            log_run(uri, "exp", "weak", seed, _probs(0.6, 10 + seed), tmp, val=[0.5, 0.52, 0.51])[1]
        )
    log_run(uri, "exp", "probe", 0, _probs(1.0, 20), tmp, reference="linear_probe", val=[0.7])
    return uri, logged


def _json(args, capsys):
    assert main([*args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_groups_have_n_mean_std_and_intervals(store, capsys):
    uri, logged = store
    out = _json(["exp", "--tracking-uri", uri, "--out", "/dev/null"], capsys)
    groups = {g["name"]: g for g in out["groups"]}
    assert list(groups) == ["head=good", "head=same", "head=weak", "head=probe"]
    assert out["test_clips"] == len(CLIPS) and out["resamples"] == 1000
    for name in ("good", "same", "weak"):
        g = groups[f"head={name}"]["metrics"]["test_roc_auc"]
        values = [m["test_roc_auc"] for m in logged[name]]
        assert (
            g["n"] == 3
            and g["mean"] == pytest.approx(np.mean(values))
            and g["std"] == pytest.approx(np.std(values, ddof=1))
        )
        assert g["ci95"][0] < g["mean"] < g["ci95"][1] and g["ci_kind"] == "clips and seeds"
    assert groups["head=probe"]["reference"] == "linear_probe" and groups["head=probe"]["n"] == 1
    probe = groups["head=probe"]["metrics"]["test_roc_auc"]  # one seed: no interval over seeds
    assert probe["ci95"] is None and probe["ci_kind"] == "none: 1 seed, seed variation unknown"
    # The best group is chosen by validation (good: 0.82), never by a test metric.
    assert out["best"] == "head=good"


def test_default_pairs_against_the_best_with_verdicts(store, capsys):
    uri, _ = store
    out = _json(["exp", "--tracking-uri", uri, "--out", "/dev/null"], capsys)
    verdicts = {(p["a"], p["metric"]): p for p in out["pairs"]}
    weak = verdicts[("head=weak", "test_roc_auc")]
    assert weak["b"] == "head=good" and weak["verdict"] == "B better" and weak["ci95"][1] < 0
    assert weak["reads"] == "head=good better" and weak["seeds"] == [3, 3] and weak["seeds_needed_estimate"] is None
    same = verdicts[("head=same", "test_roc_auc")]  # identical predictions: a zero difference
    assert same["diff"] == 0 and same["verdict"] == "not distinguishable" and same["ci95"][0] < 0 < same["ci95"][1]
    assert ("head=good", "test_roc_auc") not in verdicts  # not against itself
    probe = verdicts[("head=probe", "test_roc_auc")]  # one seed: no verdict
    assert probe["verdict"] == "seed variation unknown" and probe["ci95"] is None


def test_chosen_pair(store, capsys):
    uri, _ = store
    out = _json(["exp", "--tracking-uri", uri, "--out", "/dev/null", "--pair", "head=weak", "head=same"], capsys)
    assert [(p["a"], p["b"], p["metric"]) for p in out["pairs"]] == [
        ("head=weak", "head=same", "test_roc_auc"),
        ("head=weak", "head=same", "test_pr_auc"),
    ]
    assert all(p["verdict"] == "B better" and p["reads"] == "head=same better" for p in out["pairs"])
    assert main(["exp", "--tracking-uri", uri, "--pair", "head=nope", "head=same"]) == 2
    assert "head=nope" in capsys.readouterr().err


def test_text_markdown_and_latex_tables(store, tmp_path, capsys):
    uri, _ = store
    assert main(["exp", "--tracking-uri", uri, "--out", str(tmp_path / "c.png")]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("head=good "))
    assert row.split()[1] == "3" and "±" in row and "[" in row
    assert "head=probe [reference]" in text
    assert "4 groups, 10 runs (1 to 3 seed(s) per group); test set: 300 clips shared by every run" in text
    assert "head=weak - head=good = -" in text and ": head=good better" in text
    assert "(test_roc_auc): seed variation unknown; run at least 3 seeds per group (or pass --seed-sd)" in text
    assert main(["exp", "--tracking-uri", uri, "--out", str(tmp_path / "c.png"), "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert md.splitlines()[0].startswith("| group | n |") and "| head=good | 3 |" in md and "| verdict |" in md
    assert main(["exp", "--tracking-uri", uri, "--out", str(tmp_path / "c.png"), "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert tex.startswith(r"\begin{table}") and r"head=good & 3 &" in tex and r"$\pm$" in tex


def test_curves_are_means_over_seeds_with_a_band(store, tmp_path):
    uri, _ = store
    c = compare("exp", ["val_roc_auc", "val_loss"], tmp_path / "two.png", uri)
    good = c.series["val_roc_auc"]["head=good"]
    assert good["steps"] == [0, 1, 2] and good["n"] == [3, 3, 3]
    assert good["mean"] == pytest.approx([0.61, 0.71, 0.81]) and good["low"] == pytest.approx([0.6, 0.7, 0.8])
    assert good["high"] == pytest.approx([0.62, 0.72, 0.82])
    assert c.series["val_roc_auc"]["head=probe [reference]"]["reference"] is True
    assert matplotlib.image.imread(c.png).shape[:2] == (FIGURE_INCHES[1] * DPI, 2 * FIGURE_INCHES[0] * DPI)


def test_mixed_tag_sets_are_refused_naming_the_key(store, tmp_path, capsys):
    uri, _ = store
    log_run(uri, "mixed", "x", 0, _probs(1.0, 30), tmp_path, tags_set="all")
    log_run(uri, "mixed", "y", 0, _probs(1.0, 31), tmp_path, tags_set="top50")
    assert main(["mixed", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "data.tags" in err and "all vs top50" in err and "--allow-mixed" in err
    assert main(["mixed", "--tracking-uri", uri, "--allow-mixed", "--out", str(tmp_path / "m.png")]) == 0
    text = capsys.readouterr().out
    assert "* evaluated under another protocol: data.tags: all vs top50" in text


def test_front_ends_are_compared_on_the_same_test_clips_but_not_on_others(store, tmp_path, capsys):
    """Transfer versus scratch: two backbones with their own front ends (two feature stores) are
    one protocol when split, tags and the scored test clips are equal; another test set is not."""
    uri, _ = store
    for seed in range(3):
        log_run(uri, "fronts", "vggish", seed, _probs(2.0, 50 + seed), tmp_path, feature_store="logmel-store")
        log_run(uri, "fronts", "shortchunk", seed, _probs(1.0, 60 + seed), tmp_path, feature_store="meldb-store")
    out = _json(["fronts", "--tracking-uri", uri, "--out", "/dev/null"], capsys)
    assert sorted((g["name"], g["n"]) for g in out["groups"]) == [("head=shortchunk", 3), ("head=vggish", 3)]
    assert out["mixed_protocol"] == {}
    other = digest_test_set(CLIPS[:-1], LABELS[:-1])  # one test clip fewer
    log_run(uri, "fronts", "subset", 0, _probs(1.0, 70), tmp_path, feature_store="meldb-store", test_digest=other)
    assert main(["fronts", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "test_clips_sha256" in err and "--allow-mixed" in err


def test_out_dev_null_stays_a_device(store, capsys):
    """``--out /dev/null`` (as these tests pass) must not rename a PNG onto it: run as root that
    replaced the machine's /dev/null with a regular file."""
    uri, _ = store
    assert main(["exp", "--tracking-uri", uri, "--out", os.devnull]) == 0
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_a_rerun_of_the_same_config_and_seed_counts_once(store, tmp_path, capsys):
    uri, _ = store
    first = log_run(uri, "again", "g", 0, _probs(1.0, 40), tmp_path, config="same-config")[1]
    second = log_run(uri, "again", "g", 0, _probs(2.0, 41), tmp_path, config="same-config")[1]
    out = _json(["again", "--tracking-uri", uri, "--out", "/dev/null"], capsys)
    (g,) = out["groups"]
    assert g["n"] == 1 and g["metrics"]["test_roc_auc"]["mean"] == pytest.approx(second["test_roc_auc"])
    assert first["test_roc_auc"] != second["test_roc_auc"]


def test_missing_experiment_is_named(store, capsys):
    uri, _ = store
    assert main(["nope", "--tracking-uri", uri]) == 2
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
        call_hook(pool, "log_end", t, step=3)
        call_hook(GlobalAveragePool(), "log_end", t, step=3)  # no alphas: nothing logged, no error
    run = MlflowClient(uri).get_run(t.run_id)
    assert run.data.metrics["alpha_max"] == 1.0 and run.data.metrics["alpha_min"] == -1.0
    assert run.data.metrics["alpha_mean"] == pytest.approx(0.125)
    path = MlflowClient(uri).download_artifacts(t.run_id, "autopool_alpha.json", str(tmp_path))
    saved = json.loads(open(path).read())
    assert saved["alpha"] == [0.5, -1.0, 1.0, 0.0] and saved["constraint"] == "cap" and saved["cap"] == 1.0


def test_a_groups_runs_are_in_seed_order_whatever_order_they_ended_in():
    """Parallel jobs end in any order; the seeds' bootstrap draws follow the runs' order, so a
    group lists its runs by seed (a rerun of one seed after the older one) for intervals that do
    not change from one identical sweep to the next."""
    from mtt.analysis.compare import group_runs

    def run(run_id, seed, group="g"):
        return {
            "run_id": run_id,
            "name": run_id,
            "reference": None,
            "params": {"trainer.seed": str(seed)},
            "tags": {"mtt.group": group, "mtt.group_name": group},
        }

    ended = [run("c", 2), run("a", 0), run("other", 5, "h"), run("b", 1), run("a2", 0)]
    groups = group_runs(ended)
    assert [g.name for g in groups] == ["g", "h"]
    assert [r["run_id"] for r in groups[0].runs] == ["a", "a2", "b", "c"]


def test_the_best_group_is_the_best_by_validation_whatever_the_test_order(store, tmp_path, capsys):
    """Groups whose validation and test orders differ: the best group, and so the default pairs
    and the group --register draws from, follow validation (ranking by a test metric would pick
    the other one)."""
    uri, _ = store
    for seed in range(2):
        log_run(uri, "ranks", "valwin", seed, _probs(0.8, 80 + seed), tmp_path, val=[0.6, 0.9, 0.85])
        log_run(uri, "ranks", "testwin", seed, _probs(2.0, 90 + seed), tmp_path, val=[0.6, 0.7, 0.65])
    out = _json(["ranks", "--tracking-uri", uri, "--out", "/dev/null"], capsys)
    tests = {g["name"]: g["metrics"]["test_roc_auc"]["mean"] for g in out["groups"]}
    assert tests["head=testwin"] > tests["head=valwin"] + 0.05  # the test order is the other one
    assert out["best"] == "head=valwin" and out["ranked"] is True
    assert {(p["a"], p["b"]) for p in out["pairs"]} == {("head=testwin", "head=valwin")}


def _report_runs(uri, tmp_path):
    for seed in range(2):
        log_run(uri, "onreport", "r1", seed, _probs(1.5, 100 + seed), tmp_path, split="report", val=[0.7, 0.9, 0.8])
        log_run(uri, "onreport", "r2", seed, _probs(1.0, 110 + seed), tmp_path, split="report", val=[0.6, 0.7, 0.8])


def test_runs_validated_on_their_test_clips_are_not_ranked(store, tmp_path, capsys):
    """The report split validates on its test clips: a "selected" validation score is a test
    score, so nothing is ranked by it: no best group, no default pairs, no (selected) column."""
    from mtt.analysis.compare import build, format_text, table_rows

    uri, _ = store
    _report_runs(uri, tmp_path)
    out = _json(["onreport", "--tracking-uri", uri, "--out", "/dev/null"], capsys)
    assert out["best"] is None and out["ranked"] is False and out["pairs"] == []
    assert all("selected_val_roc_auc" not in g["metrics"] and "test_roc_auc" in g["metrics"] for g in out["groups"])
    c = build("onreport", uri)
    assert [row[6] for row in table_rows(c)] == ["-", "-"]  # val_roc_auc (selected)
    assert "no best group: the runs validate on their test clips (data.split=report)" in format_text(c)
    named = _json(["onreport", "--tracking-uri", uri, "--out", "/dev/null", "--pair", "head=r1", "head=r2"], capsys)
    assert [(p["a"], p["b"]) for p in named["pairs"]] == [("head=r1", "head=r2")] * 2


def test_register_refuses_on_the_report_split_in_one_line(store, tmp_path, capsys):
    uri, _ = store
    _report_runs(uri, tmp_path)
    assert main(["onreport", "--register", "tagger", "--tracking-uri", uri, "--out", "/dev/null"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("error: --register: the runs of 'onreport' validate on their test clips")
    assert MlflowClient(uri).search_registered_models() == []


def test_eval_spacing_is_part_of_the_protocol_where_patches_are_chosen(store, tmp_path, capsys):
    uri, _ = store
    log_run(uri, "spacing", "even", 0, _probs(1.0, 120), tmp_path, patches=4, spacing="even")
    log_run(uri, "spacing", "random", 0, _probs(1.0, 121), tmp_path, patches=4, spacing="random")
    assert main(["spacing", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "eval.spacing is even vs random" in err and "--allow-mixed" in err
    log_run(uri, "patches", "two", 0, _probs(1.0, 122), tmp_path, patches=2)
    log_run(uri, "patches", "four", 0, _probs(1.0, 123), tmp_path, patches=4)
    assert main(["patches", "--tracking-uri", uri]) == 2
    assert "eval.patches_per_clip is 2 vs 4" in capsys.readouterr().err
    # Every patch scored: the spacing chooses nothing, the runs are comparable.
    log_run(uri, "every", "even", 0, _probs(1.0, 124), tmp_path, spacing="even")
    log_run(uri, "every", "random", 0, _probs(1.0, 125), tmp_path, spacing="random")
    assert _json(["every", "--tracking-uri", uri, "--out", "/dev/null"], capsys)["mixed_protocol"] == {}


def test_intervals_are_mtt_stats_on_resamples_shared_by_every_run(store, capsys):
    """compare scores every run on the SAME resamples of the shared clips: its group intervals
    and pairs are exactly mtt.metrics.stats' on the logged predictions (a run with resamples of its own
    would drop the clips' shared effect from every interval), and pairing is what makes the
    difference's interval narrow: correlated predictions, a clip term far below the groups'."""
    from mtt.metrics.stats import group_estimate, paired_difference

    uri, _ = store
    out = _json(["exp", "--tracking-uri", uri, "--out", "/dev/null", "--pair", "head=weak", "head=good"], capsys)
    good = np.stack([_probs(2.0, seed) for seed in range(3)])
    weak = np.stack([_probs(0.6, 10 + seed) for seed in range(3)])
    groups = {g["name"]: g["metrics"] for g in out["groups"]}
    for name, scores in (("head=good", good), ("head=weak", weak)):
        e = group_estimate(LABELS, scores)
        assert groups[name]["test_roc_auc"]["ci95"] == pytest.approx([e.low, e.high], abs=1e-12)
        assert groups[name]["test_roc_auc"]["clip_sd"] == pytest.approx(np.sqrt(e.clip_var), abs=1e-12)
    for p, metric in zip(out["pairs"], ("roc_auc", "pr_auc")):
        d = paired_difference(LABELS, weak, good, metric)
        assert p["ci95"] == pytest.approx([d.low, d.high], abs=1e-12) and p["verdict"] == d.verdict
        assert p["clip_sd"] == pytest.approx(np.sqrt(d.clip_var), abs=1e-12)


def test_seeds_needed_and_a_supplied_seed_sd(store, tmp_path, capsys):
    """A pair that is not distinguishable gets an estimate of the seeds that would resolve a
    difference of its size; a group of one seed gets a verdict once its seed sd is supplied."""
    uri, _ = store
    for seed in range(3):
        log_run(uri, "close", "a", seed, _probs(1.0 + 0.05 * (seed - 1), 130 + seed), tmp_path, val=[0.7, 0.8, 0.9])
        log_run(uri, "close", "b", seed, _probs(0.95 + 0.05 * (seed - 1), 140 + seed), tmp_path)
    log_run(uri, "close", "one", 0, _probs(0.5, 150), tmp_path)
    out = _json(["close", "--tracking-uri", uri, "--out", "/dev/null"], capsys)
    pairs = {(p["a"], p["metric"]): p for p in out["pairs"]}
    close = pairs[("head=b", "test_roc_auc")]
    needed = close["seeds_needed_estimate"]
    assert close["verdict"] == "not distinguishable" and needed > 3 and close["clips_limit"] is False
    assert pairs[("head=one", "test_roc_auc")]["verdict"] == "seed variation unknown"
    assert main(["close", "--tracking-uri", uri, "--out", "/dev/null"]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.strip().startswith("head=b - head=a") and "test_roc_auc" in x)
    assert line.endswith(
        f"not distinguishable; seeds per group to resolve a difference this size: about {needed} (estimate)"
    )
    supplied = _json(["close", "--tracking-uri", uri, "--out", "/dev/null", "--seed-sd", "0.01"], capsys)
    one = next(p for p in supplied["pairs"] if p["a"] == "head=one" and p["metric"] == "test_roc_auc")
    assert one["verdict"] == "B better" and one["seed_sd_supplied"] and one["seed_sd"] == [0.01, 0.01]
    pr = next(p for p in supplied["pairs"] if p["a"] == "head=one" and p["metric"] == "test_pr_auc")
    assert pr["verdict"] == "seed variation unknown"  # the sd given is test_roc_auc's
    assert supplied["seed_sd"] == {"test_roc_auc": 0.01}
    for bad in ("-1", "f1=0.01", "x"):
        with pytest.raises(SystemExit) as e:
            main(["close", "--tracking-uri", uri, "--seed-sd", bad])
        assert e.value.code == 2 and f"--seed-sd {bad}" in capsys.readouterr().err
