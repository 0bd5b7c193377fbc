"""Compare the runs of one MLflow experiment: a table of settings and final scores, and a PNG of
per-epoch curves with one line per run.

    python -m mtt.compare report
    python -m mtt.compare report --metrics val_roc_auc val_loss --out /tmp/report.png

A reading tool (argparse, no Hydra): it never changes the store. MLflow is reached only
through ``mtt.tracking``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

from mtt.tracking import metric_history, read_runs, resolve_uri

DEFAULT_METRICS = ("val_roc_auc", "val_loss")
FIGURE_INCHES = (6.0, 4.0)  # per metric panel
DPI = 100

REFERENCE_TAG = "mtt.reference"  # set on reference runs (mtt.probe: linear_probe)


def _trained(get):
    """A column that only trained runs have; reference runs (the linear probe) show ``-``."""
    return lambda r: "-" if r["reference"] else get(r)


# (header, how to read it from a run) in table order.
COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("run", lambda r: r["label"]),
    ("status", lambda r: r["status"]),
    ("head", _trained(lambda r: f"{r['params'].get('head.blocks', '?')} blocks")),
    ("pool", _trained(lambda r: r["params"].get("pool.name", "?"))),
    ("output", _trained(lambda r: r["params"].get("head.output", "?"))),
    ("steps", _trained(lambda r: f"{r['params'].get('steps.policy', '?')} "
                                 f"({r['params'].get('derived.steps_per_epoch', '?')}/ep)")),
    ("epochs", _trained(lambda r: _epochs(r))),
    ("val_loss", lambda r: _num(r, "val_loss")),
    ("test_loss", lambda r: _num(r, "test_loss")),
    ("test_acc", lambda r: _num(r, "test_accuracy")),
    ("all_neg_acc", lambda r: _num(r, "test_accuracy_all_negative")),
    ("test_roc_auc", lambda r: _num(r, "test_roc_auc")),
    ("test_pr_auc", lambda r: _num(r, "test_pr_auc")),
]


def _epochs(run: dict) -> str:
    """Epochs trained (of the maximum), and the best epoch the test metrics come from."""
    trained, best = run["metrics"].get("epochs_trained"), run["metrics"].get("best_epoch")
    if trained is None or best is None:
        return run["params"].get("trainer.epochs", "?")
    return f"{int(trained)}/{run['params'].get('trainer.epochs', '?')} (best {int(best)})"


def _num(run: dict, key: str) -> str:
    v = run["metrics"].get(key)
    return "-" if v is None or math.isnan(v) else f"{v:.4f}"


@dataclass
class Comparison:
    runs: list[dict]  # read_runs() dicts, each with a unique "label"
    table: str
    series: dict[str, dict[str, tuple[list[int], list[float]]]]  # metric -> label -> (steps, values)
    png: Path


def load_runs(experiment: str, uri: str | None = None) -> list[dict]:
    """The experiment's runs, trained runs oldest first and reference runs after them, each
    labelled by its run name (made unique); a reference run's label says what it is."""
    runs = read_runs(uri, experiment)
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


def format_table(runs: Sequence[dict]) -> str:
    """A plain-text table: a header line, a rule, then one line per run."""
    rows = [[str(get(r)) for _, get in COLUMNS] for r in runs]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, (h, _) in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line([h for h, _ in COLUMNS]), line(["-" * w for w in widths]), *map(line, rows)])


def curves(runs: Sequence[dict], metrics: Sequence[str], uri: str | None = None
           ) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Per-epoch history ``metric -> run label -> (steps, values)``; runs without it are left out."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for m in metrics:
        out[m] = {}
        for r in runs:
            hist = metric_history(uri, r["run_id"], m)
            if hist:
                out[m][r["label"]] = ([s for s, _ in hist], [v for _, v in hist])
    return out


def plot_curves(series: dict[str, dict[str, tuple[list[int], list[float]]]], out: Path, title: str) -> Path:
    """One panel per metric, one line per run; written atomically as a PNG of
    ``FIGURE_INCHES[0] * n_metrics x FIGURE_INCHES[1]`` inches at ``DPI``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; files only
    import matplotlib.pyplot as plt

    n = max(1, len(series))
    fig, axes = plt.subplots(1, n, figsize=(FIGURE_INCHES[0] * n, FIGURE_INCHES[1]), dpi=DPI, squeeze=False)
    for ax, (metric, by_run) in zip(axes[0], series.items()):
        for label, (steps, values) in by_run.items():
            ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if by_run:
            ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
        return Path(resolved[len("sqlite:///"):]).parent / name
    if parsed.scheme in ("file", ""):
        return Path(parsed.path or resolved) / name
    return Path.cwd() / name


def compare(experiment: str, metrics: Sequence[str] = DEFAULT_METRICS, out: str | Path | None = None,
            uri: str | None = None) -> Comparison:
    """Read experiment ``experiment``, build its table and write its curves PNG."""
    runs = load_runs(experiment, uri)
    if not runs:
        raise LookupError(f"MLflow experiment {experiment!r} in {resolve_uri(uri)} has no runs")
    series = curves(runs, metrics, uri)
    png = plot_curves(series, Path(out) if out else default_png(uri, experiment),
                      f"{experiment}: {len(runs)} runs")
    return Comparison(runs, format_table(runs), series, png)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtt.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="MLflow experiment name (e.g. report, demo)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                        help="per-epoch metrics to plot (default: %(default)s)")
    parser.add_argument("--out", help="PNG path (default: compare-<experiment>.png next to the store)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else <repo>/mlflow.db)")
    args = parser.parse_args(argv)
    try:
        result = compare(args.experiment, args.metrics, args.out, args.tracking_uri)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.table)
    missing = [m for m, by_run in result.series.items() if not by_run]
    if missing:
        print(f"note: no run logged {missing}", file=sys.stderr)
    print(f"\ncurves ({', '.join(args.metrics)}): {result.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
