"""Clip-level metrics: accuracy beside the all-negative baseline, macro AUCs over scorable tags."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mtt.metrics.tagging import per_tag_table, tagging_metrics


def test_all_negative_prediction_scores_the_baseline_accuracy():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 188)) < 0.018).astype(np.uint8)  # MTAT-like density
    m = tagging_metrics(y, np.zeros(y.shape))
    assert m["accuracy"] == pytest.approx(m["accuracy_all_negative"]) == pytest.approx(1 - y.mean())
    assert m["accuracy"] > 0.97  # the report's "0.98" is reachable by predicting nothing


def test_aucs_are_macro_over_tags_with_both_classes():
    y = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]])
    p = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.1], [0.6, 0.2, 0.3], [0.7, 0.1, 0.4]])
    m = tagging_metrics(y, p)
    # tag 1 has no positive: left out; tags 0 and 2 averaged.
    expected = np.mean([roc_auc_score(y[:, 0], p[:, 0]), roc_auc_score(y[:, 2], p[:, 2])])
    assert m["roc_auc"] == pytest.approx(expected)
    assert m["accuracy"] == pytest.approx(np.mean((p >= 0.5) == y))
    rows = per_tag_table(["a", "b", "c"], y, p)
    assert [r["positives"] for r in rows] == [2, 0, 2]
    assert np.isnan(rows[1]["roc_auc"]) and rows[0]["roc_auc"] == pytest.approx(0.75)


def test_perfect_ranking():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    m = tagging_metrics(y, y * 0.8 + 0.1)
    assert m["roc_auc"] == 1.0 and m["pr_auc"] == 1.0 and m["accuracy"] == 1.0
