"""Bootstrap intervals and paired differences: exact against scikit-learn, and verdicts that
follow the data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mtt.metrics import tagging_metrics
from mtt.stats import (
    bootstrap_weights,
    interval,
    macro_auc_under_weights,
    paired_difference,
    run_intervals,
    seed_resampled_means,
)


def _data(n=200, tags=6, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, tags)) < 0.15).astype(np.uint8)
    probs = 1 / (1 + np.exp(-(signal * (labels.astype(int) * 2 - 1) + rng.normal(size=(n, tags)))))
    return labels, probs


@pytest.mark.parametrize("ties", [False, True])
def test_resampled_aucs_equal_scikit_learn_with_the_counts_as_weights(ties):
    labels, probs = _data()
    if ties:
        probs = np.round(probs, 1)  # many equal scores
    weights = bootstrap_weights(len(labels), 25, seed=3)
    roc, ap = macro_auc_under_weights(labels, probs, weights)
    for b in range(25):
        keep = [j for j in range(labels.shape[1]) if 0 < labels[weights[b] > 0, j].sum() < (weights[b] > 0).sum()]
        want_roc = np.mean([roc_auc_score(labels[:, j], probs[:, j], sample_weight=weights[b]) for j in keep])
        want_ap = np.mean([average_precision_score(labels[:, j], probs[:, j], sample_weight=weights[b]) for j in keep])
        assert roc[b] == pytest.approx(want_roc, abs=1e-12) and ap[b] == pytest.approx(want_ap, abs=1e-12)


def test_unit_weights_give_the_logged_metrics():
    labels, probs = _data(seed=1)
    roc, ap = macro_auc_under_weights(labels, probs, np.ones((1, len(labels)), dtype=np.int32))
    m = tagging_metrics(labels, probs)
    assert roc[0] == pytest.approx(m["roc_auc"], abs=1e-12) and ap[0] == pytest.approx(m["pr_auc"], abs=1e-12)


def test_run_interval_brackets_the_score_and_narrows_with_more_clips():
    small, large = _data(n=60, seed=2), _data(n=2000, seed=2)
    widths = []
    for labels, probs in (small, large):
        ci = run_intervals(labels, probs, resamples=1000, seed=0)
        score = tagging_metrics(labels, probs)["roc_auc"]
        assert ci["test_roc_auc_ci95_low"] < score < ci["test_roc_auc_ci95_high"]
        widths.append(ci["test_roc_auc_ci95_high"] - ci["test_roc_auc_ci95_low"])
    assert widths[1] < widths[0] / 3  # about sqrt(2000 / 60) = 5.8 times narrower
    assert run_intervals(*small, seed=0) == run_intervals(*small, seed=0)  # seeded: repeatable


def test_paired_verdicts_better_and_indistinguishable():
    labels, good = _data(n=400, seed=4, signal=2.0)
    rng = np.random.default_rng(5)
    weak = 1 / (1 + np.exp(-(0.5 * (labels.astype(int) * 2 - 1) + rng.normal(size=labels.shape))))
    seeds_good = [np.clip(good + rng.normal(0, 0.01, good.shape), 0, 1) for _ in range(3)]
    seeds_weak = [np.clip(weak + rng.normal(0, 0.01, weak.shape), 0, 1) for _ in range(3)]
    better = paired_difference(labels, seeds_good, seeds_weak, ("good", "weak"))
    assert better["test_roc_auc"].verdict == "good better" and better["test_roc_auc"].low > 0
    assert better["test_roc_auc"].line().startswith("good - weak = +")
    worse = paired_difference(labels, seeds_weak, seeds_good, ("weak", "good"))
    assert worse["test_pr_auc"].verdict == "good better" and worse["test_pr_auc"].high < 0
    same = paired_difference(labels, seeds_good, seeds_good, ("a", "b"))
    for d in same.values():
        assert d.verdict == "not distinguishable at 95%" and d.diff == 0 and d.low <= 0 <= d.high


def test_pairing_makes_a_small_consistent_gain_visible():
    """A gain too small to separate the two unpaired intervals is real when every clip moves."""
    labels, probs = _data(n=300, seed=6, signal=0.7)
    nudged = np.clip(probs + 0.02 * (labels.astype(int) * 2 - 1), 0, 1)  # each clip a little better
    a = run_intervals(labels, nudged, seed=0)
    b = run_intervals(labels, probs, seed=0)
    assert a["test_roc_auc_ci95_low"] < b["test_roc_auc_ci95_high"]  # the intervals overlap...
    d = paired_difference(labels, [nudged], [probs], ("nudged", "plain"))["test_roc_auc"]
    assert d.verdict == "nudged better"  # ...the paired difference does not include 0


def test_seed_resampling_widens_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(7)
    agree = np.stack([rng.normal(0.8, 0.01, 1000)] * 3)
    disagree = agree + np.array([[-0.1], [0.0], [0.1]])
    w_agree = np.subtract(*reversed(interval(seed_resampled_means(agree))))
    w_disagree = np.subtract(*reversed(interval(seed_resampled_means(disagree))))
    assert w_disagree > 3 * w_agree
    np.testing.assert_array_equal(seed_resampled_means(agree[:1]), agree[0])  # one seed: the clips alone
