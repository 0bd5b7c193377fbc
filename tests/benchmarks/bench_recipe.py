"""Does the default recipe converge? Each head against the linear probe on the same features.

For each dataset, 3 seeds of: the linear probe (mtt.probe), the heads gap2, gap3 and autopool
with the default recipe (mtt.run's defaults), and gap2 with the previous default (steps=cached,
PyTorch's initial output bias, a fixed 12 epochs) for contrast. Prints test ROC-AUC and PR-AUC (mean and
standard deviation over seeds), the epochs used (best epoch / epochs trained), the wall time of
one run, and whether each head's mean ROC-AUC is within 0.01 of the probe's (the acceptance rule).

Datasets: the embedded default (320 clips x 6 s: 240 train / 20 valid / 60 test, all 188 tags)
and a generated MTAT-format tree (16 folders x 30 clips x 29.1 s, read as `data=mtat`: top-50
tags, the standard split, 360 / 30 / 90 clips). The backbone is random VGGish (no weights can be
downloaded here), so each seed is also another backbone, and the probe is re-fitted per seed.
Generated data and feature stores go to $MTT_CACHE (kept, so a second run skips them).

    python tests/benchmarks/bench_recipe.py [--datasets embedded mtat] [--seeds 3]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hydra import compose, initialize_config_dir  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from mtt.config import CONF_DIR  # noqa: E402
from mtt.data.datasets import SynthConfig  # noqa: E402
from mtt.data.embedded import ensure_dataset  # noqa: E402
from mtt.tracking.runs import MlflowTracker  # noqa: E402
from mtt.training.probe import run_probe  # noqa: E402
from mtt.training.train import train  # noqa: E402

VARIANTS = {  # name -> (overrides, job)
    "linear probe": ([], run_probe),
    "gap2": (["+head=gap2"], train),
    "gap3": (["+head=gap3"], train),
    "autopool": (["+head=autopool"], train),
    "gap2, previous default": (
        [
            "+head=gap2",
            "steps=cached",
            "head.bias_init=default",
            "trainer.epochs=12",
            "trainer.patience=null",
            "trainer.lr_schedule=none",
        ],
        train,
    ),
}
MTAT_TREE = SynthConfig(clips_per_folder=30, seconds=29.1, seed=0)


def dataset_overrides(name: str, cache: Path) -> list[str]:
    if name == "embedded":
        return []
    root = cache / "bench-recipe" / f"mtat-c{MTAT_TREE.clips_per_folder}-s{MTAT_TREE.seconds}"
    ensure_dataset(root, MTAT_TREE)  # MTAT's on-disk format, generated once
    return ["data=mtat", f"data.root={root}"]


def run_variant(overrides: list[str], job, seed: int, uri: str) -> tuple[dict, float]:
    """One run; its metrics (with the clip counts it rests on) and its wall time."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[*overrides, f"trainer.seed={seed}", "trainer.progress=false", f"tracking.uri={uri}"],
        )
    start = time.perf_counter()
    with MlflowTracker(uri, "bench-recipe", " ".join(overrides) or "default") as tracker:
        metrics = job(cfg, tracker)
    params = MlflowClient(uri).get_run(tracker.run_id).data.params
    metrics.update({k: int(params[f"derived.{k}"]) for k in ("train_clips", "val_clips", "test_clips")})
    return metrics, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["embedded", "mtat"], choices=["embedded", "mtat"])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import os

    cache = Path(os.environ.get("MTT_CACHE", Path.home() / ".cache" / "mtt"))
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        for dataset in args.datasets:
            data = dataset_overrides(dataset, cache)
            print(f"\n== {dataset}: {args.seeds} seeds per row", flush=True)
            print(
                f"{'variant':<24} {'test ROC-AUC':>16} {'test PR-AUC':>16} {'best/trained':>14} {'s/run':>6}  vs probe",
                flush=True,
            )
            probe_mean = None
            for name, (overrides, job) in VARIANTS.items():
                runs = [run_variant([*data, *overrides], job, seed, uri) for seed in range(args.seeds)]
                roc = np.array([m["test_roc_auc"] for m, _ in runs])
                pr = np.array([m["test_pr_auc"] for m, _ in runs])
                seconds = np.mean([s for _, s in runs])
                if probe_mean is None:
                    m = runs[0][0]
                    print(f"   ({m['train_clips']} train / {m['val_clips']} valid / {m['test_clips']} test clips)")
                if job is run_probe:
                    probe_mean, epochs, verdict = roc.mean(), "-", "reference"
                else:
                    best = np.mean([m["best_epoch"] for m, _ in runs]) + 1
                    trained = np.mean([m["epochs_trained"] for m, _ in runs])
                    epochs = f"{best:.0f}/{trained:.0f}"
                    gap = roc.mean() - probe_mean
                    verdict = f"{gap:+.4f} ({'ok' if gap >= -0.01 else 'BELOW probe - 0.01'})"
                print(
                    f"{name:<24} {roc.mean():.4f} ± {roc.std(ddof=1):.4f} {pr.mean():.4f} ± {pr.std(ddof=1):.4f} "
                    f"{epochs:>14} {seconds:6.0f}  {verdict}",
                    flush=True,
                )
    print("\n(± is the standard deviation over seeds; best/trained: mean best epoch (1-based) / epochs run)")


if __name__ == "__main__":
    main()
