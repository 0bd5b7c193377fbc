"""How much of the training set one epoch really sees, per steps policy (docs/steps.md's table).

Run: ``python tests/benchmarks/bench_coverage.py [--seeds 3] [--epochs 3]`` (about 16 minutes on
two shared cores, 14 of them the two MTAT ``patches`` rows). For each dataset size
and ``steps`` policy it draws the epochs from the training stream exactly as a run seeds it
(``mtt.features.streams.simulate_coverage``: the same mux or epoch sampler, no patch read) and prints
``train_clip_coverage`` (the share of training clips drawn at least once in an epoch) and
``train_draws_per_clip`` (draws per clip seen), each as the mean over seeds x epochs with its
range. Every run logs the same two figures per epoch.

Sizes: the embedded data (240 training clips of 6 s: 6 VGGish patches, 2 short-chunk chunks
each) and MTAT's (15,247 top-50 training clips of 29.1 s: 30 VGGish patches, 17 short-chunk
chunks each; declared = cached, a complete store). Batch 32 for VGGish (mtt's default), 16 for
the short chunks (Won et al.'s). Which clip a draw comes from depends on the number of clips,
the stream settings and the seed, not on the patches (``stream.weights=uniform``), so the
report presets (one fixed patch per clip) cover as the default stream does for their policy.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from mtt.config import StreamConfig  # noqa: E402
from mtt.features.streams import simulate_coverage, steps_per_epoch  # noqa: E402

# name -> (training clips, patches per clip, batch)
SIZES = {
    "embedded, VGGish": (240, 6, 32),
    "embedded, short-chunk": (240, 2, 16),
    "MTAT, VGGish": (15_247, 30, 32),
    "MTAT, short-chunk": (15_247, 17, 16),
}
# (policy, stream.mode): the mux under every steps policy, and the epoch mode's own
POLICIES = [("declared", "with_replacement"), ("cached", "with_replacement"), ("patches", "with_replacement")]
POLICIES += [("fixed", "with_replacement"), ("epoch", "epoch")]
FIXED_N = 100  # steps=fixed's n (mtt.features.streams.FixedSteps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    print("| data | steps= | stream.mode | steps per epoch | train_clip_coverage | train_draws_per_clip |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (clips, per_clip, batch) in SIZES.items():
        sizes = np.full(clips, per_clip)
        for policy, mode in POLICIES:
            steps = steps_per_epoch(policy, batch, clips, clips, clips * per_clip, FIXED_N)
            cfg = OmegaConf.structured(StreamConfig(mode=mode))
            start = time.perf_counter()
            runs = [e for s in range(args.seeds) for e in simulate_coverage(sizes, cfg, batch, steps, args.epochs, s)]
            cov = np.array([r["train_clip_coverage"] for r in runs])
            draws = np.array([r["train_draws_per_clip"] for r in runs])
            print(
                f"| {name} | `{policy}` | `{mode}` | {steps:,} | {cov.mean():.3f} ({cov.min():.3f}-{cov.max():.3f}) "
                f"| {draws.mean():.2f} ({draws.min():.2f}-{draws.max():.2f}) |",
                flush=True,
            )
            print(f"  ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    print(
        f"\nmean (min-max) over {args.seeds} seeds x {args.epochs} epochs; one pass = ceil(clips / batch) steps", end=""
    )
    print(f" ({', '.join(f'{n}: {math.ceil(c / b):,}' for n, (c, _, b) in SIZES.items())})")


if __name__ == "__main__":
    main()
