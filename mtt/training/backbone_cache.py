"""Cache of the frozen backbone's outputs: one VGGish forward per patch, ever.

With a frozen backbone every epoch of every head variant recomputes the same conv maps. This
module computes them once per (feature store, weights, backbone settings, device type, autocast
dtype, memory format, what the pool reads) and stores them as a ``PatchStore`` with the same clip
table as the feature store, float16 items of what the pool reads (``mtt.models.pooling``): the
frequency mean ``(C, T, 1)`` for GAP and AutoPool (VGGish: 6,144 bytes per patch), the whole
``(C, T, F)`` map for a pool that needs it (``pool=max``: 24,576 bytes). Building is resumable:
rows are written in chunks into a memory-mapped temporary file and the number of finished rows is
recorded after each flush, so an interrupted build continues where it stopped. A changed key
(other weights, other features, bf16 instead of fp32, a pool that reads more or less) is a
different folder; a cache of an older format is left unread and named in one log line, with the
space deleting it frees. The cache carries content checksums like every store (``mtt.features.store``): a
corrupt or truncated cache is refused in one line naming the file and how to rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mtt.core.fs import atomic_write_bytes, durable_replace, locked
from mtt.features.store import MANIFEST, PATCHES, PatchStore, finalize, params_key, rebuild_hint, row_checksums
from mtt.models.pooling import MAP, READS, reduce_map

log = logging.getLogger(__name__)

# 3: items are what the pool reads (key "reads"); 2 stored every pool's whole (C, T, F) map.
FORMAT = 3


def parameters_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def channels_last(module: torch.nn.Module) -> bool:
    """Whether the module's conv weights are in channels-last (NHWC) memory format."""
    return any(
        p.dim() == 4 and p.shape[1] > 1 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in module.parameters()
    )


def compute_settings(
    device: torch.device, autocast_dtype: torch.dtype | None, backbone: torch.nn.Module | None = None
) -> dict:
    """How the outputs are computed, which changes their values (not only their speed): the
    device type (CUDA convolutions may use TF32), the autocast dtype (bf16 conv maps differ from
    fp32 ones by far more than float16 storage rounds away) and the memory format."""
    return {
        "device": device.type,
        "dtype": str(autocast_dtype or torch.float32).removeprefix("torch."),
        "tf32": device.type == "cuda" and bool(torch.backends.cudnn.allow_tf32),
        "channels_last": backbone is not None and channels_last(backbone),
    }


def cache_key(
    store: PatchStore,
    weights_sha256: str | None,
    backbone_cfg,
    backbone: torch.nn.Module | None = None,
    *,
    device: torch.device = torch.device("cpu"),
    autocast_dtype: torch.dtype | None = None,
    reads: str = MAP,
) -> dict:
    """Everything that determines the cached outputs: features, weights, backbone settings, how
    the build computes (``compute_settings``: pass the ``device`` and ``autocast_dtype`` that
    ``build_backbone_cache`` is given, which checks that they agree) and what of each map is kept
    (``reads``: the pool's, ``mtt.models.pooling.reads_of``; by default the whole map).

    With a weights file its SHA-256 identifies the backbone. A randomly initialised backbone has
    no file, and its values depend on the seed (and on whatever drew from the RNG before it), so
    pass ``backbone``: its parameters are hashed instead. Without either the key cannot tell two
    random backbones apart, which is an error rather than a silent reuse.
    """
    if weights_sha256 is None:
        if backbone is None:
            raise ValueError("cache_key: a randomly initialised backbone needs `backbone` to be hashed")
        weights = f"random-init:{parameters_sha256(backbone)}"
    else:
        weights = weights_sha256
    if reads not in READS:
        raise ValueError(f"cache_key: reads={reads!r}, expected one of {', '.join(READS)}")
    return {
        "features": store.fingerprint,
        "weights": weights,
        "width": float(backbone_cfg.width),
        "embeddings": bool(backbone_cfg.embeddings),
        "embedding_relu": bool(backbone_cfg.embedding_relu),
        "compute": compute_settings(device, autocast_dtype, backbone),
        "reads": reads,
        "format": FORMAT,
    }


@torch.no_grad()
def build_backbone_cache(
    store: PatchStore,
    encode,
    key: dict,
    root: str | Path,
    device: torch.device,
    batch_size: int = 256,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> PatchStore:
    """Run ``encode`` (``(B, 96, 64) -> (B, C, T, F)``) over every patch of ``store`` once and
    keep what ``key["reads"]`` says of each map (``reduce_map``: ``(C, T, 1)`` or ``(C, T, F)``).

    Returns the finished cache store (opened from disk if it already exists). Concurrent callers
    with the same key (parallel sweep jobs) serialise on a lock: one builds, the others open it.
    ``key`` (``cache_key``) must name the ``device`` type and ``autocast_dtype`` used here.
    """
    asked = compute_settings(device, autocast_dtype)
    keyed = key.get("compute", {})
    if {k: keyed.get(k) for k in ("device", "dtype")} != {k: asked[k] for k in ("device", "dtype")}:
        raise ValueError(
            f"build_backbone_cache: the key was made for {keyed.get('device')}/{keyed.get('dtype')} "
            f"but the build computes on {asked['device']}/{asked['dtype']}; pass the same "
            "device and autocast_dtype to cache_key"
        )
    if key.get("reads") not in READS or key.get("format") != FORMAT:
        raise ValueError(f"build_backbone_cache: not a key of this format ({FORMAT}), make it with cache_key")
    path = Path(root).expanduser() / params_key(key)
    if (path / MANIFEST).is_file():
        return _opened(path, key)
    with locked(path.parent / f".{path.name}.lock"):
        if (path / MANIFEST).is_file():  # finished by another process while we waited
            return _opened(path, key)
        for old in older_caches(path.parent, key):
            size = (old / PATCHES).stat().st_size if (old / PATCHES).is_file() else 0
            log.warning(
                "%s: a backbone cache of an older format (every pool's whole map), no longer read; "
                "building this one at %s (rm -r it to free %.1f MB)",
                old,
                path,
                size / 1e6,
            )
        return _build(store, encode, key, path, device, batch_size, progress, autocast_dtype)


def _opened(path: Path, key: dict) -> PatchStore:
    """The finished cache at ``path``, refused (``ValueError``, one line) unless its manifest was
    written for ``key``: a folder copied or renamed into place must not feed a pool another map."""
    cache = PatchStore(path)
    if cache.manifest["params"] != json.loads(json.dumps(key, default=str)):
        raise ValueError(f"{path}: a backbone cache built for other settings than its name says; {rebuild_hint(path)}")
    return cache


def older_caches(root: Path, key: dict) -> list[Path]:
    """Finished caches under ``root`` of the same features, weights and settings as ``key`` but an
    older ``FORMAT`` (before caches kept only what the pool reads): never read again."""
    same = {k: v for k, v in json.loads(json.dumps(key, default=str)).items() if k not in ("format", "reads")}
    found = []
    for manifest in sorted(root.glob(f"*/{MANIFEST}")):
        try:
            params = json.loads(manifest.read_text()).get("params", {})
        except (OSError, ValueError):
            continue
        if params.get("format", 0) < FORMAT and {k: params.get(k) for k in same} == same:
            found.append(manifest.parent)
    return found


def _build(
    store: PatchStore,
    encode,
    key: dict,
    path: Path,
    device: torch.device,
    batch_size: int,
    progress: bool,
    autocast_dtype: torch.dtype | None,
) -> PatchStore:
    """``build_backbone_cache`` under its lock: resume from ``progress.json`` or start.

    Each row's CRC-32 is taken from the outputs in memory, into ``.checksums.npy.tmp`` beside
    the rows, both flushed before ``progress.json`` counts them; the feature store's rows are
    checked as they are read (``PatchStore.read``), so a corrupt feature store stops the build.
    """
    path.mkdir(parents=True, exist_ok=True)
    total = store.patches.shape[0]
    reads = key["reads"]
    probe = encode(torch.from_numpy(np.asarray(store.read(slice(0, 1)), dtype=np.float32)).to(device))
    item_shape = tuple(reduce_map(probe.float(), reads).shape[1:])
    tmp, sums_tmp, done_file = path / ".patches.npy.tmp", path / ".checksums.npy.tmp", path / "progress.json"
    done = 0
    if tmp.exists() and sums_tmp.exists() and done_file.exists():
        state = json.loads(done_file.read_text())
        if state.get("shape") == [total, *item_shape]:
            done = int(state["rows_done"])
    if done:
        out = np.load(tmp, mmap_mode="r+", allow_pickle=False)
        sums = np.load(sums_tmp, mmap_mode="r+", allow_pickle=False)
    else:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, *item_shape))
        sums = np.lib.format.open_memmap(sums_tmp, mode="w+", dtype=np.uint32, shape=(total,))
    chunk = batch_size * 8  # rows between progress records
    with tqdm(total=total, initial=done, desc="backbone cache", unit="patch", disable=not progress) as bar:
        for start in range(done, total, chunk):
            stop = min(start + chunk, total)
            for s in range(start, stop, batch_size):
                e = min(s + batch_size, stop)
                x = torch.from_numpy(np.asarray(store.read(slice(s, e)), dtype=np.float32)).to(device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    y = encode(x)
                # Reduced in float32, then rounded to float16 once (a whole map is rounded before the
                # pool averages it: the two differ by float16 rounding, tests/test_backbone_cache.py).
                rows = reduce_map(y.float(), reads).cpu().numpy().astype(np.float16)
                sums[s:e] = row_checksums(rows)
                out[s:e] = rows
                bar.update(e - s)
            out.flush()
            sums.flush()
            atomic_write_bytes(done_file, json.dumps({"rows_done": stop, "shape": [total, *item_shape]}).encode())
    checksums = np.array(sums)
    del out, sums
    durable_replace(tmp, path / "patches.npy")
    table = np.stack([store.clip_ids, store.starts, store.counts], axis=1)
    cache = finalize(path, table, key, item_shape, checksums, store.failed)
    done_file.unlink(missing_ok=True)
    sums_tmp.unlink(missing_ok=True)
    return cache
