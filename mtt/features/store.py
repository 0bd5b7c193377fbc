"""Patch stores on disk: per-clip arrays packed into one memory-mapped float16 file.

A store is a folder::

    shards/<clip_id>.npy   one clip's array (n_patches, *item_shape), written while building
    patches.npy            all clips packed, (total_patches, *item_shape) float16, memory-mapped
    checksums.npy          (total_patches,) uint32: the CRC-32 of each row of patches.npy,
                           computed from the rows in memory as they were written
    clips.npy              (n_clips, 3) int64 rows: clip_id, first row in patches.npy, n_patches
    manifest.json          parameters, failures, the fingerprint, what the builder adds (the
                           feature store: every clip's decoded seconds, the truncated clips),
                           the size and SHA-256 of the files above and its own SHA-256;
                           written LAST

Every file is written to a temporary name and renamed into place, and ``manifest.json`` only
exists once ``patches.npy`` and ``clips.npy`` are complete, so a crash (Ctrl-C, kill -9, power)
at any point leaves either a finished store or shards that a re-run picks up: nothing truncated
is ever read as valid. The same layout holds VGGish log-mel patches (``mtt.preprocess``) and
cached backbone outputs (``mtt.training.backbone_cache``).

Content checksums: opening a store checks the manifest's own digest, every file's size (a
truncated ``patches.npy`` is named as such) and the SHA-256 of ``clips.npy`` and
``checksums.npy``; the rows of ``patches.npy`` are checked against their CRC-32 the first time
this ``PatchStore`` reads them (``read``, ``get``, ``verify``), so every row a number is
computed from was checked, once per process, and a pass over a 19 GB cache is never paid before
a 3-second epoch (docs/records-and-resume.md has the measured cost). Any mismatch raises
``mtt.core.fs.CorruptFileError``: one line naming the file and the command that rebuilds the store.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

# Re-exported: store builders import the writers from here.
from mtt.core.fs import (  # noqa: F401
    CorruptFileError,
    atomic_replace,
    atomic_write_bytes,
    check_file,
    check_size,
    durable_replace,
    locked,
    save_npy_atomic,
)

MANIFEST = "manifest.json"
PATCHES, CHECKSUMS, CLIPS = "patches.npy", "checksums.npy", "clips.npy"


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """``(n,)`` uint32: the CRC-32 of each row's bytes (``rows`` ``(n, *item_shape)``).

    CRC-32 rather than SHA-256: rows are checked as training reads them, and zlib's CRC-32 is
    about twice as fast here (tests/benchmarks/bench_checksums.py prints both); it catches any
    zeroed, overwritten or shifted row (a miss is a 1 in 4 billion chance per row).
    """
    rows = np.ascontiguousarray(rows)
    flat = rows.reshape(len(rows), rows[0].size if len(rows) else 0).view(np.uint8)
    return np.fromiter((zlib.crc32(r.data) for r in flat), dtype=np.uint32, count=len(flat))


def rebuild_hint(path: Path) -> str:
    """How to rebuild a store: both kinds are derived data that the command rebuilds when absent."""
    return f"rebuild it: rm -r {shlex.quote(str(path))} and run the same command again (it recomputes the store)"


def _manifest_digest(manifest: Mapping) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(path: Path) -> dict:
    """The manifest of the store at ``path``, checked against its own SHA-256.

    ``CorruptFileError`` when it is unreadable, changed, or from a store written before stores
    carried checksums (refused: its contents cannot be checked).
    """
    file, remedy = path / MANIFEST, rebuild_hint(path)
    try:
        manifest = json.loads(file.read_text())
        ok = isinstance(manifest, dict) and manifest.get("sha256") == _manifest_digest(manifest)
    except (ValueError, UnicodeDecodeError):
        ok, manifest = False, None
    if isinstance(manifest, dict) and "files" not in manifest and "sha256" not in manifest:
        raise CorruptFileError(file, "a store written before stores carried checksums (cannot be checked)", remedy)
    if not ok:
        raise CorruptFileError(file, "content differs from the SHA-256 written with it (corrupt)", remedy)
    return manifest


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
        self.manifest = read_manifest(self.path)
        remedy, files = rebuild_hint(self.path), self.manifest["files"]
        for name in (CLIPS, CHECKSUMS):
            check_file(self.path / name, [files[name]], remedy)
        self.patches = self._open_patches(files[PATCHES]["size"], remedy)
        self.checksums = np.load(self.path / CHECKSUMS, allow_pickle=False)
        self._checked = np.zeros(len(self.patches), dtype=bool)  # rows whose CRC-32 matched
        self.verify_seconds = 0.0  # time spent checking rows (tests/benchmarks/bench_checksums.py)
        table = np.load(self.path / CLIPS, allow_pickle=False)
        self.clip_ids = table[:, 0].copy()
        self.starts = table[:, 1].copy()
        self.counts = table[:, 2].copy()
        self._row = {int(c): i for i, c in enumerate(self.clip_ids)}

    def _open_patches(self, size: int, remedy: str) -> np.ndarray:
        """``patches.npy`` memory-mapped, after checking its size and header against the manifest."""
        file = self.path / PATCHES
        check_size(file, [size], remedy)  # a truncated file, named, rather than numpy's "mmap length"
        expected = (int(self.manifest["n_patches"]), *self.manifest["item_shape"])
        try:
            patches = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise CorruptFileError(file, f"unreadable .npy header ({exc})", remedy) from None
        if patches.shape != expected or patches.dtype != np.float16:
            raise CorruptFileError(
                file, f"header says {patches.dtype}{patches.shape}, float16{expected} were written", remedy
            )
        return patches

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
        """One clip's patches ``(n_patches, *item_shape)`` (a memory-mapped view), checked."""
        return self.read(self.rows(clip_id))

    def read(self, rows: slice | np.ndarray) -> np.ndarray:
        """``patches[rows]`` (a slice: a memory-mapped view; row numbers: a copy), each row checked
        against its CRC-32 the first time this store reads it (``verify``)."""
        return self.verify(rows, self.patches[rows])

    def verify(self, rows: slice | np.ndarray, data: np.ndarray) -> np.ndarray:
        """Check ``data`` (``patches[rows]``, read by the caller: ``mtt.features.streams.RowReader``) row by
        row against ``checksums.npy``, skipping rows already checked; returns ``data``.

        ``CorruptFileError`` naming ``patches.npy``, the first bad row and how to rebuild."""
        start = time.perf_counter()
        idx = np.arange(*rows.indices(len(self.patches))) if isinstance(rows, slice) else np.asarray(rows)
        todo = np.flatnonzero(~self._checked[idx])
        if len(todo):
            new = data if len(todo) == len(idx) else data[todo]  # usually every row: no copy
            bad = np.flatnonzero(row_checksums(new) != self.checksums[idx[todo]])
            if len(bad):
                raise CorruptFileError(
                    self.path / PATCHES,
                    f"row {int(idx[todo[bad[0]]])} differs from its CRC-32 in {CHECKSUMS} "
                    f"({len(bad)} of {len(todo)} rows just read; corrupt)",
                    rebuild_hint(self.path),
                )
            self._checked[idx[todo]] = True
        self.verify_seconds += time.perf_counter() - start
        return data


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
    the store is never whole in RAM, each row's CRC-32 taken from the array in memory; then
    ``finalize``.
    """
    path.mkdir(parents=True, exist_ok=True)
    clip_ids = [int(c) for c in counts]
    sizes = np.array([int(counts[c]) for c in clip_ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    total = int(sizes.sum())
    tmp = path / ".patches.npy.tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, *item_shape))
    checksums = np.zeros(total, dtype=np.uint32)
    for c, s, n in tqdm(
        list(zip(clip_ids, starts, sizes)), desc=f"pack {path.name}", unit="clip", disable=not progress, leave=False
    ):
        if n:
            rows = np.ascontiguousarray(load(c), dtype=np.float16).reshape(n, *item_shape)
            checksums[s : s + n] = row_checksums(rows)
            out[s : s + n] = rows
    out.flush()
    del out
    durable_replace(tmp, path / PATCHES)
    table = (
        np.stack([np.asarray(clip_ids, dtype=np.int64), starts, sizes], axis=1)
        if clip_ids
        else np.zeros((0, 3), dtype=np.int64)
    )
    return finalize(path, table, params, item_shape, checksums, failed, extra)


def finalize(
    path: Path,
    table: np.ndarray,
    params: Mapping,
    item_shape: tuple[int, ...],
    checksums: np.ndarray,
    failed: Mapping[str, str] | None = None,
    extra: Mapping | None = None,
) -> PatchStore:
    """Write ``clips.npy``, ``checksums.npy`` (``row_checksums`` of every row of the complete
    ``patches.npy`` beside them, taken when the rows were in memory) and then the manifest.

    The fingerprint hashes the clip table, the parameters and the row checksums: two stores
    share it only if they hold the same numbers.
    """
    checksums = np.asarray(checksums, dtype=np.uint32)
    files = {
        CLIPS: save_npy_atomic(path / CLIPS, table),
        CHECKSUMS: save_npy_atomic(path / CHECKSUMS, checksums),
        PATCHES: {"size": (path / PATCHES).stat().st_size},
    }
    digest = hashlib.sha256(table.tobytes() + json.dumps(params, sort_keys=True, default=str).encode())
    digest.update(checksums.tobytes())
    manifest = {
        "params": dict(params),
        "n_clips": int(table.shape[0]),
        "n_patches": int(table[:, 2].sum()),
        "item_shape": list(item_shape),
        "failed": dict(failed or {}),
        "fingerprint": digest.hexdigest()[:16],
        **dict(extra or {}),
        "files": files,
    }
    manifest = json.loads(json.dumps(manifest, default=str))  # as read back: the digest must match
    manifest["sha256"] = _manifest_digest(manifest)
    atomic_write_bytes(path / MANIFEST, json.dumps(manifest, indent=1).encode())
    return PatchStore(path)
