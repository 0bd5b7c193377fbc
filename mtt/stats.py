"""How much a score varies: bootstrap intervals over test clips (and seeds), paired differences.

A test set of a few thousand clips, and one training seed, each move a macro ROC-AUC by about a
hundredth. These functions say by how much, so a comparison can say whether a difference is
real:

- ``bootstrap_weights``: B resamples of the test clips (with replacement), as clip counts;
- ``macro_auc_under_weights``: macro ROC-AUC and PR-AUC of one run's predictions under each
  resample, exactly what scikit-learn gives with those counts as sample weights (vectorised: a
  sort per tag, then cumulative sums, so 1,000 resamples of 5,000 clips x 50 tags take seconds);
- ``interval``: the percentile interval of bootstrap values;
- ``paired_difference``: the difference between two groups of runs (seeds) scored on the SAME
  resamples of the shared clips, with seeds resampled too, and a plain verdict.

Tags are scored where the resample holds both classes (as ``mtt.metrics`` does on the full set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def bootstrap_weights(n_clips: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``(resamples, n_clips)`` int32 counts: how often each clip is drawn in each resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_clips, np.full(n_clips, 1.0 / n_clips), size=resamples).astype(np.int32)


def _cum_at(w: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``(B, len(counts))``: the sum of the first ``counts[k]`` columns of ``w`` ``(B, m)``."""
    cum = np.zeros((len(w), w.shape[1] + 1), dtype=np.int64)
    np.cumsum(w, axis=1, out=cum[:, 1:])
    return cum[:, counts].astype(np.float64)


def _tag_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC-AUC and average precision of one tag under each row of ``weights`` ``(B, n)``.

    ``scores``/``positive`` are ``(n,)``. Ties are handled as scikit-learn does: ROC-AUC counts a
    tied (positive, negative) pair as one half; AP steps once per distinct score. Returns two
    ``(B,)`` arrays, NaN where a resample lacks a class.
    """
    order = np.argsort(-scores, kind="stable")  # descending
    s, pos = scores[order], positive[order].astype(bool)
    # Counts stay integers (exact, and several times faster than float cumulative sums).
    wp = weights[:, order[pos]]
    wn = weights[:, order[~pos]]
    # The last index of each run of equal scores: where a threshold stops.
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    # (B, thresholds) true / false positives at score >= threshold: cumulative counts of the
    # positives (negatives) ranked at or above each threshold's last clip.
    pos_rank = np.cumsum(pos)[last]  # how many positives are at or above each threshold
    neg_rank = np.cumsum(~pos)[last]
    tp = _cum_at(wp, pos_rank)
    fp = _cum_at(wn, neg_rank)
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    ok = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        # ROC curve through the thresholds, trapezoids (exact for ties: the half pairs).
        tpr = np.concatenate([np.zeros((len(weights), 1)), tp], axis=1) / n_pos[:, None]
        fpr = np.concatenate([np.zeros((len(weights), 1)), fp], axis=1) / n_neg[:, None]
        roc = np.sum((fpr[:, 1:] - fpr[:, :-1]) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
        precision = tp / np.maximum(tp + fp, 1e-300)
        recall_step = np.diff(np.concatenate([np.zeros((len(weights), 1)), tp], axis=1), axis=1) / n_pos[:, None]
        ap = np.sum(recall_step * precision, axis=1)
    return np.where(ok, roc, np.nan), np.where(ok, ap, np.nan)


def macro_auc_under_weights(
    labels: np.ndarray, probs: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Macro ROC-AUC and PR-AUC ``(B,)`` of ``probs`` ``(n, tags)`` against 0/1 ``labels`` under
    each resample of ``weights`` ``(B, n)``: the mean over the tags that have both classes in
    that resample."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    roc = np.full((len(weights), labels.shape[1]), np.nan)
    ap = np.full_like(roc, np.nan)
    for j in range(labels.shape[1]):
        if 0 < labels[:, j].sum() < len(labels):  # else no resample has both classes either
            roc[:, j], ap[:, j] = _tag_auc(probs[:, j], labels[:, j], weights)
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no scorable tag
            return np.nanmean(roc, axis=1), np.nanmean(ap, axis=1)


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval holding ``level`` of the bootstrap ``values`` (NaNs dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(v, [tail, 100 - tail])
    return float(lo), float(hi)


def run_intervals(
    labels: np.ndarray, probs: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict[str, float]:
    """``test_roc_auc_ci95_low`` ... ``test_pr_auc_ci95_high`` of one run's test predictions:
    the bootstrap over its test clips."""
    roc, ap = macro_auc_under_weights(labels, probs, bootstrap_weights(len(labels), resamples, seed))
    pct = round(level * 100)
    (rl, rh), (pl, ph) = interval(roc, level), interval(ap, level)
    return {
        f"test_roc_auc_ci{pct}_low": rl,
        f"test_roc_auc_ci{pct}_high": rh,
        f"test_pr_auc_ci{pct}_low": pl,
        f"test_pr_auc_ci{pct}_high": ph,
    }


def seed_resampled_means(per_run: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(B,)`` means of a group's runs under each clip resample, the runs (seeds) themselves
    drawn with replacement per resample. ``per_run`` is ``(n_runs, B)`` bootstrap values; with
    one run this is just its values (only the test clips vary)."""
    n, b = per_run.shape
    if n == 1:
        return per_run[0]
    pick = np.random.default_rng([seed, 1]).integers(n, size=(b, n))
    with np.errstate(invalid="ignore"):
        return np.nanmean(per_run[pick, np.arange(b)[:, None]], axis=1)


@dataclass(frozen=True)
class Difference:
    """``a - b`` of a metric: the point estimate (means over runs on all shared clips), its
    bootstrap interval, and whether the interval excludes 0."""

    metric: str
    a: str
    b: str
    diff: float
    low: float
    high: float
    level: float = LEVEL

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return f"{self.a} better"
        if self.high < 0:
            return f"{self.b} better"
        return f"not distinguishable at {round(self.level * 100)}%"

    def line(self) -> str:
        return (
            f"{self.a} - {self.b} = {self.diff:+.4f} [{self.low:+.4f}, {self.high:+.4f}] "
            f"({self.metric}): {self.verdict}"
        )


def difference(
    a_boot: np.ndarray,
    b_boot: np.ndarray,
    a_point: float,
    b_point: float,
    names: tuple[str, str],
    metric: str,
    seed: int = 0,
    level: float = LEVEL,
) -> Difference:
    """``mean(A) - mean(B)`` of ``metric`` with its interval.

    ``a_boot``/``b_boot`` are ``(runs, B)``: each run's metric under the SAME ``B`` resamples of
    the shared clips (paired); the seeds of each group are also drawn with replacement per
    resample, so the interval covers both the test set's and the seeds' variation.
    ``a_point``/``b_point`` are the groups' means on all shared clips.
    """
    means_a = seed_resampled_means(np.asarray(a_boot), seed)
    means_b = seed_resampled_means(np.asarray(b_boot), seed + 1)
    low, high = interval(means_a - means_b, level)
    return Difference(metric, names[0], names[1], float(a_point - b_point), low, high, level)


def paired_difference(
    labels: np.ndarray,
    group_a: list[np.ndarray],
    group_b: list[np.ndarray],
    names: tuple[str, str],
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, Difference]:
    """``difference`` of macro ROC-AUC and PR-AUC for two groups of runs given their test
    probabilities ``(n, tags)`` (one array per run, rows aligned with ``labels``)."""
    weights = bootstrap_weights(len(labels), resamples, seed)
    full = np.ones((1, len(labels)), dtype=np.int32)
    boot = [[macro_auc_under_weights(labels, p, weights) for p in g] for g in (group_a, group_b)]
    point = [[macro_auc_under_weights(labels, p, full) for p in g] for g in (group_a, group_b)]
    out = {}
    for k, metric in enumerate(("test_roc_auc", "test_pr_auc")):
        a, b = (np.stack([r[k] for r in g]) for g in boot)
        pa, pb = (float(np.mean([r[k][0] for r in g])) for g in point)
        out[metric] = difference(a, b, pa, pb, names, metric, seed, level)
    return out
