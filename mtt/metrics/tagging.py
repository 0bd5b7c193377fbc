"""Clip-level tagging metrics: binary accuracy beside its all-negative baseline, macro ROC-AUC
and PR-AUC over tags (scikit-learn), and a per-tag table."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def scorable(y_true: np.ndarray) -> np.ndarray:
    """Columns (tags) that have both classes, the only ones an AUC is defined for."""
    pos = y_true.sum(axis=0)
    return np.flatnonzero((pos > 0) & (pos < y_true.shape[0]))


def tagging_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of clip probabilities ``y_prob`` against 0/1 labels ``y_true``, both ``(clips, tags)``.

    ``accuracy`` is binary accuracy at ``threshold`` over all (clip, tag) cells (the report's
    "accuracy"); ``accuracy_all_negative`` is what predicting no tag at all scores on the same
    cells; ``roc_auc`` / ``pr_auc`` are macro averages over tags with both classes (NaN if none).
    """
    y_true = np.asarray(y_true).astype(np.int64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    out = {
        "accuracy": float(((y_prob >= threshold) == (y_true == 1)).mean()),
        "accuracy_all_negative": float((y_true == 0).mean()),
    }
    cols = scorable(y_true)
    if len(cols):
        out["roc_auc"] = float(roc_auc_score(y_true[:, cols], y_prob[:, cols], average="macro"))
        out["pr_auc"] = float(average_precision_score(y_true[:, cols], y_prob[:, cols], average="macro"))
    else:
        out["roc_auc"] = out["pr_auc"] = float("nan")
    return out


def per_tag_table(tags, y_true: np.ndarray, y_prob: np.ndarray) -> list[dict]:
    """One row per tag: tag, positives, roc_auc, pr_auc (NaN where a tag lacks a class)."""
    rows = []
    for j, tag in enumerate(tags):
        t, p = y_true[:, j].astype(int), y_prob[:, j]
        ok = 0 < t.sum() < len(t)
        rows.append(
            {
                "tag": tag,
                "positives": int(t.sum()),
                "roc_auc": float(roc_auc_score(t, p)) if ok else float("nan"),
                "pr_auc": float(average_precision_score(t, p)) if ok else float("nan"),
            }
        )
    return rows
