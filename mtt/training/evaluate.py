"""Evaluation: clip-level probabilities of a split, its metrics, and the test split's records.

Shared by the training loop (``mtt.training.train``) and the linear probe (``mtt.probe``), so that every
run is scored, and its test split recorded, the same way.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtt.core import distributed
from mtt.data.index import ClipIndex
from mtt.features.store import PatchStore
from mtt.features.streams import ChunkGrid, eval_batches
from mtt.metrics.stats import run_intervals
from mtt.metrics.tagging import per_tag_table, tagging_metrics
from mtt.models import Tagger
from mtt.tracking.records import PREDICTIONS, digest_test_set, per_tag_csv, save_predictions

log = logging.getLogger(__name__)


@dataclass
class Split:
    """The clips of one split that have features, with their labels ``(n, n_tags)``."""

    clip_ids: np.ndarray
    labels: np.ndarray
    declared: int  # clips of this split in the annotations, with or without features


def split_of(index: ClipIndex, store: PatchStore, name: str) -> Split:
    """The clips of split ``name`` that have at least one patch; clips shorter than one patch are
    kept in the store with 0 patches (see ``mtt.preprocess``) and left out here, with a count."""
    rows = index.subset(name)
    stored = np.array([int(index.clip_ids[r]) in store for r in rows], dtype=bool)
    present = np.array([ok and store.count(index.clip_ids[r]) > 0 for ok, r in zip(stored, rows)], dtype=bool)
    short = int(stored.sum() - present.sum())
    if short:
        log.warning("%s: %d clip(s) shorter than one patch (0 patches) left out", name, short)
    rows_ok = rows[present]
    return Split(index.clip_ids[rows_ok], index.labels[rows_ok], declared=len(rows))


def chunk_grid(cfg, store: PatchStore, from_backbone: bool) -> ChunkGrid:
    """Where the rows of a run's inputs lie in their clips (``ChunkGrid``): the feature store
    ``store``'s patches can be cut between rows when they touch or overlap; the frozen backbone's
    cache (``from_backbone``) holds whole rows only. Lengths come from the feature store's
    decoded seconds; ``eval.chunk_samples`` (default: the front end's fewest samples for a patch)."""
    from mtt.features.frontend import build_front_end  # here: torchaudio is imported only when needed

    f = cfg.features
    hop_samples = int(round(f.sample_rate * f.hop_seconds))  # as both front ends round it
    chunk = cfg.eval.get("chunk_samples") or build_front_end(f).samples_for_frames(f.patch_frames)
    samples = {c: int(round(s * f.sample_rate)) for c, s in store.seconds.items()}
    cuttable = not from_backbone and f.patch_hop_frames <= f.patch_frames
    return ChunkGrid(f.patch_hop_frames, f.patch_frames, cuttable, hop_samples, int(chunk), samples)


def chunk_bce(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of each chunk ``(chunks, n_tags)`` against its clip's tags, averaged
    over the tags ``(chunks,)``, as ``torch.nn.BCELoss`` computes it (each log clamped at -100)."""
    y = labels.astype(np.float64)
    with np.errstate(divide="ignore"):
        log_p, log_q = np.maximum(np.log(probs), -100.0), np.maximum(np.log1p(-probs), -100.0)
    return -(y * log_p + (1 - y) * log_q).mean(axis=1)


@torch.no_grad()
def clip_scores(
    model: Tagger,
    inputs: PatchStore,
    split: Split,
    cfg,
    device: torch.device,
    from_backbone: bool,
    amp: torch.dtype | None,
    grid: ChunkGrid | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Clip-level probabilities ``(clips, n_tags)``: every evaluated chunk's, aggregated per clip
    (mean or max); and each clip's chunk loss ``(clips,)``: the mean ``chunk_bce`` of its chunks
    (Won et al.'s validation loss is its mean over the clips). ``grid``: ``chunk_grid``, needed by
    ``eval.spacing=even``."""
    model.eval()
    n, n_tags = len(split.clip_ids), split.labels.shape[1]
    agg = np.zeros((n, n_tags))
    counts = np.zeros(n)
    losses = np.zeros(n)
    reduce = {"mean": np.add.at, "max": np.maximum.at}
    for x, owner in eval_batches(
        inputs,
        split.clip_ids,
        cfg.eval.batch_size,
        cfg.eval.patches_per_clip,
        cfg.trainer.seed,
        spacing=cfg.eval.spacing,
        grid=grid,
    ):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x.to(device, non_blocking=True), from_backbone=from_backbone)
        probs = model.probabilities(logits).cpu().numpy().astype(np.float64)
        reduce[cfg.eval.aggregate](agg, owner, probs)
        np.add.at(counts, owner, 1)
        np.add.at(losses, owner, chunk_bce(probs, split.labels[owner]))
    if cfg.eval.aggregate == "mean":
        agg /= np.maximum(counts, 1)[:, None]
    return agg, losses / np.maximum(counts, 1)


def clip_probabilities(*args, **kwargs) -> np.ndarray:
    """Clip-level probabilities ``(clips, n_tags)`` alone (``clip_scores``, same arguments)."""
    return clip_scores(*args, **kwargs)[0]


def clip_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``tagging_metrics`` plus the clip-level binary cross-entropy ``loss``."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    out = tagging_metrics(labels, probs)
    out["loss"] = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    return out


def split_scores(
    d: distributed.Dist,
    model: Tagger,
    inputs: PatchStore,
    split: Split,
    cfg,
    device: torch.device,
    from_backbone: bool,
    amp: torch.dtype | None,
    grid: ChunkGrid | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``clip_scores`` of a whole split; under torchrun each rank computes every world-th clip
    and the ranks exchange results, so each clip is evaluated exactly once."""

    def part(rows: np.ndarray) -> np.ndarray:
        sub = Split(split.clip_ids[rows], split.labels[rows], split.declared)
        probs, losses = clip_scores(model, inputs, sub, cfg, device, from_backbone, amp, grid)
        return np.column_stack([probs, losses])  # one array per rank: the loss is the last column

    both = distributed.gather_rows(d, len(split.clip_ids), part)
    return both[:, :-1], both[:, -1]


def monitor_score(metrics: dict[str, float], monitor: str) -> float:
    """The monitored metric, oriented so that higher is better (losses are negated); NaN -> -inf."""
    if monitor not in metrics:
        raise KeyError(f"trainer.monitor={monitor!r} is not an epoch metric; have {sorted(metrics)}")
    score = metrics[monitor] * (-1 if monitor.endswith("loss") else 1)
    return -math.inf if math.isnan(score) else score


def log_test(
    tracker, tags, split: Split, probs: np.ndarray, step: int, seed: int, extra: dict[str, float] | None = None
) -> dict[str, float]:
    """Score the test split and record it: ``test_*`` metrics with their bootstrap intervals
    (resampling the test clips, seeded), the clip probabilities (``test_predictions.npz``), the
    per-tag table and the test set's digest. Returns the ``test_*`` metrics."""
    final = {f"test_{k}": v for k, v in clip_metrics(split.labels, probs).items()}
    intervals = run_intervals(split.labels, probs, seed=seed)
    tracker.log_metrics({**final, **intervals, **(extra or {})}, step=step)
    tracker.set_tags(
        {"test_clips_sha256": digest_test_set(split.clip_ids, split.labels), "test_clips": len(split.clip_ids)}
    )
    tracker.log_text(per_tag_csv(per_tag_table(tags, split.labels, probs)), "per_tag_test.csv")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_predictions(Path(tmp) / PREDICTIONS, split.clip_ids, tags, probs, split.labels)
        tracker.log_artifact(path)
    return {**final, **intervals}
