"""Compare the variants of one MLflow experiment: groups of seeds, intervals, paired verdicts.

    python -m mtt.compare demo
    python -m mtt.compare demo --pair head=gap2 head=autopool --format markdown
    python -m mtt.compare report --allow-mixed --metrics val_roc_auc val_loss --out /tmp/report.png

Runs that differ only in their seed form one group (tag ``mtt.group``; named by ``mtt.group_name``).
Per group: n, mean ± std over seeds and a 95% interval of each metric. For test ROC-AUC and
PR-AUC the interval counts the test clips AND the seeds (``mtt.metrics.stats.combine``, from the logged
``test_predictions.npz``: the seeds' variance on the shared clips, and a paired bootstrap of the
clips with every run on the same resamples); for other metrics it is Student's t over seeds.
A group of one seed gets no interval for them: its seed variation is unknown (``--seed-sd``
supplies one). Pairs of groups (``--pair A B``, by default each group against the best one,
chosen by its mean validation metric of the selected epochs, never by a test metric) get the
same for their difference on the shared test clips and a verdict: "A better" / "B better" when
the interval excludes 0, "not distinguishable" (with an estimate of the seeds per group that
would resolve a difference of that size), or "seed variation unknown" (a group of one seed).
Where the runs validate on their test clips (``data.split=report``), no group is ranked: no best
group, pairs only as ``--pair`` names them, and ``--register`` refuses.

Runs are only ranked when they share the evaluation protocol (split, tag set, evaluation
aggregation, patches and their spacing, test clips; not the feature store, which belongs to the
model: see ``PROTOCOL``); otherwise the command refuses, naming the key that differs (``--allow-mixed`` prints them anyway, marked). Reference runs (``mtt.probe``) are
labelled rows. A reading tool (argparse, no Hydra): it never changes the store, except that
``--register NAME`` registers the best group's best run (by its monitored validation metric) as
a new version of MLflow model NAME (``mtt.serving.pyfunc.register``); MLflow is reached only through
``mtt.tracking.runs`` and ``mtt.serving.pyfunc``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from mtt.core.fs import atomic_replace
from mtt.metrics.stats import LEVEL, RESAMPLES, Difference, bootstrap_weights, combine, macro_auc_under_weights
from mtt.tracking.records import PREDICTIONS, Predictions, load_predictions
from mtt.tracking.runs import SWEEP_TAG, child_runs, metric_history, read_runs, resolve_uri, try_download_artifact

DEFAULT_METRICS = ("val_roc_auc", "val_loss")
FIGURE_INCHES = (6.0, 4.0)  # per metric panel
DPI = 100
REFERENCE_TAG = "mtt.reference"  # set on reference runs (mtt.probe: linear_probe)
BOOTSTRAPPED = ("test_roc_auc", "test_pr_auc")  # intervals over clips and seeds, from predictions
METRIC_OF = {"test_roc_auc": "roc_auc", "test_pr_auc": "pr_auc"}  # --seed-sd's names
METHOD = "seed variance + paired clip bootstrap, fiducial interval; docs/comparing.md"
MIN_SEEDS = 3  # what compare asks for where a group has one seed: 2 give 1-df intervals, rarely decisive
# The table's metrics: the validation score of the selected epoch, then the test scores.
TABLE_METRICS = ("selected_val_roc_auc", "test_roc_auc", "test_pr_auc", "test_accuracy", "test_accuracy_all_negative")
# What must be equal for two runs' test scores to be comparable: (where, key).
# The feature store (tag feature_store) is NOT among them: it is part of the model (its front end),
# not of how the model is scored. Two runs whose split, tag set and test clips with their labels
# (test_clips_sha256, a digest of the clip ids and label matrix actually scored) are equal answer the
# same test questions, whatever their inputs were computed with; that is the comparison a
# transfer-versus-scratch sweep exists for (VGGish log-mel patches against Won et al.'s mel-dB
# chunks: necessarily two stores). A store missing clips shows up as another test digest.
PROTOCOL = (
    ("params", "data.split"),
    ("params", "data.tags"),
    ("params", "data.drop_untagged"),
    ("params", "eval.aggregate"),
    ("params", "eval.patches_per_clip"),
    ("params", "eval.spacing"),  # which patches_per_clip patches (moot when every patch is scored)
    ("tags", "test_clips_sha256"),
)
ALL_PATCHES = "None"  # eval.patches_per_clip as logged when every patch is scored


class ProtocolError(LookupError):
    """Runs evaluated differently: the message names the key and its values."""


@dataclass
class Group:
    """Runs that differ only in their seed."""

    id: str
    name: str
    runs: list[dict]
    reference: str | None = None
    stats: dict[str, dict] = field(default_factory=dict)  # metric -> {n, mean, std, ci95, values}
    mixed: list[str] = field(default_factory=list)  # protocol keys that differ from the others'

    @property
    def label(self) -> str:
        return f"{self.name} [reference]" if self.reference else self.name

    def describe(self) -> dict[str, str]:
        """What the group is (from its first run's params), for the table."""
        p = self.runs[0]["params"]
        if self.reference:
            return {"head": "-", "pool": "-", "steps": "-", "epochs": "-"}
        trained = [r["metrics"].get("epochs_trained") for r in self.runs]
        best = [r["metrics"].get("best_epoch") for r in self.runs]
        epochs = p.get("trainer.epochs", "?")
        if None not in trained and None not in best:
            epochs = f"{np.mean(best) + 1:.0f}/{np.mean(trained):.0f}"
        return {
            "head": f"{p.get('head.blocks', '?')}x{p.get('head.output', '?')[:3]}",
            "pool": p.get("pool.name", "?"),
            "steps": f"{p.get('steps.policy', '?')}",
            "epochs": epochs,
        }


@dataclass
class Comparison:
    experiment: str
    groups: list[Group]
    pairs: list[Difference]
    best: Group | None
    test_clips: int | None
    resamples: int
    skipped: list[dict]  # runs not compared (unfinished, or without test metrics)
    mixed: dict[str, list[str]]  # protocol key -> distinct values, when --allow-mixed let them in
    ranked: bool = True  # False: the runs validate on their test clips, nothing is ranked
    seed_sd: dict[str, float] = field(default_factory=dict)  # metric -> a supplied seed sd
    series: dict[str, dict[str, dict]] = field(default_factory=dict)  # metric -> group -> curves
    png: Path | None = None

    def to_json(self) -> dict:
        return {
            "experiment": self.experiment,
            "test_clips": self.test_clips,
            "resamples": self.resamples,
            "level": LEVEL,
            "method": METHOD,
            "seed_sd": self.seed_sd,
            "ranked": self.ranked,
            "best": self.best.name if self.best else None,
            "mixed_protocol": self.mixed,
            "groups": [
                {
                    "name": g.name,
                    "id": g.id,
                    "reference": g.reference,
                    "n": len(g.runs),
                    "runs": [r["run_id"] for r in g.runs],
                    "mixed_protocol": g.mixed,
                    "metrics": {m: {k: v for k, v in s.items()} for m, s in g.stats.items()},
                }
                for g in self.groups
            ],
            "pairs": [pair_json(d) for d in self.pairs],
            "skipped": [{"run_id": r["run_id"], "name": r["name"], "status": r["status"]} for r in self.skipped],
        }


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def _sd(var: float) -> float | None:
    return None if math.isnan(var) else math.sqrt(var)


def pair_json(d: Difference) -> dict:
    """A pair for ``--format json``: ``verdict`` one of ``mtt.metrics.stats.VERDICTS`` ("A better": ``a``),
    ``reads`` it with the names; what the interval rests on (seeds, seed sd per group, the clips'
    sd of the difference); ``seeds_needed``: an estimate, for a pair not distinguishable."""
    return {
        "a": d.a,
        "b": d.b,
        "metric": d.metric,
        "diff": d.estimate,
        "ci95": [d.low, d.high] if d.seed_var_known else None,
        "verdict": d.verdict,
        "reads": d.reads,
        "seeds": list(d.seeds),
        "seed_sd": [_sd(v) for v in d.seed_vars],
        "seed_sd_supplied": d.seed_sd_known,
        "clip_sd": math.sqrt(d.clip_var),
        "seeds_needed_estimate": d.seeds_needed(),
        "clips_limit": d.clips_limit if d.seed_var_known else None,
    }


# ------------------------------------------------------------------------------------ reading


def load_runs(experiment: str, uri: str | None = None, parent: str | None = None) -> list[dict]:
    """The experiment's runs (or one sweep's: the children of ``parent``), trained runs oldest
    first and reference runs after them, without sweep parent runs; each labelled by its run name
    (made unique), a reference's label saying so."""
    runs = child_runs(uri, parent) if parent else read_runs(uri, experiment)
    runs = [r for r in runs if r["tags"].get(SWEEP_TAG) != "true"]
    for r in runs:
        r["reference"] = r["tags"].get(REFERENCE_TAG)
    runs.sort(key=lambda r: r["reference"] is not None)  # stable: keeps the time order within
    seen: dict[str, int] = {}
    for r in runs:
        name = r["name"] or r["run_id"][:8]
        seen[name] = seen.get(name, 0) + 1
    for r in runs:
        name = r["name"] or r["run_id"][:8]
        r["label"] = name if seen[name] == 1 else f"{name} ({r['run_id'][:6]})"
        if r["reference"]:
            r["label"] = f"{r['label']} [reference]"
    return runs


def group_runs(runs: Sequence[dict]) -> list[Group]:
    """Groups by ``mtt.group`` (a run without it is a group of its own), in order of first run."""
    groups: dict[str, Group] = {}
    for r in runs:
        gid = r["tags"].get("mtt.group") or r["run_id"]
        if gid not in groups:
            name = r["tags"].get("mtt.group_name") or r["name"] or r["run_id"][:8]
            groups[gid] = Group(gid, name, [], r["reference"])
        groups[gid].runs.append(r)
    for g in groups.values():  # by seed (stable: reruns keep their time order), so that the seeds'
        # bootstrap draws, and so the intervals, do not depend on which parallel job ended first
        g.runs.sort(key=_seed_of)
    names: dict[str, int] = {}
    for g in groups.values():
        names[g.name] = names.get(g.name, 0) + 1
    for g in groups.values():
        if names[g.name] > 1:  # two configs whose overrides read the same: tell them apart
            g.name = f"{g.name} ({g.id[:6]})"
    return list(groups.values())


def _seed_of(run: dict) -> int:
    try:
        return int(run["params"].get("trainer.seed", 0))
    except (TypeError, ValueError):
        return 0


def protocol_of(run: dict) -> dict[str, str]:
    out = {key: str(run[where].get(key, "?")) for where, key in PROTOCOL}
    if out["eval.patches_per_clip"] == ALL_PATCHES:  # every patch is scored: no spacing to choose
        out["eval.spacing"] = "every patch"
    return out


def validates_on_test(run: dict) -> bool:
    """Whether ``run``'s validation clips are its test clips (``data.split=report``): its
    "selected" validation score is then a test score, and nothing may be ranked by it. A trained
    run says so with tag ``selection=last``; the linear probe then chooses its strength on
    training clips held out (``probe_validation=carved_from_train``); an older run by its split."""
    tags = run["tags"]
    if "selection" in tags:
        return tags["selection"] == "last"
    if "probe_validation" in tags:
        return tags["probe_validation"] != "carved_from_train" and run["params"].get("data.split") == "report"
    return run["params"].get("data.split") == "report"


def check_protocol(runs: Sequence[dict], allow_mixed: bool) -> dict[str, list[str]]:
    """``{key: values}`` of the protocol keys in which ``runs`` differ; raises ``ProtocolError``
    naming the first such key unless ``allow_mixed``."""
    mixed = {}
    for _, key in PROTOCOL:
        values = sorted({protocol_of(r)[key] for r in runs})
        if len(values) > 1:
            mixed[key] = values
    if mixed and not allow_mixed:
        key, values = next(iter(mixed.items()))
        raise ProtocolError(
            f"runs differ in their evaluation protocol: {key} is {' vs '.join(values)}; their "
            f"scores are not comparable (pass --allow-mixed to print them anyway, marked)"
        )
    return mixed


class Scorer:
    """Bootstrap values of each run's test ROC-AUC and PR-AUC on a set of clips, computed once
    per (run, clip set) under resamples that are the same for every run (so pairs are paired)."""

    def __init__(self, predictions: dict[str, Predictions], resamples: int, seed: int):
        self.predictions, self.resamples, self.seed = predictions, resamples, seed
        self._cache: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}

    def shared_clips(self, run_ids: Sequence[str]) -> np.ndarray:
        sets = [set(self.predictions[r].clip_ids.tolist()) for r in run_ids]
        return np.array(sorted(set.intersection(*sets)), dtype=np.int64)

    def boot(self, run_id: str, clips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = (run_id, hashlib.sha256(clips.tobytes()).hexdigest())
        if key not in self._cache:
            p = self.predictions[run_id]
            order = np.argsort(p.clip_ids)
            rows = order[np.searchsorted(p.clip_ids, clips, sorter=order)]  # the run's row of each clip
            weights = bootstrap_weights(len(clips), self.resamples, self.seed)
            self._cache[key] = macro_auc_under_weights(p.labels[rows], p.probabilities[rows], weights)
            full = np.ones((1, len(clips)), dtype=np.int32)
            self._cache[key + ("point",)] = macro_auc_under_weights(p.labels[rows], p.probabilities[rows], full)
        return self._cache[key]

    def point(self, run_id: str, clips: np.ndarray) -> tuple[float, float]:
        self.boot(run_id, clips)
        key = (run_id, hashlib.sha256(clips.tobytes()).hexdigest(), "point")
        return float(self._cache[key][0][0]), float(self._cache[key][1][0])


def _fetch_predictions(uri: str | None, runs: Sequence[dict], folder: Path) -> dict[str, Predictions]:
    out = {}
    for r in runs:
        path = try_download_artifact(uri, r["run_id"], PREDICTIONS, folder / r["run_id"])
        if path is not None:  # an older run has none: no bootstrap for it
            out[r["run_id"]] = load_predictions(path)
    return out


# ------------------------------------------------------------------------------------ statistics


def _metric(run: dict, name: str) -> float | None:
    m = run["metrics"]
    if name == "selected_val_roc_auc" and name not in m:  # older runs: the last epoch's
        name = "val_roc_auc"
    v = m.get(name)
    return None if v is None or math.isnan(v) else float(v)


def _t_interval(values: np.ndarray) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    from scipy import stats as st

    half = st.t.ppf(0.5 + LEVEL / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    # Every table metric lies in [0, 1]; with two or three seeds t's interval can pass the bounds.
    return max(0.0, float(values.mean() - half)), min(1.0, float(values.mean() + half))


def _bootstrapped(
    runs: Sequence[dict], scorer: Scorer, clips: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The runs' metric ``BOOTSTRAPPED[k]`` on all ``clips`` ``(runs,)`` and under the shared
    resamples ``(runs, B)``; None unless every run logged its predictions."""
    ids = [r["run_id"] for r in runs]
    if not all(i in scorer.predictions for i in ids):
        return None
    points = np.array([scorer.point(i, clips)[k] for i in ids])
    return points, np.stack([scorer.boot(i, clips)[k] for i in ids])


def group_stats(
    group: Group, scorer: Scorer, clips: np.ndarray | None, seed_sd: dict[str, float], ranked: bool = True
) -> None:
    """Fill ``group.stats``: for each table metric n, mean, std (over seeds) and ci95 (test AUCs:
    ``mtt.metrics.stats.combine`` over clips and seeds; None for one seed without a supplied seed sd).
    Not ``ranked``: no selected validation score where it is a test score."""
    for metric in TABLE_METRICS:
        if metric == "selected_val_roc_auc" and not ranked and any(validates_on_test(r) for r in group.runs):
            continue
        values = np.array([v for v in (_metric(r, metric) for r in group.runs) if v is not None])
        if len(values) == 0:
            continue
        stats = {
            "n": len(values),
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
            "values": values.tolist(),
            "ci95": _t_interval(values),
            "ci_kind": "t over seeds",
        }
        scored = (
            _bootstrapped(group.runs, scorer, clips, BOOTSTRAPPED.index(metric))
            if metric in BOOTSTRAPPED and clips is not None
            else None
        )
        if scored is not None:
            est = combine([scored[0]], [scored[1]], [1], len(clips), LEVEL, seed_sd.get(metric))
            stats["ci95"] = (est.low, est.high) if est.seed_var_known else None
            stats["ci_kind"] = (
                "clips and seeds" + (" (seed sd supplied)" if est.seed_sd_known else "")
                if est.seed_var_known
                else "none: 1 seed, seed variation unknown"
            )
            stats["clip_sd"] = math.sqrt(est.clip_var)
        group.stats[metric] = stats


def pair(a: Group, b: Group, scorer: Scorer, seed_sd: dict[str, float]) -> list[Difference]:
    """The paired differences ``a - b`` of test ROC-AUC and PR-AUC on their shared clips."""
    ids = [r["run_id"] for g in (a, b) for r in g.runs]
    if not all(i in scorer.predictions for i in ids):
        return []
    clips = scorer.shared_clips(ids)
    out = []
    for k, metric in enumerate(BOOTSTRAPPED):
        (pa, ba), (pb, bb) = (_bootstrapped(g.runs, scorer, clips, k) for g in (a, b))
        both = combine([pa, pb], [ba, bb], [1, -1], len(clips), LEVEL, seed_sd.get(metric))
        out.append(Difference.of(both, metric, a.name, b.name))
    return out


def best_group(groups: Sequence[Group]) -> Group | None:
    """The group with the best mean validation score of its selected epochs (trained groups
    first: a reference is a yardstick, not a candidate)."""
    candidates = [g for g in groups if not g.reference] or list(groups)
    scored = [g for g in candidates if "selected_val_roc_auc" in g.stats]
    return max(scored, key=lambda g: g.stats["selected_val_roc_auc"]["mean"]) if scored else None


def find_group(groups: Sequence[Group], key: str) -> Group:
    matches = [g for g in groups if key in (g.name, g.label) or g.id.startswith(key)]
    if len(matches) != 1:
        known = ", ".join(g.name for g in groups)
        raise LookupError(f"--pair {key!r}: {'no' if not matches else 'more than one'} group matches; groups: {known}")
    return matches[0]


def build(
    experiment: str,
    uri: str | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    allow_mixed: bool = False,
    parent: str | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    bootstrap: bool = True,
    seed_sd: dict[str, float] | None = None,
) -> Comparison:
    """Read the runs, check their protocol, group them, compute intervals and paired differences
    (``bootstrap=False``: without reading predictions, so no bootstrap intervals or pairs).
    ``seed_sd``: a known sd between seeds of ``test_roc_auc`` / ``test_pr_auc``, used instead of
    the groups' measured ones. Where the runs validate on their test clips nothing is ranked: no
    best group and only the ``pairs`` named."""
    runs = load_runs(experiment, uri, parent)
    finished = [r for r in runs if r["status"] == "FINISHED" and "test_roc_auc" in r["metrics"]]
    # The same config and seed run again (a repeated `make demo`) replaces the older run: a seed
    # counts once in its group.
    newest = {r["tags"].get("config_hash", r["run_id"]) + r["tags"].get(REFERENCE_TAG, ""): r for r in finished}
    for r in finished:
        if newest[r["tags"].get("config_hash", r["run_id"]) + r["tags"].get(REFERENCE_TAG, "")] is not r:
            r["status"] = "superseded"
    if not allow_mixed:  # a run logged before its protocol was recorded cannot be checked
        for r in finished:
            if "?" in protocol_of(r).values():
                r["status"] = "no protocol record"
    finished = [r for r in finished if r["status"] == "FINISHED"]
    skipped = [r for r in runs if r not in finished]
    if not finished:
        where = f"sweep {parent}" if parent else f"MLflow experiment {experiment!r} in {resolve_uri(uri)}"
        raise LookupError(f"{where} has no finished run with test metrics")
    mixed = check_protocol(finished, allow_mixed)
    groups = group_runs(finished)
    if mixed:  # mark the groups evaluated unlike most runs
        from collections import Counter

        usual = {k: Counter(protocol_of(r)[k] for r in finished).most_common(1)[0][0] for k in mixed}
        for g in groups:
            g.mixed = [k for k in mixed if any(protocol_of(r)[k] != usual[k] for r in g.runs)]
    with tempfile.TemporaryDirectory() as tmp:
        scorer = Scorer(_fetch_predictions(uri, finished, Path(tmp)) if bootstrap else {}, resamples, seed)
    all_ids = [r["run_id"] for r in finished if r["run_id"] in scorer.predictions]
    clips = scorer.shared_clips(all_ids) if all_ids else None
    seed_sd = dict(seed_sd or {})
    ranked = not any(validates_on_test(r) for r in finished if not r["reference"])
    for g in groups:
        group_stats(g, scorer, clips, seed_sd, ranked)
    best = best_group(groups) if ranked else None
    chosen = (
        [(find_group(groups, a), find_group(groups, b)) for a, b in pairs]
        if pairs
        else [(g, best) for g in groups if best is not None and g is not best]
    )
    diffs = [d for a, b in chosen for d in pair(a, b, scorer, seed_sd)]
    test_clips = len(clips) if clips is not None else None
    return Comparison(experiment, groups, diffs, best, test_clips, resamples, skipped, mixed, ranked, seed_sd)


# ------------------------------------------------------------------------------------ output


def _fmt(stats: dict | None, digits: int = 4) -> str:
    if not stats:
        return "-"
    out = f"{stats['mean']:.{digits}f}"
    if stats["n"] > 1:
        out += f" ± {stats['std']:.{digits}f}"
    if stats.get("ci95"):
        lo, hi = stats["ci95"]
        out += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    elif stats.get("ci_kind", "").startswith("none"):
        out += " (1 seed)"
    return out


def advice(d: Difference, short: bool = False) -> str:
    """What a verdict asks for: more seeds (how many, as an estimate), or why more will not do;
    ``short``: for a table cell."""
    if d.verdict == "seed variation unknown":
        return (
            f"run >= {MIN_SEEDS} (or --seed-sd)"
            if short
            else f"run at least {MIN_SEEDS} seeds per group (or pass --seed-sd)"
        )
    if d.verdict != "not distinguishable":
        return ""
    if d.estimate == 0:
        return "none: the same scores" if short else "the same scores: nothing to resolve"
    n = d.seeds_needed()
    if n is None and d.clips_limit:
        return (
            "more would not: clips"
            if short
            else "more seeds alone would not resolve it: the test clips vary more than the difference"
        )
    count = f"about {n}" if n is not None else "over 1000"
    return count if short else f"seeds per group to resolve a difference this size: {count} (estimate)"


HEADERS = (
    "group",
    "n",
    "head",
    "pool",
    "steps",
    "epochs",
    "val_roc_auc (selected)",
    "test_roc_auc",
    "test_pr_auc",
    "test_acc",
    "all_neg_acc",
)


def table_rows(c: Comparison) -> list[list[str]]:
    rows = []
    for g in c.groups:
        d = g.describe()
        label = g.label + (" *" if g.mixed else "")
        rows.append(
            [
                label,
                str(len(g.runs)),
                d["head"],
                d["pool"],
                d["steps"],
                d["epochs"],
                _fmt(g.stats.get("selected_val_roc_auc")),
                _fmt(g.stats.get("test_roc_auc")),
                _fmt(g.stats.get("test_pr_auc")),
                _fmt({**g.stats["test_accuracy"], "ci95": None}) if "test_accuracy" in g.stats else "-",
                f"{g.stats['test_accuracy_all_negative']['mean']:.4f}"
                if "test_accuracy_all_negative" in g.stats
                else "-",
            ]
        )
    return rows


def _notes(c: Comparison) -> list[str]:
    seeds = sorted({len(g.runs) for g in c.groups})
    per_group = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]} to {seeds[-1]}"
    supplied = ", ".join(f"{m} {v:g}" for m, v in c.seed_sd.items())
    lines = [
        f"{len(c.groups)} groups, {sum(len(g.runs) for g in c.groups)} runs ({per_group} seed(s) per group); "
        f"test set: {c.test_clips if c.test_clips is not None else '?'} clips shared by "
        f"every run; mean ± std over seeds [95% interval: test AUCs over clips and seeds ({METHOD}, "
        f"{c.resamples} resamples{f'; seed sd supplied: {supplied}' if supplied else ''}); "
        "other metrics Student's t over seeds]"
    ]
    if any(s.get("ci_kind", "").startswith("none") for g in c.groups for s in g.stats.values()):
        lines.append(
            "(1 seed): no interval, the seed variation of a group of one seed is unknown (--seed-sd X supplies it)"
        )
    if c.best is not None:
        lines.append(f"best group by mean validation ROC-AUC of the selected epochs: {c.best.name}")
    if not c.ranked:
        lines.append(
            "no best group: the runs validate on their test clips (data.split=report), so a validation "
            "score is a test score; nothing is ranked or registered, pairs only as --pair names them"
        )
    if c.mixed:
        lines.append(
            "* evaluated under another protocol: " + "; ".join(f"{k}: {' vs '.join(v)}" for k, v in c.mixed.items())
        )
    superseded = [r for r in c.skipped if r["status"] == "superseded"]
    others = [r for r in c.skipped if r["status"] != "superseded"]
    if superseded:
        lines.append(f"{len(superseded)} older run(s) superseded by a newer run of the same config and seed")
    if others:
        from collections import Counter

        counts = Counter(r["status"] for r in others)
        listed = (
            ", ".join(f"{r['label']} ({r['status']})" for r in others)
            if len(others) <= 4
            else ", ".join(f"{n} {status}" for status, n in counts.most_common())
        )
        lines.append(f"not compared ({len(others)} runs): {listed}")
    return lines


def format_text(c: Comparison) -> str:
    rows = table_rows(c)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [f"experiment {c.experiment}", line(HEADERS), line(["-" * w for w in widths]), *map(line, rows), ""]
    out += _notes(c)
    if c.pairs:
        out += ["", "paired differences (same test clips; 95% interval over clips and seeds):"]
        out += [f"  {d.line()}" + (f"; {advice(d)}" if advice(d) else "") for d in c.pairs]
    return "\n".join(out)


def format_markdown(c: Comparison) -> str:
    out = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    out += ["| " + " | ".join(r) + " |" for r in table_rows(c)]
    out += [""] + [f"{n}." if not n.endswith(".") else n for n in _notes(c)]
    if c.pairs:
        out += [
            "",
            "| difference | metric | value | 95% interval | verdict | seeds per group to resolve it (estimate) |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {d.a} - {d.b} | {d.metric} | {d.estimate:+.4f} | {_ci(d)} | {d.reads} | {advice(d, short=True) or '-'} |"
            for d in c.pairs
        ]
    return "\n".join(out)


def _ci(d: Difference) -> str:
    return f"[{d.low:+.4f}, {d.high:+.4f}]" if d.seed_var_known else "-"


def _tex(s: str) -> str:
    return re.sub(r"([_&%#$])", r"\\\1", s).replace("±", r"$\pm$")


def format_latex(c: Comparison) -> str:
    cols = ("group", "n", "val ROC-AUC", "test ROC-AUC", "test PR-AUC")
    out = [
        r"\begin{table}[t]",
        r"\centering",
        r"\begin{tabular}{lrlll}",
        r"\toprule",
        " & ".join(cols) + r" \\",
        r"\midrule",
    ]
    for g in c.groups:
        cells = [g.label, str(len(g.runs))] + [_fmt(g.stats.get(m), 3) for m in TABLE_METRICS[:3]]
        out.append(" & ".join(_tex(x) for x in cells) + r" \\")
    out += [
        r"\bottomrule",
        r"\end{tabular}",
        r"\caption{"
        + _tex(
            f"{c.experiment}: mean ± std over seeds and 95% interval (test AUCs: over the "
            f"{c.test_clips} test clips and the seeds, {METHOD})."
        )
        + "}",
        r"\end{table}",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ curves


def curves(groups: Sequence[Group], metrics: Sequence[str], uri: str | None = None) -> dict[str, dict[str, dict]]:
    """``metric -> group name -> {"steps", "mean", "low", "high", "n"}``: the per-epoch mean over
    the group's seeds and the band between their lowest and highest value (at each step, over
    the seeds that reached it: early stopping ends seeds at different epochs)."""
    out: dict[str, dict[str, dict]] = {}
    for m in metrics:
        out[m] = {}
        for g in groups:
            by_step: dict[int, list[float]] = {}
            for r in g.runs:
                for step, v in metric_history(uri, r["run_id"], m):
                    by_step.setdefault(step, []).append(v)
            if by_step:
                steps = sorted(by_step)
                out[m][g.label] = {
                    "steps": steps,
                    "mean": [float(np.mean(by_step[s])) for s in steps],
                    "low": [float(np.min(by_step[s])) for s in steps],
                    "high": [float(np.max(by_step[s])) for s in steps],
                    "n": [len(by_step[s]) for s in steps],
                    "reference": bool(g.reference),
                }
    return out


def plot_comparison(series: dict[str, dict[str, dict]], out: Path, title: str) -> Path:
    """One panel per metric, one line (the mean over seeds) and band (min-max) per group; a
    reference, which has no epochs, is a dashed horizontal line. Written atomically as a PNG of
    ``FIGURE_INCHES[0] * n_metrics x FIGURE_INCHES[1]`` inches at ``DPI``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; files only
    import matplotlib.pyplot as plt

    n = max(1, len(series))
    fig, axes = plt.subplots(1, n, figsize=(FIGURE_INCHES[0] * n, FIGURE_INCHES[1]), dpi=DPI, squeeze=False)
    for ax, (metric, by_group) in zip(axes[0], series.items()):
        for label, s in by_group.items():
            if s["reference"] and len(s["steps"]) == 1:
                ax.axhline(s["mean"][0], linestyle="--", linewidth=1, color="gray", label=label)
                continue
            (line,) = ax.plot(s["steps"], s["mean"], marker="o", markersize=2, label=f"{label} (n={max(s['n'])})")
            ax.fill_between(s["steps"], s["low"], s["high"], alpha=0.2, color=line.get_color())
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if by_group:
            ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    if out.exists() and not out.is_file():  # /dev/null or a pipe: write into it, never rename onto it
        try:
            with open(out, "wb") as f:
                fig.savefig(f, format="png", dpi=DPI)
        finally:
            plt.close(fig)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_replace(out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    finally:
        plt.close(fig)
    return out


def default_png(uri: str | None, experiment: str) -> Path:
    """``compare-<experiment>.png`` next to a local store (sqlite file or file: folder), else in
    the working directory."""
    name = f"compare-{re.sub(r'[^A-Za-z0-9_.-]+', '_', experiment)}.png"
    resolved = resolve_uri(uri)
    parsed = urlparse(resolved)
    if parsed.scheme == "sqlite" and resolved.startswith("sqlite:///"):
        return Path(resolved[len("sqlite:///") :]).parent / name
    if parsed.scheme in ("file", ""):
        return Path(parsed.path or resolved) / name
    return Path.cwd() / name


def compare(
    experiment: str,
    metrics: Sequence[str] = DEFAULT_METRICS,
    out: str | Path | None = None,
    uri: str | None = None,
    **kwargs,
) -> Comparison:
    """``build`` the comparison of ``experiment`` and write its curves PNG."""
    c = build(experiment, uri, **kwargs)
    c.series = curves(c.groups, metrics, uri)
    c.png = plot_comparison(
        c.series,
        Path(out) if out else default_png(uri, experiment),
        f"{experiment}: {len(c.groups)} groups, {sum(len(g.runs) for g in c.groups)} runs",
    )
    return c


def best_run(group: Group) -> dict:
    """The run of ``group`` whose own monitored validation metric (``trainer.monitor``) was best
    at its selected epoch (``selected_<monitor>``; a loss: the lowest). Never a test metric."""

    def score(r: dict) -> float:
        monitor = r["params"].get("trainer.monitor", "val_roc_auc")
        v = _metric(r, f"selected_{monitor}")
        if v is None:
            return -math.inf
        return -v if monitor.endswith("loss") else v

    return max(group.runs, key=score)


NOT_RANKED = (
    "--register: the runs of {experiment!r} validate on their test clips (data.split=report), so no run "
    "can be chosen without ranking on test clips; nothing registered"
)


def register_best(c: Comparison, name: str, uri: str | None = None) -> tuple[int, dict]:
    """Register the best run of the best group of comparison ``c`` (``build``'s best group, by
    mean validation ROC-AUC of the selected epochs; in it ``best_run``) as a new version of model
    ``name``, the group's summary as the version's description. Returns (version, run)."""
    from mtt.serving.pyfunc import register

    experiment = c.experiment
    if not c.ranked:
        raise LookupError(NOT_RANKED.format(experiment=experiment))
    if c.best is None or c.best.reference:
        raise LookupError(f"experiment {experiment!r} has no trained group with a validation score to register")
    g, run = c.best, best_run(c.best)
    monitor = run["params"].get("trainer.monitor", "val_roc_auc")
    lines = [
        f"Best group of experiment {experiment!r} by mean validation ROC-AUC of the selected epochs: "
        f"{g.name} ({len(g.runs)} seed(s); {c.test_clips if c.test_clips is not None else '?'} test clips).",
        *(f"{m}: {_fmt(g.stats.get(m))}" for m in TABLE_METRICS[:3] if m in g.stats),
        f"This version: run {run['run_id']} ({run['label']}), the group's best by its monitored "
        f"selected_{monitor} = {_metric(run, f'selected_{monitor}')}; test_roc_auc = "
        f"{_metric(run, 'test_roc_auc')}.",
    ]
    tags = {"mtt.experiment": experiment, "mtt.group": g.id, "mtt.group_name": g.name, "monitor": monitor}
    version = register(uri, name, run["run_id"], "\n".join(lines), tags)
    return version, run


def sweep_summary(uri: str | None, parent_run_id: str, bootstrap: bool = True) -> dict:
    """The grouped summary (``--format json``) of one sweep's child runs, for its parent run."""
    return build("", uri, parent=parent_run_id, allow_mixed=True, bootstrap=bootstrap).to_json()


def parse_seed_sd(values: Sequence[str]) -> dict[str, float]:
    """``--seed-sd`` values (``0.004``, ``pr_auc=0.01``) as ``{test metric: sd}``."""
    out = {}
    for value in values:
        metric, _, number = value.rpartition("=")
        key = f"test_{metric or 'roc_auc'}"
        try:
            sd = float(number)
        except ValueError:
            sd = math.nan
        if key not in METRIC_OF or not sd >= 0 or math.isinf(sd):
            names = ", ".join(METRIC_OF.values())
            raise ValueError(f"--seed-sd {value}: expected SD or METRIC=SD with METRIC in {names} and SD >= 0")
        out[key] = sd
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtt.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="MLflow experiment name (e.g. report, demo)")
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help="per-epoch metrics to plot (default: %(default)s)"
    )
    parser.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("A", "B"),
        default=[],
        help="groups to test against each other (name or id prefix; repeatable); default: each group against the best",
    )
    parser.add_argument("--format", choices=("text", "json", "markdown", "latex"), default="text")
    parser.add_argument(
        "--allow-mixed", action="store_true", help="list runs evaluated under different protocols anyway (marked *)"
    )
    parser.add_argument("--parent", help="only the child runs of this sweep's parent run")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    parser.add_argument(
        "--seed-sd",
        action="append",
        default=[],
        metavar="[METRIC=]SD",
        help="a known sd of one run's test score between seeds, used for every group instead of the "
        "measured one (so groups of one seed get intervals and verdicts): X for test_roc_auc, "
        "pr_auc=X for test_pr_auc (repeatable)",
    )
    parser.add_argument("--out", help="PNG path (default: compare-<experiment>.png next to the store)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else <repo>/mlflow.db)")
    parser.add_argument(
        "--register",
        metavar="NAME",
        help="register the best run of the best group (by validation) as a new version of model NAME",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stdout is the table
    if args.resamples < 100:
        parser.error(f"--resamples must be at least 100, got {args.resamples}")
    try:
        seed_sd = parse_seed_sd(args.seed_sd)
    except ValueError as e:
        parser.error(str(e))
    try:
        c = compare(
            args.experiment,
            args.metrics,
            args.out,
            args.tracking_uri,
            pairs=[tuple(p) for p in args.pair],
            allow_mixed=args.allow_mixed,
            parent=args.parent,
            resamples=args.resamples,
            seed=args.seed,
            seed_sd=seed_sd,
        )
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.register and not c.ranked:  # before any output: one line, nothing registered
        print(f"error: {NOT_RANKED.format(experiment=c.experiment)}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(c.to_json(), indent=1))
    elif args.format == "markdown":
        print(format_markdown(c))
    elif args.format == "latex":
        print(format_latex(c))
    else:
        print(format_text(c))
        missing = [m for m, by in c.series.items() if not by]
        if missing:
            print(f"note: no run logged {missing}", file=sys.stderr)
        print(f"\ncurves ({', '.join(args.metrics)}; mean over seeds, band from lowest to highest): {c.png}")
    if args.register:
        try:
            version, run = register_best(c, args.register, args.tracking_uri)
        except LookupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"registered run {run['run_id']} ({run['label']}) as version {version} of model "
            f"{args.register!r}: models:/{args.register}/{version}",
            file=sys.stderr,
        )
    return 0
