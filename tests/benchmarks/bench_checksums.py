"""What the content checksums cost, against an epoch, at MTAT scale, measured in one run.

    python tests/benchmarks/bench_checksums.py

The stores are MTAT-sized and SPARSE, as in bench_backbone_cache.py: a feature store (25,863
clips x 30 patches of (96, 64) float16, 9.5 GB) and its backbone caches ((512, 6, 4) per patch,
19 GB, what pool=max reads; (512, 6, 1), 4.8 GB, what GAP and AutoPool read), whose pages read as
zeros (no disk reads: the figures are the CPU work of checking).
Printed, each as a ratio to an epoch timed in the same run:

1. opening the cache (the manifest's digest, the SHA-256 of clips.npy and checksums.npy, sizes);
2. the rows' CRC-32s checked while training reads them, during a head-only epoch from the cache
   with the report's `cached` steps policy (606 steps of 32): the shortest epoch there is, every
   row read for the first time (later epochs re-read some rows, which are not checked again);
3. the same for an uncached (live-backbone) step from the feature store, K steps timed;
4. what a full pass over the cache at open would cost instead (CRC-32 and SHA-256, CPU only,
   from passes over 256 MB in memory): why rows are checked as they are read;
5. a full-width last.pt written with and without its SHA-256 sidecar, and checked on resume.

Timings are noisy on a shared machine; the ratios come from the same run.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backbone_cache import BATCH, CLIPS, PATCHES, STEPS, TRAIN, sparse_store  # noqa: E402

from mtt.config import CONF_DIR  # noqa: E402
from mtt.core.fs import file_digest  # noqa: E402
from mtt.features.store import PatchStore  # noqa: E402
from mtt.models import build_model  # noqa: E402
from mtt.tracking.checkpoint import TrainState, last_epoch, save_last  # noqa: E402

K_LIVE = 4  # uncached steps timed (each runs the full VGGish)


def epoch(model, store: PatchStore, steps: int, from_backbone: bool) -> tuple[float, float]:
    """(seconds of ``steps`` training steps, seconds of them spent checking rows), as mtt.training.train
    steps: the real stream, forward, loss, backward, Adam."""
    from omegaconf import OmegaConf

    from mtt.config import StreamConfig
    from mtt.features.streams import train_loader

    labels = (np.random.default_rng(0).random((TRAIN, 50)) < 0.05).astype(np.float32)
    stream = train_loader(store, store.clip_ids[:TRAIN], labels, OmegaConf.structured(StreamConfig()), BATCH, seed=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    model.backbone.eval()
    checked0, t0 = store.verify_seconds, time.perf_counter()
    for _ in range(steps):
        x, y = next(stream)
        loss = model.loss(model(x, from_backbone=from_backbone), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, store.verify_seconds - checked0


def full_pass_seconds(nbytes: int, hasher, reps: int = 3) -> float:
    """CPU seconds to hash ``nbytes`` once in 16 MB blocks (the best of ``reps`` passes over a
    256 MB buffer in memory, scaled up; reading the file from disk comes on top)."""
    buf = memoryview(np.random.default_rng(0).bytes(256 << 20))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(0, len(buf), 1 << 24):
            hasher(buf[i : i + (1 << 24)])
        best = min(best, time.perf_counter() - t0)
    return best * nbytes / len(buf)


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:6.2f} %"


def main() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config")
    torch.manual_seed(0)
    model = build_model(cfg, 50).to(memory_format=torch.channels_last)
    print(f"torch threads: {torch.get_num_threads()}; {CLIPS:,} clips x {PATCHES} patches; batch {BATCH}")
    with tempfile.TemporaryDirectory() as tmp:
        sparse_store(Path(tmp) / "features", (96, 64))
        sparse_store(Path(tmp) / "cache", (512, 6, 4))
        t0 = time.perf_counter()
        cache = PatchStore(Path(tmp) / "cache")
        open_s = time.perf_counter() - t0
        features = PatchStore(Path(tmp) / "features")

        cached_s, cached_check = epoch(model, cache, STEPS, from_backbone=True)
        print(f"cached epoch ({STEPS} steps, every row new): {cached_s:7.2f} s")
        print(f"  1. opening the cache             : {open_s:7.3f} s = {pct(open_s, cached_s)} of the epoch")
        print(
            f"  2. rows checked while training   : {cached_check:7.3f} s = {pct(cached_check, cached_s)} of the epoch "
            f"({STEPS * BATCH:,} rows of {cache.patches[0].nbytes // 1024} KB, "
            f"{1e6 * cached_check / (STEPS * BATCH):.1f} us/row)"
        )
        # The compact cache GAP and AutoPool read (the frequency mean: a quarter of the bytes per row).
        compact = sparse_store(Path(tmp) / "compact", (512, 6, 1))
        compact_s, compact_check = epoch(model, compact, STEPS, from_backbone=True)
        print(
            f"     the same from the compact cache: {compact_check:7.3f} s = {pct(compact_check, compact_s)} of its "
            f"{compact_s:.2f} s epoch ({compact.patches[0].nbytes // 1024} KB rows, "
            f"{1e6 * compact_check / (STEPS * BATCH):.1f} us/row)"
        )
        epoch(model, features, 1, from_backbone=False)  # warm-up: allocators, stream
        live_s, live_check = epoch(model, features, K_LIVE, from_backbone=False)
        live_epoch = live_s / K_LIVE * STEPS
        print(f"uncached epoch: {live_epoch:7.1f} s (EXTRAPOLATED from {K_LIVE} timed steps)")
        print(f"  3. rows checked while training   : {pct(live_check, live_s)} of the epoch")

        nbytes = (cache.path / "patches.npy").stat().st_size
        crc = full_pass_seconds(nbytes, zlib.crc32)
        sha = full_pass_seconds(nbytes, hashlib.sha256)
        print(
            f"  4. a full pass over the {nbytes / 1e9:.1f} GB cache at open instead (CPU only): CRC-32 {crc:5.1f} s = "
            f"{pct(crc, cached_s)}, SHA-256 {sha:5.1f} s = {pct(sha, cached_s)} of the epoch"
        )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        state = TrainState(epoch=0)
        t0 = time.perf_counter()
        save_last(folder, model, opt, state)
        with_sum = time.perf_counter() - t0
        mb = (folder / "last.pt").stat().st_size / 1e6
        t0 = time.perf_counter()
        file_digest(folder / "last.pt")
        digest_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        last_epoch(folder)
        resume_s = time.perf_counter() - t0
        print(
            f"  5. last.pt ({mb:.0f} MB): written with its sidecar in {with_sum:.2f} s, of which the SHA-256 "
            f"{digest_s:.2f} s = {pct(digest_s, cached_s)} of the cached epoch; checked on resume in {resume_s:.2f} s"
        )


if __name__ == "__main__":
    main()
