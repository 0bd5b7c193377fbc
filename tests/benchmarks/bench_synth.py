"""How long the embedded dataset takes to generate, against the floor set by its file format.

    python tests/benchmarks/bench_synth.py

For the default size (16 x 20 clips x 6 s) and the tests' tiny size (16 x 2 x 2 s) it prints the
wall time of ``ensure_dataset`` (first call and the no-op second call) beside the time spent only
encoding the same audio to mp3 (the baseline: what any MTAT-format writer pays) and only rendering
it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mtt.data.datasets import SynthConfig  # noqa: E402
from mtt.data.embedded import ensure_dataset, render_clip  # noqa: E402
from mtt.data.embedded.plan import _plan  # noqa: E402
from mtt.data.mtat import SAMPLE_RATE, write_mp3  # noqa: E402


def bench(cfg: SynthConfig, workdir: Path) -> None:
    root = workdir / f"c{cfg.clips_per_folder}-s{cfg.seconds}"
    start = time.perf_counter()
    ensure_dataset(root, cfg, progress=False)
    first = time.perf_counter() - start
    start = time.perf_counter()
    ensure_dataset(root, cfg, progress=False)
    again = time.perf_counter() - start

    render = encode = 0.0
    for clip in _plan(cfg.clips_per_folder, cfg.seconds, cfg.seed):
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1, clip.folder, clip.index)))
        t0 = time.perf_counter()
        wave = render_clip(sorted(clip.recipe.tags()), cfg.seconds, SAMPLE_RATE, rng)
        t1 = time.perf_counter()
        write_mp3(workdir / "probe.mp3", wave)
        encode += time.perf_counter() - t1
        render += t1 - t0
    n = 16 * cfg.clips_per_folder
    print(
        f"{n:4d} clips x {cfg.seconds:g} s: ensure_dataset {first:6.2f} s ({1000 * first / n:5.1f} ms/clip), "
        f"second call {1000 * again:.2f} ms | baseline mp3 encode only {encode:6.2f} s, "
        f"render only {render:6.2f} s"
    )


def main() -> None:
    print(f"cores available: {len(os.sched_getaffinity(0))} (generation uses one)")
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in (SynthConfig(clips_per_folder=2, seconds=2.0), SynthConfig()):
            bench(cfg, Path(tmp))


if __name__ == "__main__":
    main()
