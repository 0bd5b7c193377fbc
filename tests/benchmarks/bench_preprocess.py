"""End-to-end preprocessing throughput: ``mtt.preprocess`` vs the source report's way.

Run: ``python tests/benchmarks/bench_preprocess.py [N]``. Generates N (default 64) distinct
29.1 s, 16 kHz mono mp3 clips (``mtt.data.embedded.render_clip`` + ``write_mp3``) and a tree in
MTAT's layout that names each file 4 times (hard links: 4N clips to decode, without 4x the
generation time), then times, on the same 4N files and on all cores:

- ours: ``build_feature_store`` (forked workers, one torch thread each: decode at the native
  16 kHz with libsndfile, the torch VGGish front end, float16 shards, packing into the store);
- the report's way: ``librosa.load`` at its default 22,050 Hz, then torchvggish's
  ``vggish_input.waveform_to_examples`` (resampy back to 16 kHz, numpy front end), each clip's
  examples saved with ``np.save`` as float16, in a pool of the same size.

Both include process start-up (importing torch is most of it: ~2 s of CPU per process; ours
imports it once in a fork server, the reference's pool in every worker). Ours is
also run on the N distinct files alone, to separate its fixed cost from the per-clip cost, which
gives the projection for all 25,863 MTAT clips. Wall-clock figures depend on what else runs on the machine (the load average is
printed), so per-clip CPU time (all processes, from getrusage) is printed too: it is robust to
contention, and clips/s on C idle cores is about C / (CPU s per clip).
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from mtt.config import FeaturesConfig  # noqa: E402
from mtt.data.index import build_index  # noqa: E402
from mtt.data.mtat import FOLDERS  # noqa: E402
from mtt.features.preprocess import build_feature_store  # noqa: E402

SECONDS, SR, MTAT_CLIPS = 29.1, 16000, 25_863
RECIPES = [
    {"guitar", "slow"},
    {"piano"},
    {"drums", "fast"},
    {"violin", "female"},
    {"techno"},
    {"flute", "quiet"},
    {"harpsichord"},
    {"sitar", "male"},
]


# The synthesiser (scipy) is imported where it is used: spawned workers re-import this script,
# and its imports would count in both contenders' start-up.
def _render(job: tuple[int, str]) -> None:
    from mtt.data.embedded import complete_tags, render_clip
    from mtt.data.mtat import write_mp3

    k, path = job
    tags = complete_tags(RECIPES[k % len(RECIPES)])
    write_mp3(path, render_clip(tags, SECONDS, SR, np.random.default_rng(k)))


def make_tree(root: Path, n: int) -> list[Path]:
    """``n`` distinct clips spread over the 16 folders, and their annotations."""
    for f in FOLDERS:
        (root / f).mkdir(parents=True, exist_ok=True)
    files = [root / FOLDERS[k % 16] / f"artist{k}-album-01-song-0-29.mp3" for k in range(n)]
    with ProcessPoolExecutor(os.cpu_count(), mp_context=get_context("spawn")) as pool:
        list(pool.map(_render, [(k, str(f)) for k, f in enumerate(files)]))
    link_tree(root, root, files, copies=1)
    return files


def link_tree(src_root: Path, root: Path, files: list[Path], copies: int) -> None:
    """Annotations for ``copies`` names per file under ``root`` (hard links: the same bytes)."""
    from mtt.data.embedded import complete_tags
    from mtt.data.mtat import write_annotations

    rows = []
    for c in range(copies):
        for k, src in enumerate(files):
            rel = src.relative_to(src_root)
            if root != src_root or c:
                rel = rel.with_name(f"copy{c}-{rel.name}")
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(src, root / rel)
            rows.append((2 + 3 * len(rows), complete_tags(RECIPES[k % len(RECIPES)]), rel.as_posix()))
    write_annotations(root / "annotations_final.csv", rows)


def _report_way(job: tuple[str, str]) -> int:
    """One clip the source report's way; the same write as ours (float16 .npy per clip)."""
    import librosa
    import torch
    from torchvggish import vggish_input

    torch.set_num_threads(1)
    audio, out = job
    y, sr = librosa.load(audio)  # sr=22050, librosa's default
    examples = vggish_input.waveform_to_examples(y, sr, return_tensor=False)
    np.save(out, examples.astype(np.float16), allow_pickle=False)
    return len(examples)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and every child it has waited for."""
    return sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )


def stop_forkserver() -> None:
    """Stop multiprocessing's fork server (ours starts its workers from one) and wait for it, so
    that its CPU time and its workers' (which it waited for) count in RUSAGE_CHILDREN, and the
    next run starts it afresh, as every ``python -m mtt.preprocess`` does."""
    from multiprocessing import forkserver  # noqa: PLC0415

    server = forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is not None:
        server._stop()  # CPython's own way to stop it (used by its tests); waits for the server


def timed(fn) -> tuple[float, float]:
    """(wall s, CPU s) of ``fn()`` including the fork server it starts and that server's workers."""
    cpu, wall = cpu_seconds(), time.perf_counter()
    fn()
    stop_forkserver()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        files = make_tree(tmp / "small", n)
        link_tree(tmp / "small", tmp / "big", files, copies=4)
        print(
            f"generated {n} distinct {SECONDS} s {SR} Hz mono mp3 clips ({time.perf_counter() - start:.0f} s); "
            f"{cores} cores, load average {os.getloadavg()[0]:.1f} before timing"
        )

        def ours(tree: str) -> None:
            cfg = FeaturesConfig(store=str(tmp / f"store-{tree}"))
            store = build_feature_store(build_index(tmp / tree, tags="all"), cfg, progress=False)
            assert not store.failed and (store.counts == 30).all()  # 2,910 frames -> 30 patches

        index = build_index(tmp / "big")
        jobs = [(str(index.audio_path(i)), str(tmp / f"ref-{i}.npy")) for i in range(len(index.clip_ids))]

        def report_way() -> None:
            with ProcessPoolExecutor(cores, mp_context=get_context("spawn")) as pool:
                counts = list(pool.map(_report_way, jobs, chunksize=4))
            assert min(counts) == 30  # 2,910 frames of 10 ms -> 30 patches of 96

        ours_wall, ours_cpu = timed(lambda: ours("small"))
        big_wall, big_cpu = timed(lambda: ours("big"))
        ref_wall, ref_cpu = timed(report_way)  # on the 4N clips of "big"
        load = os.getloadavg()[0]

    per_clip = max(big_wall - ours_wall, 1e-9) / (3 * n)  # marginal wall time per clip
    fixed = max(ours_wall - per_clip * n, 0.0)
    cpu_per_clip = max(big_cpu - ours_cpu, 1e-9) / (3 * n)
    print(f"{'':28s}{'clips':>7s}{'wall s':>9s}{'clips/s':>9s}{'CPU s/clip':>12s}")
    for name, clips, wall, cpu in (
        ("ours (mtt.preprocess)", n, ours_wall, ours_cpu),
        ("ours, 4x the clips", 4 * n, big_wall, big_cpu),
        ("report's way (librosa+resampy)", 4 * n, ref_wall, ref_cpu),
    ):
        print(f"{name:28s}{clips:7d}{wall:9.2f}{clips / wall:9.1f}{cpu / clips:12.4f}")
    print(
        f"speed-up on the same {4 * n} clips, end to end: wall {ref_wall / big_wall:.1f}x, "
        f"CPU time {ref_cpu / big_cpu:.1f}x; per clip after start-up: CPU {ref_cpu / (4 * n) / cpu_per_clip:.0f}x "
        f"(target >= 10x)"
    )
    print(
        f"ours: fixed cost {fixed:.1f} s (worker start-up, store packing), then {1 / per_clip:.1f} clips/s "
        f"wall, {cpu_per_clip * 1000:.1f} ms CPU per clip = {cores / cpu_per_clip:.0f} clips/s on {cores} idle "
        f"cores (target >= 30)"
    )
    mtat_wall = fixed + MTAT_CLIPS * per_clip
    mtat_cpu = MTAT_CLIPS * cpu_per_clip / cores
    ref_mtat = MTAT_CLIPS * ref_cpu / (4 * n) / cores
    print(
        f"projected for all {MTAT_CLIPS:,} MTAT clips: ours {mtat_wall / 60:.1f} min at this load "
        f"({mtat_cpu / 60:.1f} min on {cores} idle cores); the report's way ~{ref_mtat / 60:.0f} min on "
        f"{cores} idle cores (load average {load:.1f} after timing)"
    )


if __name__ == "__main__":
    main()
