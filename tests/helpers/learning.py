"""Tests that assert a learned quantity (a loss that falls, an AUC above a floor, a verdict that
must come out), and the grid of seeds and CPU arithmetic on which each must pass with a margin.

A training run's trajectory depends on the CPU's arithmetic: the thread count sets the order of
torch's reductions, the instruction set (AVX-512 or AVX2) the rounding of oneDNN's convolutions.
A bound read off one machine's run can fail on another (issue 29: a val_loss that fell 14% here
fell 6.6% on another AMD EPYC). So a learning test:

- takes the ``learning`` fixture (tests/conftest.py), which parametrizes it over the seeds in
  ``$MTT_LEARNING_SEEDS`` (``0`` unless set; ``0,1,2,3,4`` is the grid's) and marks it
  ``learning``; it trains or draws with ``learning.seed``;
- asserts each learned quantity through ``learning.at_least`` / ``learning.at_most``, naming its
  ``baseline``: its value without the effect the test claims (a score's chance level, the cap of
  an epoch count). With ``$MTT_LEARNING_RECORD`` set, each check also appends one JSON line to
  that file.

``run_grid`` (the slow test tests/test_learning_grid.py, and ``python -m tests.helpers.learning``
for the table in docs/development.md) runs every learning test in one pytest subprocess per
arithmetic variant, each over all ``SEEDS``, and ``margins`` applies the rule: a bound must lie
beyond the worst variant by at least half the grid's spread (best minus worst value over all
variants). Where CPU arithmetic moves a run as much as a new seed does (a network trained from
scratch), the 20 variants are 20 draws and half their range beyond the lowest is about 3.7
standard deviations below their mean; where it barely moves it (a head on frozen features, a
convex fit), a machine's change is far smaller than the seeds' spread. Adding a learning test:
take the fixture, use its seed, assert through its checks; the grid picks it up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SEEDS_ENV = "MTT_LEARNING_SEEDS"
RECORD_ENV = "MTT_LEARNING_RECORD"
SEEDS = (0, 1, 2, 3, 4)
THREADS = (1, 2)
SPREAD_SHARE = 0.5  # the margin a bound needs beyond the worst variant, as a share of the spread
# An AVX2-only CPU's kernels (an AVX-512 machine running another CPU's arithmetic): torch's own
# vectorised ops, oneDNN's convolutions, MKL's BLAS (torch's), and for numpy, scipy and
# scikit-learn (the probe, mtt.metrics.stats) numpy's dispatched loops and OpenBLAS's kernels.
AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Haswell",
}


def seeds_from_env() -> tuple[int, ...]:
    """The seeds of ``$MTT_LEARNING_SEEDS`` (comma-separated), ``(0,)`` when unset."""
    raw = os.environ.get(SEEDS_ENV, "").strip()
    if not raw:
        return (0,)
    try:
        seeds = tuple(int(s) for s in raw.split(","))
    except ValueError:
        raise ValueError(f"{SEEDS_ENV}={raw!r}: expected comma-separated integers, e.g. 0,1,2,3,4") from None
    if any(s < 0 for s in seeds):
        raise ValueError(f"{SEEDS_ENV}={raw!r}: seeds must be >= 0")
    return seeds


def arithmetic() -> str:
    """This process's CPU arithmetic as the records name it: ``"2 threads, AVX512"``."""
    import torch

    return f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}, {isa()}"


def isa() -> str:
    """The instruction set torch's kernels run with (oneDNN's cap, if lower, wins)."""
    import torch

    return "AVX2" if os.environ.get("DNNL_MAX_CPU_ISA") == "AVX2" else torch.backends.cpu.get_cpu_capability()


@dataclass(frozen=True)
class Learning:
    """A learning test's seed and checks (the ``learning`` fixture)."""

    test: str  # node id without the seed parameter
    seed: int

    def at_least(self, check: str, value: float, bound: float, baseline: float) -> None:
        """Assert ``value >= bound`` for a learned quantity that is ``baseline`` without the effect."""
        self._check(check, float(value), bound, baseline, higher=True)

    def at_most(self, check: str, value: float, bound: float, baseline: float) -> None:
        """Assert ``value <= bound`` for a learned quantity that is ``baseline`` without the effect."""
        self._check(check, float(value), bound, baseline, higher=False)

    def _check(self, check: str, value: float, bound: float, baseline: float, higher: bool) -> None:
        path = os.environ.get(RECORD_ENV)
        if path:
            row = {"test": self.test, "check": check, "seed": self.seed, "arithmetic": arithmetic()}
            row |= {"value": value, "bound": bound, "baseline": baseline, "higher": higher}
            with open(path, "a") as f:  # one file per pytest process: no writer shares it
                f.write(json.dumps(row) + "\n")
        ok = value >= bound if higher else value <= bound
        assert ok, (
            f"{check} = {value:.4g}, {'below' if higher else 'above'} its bound {bound} (baseline {baseline}); "
            f"seed {self.seed}, {arithmetic()}"
        )


@dataclass(frozen=True)
class Variant:
    """One pytest subprocess of the grid: a thread count and an instruction set, all seeds."""

    threads: int
    avx2: bool

    @property
    def name(self) -> str:
        return f"{self.threads} thread{'s' if self.threads > 1 else ''}{', AVX2' if self.avx2 else ''}"

    def env(self) -> dict[str, str]:
        threads = str(self.threads)
        return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **(AVX2 if self.avx2 else {})}


def variants() -> list[Variant]:
    """``THREADS`` x (native, and AVX2 where the native kernels are AVX-512)."""
    import torch

    isas = (False, True) if torch.backends.cpu.get_cpu_capability() == "AVX512" else (False,)
    return [Variant(t, a) for a in isas for t in THREADS]


@dataclass
class Margin:
    """One check over the grid: its bound, the worst and best values, and whether the bound has margin."""

    test: str
    check: str
    bound: float
    baseline: float
    higher: bool
    values: list[float]

    @property
    def worst(self) -> float:
        return min(self.values) if self.higher else max(self.values)

    @property
    def best(self) -> float:
        return max(self.values) if self.higher else min(self.values)

    @property
    def spread(self) -> float:
        return abs(self.best - self.worst)

    @property
    def margin(self) -> float:
        """How far the worst variant lies on the passing side of the bound (negative: it failed)."""
        return self.worst - self.bound if self.higher else self.bound - self.worst

    @property
    def ok(self) -> bool:
        return self.margin > 0 and self.margin >= SPREAD_SHARE * self.spread

    def line(self) -> str:
        op = ">=" if self.higher else "<="
        return (
            f"| `{self.test}` | {self.check} {op} {self.bound:g} | {self.baseline:g} | {self.worst:.4g} | "
            f"{self.best:.4g} | {self.margin:.3g} | {self.spread:.3g} | {'yes' if self.ok else '**no**'} |"
        )


TABLE_HEAD = (
    "| test | check | baseline | worst | best | margin | spread | margin >= spread / 2 |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def margins(records: list[dict]) -> list[Margin]:
    """Group the records by (test, check), in the order they first appear."""
    grouped: dict[tuple[str, str], Margin] = {}
    for r in records:
        key = (r["test"], r["check"])
        m = grouped.setdefault(key, Margin(r["test"], r["check"], r["bound"], r["baseline"], r["higher"], []))
        if (r["bound"], r["higher"]) != (m.bound, m.higher):
            raise ValueError(f"{key}: the bound changed between records ({m.bound} vs {r['bound']})")
        m.values.append(r["value"])
    return list(grouped.values())


def missing(records: list[dict], seeds: tuple[int, ...], arith: list[str]) -> list[str]:
    """Each (test, check) that has no record for some seed x arithmetic variant."""
    seen = defaultdict(set)
    for r in records:
        seen[(r["test"], r["check"])].add((r["seed"], r["arithmetic"]))
    want = {(s, a) for s in seeds for a in arith}
    return [f"{t} {c}: no record for {sorted(want - got)}" for (t, c), got in seen.items() if want - got]


@dataclass
class GridRun:
    """What ``run_grid`` found: the records, each variant's pytest exit status and output tail."""

    records: list[dict]
    status: dict[str, int]
    output: dict[str, str]
    arithmetic: list[str]  # as the records name each variant
    seconds: float


def run_grid(
    folder: Path,
    marker: str = "learning and not slow",
    seeds: tuple[int, ...] = SEEDS,
    cores: int | None = None,
    extra: tuple[str, ...] = (),
) -> GridRun:
    """Run the tests selected by ``marker`` (and pytest arguments ``extra``) once per arithmetic
    variant (``variants()``), each over ``seeds``, in pytest subprocesses with their own temporary
    folders under ``folder``; variants of one thread count run side by side on ``cores`` (default:
    all)."""
    from mtt.core.paths import REPO_ROOT

    folder.mkdir(parents=True, exist_ok=True)
    cores = cores or os.cpu_count() or 1
    start = time.perf_counter()

    def one(v: Variant) -> tuple[Variant, int, str]:
        tag = f"t{v.threads}{'-avx2' if v.avx2 else ''}"
        env = {**os.environ, **v.env(), SEEDS_ENV: ",".join(map(str, seeds)), RECORD_ENV: str(folder / f"{tag}.jsonl")}
        env.pop("PYTEST_ADDOPTS", None)
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider", "--basetemp"]
        cmd += [str(folder / tag), *extra]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        return v, proc.returncode, (proc.stdout + proc.stderr)[-6000:]

    done = []
    for threads in sorted({v.threads for v in variants()}):
        with ThreadPoolExecutor(max(1, cores // threads)) as pool:
            done += pool.map(one, [v for v in variants() if v.threads == threads])
    records = [json.loads(line) for p in sorted(folder.glob("*.jsonl")) for line in p.read_text().splitlines()]
    probe = {v.name: _arithmetic_of(v) for v, _, _ in done}
    return GridRun(
        records,
        {v.name: rc for v, rc, _ in done},
        {v.name: out for v, _, out in done},
        list(probe.values()),
        time.perf_counter() - start,
    )


def _arithmetic_of(v: Variant) -> str:
    """How a process started with ``v.env()`` names its arithmetic (what its records say)."""
    code = "from tests.helpers.learning import arithmetic; print(arithmetic())"
    from mtt.core.paths import REPO_ROOT

    env = {**os.environ, **v.env()}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    """Print the margin table of the learning tests over the grid (docs/development.md); exit 1
    where a test failed, a check is missing from a variant or a bound has too little margin."""
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m tests.helpers.learning", description=main.__doc__)
    parser.add_argument(
        "-m", dest="marker", default="learning and not slow", help="pytest marker expression (default: %(default)s)"
    )
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="default %(default)s")
    parser.add_argument("--records", type=Path, help="also write every record here (JSON lines)")
    args, extra = parser.parse_known_args(argv)  # the rest goes to pytest (-k EXPR, paths)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    with tempfile.TemporaryDirectory(prefix="mtt-learning-grid-") as tmp:
        grid = run_grid(Path(tmp), args.marker, seeds, extra=tuple(extra))
    if args.records:
        args.records.write_text("".join(json.dumps(r) + "\n" for r in grid.records))
    print(f"{len(seeds)} seeds x {', '.join(grid.arithmetic)}; {grid.seconds / 60:.1f} min\n")
    print(TABLE_HEAD)
    table = margins(grid.records)
    for m in table:
        print(m.line())
    for name, rc in grid.status.items():
        if rc != 0:
            print(f"\n{name}: pytest exited {rc}\n{grid.output[name]}", file=sys.stderr)
    gaps = missing(grid.records, seeds, grid.arithmetic)
    for gap in gaps:
        print(gap, file=sys.stderr)
    ok = all(rc == 0 for rc in grid.status.values()) and not gaps and all(m.ok for m in table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
