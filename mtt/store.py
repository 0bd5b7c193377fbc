"""Patch stores on disk: per-clip arrays packed into one memory-mapped float16 file.

A store is a folder::

    shards/<clip_id>.npy   one clip's array (n_patches, *item_shape), written while building
    patches.npy            all clips packed, (total_patches, *item_shape) float16, memory-mapped
    clips.npy              (n_clips, 3) int64 rows: clip_id, first row in patches.npy, n_patches
    manifest.json          parameters, failures, the fingerprint and what the builder adds
                           (the feature store: every clip's decoded seconds, the truncated
                           clips); written LAST

Every file is written to a temporary name and renamed into place, and ``manifest.json`` only
exists once ``patches.npy`` and ``clips.npy`` are complete, so a crash (Ctrl-C, kill -9, power)
at any point leaves either a finished store or shards that a re-run picks up: nothing truncated
is ever read as valid. The same layout holds VGGish log-mel patches (``mtt.preprocess``) and
cached backbone outputs (``mtt.backbone_cache``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

# Re-exported: store builders import the writers from here.
from mtt.fs import atomic_replace, atomic_write_bytes, durable_replace, locked, save_npy_atomic  # noqa: F401

MANIFEST = "manifest.json"


def params_key(params: Mapping) -> str:
    """A short stable hash of JSON-able parameters, used to name stores."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class PatchStore:
    """A finished store, memory-mapped: nothing but the clip table is read into RAM.

    ``patches`` is ``(total_patches, *item_shape)`` float16; ``rows(clip_id)`` gives the slice of
    one clip's patches.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.path}: not a finished store (no {MANIFEST})")
        self.manifest = json.loads(manifest.read_text())
        self.patches = np.load(self.path / "patches.npy", mmap_mode="r", allow_pickle=False)
        table = np.load(self.path / "clips.npy", allow_pickle=False)
        self.clip_ids = table[:, 0].copy()
        self.starts = table[:, 1].copy()
        self.counts = table[:, 2].copy()
        self._row = {int(c): i for i, c in enumerate(self.clip_ids)}

    def __deepcopy__(self, memo) -> PatchStore:
        # Read-only, so sharing is a correct copy. pescador deep-copies a streamer's arguments
        # every time the mux activates it; a deep copy of the memory map would read the whole
        # store into RAM (9.5 GB on MTAT) per activation.
        return self

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def failed(self) -> dict[str, str]:
        """clip_id (as str) -> reason, for clips that could not be decoded."""
        return self.manifest.get("failed", {})

    @property
    def seconds(self) -> dict[str, float]:
        """clip_id (as str) -> decoded duration in seconds (feature stores; empty otherwise)."""
        return self.manifest.get("seconds", {})

    @property
    def truncated(self) -> dict[str, dict]:
        """clip_id (as str) -> ``{file, expected_seconds, decoded_seconds}`` of the clips shorter
        than expected by more than one patch (see ``mtt.preprocess``)."""
        return self.manifest.get("truncated", {})

    @property
    def item_shape(self) -> tuple[int, ...]:
        return tuple(self.patches.shape[1:])

    def __contains__(self, clip_id: int) -> bool:
        return int(clip_id) in self._row

    def __len__(self) -> int:
        return len(self.clip_ids)

    def count(self, clip_id: int) -> int:
        return int(self.counts[self._row[int(clip_id)]])

    def rows(self, clip_id: int) -> slice:
        i = self._row[int(clip_id)]
        return slice(int(self.starts[i]), int(self.starts[i] + self.counts[i]))

    def get(self, clip_id: int) -> np.ndarray:
        """One clip's patches ``(n_patches, *item_shape)`` (a memory-mapped view)."""
        return self.patches[self.rows(clip_id)]


def pack(
    path: Path,
    counts: Mapping[int, int],
    load: Callable[[int], np.ndarray],
    item_shape: tuple[int, ...],
    params: Mapping,
    failed: Mapping[str, str] | None = None,
    progress: bool = False,
    extra: Mapping | None = None,
) -> PatchStore:
    """Pack per-clip arrays into a finished store.

    ``counts`` maps clip_id -> n_patches (in store order) and ``load(clip_id)`` returns that
    clip's ``(n_patches, *item_shape)`` array. ``patches.npy`` is written through a memory map so
    the store is never whole in RAM; then ``clips.npy``; then the manifest with the fingerprint
    (a hash of the clip table and the parameters) and ``extra`` (more manifest entries).
    """
    path.mkdir(parents=True, exist_ok=True)
    clip_ids = [int(c) for c in counts]
    sizes = np.array([int(counts[c]) for c in clip_ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    total = int(sizes.sum())
    tmp = path / ".patches.npy.tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, *item_shape))
    for c, s, n in tqdm(
        list(zip(clip_ids, starts, sizes)), desc=f"pack {path.name}", unit="clip", disable=not progress, leave=False
    ):
        if n:
            out[s : s + n] = load(c)
    out.flush()
    del out
    durable_replace(tmp, path / "patches.npy")
    table = (
        np.stack([np.asarray(clip_ids, dtype=np.int64), starts, sizes], axis=1)
        if clip_ids
        else np.zeros((0, 3), dtype=np.int64)
    )
    return finalize(path, table, params, item_shape, failed, extra)


def finalize(
    path: Path,
    table: np.ndarray,
    params: Mapping,
    item_shape: tuple[int, ...],
    failed: Mapping[str, str] | None = None,
    extra: Mapping | None = None,
) -> PatchStore:
    """Write ``clips.npy`` and then the manifest next to a complete ``patches.npy``.

    The fingerprint hashes the clip table and the parameters.
    """
    save_npy_atomic(path / "clips.npy", table)
    digest = hashlib.sha256(table.tobytes() + json.dumps(params, sort_keys=True, default=str).encode())
    manifest = {
        "params": dict(params),
        "n_clips": int(table.shape[0]),
        "n_patches": int(table[:, 2].sum()),
        "item_shape": list(item_shape),
        "failed": dict(failed or {}),
        "fingerprint": digest.hexdigest()[:16],
        **dict(extra or {}),
    }
    atomic_write_bytes(path / MANIFEST, json.dumps(manifest, indent=1, default=str).encode())
    return PatchStore(path)
