"""Calibration of mtt.metrics.stats' intervals and verdicts, measured on simulated runs whose true AUC is
known: does a 95% interval cover the truth 95% of the time, and how often does a comparison of
two groups of the SAME config call one "better"?

Run: ``python tests/benchmarks/bench_calibration.py`` (the full grid: about 1,000 CPU-seconds,
so about 9 minutes in two processes on two idle cores (``--jobs``); ``--draws``, ``--clips``,
``--seeds``, ``--ratios`` shrink it; ``--markdown`` prints the table for docs/comparing.md).
Exit status 1 if a cell misses the target.

The generative model (one draw = one test set and every group's runs on it):

- 8 tags; tag j is positive on a clip with probability ``PREVALENCE[j]`` (8% to 30%);
- every run of every group scores clip i, tag j as
  ``x = (d_j + sigma * xi_s + shift) * y_ij + rho * z_ij + sqrt(1 - rho^2) * eps_sij``:
  ``d_j`` the tag's separation (AUCs 0.80 to 0.95), ``xi_s ~ N(0, 1)`` the seed's shift of the
  signal (every tag), ``z_ij ~ N(0, 1)`` the clip's effect, shared by every run (a clip that is
  hard for one model is hard for all), ``eps_sij ~ N(0, 1)`` the run's own error on that clip,
  ``rho = 0.8``; ``shift`` is 0 except for the groups that are truly better;
- so a run's population AUC on tag j is ``Phi((d_j + sigma xi + shift) / sqrt(2))`` and a
  group's true macro ROC-AUC, the mean over seeds and clips, is in closed form
  ``mean_j Phi((d_j + shift) / sqrt(2 + sigma^2))``;
- ``sigma`` is set per cell so that the sd of a run's AUC between seeds is ``ratio`` times the
  sd of a run's AUC between test sets of N clips (measured once by simulating 4,000 test sets).

Per cell (N test clips, n seeds per group, seed sd / clip sd), each draw makes four groups of n
runs on one test set: A and B of the same config, C truly better than A by 0.01, D truly better
than B by 0.02, all scored on the same 1,000 resamples (mtt.metrics.stats' defaults). It counts: the
coverage and mean width of A's 95% group interval; false "better" verdicts of A against B (either
direction); the power to call C better than A and D better than B. The method before issue 24
(a percentile bootstrap that redraws clips and seeds; ``legacy_*`` below, copied from it) is
scored on the same draws, for comparison.

Target (issue 24): coverage >= 0.93 and false "better" <= 0.06 in every cell.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# One BLAS thread: the resamples' products (1,000 x 60 by 60 x 240) gain nothing from a second,
# and on a shared 2-core machine two threads spent five times the CPU (measured).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import optimize  # noqa: E402
from scipy import stats as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from mtt.metrics.stats import LEVEL, Difference, Interval, combine, metric_under_weights, resampled  # noqa: E402

TAGS = 8
PREVALENCE = np.linspace(0.08, 0.30, TAGS)
SEPARATION = np.sqrt(2) * st.norm.ppf(np.linspace(0.80, 0.95, TAGS))  # a tag's AUC is Phi(d / sqrt(2))
RHO = 0.8
CLIPS, SEEDS, RATIOS = (60, 300), (2, 3, 5), (0.0, 1.0, 3.0)
DRAWS = 500  # per cell: a rate near 0.95 then has a Monte Carlo sd of 0.01
DELTAS = (0.01, 0.02)
TARGET_COVERAGE, TARGET_FALSE = 0.93, 0.06
NODES, QUAD_WEIGHTS = np.polynomial.hermite_e.hermegauss(80)  # E over xi ~ N(0, 1)
QUAD_WEIGHTS = QUAD_WEIGHTS / QUAD_WEIGHTS.sum()


def true_auc(sigma: float, shift: float = 0.0) -> float:
    """A group's true macro ROC-AUC: the mean over seeds (xi) and clips, in closed form."""
    return float(np.mean(st.norm.cdf((SEPARATION + shift) / math.sqrt(2 + sigma**2))))


def seed_sd(sigma: float) -> float:
    """The sd between seeds of a run's population macro ROC-AUC (Gauss-Hermite over xi)."""
    auc = st.norm.cdf((SEPARATION[None, :] + sigma * NODES[:, None]) / math.sqrt(2)).mean(axis=1)
    mean = QUAD_WEIGHTS @ auc
    return float(math.sqrt(QUAD_WEIGHTS @ (auc - mean) ** 2))


def scores(rng: np.random.Generator, labels, z, n: int, sigma: float, shift: float = 0.0) -> np.ndarray:
    """``(n, clips, tags)``: n seeds' scores on one test set (``labels``, shared clip effects ``z``)."""
    xi = rng.standard_normal(n)[:, None, None]
    eps = rng.standard_normal((n, *labels.shape))
    return (SEPARATION + sigma * xi + shift) * labels + RHO * z + math.sqrt(1 - RHO**2) * eps


def test_set(rng: np.random.Generator, clips: int) -> tuple[np.ndarray, np.ndarray]:
    labels = (rng.random((clips, TAGS)) < PREVALENCE).astype(np.uint8)
    return labels, rng.standard_normal((clips, TAGS))


def clip_sd(clips: int, sets: int = 4000, seed: int = 1) -> float:
    """The sd of one fixed model's macro ROC-AUC between test sets of ``clips`` clips."""
    rng = np.random.default_rng(seed)
    full = np.ones((1, clips), dtype=np.int32)
    values = []
    for _ in range(sets):
        labels, z = test_set(rng, clips)
        values.append(metric_under_weights(labels, scores(rng, labels, z, 1, 0.0)[0], full)[0])
    return float(np.std(values, ddof=1))


def sigma_for(ratio: float, clips_sd: float) -> float:
    if ratio == 0:
        return 0.0
    return float(optimize.brentq(lambda s: seed_sd(s) - ratio * clips_sd, 1e-6, 10.0))


def shift_for(delta: float, sigma: float) -> float:
    return float(optimize.brentq(lambda s: true_auc(sigma, s) - true_auc(sigma) - delta, 0.0, 5.0))


# ---------------------------------------------------------------- the method before issue 24


def legacy_means(per_run: np.ndarray, seed: int = 0) -> np.ndarray:
    """mtt.metrics.stats.seed_resampled_means before issue 24: each resample's mean over the group's
    runs drawn with replacement (one run: its values)."""
    n, b = per_run.shape
    if n == 1:
        return per_run[0]
    pick = np.random.default_rng([seed, 1]).integers(n, size=(b, n))
    return np.nanmean(per_run[pick, np.arange(b)[:, None]], axis=1)


def legacy_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    v = values[~np.isnan(values)]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(v, [tail, 100 - tail])
    return float(lo), float(hi)


def legacy_group(boot: np.ndarray) -> tuple[float, float]:
    return legacy_interval(legacy_means(boot, 0))


def legacy_difference(boot_a: np.ndarray, boot_b: np.ndarray) -> tuple[float, float]:
    """mtt.metrics.stats.difference before issue 24 (seed 0 for A, 1 for B)."""
    return legacy_interval(legacy_means(boot_a, 0) - legacy_means(boot_b, 1))


# ---------------------------------------------------------------- one cell


@dataclass
class Cell:
    clips: int
    seeds: int
    ratio: float
    draws: int
    seed_sd: float
    clip_sd: float
    coverage: float
    width: float
    false_better: float
    power: dict[float, float]
    welch_coverage: float
    welch_false_better: float
    legacy_coverage: float
    legacy_false_better: float
    seconds: float

    @property
    def on_target(self) -> bool:
        return self.coverage >= TARGET_COVERAGE and self.false_better <= TARGET_FALSE


def _better(low: float, high: float) -> bool:
    return low > 0 or high < 0


def welch(est: Interval) -> tuple[float, float]:
    """The interval Student's t with Welch-Satterthwaite degrees of freedom gives on the same
    variance terms (issue 24's first suggestion; it under-covers when a 2-seed term dominates)."""
    terms = est.terms()
    total = sum(v for v, _ in terms)
    spread = sum(v * v / df for v, df in terms if v > 0)
    df = total * total / spread if spread > 0 else math.inf
    half = float(st.t.ppf(0.5 + LEVEL / 2, df)) * math.sqrt(total)
    return est.estimate - half, est.estimate + half


def _difference(points: np.ndarray, boot: np.ndarray, i: int, j: int, clips: int) -> Difference:
    """Group i minus group j of ``points`` ``(groups, seeds)``, ``boot`` ``(groups, seeds, B)``."""
    return Difference.of(combine([points[i], points[j]], [boot[i], boot[j]], [1, -1], clips), "roc_auc")


def simulate_cell(clips: int, seeds: int, ratio: float, draws: int = DRAWS, seed: int = 0, clips_sd=None) -> Cell:
    """Coverage, width, false "better" rate and power over ``draws`` simulated test sets."""
    start = time.perf_counter()
    clips_sd = clip_sd(clips) if clips_sd is None else clips_sd
    sigma = sigma_for(ratio, clips_sd)
    truth = true_auc(sigma)
    shifts = [shift_for(d, sigma) for d in DELTAS]
    rng = np.random.default_rng([seed, clips, seeds, int(ratio * 100)])
    covered = wide = false = welch_covered = welch_false = legacy_covered = legacy_false = 0.0
    hits = dict.fromkeys(DELTAS, 0)
    for _ in range(draws):
        labels, z = test_set(rng, clips)
        runs = np.concatenate([scores(rng, labels, z, seeds, sigma, s) for s in (0.0, 0.0, *shifts)])
        points, boot = resampled(labels, runs)  # every run on the same resamples
        p = points.reshape(4, seeds)
        b = boot.reshape(4, seeds, -1)
        group = combine([p[0]], [b[0]], [1], clips)
        covered += group.low <= truth <= group.high
        wide += group.high - group.low

        null = _difference(p, b, 0, 1, clips)
        false += null.verdict != "not distinguishable"
        hits[DELTAS[0]] += _difference(p, b, 2, 0, clips).verdict == "A better"
        hits[DELTAS[1]] += _difference(p, b, 3, 1, clips).verdict == "A better"
        lo, hi = welch(group)
        welch_covered += lo <= truth <= hi
        welch_false += _better(*welch(null))
        lo, hi = legacy_group(b[0])
        legacy_covered += lo <= truth <= hi
        legacy_false += _better(*legacy_difference(b[0], b[1]))
    return Cell(
        clips,
        seeds,
        ratio,
        draws,
        seed_sd(sigma),
        clips_sd,
        covered / draws,
        wide / draws,
        false / draws,
        {d: h / draws for d, h in hits.items()},
        welch_covered / draws,
        welch_false / draws,
        legacy_covered / draws,
        legacy_false / draws,
        time.perf_counter() - start,
    )


def run_grid(
    clips=CLIPS, seeds=SEEDS, ratios=RATIOS, draws: int = DRAWS, seed: int = 0, report=print, jobs: int = 1
) -> list[Cell]:
    """Every cell of the grid, in order; ``jobs`` > 1: cells in that many processes (each cell
    draws from its own seeded generator, so the figures do not depend on ``jobs``)."""
    sds = {n_clips: clip_sd(n_clips) for n_clips in clips}
    grid = [(n_clips, n, r, draws, seed, sds[n_clips]) for n_clips in clips for n in seeds for r in ratios]
    if jobs <= 1:
        cells = []
        for args in grid:
            cells.append(simulate_cell(*args))
            report(cells[-1])
        return cells
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(simulate_cell, *args) for args in grid]
        cells = []
        for f in futures:  # in grid order, as each is done
            cells.append(f.result())
            report(cells[-1])
    return cells


HEADER = (
    "clips",
    "seeds",
    "seed sd / clip sd",
    "coverage",
    "mean width",
    'false "better"',
    "power 0.01",
    "power 0.02",
    "Welch t: coverage",
    'Welch t: false "better"',
    "before: coverage",
    'before: false "better"',
)


def row(c: Cell) -> list[str]:
    return [
        str(c.clips),
        str(c.seeds),
        f"{c.ratio:g} ({c.seed_sd:.4f} / {c.clip_sd:.4f})",
        f"{c.coverage:.3f}",
        f"{c.width:.4f}",
        f"{c.false_better:.3f}",
        f"{c.power[DELTAS[0]]:.2f}",
        f"{c.power[DELTAS[1]]:.2f}",
        f"{c.welch_coverage:.3f}",
        f"{c.welch_false_better:.3f}",
        f"{c.legacy_coverage:.3f}",
        f"{c.legacy_false_better:.3f}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, nargs="+", default=list(CLIPS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--draws", type=int, default=DRAWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"{args.draws} draws per cell; target: coverage >= {TARGET_COVERAGE}, false 'better' <= {TARGET_FALSE}")
    print("  ".join(HEADER), flush=True)
    cells = run_grid(
        args.clips,
        args.seeds,
        args.ratios,
        args.draws,
        args.seed,
        lambda c: print(
            "  ".join(row(c)) + f"  ({c.seconds:.0f} s)" + ("" if c.on_target else "  OFF TARGET"), flush=True
        ),
        args.jobs,
    )
    if args.markdown:
        print("\n| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
        print("\n".join("| " + " | ".join(row(c)) + " |" for c in cells))
    missed = [c for c in cells if not c.on_target]
    print(
        f"\n{len(cells)} cells in {time.perf_counter() - start:.0f} s; "
        + ("every cell on target" if not missed else f"{len(missed)} cell(s) OFF TARGET")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
