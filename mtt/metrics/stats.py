"""How much a score varies: bootstrap intervals over test clips, and intervals and verdicts for
groups of seeds that count the seeds' variation too.

A test set of a few thousand clips, and one training seed, each move a macro ROC-AUC by about a
hundredth. These functions say by how much, so a comparison can say whether a difference is
real (the method, its sources and its measured calibration: docs/comparing.md):

- ``bootstrap_weights``: B resamples of the test clips (with replacement), as clip counts;
- ``macro_auc_under_weights`` / ``metric_under_weights``: macro ROC-AUC (and PR-AUC) of one run's
  predictions under each resample, exactly what scikit-learn gives with those counts as sample
  weights (vectorised, so 1,000 resamples of 5,000 clips x 50 tags take seconds);
- ``run_intervals``: one run's interval over its test clips (logged with every run);
- ``group_interval`` / ``group_estimate``: the mean of a group of seeds scored on the same test
  clips, with an interval that counts both sources of variation: the seeds (their variance on
  the shared clips) and the clips (the paired bootstrap, every seed on the same resamples),
  Student's t with Welch-Satterthwaite degrees of freedom;
- ``paired_difference``: the same for the difference of two groups' means on shared clips, with a
  verdict: ``A better``, ``B better``, ``not distinguishable`` or ``seed variation unknown``
  (a group of one seed, unless its seed sd is supplied).

Tags are scored where the resample holds both classes (as ``mtt.metrics.tagging`` does on the full set).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
METRICS = ("roc_auc", "pr_auc")
VERDICTS = ("A better", "B better", "not distinguishable", "seed variation unknown")
# ROC-AUC by a product of the weights (positives x pairs x negatives) where one class has at most
# this many clips, else by cumulative sums (about N operations per resample): the product is the
# faster below about 150 on a 2-core EPYC, and both are exact.
PAIRWISE_MAX = 128


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
    return _macro(roc), _macro(ap)


def _macro(per_tag: np.ndarray) -> np.ndarray:
    """``(B,)``: the mean over the scorable tags (not NaN) of ``(B, tags)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no scorable tag
        return np.nanmean(per_tag, axis=1)


def _tag_roc_pairwise(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC ``(B,)`` of one tag under float32 ``weights`` ``(B, n)``, as the weighted share of
    (positive, negative) pairs ranked right, a tie counting one half: ``w_pos @ H @ w_neg`` with
    ``H`` (positives, negatives) in {0, 0.5, 1}. Exact: every partial sum of the product is a
    multiple of 0.5 below the clip count, so float32 holds it in any summation order (the same
    result on every CPU)."""
    sp, sn = scores[positive], scores[~positive]
    h = (sp[:, None] > sn[None, :]).astype(np.float32) + np.float32(0.5) * (sp[:, None] == sn[None, :])
    wp, wn = weights[:, positive], weights[:, ~positive]
    num = np.einsum("bk,bk->b", (wp @ h).astype(np.float64), wn)
    n_pos, n_neg = wp.sum(axis=1, dtype=np.float64), wn.sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), num / (n_pos * n_neg), np.nan)


def metric_under_weights(
    labels: np.ndarray, probs: np.ndarray, weights: np.ndarray, metric: str = "roc_auc"
) -> np.ndarray:
    """Macro ``metric`` (``roc_auc`` or ``pr_auc``) ``(B,)`` of ``probs`` ``(n, tags)`` against
    0/1 ``labels`` under each resample of ``weights`` ``(B, n)``; ROC-AUC alone is computed
    several times faster than by ``macro_auc_under_weights``, with the same values."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {', '.join(METRICS)}")
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if metric == "pr_auc":
        return macro_auc_under_weights(labels, probs, weights)[1]
    roc = np.full((len(weights), labels.shape[1]), np.nan)
    as_float = weights.astype(np.float32)
    for j in range(labels.shape[1]):
        positive = labels[:, j].astype(bool)
        smaller = min(positive.sum(), len(positive) - positive.sum())
        if smaller == 0:
            continue
        if smaller <= PAIRWISE_MAX:
            roc[:, j] = _tag_roc_pairwise(probs[:, j], positive, as_float)
        else:
            roc[:, j] = _tag_auc(probs[:, j], positive, weights)[0]
    return _macro(roc)


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


# ------------------------------------------------------------------ groups of seeds, differences
#
# A group is n runs (seeds) of one config, every run scored on the same N test clips. Its mean
# moves with the seeds and with the clips. Write run s's score on the test set D as
#     X_s = mu + a_s + c(D) + e_s(D)
# (a_s: the seed's own shift; c: the clips' effect that every seed shares; e_s: how the seed's
# errors fall on these particular clips). Then var(mean) = var(a)/n + var(c) + var(e)/n, and
# - the seeds' variance on the shared clips, s^2, estimates var(a) + var(e): seed term s^2 / n,
#   with n - 1 degrees of freedom;
# - the paired bootstrap's covariance between two different seeds' scores (the same resamples
#   for every run) estimates var(c): the clip term, with N - 1. (A seed's own bootstrap variance
#   also holds var(e), which the seed term already counts: averaging the covariances between
#   different seeds counts it once.)
# A difference of two groups on the same clips adds both seed terms (combined into one by
# Welch-Satterthwaite: two terms of similar degrees of freedom, where it is accurate); its clip
# term is the shared effect of the difference, C_AA - 2 C_AB + C_BB, from the same covariances.
# The seed term and the clip term, of few and of many degrees of freedom, make the interval by
# the generalized (fiducial) pivot for a sum of variance components (Weerahandi 1993): the
# quantiles of |Z| sqrt(sum_k v_k df_k / W_k), Z ~ N(0, 1), W_k ~ chi2(df_k) (``half_width``);
# for two terms it is the Behrens-Fisher fiducial interval, which covers at least its level
# (Robinson 1976). Student's t with Welch-Satterthwaite degrees of freedom for these two covers
# about 0.89 where 2 seeds dominate. Measured: tests/benchmarks/bench_calibration.py,
# docs/comparing.md.

FIDUCIAL_POINTS = 4000  # values of each chi2 term over which the pivot's distribution is averaged


@dataclass(frozen=True)
class Interval:
    """An estimate (a group's mean, or the difference of two) with its ``level`` interval and
    what it rests on. ``seeds``: runs per group; ``seed_vars``: each group's variance of one run's
    score between seeds on the shared clips (NaN: one seed, unknown; or the supplied seed sd
    squared, then ``seed_sd_known``); ``clip_var``: the clip-sampling variance of the estimate
    that the seeds share. ``low`` and ``high`` are NaN where the seeds' variation is unknown."""

    estimate: float
    low: float
    high: float
    level: float
    seeds: tuple[int, ...]
    clips: int
    seed_vars: tuple[float, ...]
    clip_var: float
    seed_sd_known: bool = False

    @property
    def seed_var_known(self) -> bool:
        return not any(math.isnan(v) for v in self.seed_vars)

    def terms(self, seeds: Sequence[int] | None = None) -> list[tuple[float, float]]:
        """The variance terms of the estimate ``(variance, degrees of freedom)``: the seeds'
        (each group's seed variance over its seeds, or over ``seeds``; two groups' combined by
        Welch-Satterthwaite), then the clips'."""
        seeds = self.seeds if seeds is None else seeds
        per_group = [(v / n, math.inf if self.seed_sd_known else n - 1) for v, n in zip(self.seed_vars, seeds)]
        return [(sum(v for v, _ in per_group), welch_df(per_group)), (self.clip_var, self.clips - 1)]


@dataclass(frozen=True)
class Difference(Interval):
    """``mean(A) - mean(B)`` of ``metric`` on shared clips, with its interval and verdict."""

    metric: str = "roc_auc"
    a: str = "A"
    b: str = "B"

    @classmethod
    def of(cls, interval: Interval, metric: str, a: str = "A", b: str = "B") -> Difference:
        """``interval`` (of ``combine`` with signs [1, -1]) as the difference of groups a and b."""
        return cls(**vars(interval), metric=metric, a=a, b=b)

    @property
    def verdict(self) -> str:
        """One of ``VERDICTS``: "A better" when the interval lies above 0, "B better" below it."""
        if not self.seed_var_known:
            return "seed variation unknown"
        if self.low > 0:
            return "A better"
        if self.high < 0:
            return "B better"
        return "not distinguishable"

    @property
    def reads(self) -> str:
        """The verdict with the groups' names: ``head=gap3 better``."""
        return {"A better": f"{self.a} better", "B better": f"{self.b} better"}.get(self.verdict, self.verdict)

    @property
    def clips_limit(self) -> bool:
        """More seeds alone cannot resolve a difference of this size: the clips' share of the
        variance alone gives an interval that holds 0."""
        return half_width([(self.clip_var, self.clips - 1)], self.level) >= abs(self.estimate)

    def seeds_needed(self, limit: int = 1000) -> int | None:
        """An ESTIMATE, for a pair that is not distinguishable: the seeds per group at which a
        difference of the observed size would be resolved, if the measured variances (each
        group's seed variance, the clip term) held. None where it does not apply, where more
        seeds cannot resolve it (``clips_limit``) or more than ``limit`` would be needed."""
        if self.verdict != "not distinguishable" or self.estimate == 0 or self.clips_limit:
            return None
        resolved = lambda n: half_width(self.terms([n] * len(self.seeds)), self.level) < abs(self.estimate)
        if not resolved(limit):
            return None
        low, high = 1, limit  # resolved(high), not resolved(low): the half width falls with n
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if resolved(mid) else (mid, high)
        return high

    def line(self) -> str:
        if not self.seed_var_known:
            return f"{self.a} - {self.b} = {self.estimate:+.4f} ({self.metric}): {self.reads}"
        return (
            f"{self.a} - {self.b} = {self.estimate:+.4f} [{self.low:+.4f}, {self.high:+.4f}] "
            f"({self.metric}): {self.reads}"
        )


def welch_df(terms: Sequence[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of variance estimates ``(v, df)``:
    ``(sum v)^2 / sum(v^2 / df)``; inf where every term is known (df inf) or zero."""
    total = sum(v for v, _ in terms)
    spread = sum(v * v / df for v, df in terms if v > 0 and not math.isinf(df))
    return total * total / spread if spread > 0 else math.inf


@functools.lru_cache(maxsize=256)
def _chi2_points(df: float, term: int) -> np.ndarray:
    """``FIDUCIAL_POINTS`` stratified values of chi2(df) / df (its quantiles at (i + 0.5) / K;
    ones for df inf), in an order fixed per ``term`` so that two terms pair at random."""
    if math.isinf(df):
        return np.ones(FIDUCIAL_POINTS)
    from scipy import stats as st

    q = st.chi2.ppf((np.arange(FIDUCIAL_POINTS) + 0.5) / FIDUCIAL_POINTS, df) / df
    return np.random.default_rng([24, term, round(df * 1000)]).permutation(q)


def half_width(terms: Sequence[tuple[float, float]], level: float = LEVEL) -> float:
    """Half the width of the generalized (fiducial) interval of an estimate whose variance is
    the sum of ``terms`` ``(estimated variance v, its degrees of freedom df)``: the ``level``
    quantile h of ``|Z| sqrt(R)``, ``R = sum v / (chi2(df) / df)``, solving
    ``mean(erf(h / sqrt(2 R))) = level`` over stratified values of R (Z integrated exactly).
    One term of df degrees of freedom gives Student's t quantile (to 1e-5); df inf is a known
    variance. Deterministic: the same terms give the same width on any machine."""
    from scipy import optimize, special

    pivot = np.zeros(FIDUCIAL_POINTS)
    for k, (v, df) in enumerate(terms):
        if v > 0:
            pivot += v / _chi2_points(float(df), k)
    if not pivot.any():
        return 0.0
    scale = np.sqrt(2 * pivot)
    gap = lambda h: float(special.erf(h / scale).mean()) - level  # noqa: E731
    high = math.sqrt(pivot.max())
    while gap(high) < 0:
        high *= 2
    return float(optimize.brentq(gap, 0.0, high, rtol=1e-9))


def _shared_cov(cov: np.ndarray, rows: np.ndarray, cols: np.ndarray, same: bool) -> float:
    """The mean bootstrap covariance between the runs ``rows`` and ``cols``; within one group of
    two or more runs, between DIFFERENT runs only (the part of the clips' effect they share)."""
    block = cov[np.ix_(rows, cols)]
    if same and len(rows) > 1:
        return float((block.sum() - np.trace(block)) / (len(rows) * (len(rows) - 1)))
    return float(block.mean())


def combine(
    points: Sequence[np.ndarray],
    boots: Sequence[np.ndarray],
    signs: Sequence[int],
    clips: int,
    level: float = LEVEL,
    seed_sd: float | None = None,
) -> Interval:
    """The estimate ``sum_g signs[g] * mean(points[g])`` and its interval:
    ``points[g]`` ``(n_g,)`` are group g's run scores on all ``clips`` shared clips, ``boots[g]``
    ``(n_g, B)`` the same runs under the SAME B resamples of those clips. ``seed_sd``: a known sd
    of one run's score between seeds, used for every group instead of the measured one."""
    points = [np.asarray(p, dtype=np.float64) for p in points]
    stacked = np.concatenate([np.asarray(b, dtype=np.float64) for b in boots])
    stacked = stacked[:, ~np.isnan(stacked).any(axis=0)]  # resamples where every run is scored
    cov = np.atleast_2d(np.cov(stacked)) if stacked.shape[1] > 1 else np.zeros((len(stacked),) * 2)
    edges = np.cumsum([0, *(len(p) for p in points)])
    rows = [np.arange(edges[g], edges[g + 1]) for g in range(len(points))]
    clip_var = sum(
        signs[g] * signs[h] * _shared_cov(cov, rows[g], rows[h], g == h)
        for g in range(len(points))
        for h in range(len(points))
    )
    clip_var = max(0.0, float(clip_var))  # a difference of shared effects can estimate below 0
    seeds = tuple(len(p) for p in points)
    if seed_sd is not None:
        seed_vars = tuple(float(seed_sd) ** 2 for _ in points)
    else:
        seed_vars = tuple(float(np.var(p, ddof=1)) if len(p) > 1 else math.nan for p in points)
    estimate = float(sum(s * p.mean() for s, p in zip(signs, points)))
    out = Interval(estimate, math.nan, math.nan, level, seeds, clips, seed_vars, clip_var, seed_sd is not None)
    if not out.seed_var_known:
        return out
    half = half_width(out.terms(), level)
    if len(points) == 1 and 0 < estimate < 1:
        # A group's mean on the logit scale (the delta method: the same terms over (m (1 - m))^2),
        # back to [0, 1]: an AUC's spread shrinks towards 1, so a symmetric interval around a high
        # estimate is too narrow on its lower side and misses more often above the truth.
        centre, k = math.log(estimate / (1 - estimate)), half / (estimate * (1 - estimate))
        return dataclasses.replace(out, low=_expit(centre - k), high=_expit(centre + k))
    floor = 0.0 if len(points) == 1 else -1.0  # a metric lies in [0, 1], a difference in [-1, 1]
    return dataclasses.replace(out, low=max(floor, estimate - half), high=min(1.0, estimate + half))


def _expit(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def resampled(
    labels: np.ndarray, scores: np.ndarray, metric: str = "roc_auc", resamples: int = RESAMPLES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Each run's macro ``metric`` on all clips ``(runs,)`` and under the same ``resamples``
    resamples of the clips ``(runs, resamples)``; ``scores`` is ``(runs, clips, tags)``."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[1:] != labels.shape:
        raise ValueError(
            f"scores must be (seeds, clips, tags) with (clips, tags) = labels' {labels.shape}, got {scores.shape}"
        )
    weights = bootstrap_weights(len(labels), resamples, seed)
    full = np.ones((1, len(labels)), dtype=np.int32)
    points = np.array([metric_under_weights(labels, s, full, metric)[0] for s in scores])
    return points, np.stack([metric_under_weights(labels, s, weights, metric) for s in scores])


def group_estimate(
    labels: np.ndarray,
    scores: np.ndarray,
    metric: str = "roc_auc",
    level: float = LEVEL,
    seed: int = 0,
    *,
    resamples: int = RESAMPLES,
    seed_sd: float | None = None,
) -> Interval:
    """A group's mean ``metric`` over its seeds and its interval, with what it rests on.
    ``labels`` ``(clips, tags)`` in {0, 1}; ``scores`` ``(seeds, clips, tags)``: every seed's
    predictions for the same clips. One seed without ``seed_sd``: NaN bounds (the seeds'
    variation is unknown)."""
    points, boot = resampled(labels, scores, metric, resamples, seed)
    return combine([points], [boot], [1], len(labels), level, seed_sd)


def group_interval(
    labels: np.ndarray,
    scores: np.ndarray,
    metric: str = "roc_auc",
    level: float = LEVEL,
    seed: int = 0,
    *,
    resamples: int = RESAMPLES,
    seed_sd: float | None = None,
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``group_estimate`` as a tuple."""
    est = group_estimate(labels, scores, metric, level, seed, resamples=resamples, seed_sd=seed_sd)
    return est.estimate, est.low, est.high


def paired_difference(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    metric: str = "roc_auc",
    level: float = LEVEL,
    seed: int = 0,
    *,
    resamples: int = RESAMPLES,
    seed_sd: float | None = None,
    names: tuple[str, str] = ("A", "B"),
) -> Difference:
    """``mean(A) - mean(B)`` of ``metric`` for two groups scored on the same clips, both on the
    same resamples: ``scores_a`` ``(seeds_a, clips, tags)``, ``scores_b`` ``(seeds_b, clips,
    tags)``. ``.verdict`` is one of ``VERDICTS``."""
    pa, ba = resampled(labels, scores_a, metric, resamples, seed)
    pb, bb = resampled(labels, scores_b, metric, resamples, seed)
    return Difference.of(combine([pa, pb], [ba, bb], [1, -1], len(labels), level, seed_sd), metric, *names)
