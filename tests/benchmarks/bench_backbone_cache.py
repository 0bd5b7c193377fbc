"""Head-only training with and without the frozen-backbone cache, at MTAT scale, on this CPU.

An MTAT-scale synthetic feature store (25,863 clips x 30 patches of (96, 64) float16) and a
matching backbone cache ((512, 6, 4) float16 per patch) are created SPARSE with open_memmap (no
9.5 GB / 19 GB written; their pages read as zeros, so disk reads cost nothing here: the figures
are compute). Both epochs use the real model (full-width VGGish, GAP + 2 blocks), the real
pescador stream and the same steps (report split: 19,397 train clips // 32). The uncached epoch
takes far too long on a CPU to run whole, so K steps are timed and extrapolated (said below).

    python tests/benchmarks/bench_backbone_cache.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mtt.config import CONF_DIR  # noqa: E402
from mtt.models import build_model  # noqa: E402
from mtt.store import finalize, row_checksums  # noqa: E402
from mtt.streams import train_loader  # noqa: E402

CLIPS, PATCHES, TRAIN = 25_863, 30, 19_397  # MTAT clips, patches per 29 s clip, report train rows
TEST = CLIPS - TRAIN  # the report's split validates on its test quarter every epoch
BATCH = 32
STEPS = TRAIN // BATCH
K_LIVE = 8  # uncached steps actually timed
SWEEP = {"prelim": 12, "revised": 12, "three_blocks": 5, "autopool": 12}  # epochs per experiment


def sparse_store(path: Path, item_shape: tuple[int, ...]):
    path.mkdir(parents=True)
    np.lib.format.open_memmap(
        path / "patches.npy", mode="w+", dtype=np.float16, shape=(CLIPS * PATCHES, *item_shape)
    ).flush()
    ids = np.arange(CLIPS, dtype=np.int64)
    table = np.stack([ids, ids * PATCHES, np.full(CLIPS, PATCHES)], axis=1)
    zero_row = row_checksums(np.zeros((1, *item_shape), np.float16))[0]  # every row reads as zeros
    return finalize(path, table, {"bench": list(item_shape)}, item_shape, np.full(CLIPS * PATCHES, zero_row))


def time_steps(model, store, n: int, from_backbone: bool) -> float:
    """Seconds per training step (the loop of mtt.train: forward, loss, backward, step)."""
    from omegaconf import OmegaConf

    from mtt.config import StreamConfig

    cfg = OmegaConf.structured(StreamConfig())  # the defaults a run uses
    labels = (np.random.default_rng(0).random((TRAIN, 50)) < 0.05).astype(np.float32)
    stream = train_loader(store, store.clip_ids[:TRAIN], labels, cfg, BATCH, seed=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    model.backbone.eval()
    for i in range(n + 1):
        if i == 1:  # the first step warms up allocators and the stream
            t0 = time.perf_counter()
        x, y = next(stream)
        loss = model.loss(model(x, from_backbone=from_backbone), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / n


@torch.no_grad()
def forward_throughput(model, batch: int = 64, reps: int = 3) -> float:
    """Backbone patches per second, no grad (cache build and uncached evaluation)."""
    x = torch.randn(batch, 96, 64)
    model.encode(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        model.encode(x)
    return batch * reps / (time.perf_counter() - t0)


def hours(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"


def main() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config")
    torch.manual_seed(0)
    model = build_model(cfg, 50).to(memory_format=torch.channels_last)
    print(
        f"torch threads: {torch.get_num_threads()}; {CLIPS:,} clips x {PATCHES} patches; "
        f"{STEPS} steps/epoch of batch {BATCH} ({TRAIN:,} train clips)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        features = sparse_store(Path(tmp) / "features", (96, 64))
        cache = sparse_store(Path(tmp) / "cache", (512, 6, 4))
        cached_step = time_steps(model, cache, STEPS, from_backbone=True)  # the whole epoch
        live_step = time_steps(model, features, K_LIVE, from_backbone=False)
    fps = forward_throughput(model)
    cached_epoch, live_epoch = cached_step * STEPS, live_step * STEPS
    print(f"cached epoch   : {cached_epoch:8.1f} s  (all {STEPS} steps timed, {cached_step * 1e3:.1f} ms/step)")
    print(
        f"uncached epoch : {live_epoch:8.1f} s  (EXTRAPOLATED from {K_LIVE} timed steps, {live_step * 1e3:.0f} ms/step)"
    )
    speedup = live_epoch / cached_epoch
    print(f"speedup        : {speedup:8.1f}x  (target >= 50x: {'OK' if speedup >= 50 else 'MISSED'})")

    # The report's sweep on full MTAT: per epoch, training + validation over the test quarter's
    # patches; at the end one test pass. Uncached evaluation runs the backbone on every patch.
    eval_patches = TEST * PATCHES
    build = CLIPS * PATCHES / fps
    epochs = sum(SWEEP.values())
    eval_live = eval_patches / fps
    live_total = epochs * (live_epoch + eval_live) + len(SWEEP) * eval_live
    cached_total = epochs * cached_epoch + build  # cached evaluation is head-only: negligible here
    print(f"backbone forward: {fps:.0f} patches/s -> one-off cache build of {CLIPS * PATCHES:,} patches {hours(build)}")
    print(f"sweep {SWEEP} ({epochs} epochs, same steps per epoch):")
    print(
        f"  without cache: {hours(live_total)} (train {hours(epochs * live_epoch)} + evaluation "
        f"{hours((epochs + len(SWEEP)) * eval_live)})"
    )
    print(f"  with cache   : {hours(cached_total)} (build {hours(build)} + train {hours(epochs * cached_epoch)})")


if __name__ == "__main__":
    main()
