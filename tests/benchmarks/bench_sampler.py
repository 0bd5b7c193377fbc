"""Sampler throughput against training consumption, and the sampler's memory, at MTAT scale.

Run: ``python tests/benchmarks/bench_sampler.py``. The store is MTAT-sized: 25,863 clips x 30
patches of (96, 64) float16 (9.5 GB), memory-mapped. It is a sparse file (only a small part is
written with random values, so the benchmark neither needs nor writes 9.5 GB) in a temporary
folder that is removed at the end; its clip table and manifest are written by ``mtt.features.store``.

Prints, all on this machine's CPU:
- sampler throughput in patches/s through the real path: ``patch_mux`` + ``batches`` in this
  process, and ``train_loader`` with 0 and 2 DataLoader workers (after start-up, timed apart);
- training consumption: the frozen full-size VGGish + default head at batch 32 (backbone forward
  without grad, head forward/backward, Adam step), patches/s, and the ratio (target >= 20x);
- the peak RSS (VmHWM) of a child process that draws 10,000 batches of 32 (target < 1 GB).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from mtt.config import Config  # noqa: E402
from mtt.features.store import PatchStore, finalize, row_checksums  # noqa: E402
from mtt.features.streams import batches, patch_mux, train_loader  # noqa: E402
from mtt.models import build_model  # noqa: E402

N_CLIPS, PER_CLIP, ITEM, N_TAGS, BATCH = 25_863, 30, (96, 64), 50, 32
RSS_BATCHES, WRITTEN_ROWS = 10_000, 4096


def make_store(path: Path) -> PatchStore:
    """The sparse MTAT-scale store: random values in the first WRITTEN_ROWS rows, zeros beyond."""
    path.mkdir(parents=True)
    total = N_CLIPS * PER_CLIP
    out = np.lib.format.open_memmap(path / "patches.npy", mode="w+", dtype=np.float16, shape=(total, *ITEM))
    written = np.random.default_rng(0).standard_normal((WRITTEN_ROWS, *ITEM)).astype(np.float16)
    out[:WRITTEN_ROWS] = written
    out.flush()
    del out
    checksums = np.full(total, row_checksums(np.zeros((1, *ITEM), np.float16))[0], dtype=np.uint32)
    checksums[:WRITTEN_ROWS] = row_checksums(written)
    ids = np.arange(N_CLIPS, dtype=np.int64) * 3 + 2  # MTAT's ids are sparse too
    table = np.stack([ids, np.arange(N_CLIPS, dtype=np.int64) * PER_CLIP, np.full(N_CLIPS, PER_CLIP)], axis=1)
    return finalize(path, table, {"bench": "sampler"}, ITEM, checksums)


def labels_for(n: int) -> np.ndarray:
    return (np.random.default_rng(1).random((n, N_TAGS)) < 0.05).astype(np.uint8)


def stream_cfg(workers: int = 0):
    cfg = OmegaConf.structured(Config).stream
    cfg.num_workers = workers
    return cfg


def rate(it, n_batches: int) -> float:
    next(it)  # the first batch includes worker start-up
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * BATCH / (time.perf_counter() - t)


def sampler_figures(store: PatchStore) -> dict[str, float]:
    labels = labels_for(len(store))
    t = time.perf_counter()
    mux = patch_mux(store, store.clip_ids, stream_cfg(), seed=0)
    build_s = time.perf_counter() - t
    print(f"  patch_mux over {len(store):,} clips built in {build_s:.2f} s")
    out = {"patch_mux + batches": rate(batches(mux, store, labels, BATCH), 300)}
    for workers in (0, 2):
        t = time.perf_counter()
        it = train_loader(store, store.clip_ids, labels, stream_cfg(workers), BATCH, seed=0)
        out[f"train_loader, {workers} workers"] = rate(it, 300 if workers == 0 else 600)
        print(
            f"  train_loader with {workers} workers: first batch + 300/600 batches in {time.perf_counter() - t:.1f} s"
        )
        del it
    return out


def consumption() -> float:
    """Patches/s that training with the frozen full-size VGGish + default head consumes."""
    torch.manual_seed(0)
    cfg = OmegaConf.structured(Config)
    model = build_model(cfg, N_TAGS)
    model.backbone.to(memory_format=torch.channels_last)
    model.train()
    model.backbone.eval()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(BATCH, *ITEM)
    y = (torch.rand(BATCH, N_TAGS) < 0.05).float()

    def step():
        with torch.no_grad():
            fmap = model.encode(x)
        loss = model.loss(model(fmap, from_backbone=True), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    n, t = 8, time.perf_counter()
    for _ in range(n):
        step()
    return n * BATCH / (time.perf_counter() - t)


def child_rss(store_path: str) -> None:
    """In a fresh process: draw RSS_BATCHES batches through train_loader, print VmHWM in MiB."""
    store = PatchStore(store_path)
    it = train_loader(store, store.clip_ids, labels_for(len(store)), stream_cfg(), BATCH, seed=0)
    t = time.perf_counter()
    for _ in range(RSS_BATCHES):
        next(it)
    seconds = time.perf_counter() - t
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(f"{hwm / 1024:.1f} {seconds:.1f}")


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mtt-bench-sampler-"))
    try:
        t = time.perf_counter()
        store = make_store(tmp / "store")
        size = (tmp / "store" / "patches.npy").stat()
        print(
            f"store: {len(store):,} clips x {PER_CLIP} patches {ITEM} float16 = {size.st_size / 2**30:.2f} GiB "
            f"({size.st_blocks * 512 / 2**20:.0f} MiB on disk, sparse), made in {time.perf_counter() - t:.1f} s; "
            f"load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}"
        )
        sampler = sampler_figures(store)
        consumed = consumption()
        print(f"training consumption (frozen VGGish width 1.0 + head, batch {BATCH}): {consumed:,.0f} patches/s")
        for name, value in sampler.items():
            verdict = "ok" if value >= 20 * consumed else "BELOW TARGET"
            print(
                f"sampler {name:<28} {value:>10,.0f} patches/s = {value / consumed:7.1f}x consumption "
                f"(target >= 20x: {verdict})"
            )
        proc = subprocess.run(
            [sys.executable, __file__, "--rss", str(tmp / "store")], capture_output=True, text=True, check=True
        )
        hwm, seconds = (float(v) for v in proc.stdout.split())
        print(
            f"sampler peak RSS over {RSS_BATCHES:,} batches of {BATCH} (train_loader, 0 workers, "
            f"{RSS_BATCHES * BATCH / seconds:,.0f} patches/s): {hwm:.0f} MiB "
            f"(target < 1024 MiB: {'ok' if hwm < 1024 else 'ABOVE TARGET'})"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss":
        child_rss(sys.argv[2])
    else:
        main()
