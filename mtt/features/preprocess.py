"""Decode every clip and store all its VGGish log-mel patches (feature store).

    python -m mtt.preprocess data=mtat data.root=DIR      # or any data option (mtt/preprocess.py)

The store is keyed by the front-end parameters and the dataset root, so a changed front end
never reuses stale features. Each clip is written as its own shard first (atomically), so an
interrupted run (Ctrl-C, kill -9) resumes where it stopped; clips that cannot be decoded (MTAT
ships three empty mp3s) are recorded as failures, listed in the manifest and reported, and the
run goes on.

Short clips: a clip shorter than one patch (0.96 s) has no complete patch. It is KEPT in the
store with 0 patches (the reference front end, too, drops incomplete windows and patches, and
padding would feed the model silence that no real clip has); training and evaluation leave such
clips out and log how many (``mtt.training.train.split_of``), and the end-of-run summary counts them.

Truncated clips: every clip's decoded duration is recorded (manifest ``seconds``) and compared
with how long it should be (``ClipIndex.expected_seconds``: clip_info's ``segmentEnd -
segmentStart``, else ``data.clip_seconds``, 29.1 s for MTAT). A clip shorter than that by more
than one patch (a cut download, a damaged mp3) is stored as usual with the patches it has, and
listed under ``truncated`` in the manifest (clip id -> file, expected and decoded seconds) and in
the summary; a training run logs how many as ``derived.truncated_clips``.

Resuming: shards are written to a temporary name and renamed, so a shard either exists whole or
not at all; temporary leftovers of a killed run (``.*.tmp``) are deleted when a run starts. Each
shard's patches carry their CRC-32s (``<id>.json``, written first, from the patches in memory):
a leftover shard that no longer matches them is decoded again, and the finished store's
checksums are those of the patches as computed (``mtt.features.store``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shlex
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mtt.config import FeaturesConfig
from mtt.core.fs import CorruptFileError, atomic_write_bytes, locked, save_npy_atomic
from mtt.data.audio import AudioDecodeError, load_audio
from mtt.data.index import ClipIndex
from mtt.features.store import MANIFEST, PatchStore, pack, params_key, row_checksums

log = logging.getLogger(__name__)

# Below this many missing clips, worker start-up (importing torch) costs more than it saves.
_MIN_CLIPS_FOR_WORKERS = 64


def frontend_params(cfg: FeaturesConfig) -> dict:
    """The parameters that determine the patches (not where they are stored)."""
    params: dict = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else asdict(cfg)  # type: ignore[assignment]
    params = {k: v for k, v in params.items() if k not in ("store", "workers")}
    # VGGish's stores were keyed before `name` existed: leaving the default out keeps their keys
    # and fingerprints, so no existing store is recomputed or compared as another front end.
    if params.get("name") == "vggish":
        del params["name"]
    return params


def store_path(index: ClipIndex, cfg: FeaturesConfig) -> Path:
    # format 2: the manifest records every clip's decoded duration (and the truncated clips)
    key = params_key({"frontend": frontend_params(cfg), "root": str(index.root.resolve()), "format": 2})
    return Path(cfg.store).expanduser() / f"{index.root.name}-{key}"


_FRONT_ENDS: dict[str, object] = {}  # per process: params key -> LogMelFrontEnd (built once)


def _front_end(params: dict):
    key = params_key(params)
    if key not in _FRONT_ENDS:
        from mtt.features.frontend import build_front_end

        _FRONT_ENDS[key] = build_front_end(FeaturesConfig(**params))
    return _FRONT_ENDS[key]


def _init_worker() -> None:
    """One torch thread per worker process: the pool already uses every core, and torch's OpenMP
    threads stall badly when processes compete for cores (see ``LogMelFrontEnd``)."""
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def _start_method(method: str):
    """Make ``method`` the process-wide start method while the pool starts its workers.

    A child of a ``get_context(method)`` pool restores the PARENT's global start method first.
    Inside a joblib worker (a job of a ``hydra/launcher=joblib`` sweep) that is joblib's ``loky``,
    which a plain multiprocessing child does not know: every worker would die on start.
    """
    current = multiprocessing.get_start_method(allow_none=True)
    if current in (None, method):
        yield
        return
    multiprocessing.set_start_method(method, force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(current, force=True)


def _worker_context():
    """forkserver, preloading torch and the front end: the server imports them once (~2 s of
    CPU) and every worker is a cheap fork of it, instead of each spawned worker importing torch
    again. Not plain fork: the parent may already run torch threads, which a fork would copy
    mid-flight."""
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "mtt.features.frontend", "mtt.preprocess"])
    return ctx


def _extract(job: tuple[int, str, str, dict]) -> tuple[int, int | None, str | None]:
    """Worker: decode one clip, compute its patches, write its shard. -> (clip_id, n, error).

    The shard is ``(n_patches, patch_frames, n_mels)`` float16, written after ``<id>.json`` (the
    decoded duration and each patch's CRC-32, taken in memory), so a shard never lacks them; a
    clip that cannot be decoded gets a ``<id>.failed`` file holding the reason instead.
    """
    import torch

    clip_id, audio_path, shard, params = job
    front = _front_end(params)
    try:
        wave = load_audio(audio_path, params["sample_rate"])
    except (AudioDecodeError, FileNotFoundError) as exc:
        atomic_write_bytes(Path(shard).with_suffix(".failed"), str(exc).encode())
        return clip_id, None, str(exc)
    with torch.inference_mode():
        patches = front(torch.from_numpy(wave)[None])[0].numpy().astype(np.float16)
    info = {"seconds": len(wave) / params["sample_rate"], "crc32": row_checksums(patches).tolist()}
    atomic_write_bytes(Path(shard).with_suffix(".json"), json.dumps(info).encode())
    save_npy_atomic(Path(shard), patches)
    return clip_id, len(patches), None


def _load_shard(shard: Path) -> tuple[np.ndarray, float]:
    """A shard left by ``_extract`` and its decoded seconds, checked against the CRC-32s written
    with it; ``CorruptFileError`` otherwise (or when it predates them)."""
    remedy = f"delete it and run again (the clip is decoded again): rm {shlex.quote(str(shard))}"
    if not shard.with_suffix(".json").is_file():
        raise CorruptFileError(shard, "written before shards carried checksums (cannot be checked)", remedy)
    try:
        info = json.loads(shard.with_suffix(".json").read_text())
        patches = np.load(shard, allow_pickle=False)
        ok = np.array_equal(row_checksums(patches), np.asarray(info["crc32"], dtype=np.uint32))
        seconds = float(info["seconds"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(shard, f"unreadable ({exc})", remedy) from None
    if not ok:
        raise CorruptFileError(shard, "content differs from the CRC-32s written with it (corrupt)", remedy)
    return patches, seconds


def _drop_bad_shards(shards: Path, clip_ids: list[int]) -> None:
    """Shards of an interrupted earlier run that do not match their checksums (or predate them)
    are deleted, so that their clips are decoded again: they are mtt's own temporary files."""
    for c in clip_ids:
        shard = shards / f"{c}.npy"
        if not shard.exists():
            continue
        try:
            _load_shard(shard)
        except CorruptFileError as exc:
            log.warning("%s: %s; decoding clip %d again", shard, exc.problem, c)
            for f in (shard, shard.with_suffix(".json"), shard.with_suffix(".seconds")):
                f.unlink(missing_ok=True)


def _remove_temporaries(folder: Path) -> int:
    """Delete ``.*.tmp`` files a killed run left in ``folder``: never read, never reused."""
    n = 0
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def build_feature_store(index: ClipIndex, cfg: FeaturesConfig, progress: bool = True) -> PatchStore:
    """Compute (or resume, or just open) the feature store of every clip in ``index``.

    Returns the finished ``PatchStore`` whose items are ``(patch_frames, n_mels)`` float16 patches
    of the front end ``cfg.name`` (VGGish: ``(96, 64)`` log-mel).
    """
    path = store_path(index, cfg)
    store = _finished_store(path, index)
    if store is not None:
        return store
    # Concurrent builders (parallel sweep jobs): one builds, the others wait, then open it.
    with locked(path.parent / f".{path.name}.lock"):
        return _build_feature_store(path, index, cfg, progress)


def _finished_store(path: Path, index: ClipIndex) -> PatchStore | None:
    """The store at ``path`` if it is finished and knows every clip of ``index``."""
    if not (path / MANIFEST).is_file():
        return None
    store = PatchStore(path)
    known = set(int(c) for c in store.clip_ids) | set(int(c) for c in store.failed)
    return store if known.issuperset(int(c) for c in index.clip_ids) else None


def _check_ours(path: Path) -> None:
    """A store is built (and its manifest and shards replaced) only in a folder that is new, empty
    or a store's own (it holds a manifest or shards); ``FileExistsError`` names anything else."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a feature store; move it away or set features.store elsewhere")
    if path.is_dir() and any(path.iterdir()) and not ((path / MANIFEST).exists() or (path / "shards").is_dir()):
        raise FileExistsError(
            f"{path} holds files that are not a feature store's; refusing to build one there: "
            "move them away or set features.store to another folder"
        )


def _build_feature_store(path: Path, index: ClipIndex, cfg: FeaturesConfig, progress: bool) -> PatchStore:
    """``build_feature_store`` under its lock."""
    finished = _finished_store(path, index)  # built by another process while we waited
    if finished is not None:
        return finished
    _check_ours(path)
    clip_ids = [int(c) for c in index.clip_ids]
    store = PatchStore(path) if (path / MANIFEST).is_file() else None  # clips added since: extend
    shards = path / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    stale = _remove_temporaries(shards) + _remove_temporaries(path)
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted run in %s", stale, path)
    params = frontend_params(cfg)
    old = set(int(c) for c in store.clip_ids) if store is not None else set()
    _drop_bad_shards(shards, [c for c in clip_ids if c not in old])
    jobs = [
        (c, str(index.audio_path(i)), str(shards / f"{c}.npy"), params)
        for i, c in enumerate(clip_ids)
        if c not in old and not (shards / f"{c}.npy").exists() and not (shards / f"{c}.failed").exists()
    ]
    log.info(
        "computing %d of %d clips (%d done before) into %s", len(jobs), len(clip_ids), len(clip_ids) - len(jobs), path
    )
    if jobs:
        workers = cfg.workers or os.cpu_count() or 1
        bar = tqdm(total=len(jobs), desc="log-mel features", unit="clip", disable=not progress)
        if workers == 1 or len(jobs) < _MIN_CLIPS_FOR_WORKERS:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as a worker: one clip is too small to share out
            try:
                for _ in map(_extract, jobs):
                    bar.update()
            finally:
                torch.set_num_threads(threads)
        else:
            # Chunks of 8 clips keep the inter-process traffic small while the bar still moves.
            with (
                _start_method("forkserver"),
                ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_init_worker) as pool,
            ):
                for _ in pool.map(_extract, jobs, chunksize=8):
                    bar.update()
        bar.close()

    counts, failed, seconds = {}, {}, {}
    for c in clip_ids:
        shard = shards / f"{c}.npy"
        if c in old:
            counts[c], seconds[str(c)] = store.count(c), store.seconds[str(c)]
        elif shard.exists():
            counts[c] = np.load(shard, mmap_mode="r", allow_pickle=False).shape[0]
            seconds[str(c)] = float(json.loads(shard.with_suffix(".json").read_text())["seconds"])
        else:
            failed[str(c)] = (shards / f"{c}.failed").read_text()
    truncated = truncated_clips(index, seconds, cfg.patch_frames * cfg.hop_seconds)

    def load(c: int) -> np.ndarray:
        return store.get(c) if c in old else _load_shard(shards / f"{c}.npy")[0]

    item_shape = (cfg.patch_frames, cfg.n_mels)
    (path / MANIFEST).unlink(missing_ok=True)
    store = pack(
        path,
        counts,
        load,
        item_shape,
        params,
        failed,
        progress=progress,
        extra={"seconds": seconds, "truncated": truncated},
    )
    shutil.rmtree(shards, ignore_errors=True)
    if failed:
        log.warning(
            "%d clip(s) could not be decoded and were skipped (listed in %s):\n  %s",
            len(failed),
            path / MANIFEST,
            "\n  ".join(failed.values()),
        )
    if truncated:
        log.warning(
            "%d clip(s) are shorter than expected by more than one patch (kept, listed under 'truncated' in %s)",
            len(truncated),
            path / MANIFEST,
        )
    return store


def truncated_clips(index: ClipIndex, seconds: dict[str, float], patch_seconds: float) -> dict[str, dict]:
    """clip id -> ``{file, expected_seconds, decoded_seconds}`` for every decoded clip shorter
    than ``index.expected_seconds`` by more than ``patch_seconds`` (one patch)."""
    if index.expected_seconds is None:
        return {}
    out = {}
    for row, clip_id in enumerate(index.clip_ids):
        expected, decoded = float(index.expected_seconds[row]), seconds.get(str(int(clip_id)))
        if decoded is not None and decoded < expected - patch_seconds:  # NaN expected: never
            out[str(int(clip_id))] = {
                "file": index.paths[row],
                "expected_seconds": round(expected, 3),
                "decoded_seconds": round(decoded, 3),
            }
    return out


_LISTED = 20  # truncated clips named in the summary; the manifest lists them all


def summary(store: PatchStore, seconds: float | None = None) -> str:
    """The end-of-run report: counts, failures with their reasons, short and truncated clips,
    fingerprint."""
    short = int((store.counts == 0).sum())
    truncated = sorted(store.truncated.items(), key=lambda kv: int(kv[0]))
    lines = [
        f"feature store: {store.path}",
        f"  {len(store)} clips, {store.patches.shape[0]} patches of {store.item_shape}, "
        f"{short} shorter than one patch (kept with 0 patches, not trained on), "
        f"{len(truncated)} truncated, {len(store.failed)} failed, fingerprint {store.fingerprint}"
        + (f", {seconds:.1f} s" if seconds is not None else ""),
    ]
    if store.failed:
        lines.append(f"  {len(store.failed)} clip(s) could not be decoded (skipped, listed in the manifest):")
        lines += [
            f"    {clip_id}: {reason}" for clip_id, reason in sorted(store.failed.items(), key=lambda kv: int(kv[0]))
        ]
    if truncated:
        lines.append(
            f"  {len(truncated)} clip(s) shorter than expected by more than one patch (kept with the "
            "patches they have, listed under 'truncated' in the manifest):"
        )
        lines += [
            f"    {clip_id}: {t['file']}: {t['decoded_seconds']:g} s of {t['expected_seconds']:g} s"
            for clip_id, t in truncated[:_LISTED]
        ]
        if len(truncated) > _LISTED:
            lines.append(f"    ... and {len(truncated) - _LISTED} more")
    return "\n".join(lines)
