"""What a run records beside its metrics: provenance (code version, library versions) and the
end-of-run reports (per-tag CSV, curve plots). No mlflow here: these build values and files that
``train`` hands to the tracker."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from mtt.core.paths import REPO_ROOT

PACKAGES = ("torch", "mlflow", "hydra-core", "pescador", "numpy", "librosa")


# MLflow's system tag of the commit (the runs table's Source column and the run page show it),
# and our dirty flag beside it: MLflow has none, and a commit alone does not say what ran.
GIT_COMMIT, GIT_DIRTY = "mlflow.source.git.commit", "mlflow.source.git.dirty"


def git_state(repo: Path = REPO_ROOT) -> dict[str, str]:
    """``GIT_COMMIT`` and ``GIT_DIRTY`` of the code that runs; ``unknown`` outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # Untracked files count: a new module the run imports changes what ran.
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return {GIT_COMMIT: "unknown", GIT_DIRTY: "unknown"}
    return {GIT_COMMIT: commit, GIT_DIRTY: str(dirty).lower()}


def versions() -> dict[str, str]:
    """``version.<package>`` of python and the libraries that decide a run's numbers."""
    out = {"version.python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            out[f"version.{name}"] = "not installed"
    return out


def source_tags(entry: str) -> dict[str, str]:
    """MLflow's system tags of what ran: the entry point (``mtt.run``, ``mtt.probe``: the UI's
    Source column), its type and the git state (``git_state``)."""
    return {"mlflow.source.name": entry, "mlflow.source.type": "LOCAL", **git_state()}


def dataset_name(data) -> str:
    """``mtat-top50-standard``: the dataset, its tag set and its split protocol (``cfg.data``)."""
    return f"{data.name}-{data.tags}-{data.split}"


def dataset_inputs(data, fingerprint: str, splits: Mapping[str, np.ndarray]) -> list[dict]:
    """What a run trained, validated and tested on, one entry per split (``context``) for
    ``tracker.log_inputs``: ``name`` (``dataset_name``), ``digest``, ``source`` (``data.root``)
    and a ``profile`` with the feature store's fingerprint and the split's clip count.

    The digest is the feature-store fingerprint combined with the split's clip ids: MLflow keeps
    one input per (name, digest) and run, so three splits with the store's fingerprint alone
    would show as one dataset with only the first context.
    """
    out = []
    for context, clip_ids in splits.items():
        ids = np.asarray(clip_ids, dtype=np.int64)
        digest = hashlib.sha256(fingerprint.encode() + b"|" + context.encode() + b"|" + ids.tobytes()).hexdigest()
        out.append(
            {
                "name": dataset_name(data),
                "digest": digest[:16],
                "source_type": "local",
                "source": json.dumps({"uri": str(data.root)}),
                "profile": json.dumps({"feature_store": fingerprint, "split": context, "clips": len(ids)}),
                "context": context,
            }
        )
    return out


def run_note(cfg, derived: Mapping, kind: str = "trained tagger") -> str:
    """One paragraph for the run page (``mlflow.note.content``): model, steps, data, selection."""
    head, pool, data = cfg.head, cfg.pool, cfg.data
    pooling = (
        f"AutoPool (alpha initialised at {pool.alpha_init:g}, constraint {pool.constraint})"
        if pool.name == "autopool"
        else "global average pooling"
    )
    backbone = (
        "frozen"
        if cfg.backbone.freeze and cfg.backbone.finetune_last == 0
        else (f"last {cfg.backbone.finetune_last} conv layers fine-tuned" if cfg.backbone.freeze else "fine-tuned")
    )
    weights = "AudioSet weights" if cfg.backbone.weights != "none" else "random weights"
    if kind == "linear probe":
        model = f"Linear probe (logistic regression per tag) on the {backbone} VGGish ({weights})"
        schedule = f"L2 strength chosen among {list(cfg.probe.C)} on validation"
    else:
        model = (
            f"VGGish ({backbone}, {weights}, width x{cfg.backbone.width:g}) with {pooling} and a "
            f"{head.blocks}-block {head.output} head (width {head.width}, dropout {head.dropout:g})"
        )
        steps = f"{cfg.steps.policy}" + (f" (n={cfg.steps.n})" if cfg.steps.policy == "fixed" else "")
        schedule = (
            f"{derived.get('steps_per_epoch')} steps per epoch (steps policy {steps}), at most "
            f"{cfg.trainer.epochs} epochs, batch {cfg.trainer.batch_size}, lr {cfg.trainer.lr:g}, "
            f"checkpoint chosen by {cfg.trainer.monitor}"
        )
    clips = f"{derived.get('train_clips')} train / {derived.get('val_clips')} valid / {derived.get('test_clips')} test clips"
    return (
        f"{model}; {schedule}. Data: {dataset_name(data)} ({data.tags} tags: {derived.get('n_tags')}, "
        f"{data.split} split, {clips}) from {data.root}; seed {cfg.trainer.seed}."
    )


def per_tag_csv(rows: Sequence[Mapping]) -> str:
    """``mtt.metrics.tagging.per_tag_table`` rows as CSV text (tag, positives, roc_auc, pr_auc)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["tag", "positives", "roc_auc", "pr_auc"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# One PNG per curve family: (file, title, metric names, y label).
PLOTS = [
    (
        "loss.png",
        "Loss (train: patch level; validation: clip level)",
        ["train_loss", "val_loss"],
        "binary cross-entropy",
    ),
    (
        "accuracy.png",
        "Binary accuracy (train: patch level; validation: clip level)",
        ["train_accuracy", "val_accuracy", "val_accuracy_all_negative"],
        "accuracy over (item, tag) cells",
    ),
    ("auc.png", "Macro AUC (validation)", ["val_roc_auc", "val_pr_auc"], "AUC"),
]

# Legend entries that say what a curve measures where its name alone would mislead: train and
# validation share an axis but are not the same quantity. train_*: the mean over the epoch's
# steps of patch-level values, with dropout on (and AutoPool's alpha penalty in the loss); val_*:
# each clip's aggregated patch probabilities, in eval mode.
LABELS = {
    "train_loss": "train_loss (patches, dropout, + alpha penalty)",
    "val_loss": "val_loss (clips, eval mode)",
    "train_accuracy": "train_accuracy (patches, dropout)",
    "val_accuracy": "val_accuracy (clips, eval mode)",
}


def plot_curves(history: Mapping[str, Sequence[float]], folder: Path) -> list[Path]:
    """Write the loss, accuracy and AUC curves (x = epoch) as PNGs into ``folder``."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, title, keys, ylabel in PLOTS:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            values = history.get(key, [])
            if values:
                style = "--" if key.endswith("all_negative") else "-"
                ax.plot(range(len(values)), values, style, marker="o", label=LABELS.get(key, key))
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        paths.append(folder / name)
    return paths


PREDICTIONS = "test_predictions.npz"


@dataclass(frozen=True)
class Predictions:
    """A run's test-set clip probabilities, as logged in ``test_predictions.npz``."""

    clip_ids: np.ndarray  # (clips,) int64
    tags: tuple[str, ...]
    probabilities: np.ndarray  # (clips, tags) float64
    labels: np.ndarray  # (clips, tags) uint8


def save_predictions(path: Path, clip_ids, tags, probabilities, labels) -> Path:
    """Write ``test_predictions.npz``: numpy arrays only (tag names as a unicode array), no pickle."""
    np.savez_compressed(
        path,
        clip_ids=np.asarray(clip_ids, dtype=np.int64),
        tags=np.asarray(list(tags), dtype=str),
        probabilities=np.asarray(probabilities, dtype=np.float64),
        labels=np.asarray(labels, dtype=np.uint8),
    )
    return Path(path)


def load_predictions(path: str | Path) -> Predictions:
    with np.load(path, allow_pickle=False) as z:
        return Predictions(z["clip_ids"], tuple(str(t) for t in z["tags"]), z["probabilities"], z["labels"])


def digest_test_set(clip_ids, labels) -> str:
    """A short SHA-256 of the test clips and their labels: runs evaluated on the same test set
    (same clips, same tag columns) share it; ``mtt.compare`` refuses to rank runs that do not."""
    order = np.argsort(np.asarray(clip_ids))
    h = hashlib.sha256(np.asarray(clip_ids, dtype=np.int64)[order].tobytes())
    h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.uint8)[order]).tobytes())
    return h.hexdigest()[:16]
