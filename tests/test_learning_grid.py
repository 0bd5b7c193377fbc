"""Every test that asserts a learned quantity passes, with a margin, on every seed and CPU
arithmetic of the grid (tests/helpers/learning.py), so that a bound read off one machine's run
fails here before it fails on a user's machine."""

from __future__ import annotations

import pytest

from tests.helpers import run_module
from tests.helpers.learning import SEEDS, TABLE_HEAD, margins, missing, run_grid, seeds_from_env


def record(value: float, bound: float = 0.7, seed: int = 0, arithmetic: str = "1 thread, AVX512", higher=True):
    return {"test": "t.py::t", "check": "auc", "seed": seed, "arithmetic": arithmetic, "value": value} | {
        "bound": bound,
        "baseline": 0.5,
        "higher": higher,
    }


def test_a_bound_needs_half_the_grids_spread_beyond_its_worst_variant():
    # Worst 0.8, best 0.9 (spread 0.1): a bound of 0.75 lies half the spread below the worst, 0.76 less.
    (m,) = margins([record(0.9, 0.75), record(0.8, 0.75, seed=1)])
    assert (m.worst, m.best, m.margin, m.spread) == (0.8, 0.9, pytest.approx(0.05), pytest.approx(0.1)) and m.ok
    (m,) = margins([record(0.9, bound=0.76), record(0.8, bound=0.76, seed=1)])
    assert not m.ok and "**no**" in m.line()
    # Upper bounds mirror it: epochs trained <= 39 with 10 and 30 observed (spread 20, margin 9).
    (m,) = margins([record(10, 39, higher=False), record(30, 39, seed=1, higher=False)])
    assert (m.worst, m.margin) == (30, 9) and not m.ok
    (m,) = margins([record(10, 40, higher=False), record(30, 40, seed=1, higher=False)])
    assert m.ok  # 10 epochs of margin, 20 of spread
    # A value exactly at its bound has no margin, even when every variant agrees.
    assert not margins([record(0.7), record(0.7, seed=1)])[0].ok


def test_a_check_missing_from_a_variant_is_named():
    records = [record(0.9, seed=s, arithmetic=a) for s in (0, 1) for a in ("1 thread, AVX512", "2 threads, AVX512")]
    assert missing(records, (0, 1), ["1 thread, AVX512", "2 threads, AVX512"]) == []
    gaps = missing(records[:-1], (0, 1), ["1 thread, AVX512", "2 threads, AVX512"])
    assert gaps == ["t.py::t auc: no record for [(1, '2 threads, AVX512')]"]


def test_a_changed_bound_within_one_grid_is_refused():
    with pytest.raises(ValueError, match="bound changed"):
        margins([record(0.9), record(0.9, bound=0.6, seed=1)])


def test_seeds_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("MTT_LEARNING_SEEDS", raising=False)
    assert seeds_from_env() == (0,)
    monkeypatch.setenv("MTT_LEARNING_SEEDS", "0,3, 4")
    assert seeds_from_env() == (0, 3, 4)
    monkeypatch.setenv("MTT_LEARNING_SEEDS", "0,x")
    with pytest.raises(ValueError, match="MTT_LEARNING_SEEDS='0,x': expected comma-separated integers"):
        seeds_from_env()


def test_a_learning_test_runs_once_per_seed_and_records_its_checks(tmp_path):
    """The fixture parametrizes by $MTT_LEARNING_SEEDS and marks the test ``learning``; a failed
    check names its value, bound, seed and arithmetic."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import learning, pytest_generate_tests  # noqa: F401\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\nmarkers =\n    learning: x\n")
    (tmp_path / "test_toy.py").write_text(
        "def test_toy(learning):\n"
        "    learning.at_least('score', 0.6 + learning.seed / 10, 0.75, baseline=0.5)\n"
        "def test_other():\n"
        "    pass\n"
    )
    record_file = tmp_path / "r.jsonl"
    env = {"MTT_LEARNING_SEEDS": "1,2", "MTT_LEARNING_RECORD": str(record_file)}
    proc = run_module(["pytest", "-q", "-m", "learning", "-p", "no:cacheprovider"], env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed, 1 passed, 1 deselected" in proc.stdout, proc.stdout
    assert "score = 0.7, below its bound 0.75 (baseline 0.5); seed 1" in proc.stdout
    rows = [line for line in record_file.read_text().splitlines()]
    assert len(rows) == 2 and '"seed": 2' in rows[1] and '"test": "test_toy.py::test_toy"' in rows[1]


@pytest.mark.slow
def test_every_learning_test_has_margin_on_every_seed_and_arithmetic(tmp_path):
    """The fast learning tests (those `make test` runs on a user's machine), 5 seeds x {1, 2} torch
    threads x {native, AVX2} kernels (AVX2 only on an AVX-512 machine): all pass, every check is
    recorded for every variant, and every bound lies beyond its worst variant by half the spread."""
    grid = run_grid(tmp_path)
    failed = {name: grid.output[name] for name, rc in grid.status.items() if rc != 0}
    assert not failed, "\n".join(f"== {name}\n{out}" for name, out in failed.items())
    assert not missing(grid.records, SEEDS, grid.arithmetic)
    table = margins(grid.records)
    print(f"\n{len(SEEDS)} seeds x {', '.join(grid.arithmetic)}: {grid.seconds / 60:.1f} min\n{TABLE_HEAD}")
    print("\n".join(m.line() for m in table))
    assert len({m.test for m in table}) >= 6, "the fast learning tests took part"
    assert all(m.ok for m in table), "\n".join(m.line() for m in table if not m.ok)
