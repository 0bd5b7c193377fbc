"""pescador streams of patches for training, ordered clip-level batches for evaluation.

Training: one ``pescador.Streamer`` per training clip yields random patches of that clip (with
the clip's tag vector) straight from the memory-mapped store; a ``StochasticMux`` keeps
``n_active`` of them open (the report's 20) and replaces each after about ``rate`` samples, so
a batch mixes patches of many clips. With DataLoader workers each worker multiplexes a disjoint
shard of the clips, so no clip is served by two workers.

Evaluation never samples: every patch of every clip, in order, so val/test metrics are exactly
repeatable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pescador
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtt.store import PatchStore

WEIGHTS = ("uniform", "length")


def clip_rows(store: PatchStore, clip_id: int, limit: int | None, seed: int, spacing: str = "random") -> np.ndarray:
    """Row numbers of a clip's patches; with ``limit`` a fixed random subset (the report kept
    one random patch per clip), chosen by ``seed`` and the clip id so it never changes, or with
    ``spacing="even"`` ``limit`` evenly spaced patches from the first to the last (Won et al.
    2020 average 16 evenly spaced chunks)."""
    rows = np.arange(store.rows(clip_id).start, store.rows(clip_id).stop)
    if limit is not None and len(rows) > limit and spacing == "even":
        rows = rows[np.round(np.linspace(0, len(rows) - 1, limit)).astype(int)]
    elif limit is not None and len(rows) > limit:
        rng = np.random.default_rng([seed, int(clip_id)])
        rows = np.sort(rng.choice(rows, size=limit, replace=False))
    return rows


class _SharedRng:
    """A per-clip generator that survives pescador's copies.

    pescador deep-copies a ``Streamer``'s arguments every time the mux activates it (and the whole
    mux when it is iterated), so a plain ``np.random.Generator`` argument would restart from the
    same state on every activation: each activation would replay the same few patches of the clip.
    Deep copies of this object are the object itself, so the draws continue across activations.
    """

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def __deepcopy__(self, memo):
        return self


def _rows_of_clip(rows: np.ndarray, pos: int, rng: _SharedRng) -> Iterator[tuple[int, int]]:
    """Endless random patches of one clip as ``(store row, clip position)``: only integers travel
    through the mux; the batch reads the patches and labels in one go (see ``batches``)."""
    while True:
        for r in rows[rng.rng.integers(len(rows), size=16)]:
            yield int(r), pos


def mux_weights(kind: str, sizes: np.ndarray) -> np.ndarray | None:
    """The mux's sampling distribution over clips (``stream.weights``).

    ``uniform``: every clip equally often (None, pescador's default); ``length``: proportional to
    the clip's number of patches, so that every patch is about equally likely.
    """
    if kind == "uniform":
        return None
    if kind == "length":
        return np.asarray(sizes, dtype=np.float64) / float(np.sum(sizes))
    raise ValueError(f"stream.weights={kind!r}: expected one of {', '.join(WEIGHTS)}")


class WeightedMux(pescador.StochasticMux):
    """``StochasticMux`` whose ``weights`` decide how often each streamer is drawn overall.

    pescador 3.0 picks the streamer to activate uniformly and uses ``weights`` only to mix the
    active set; since every activation yields about ``rate`` samples whatever its weight, over a
    long stream every clip is drawn equally often. Here activations are drawn by weight, so a
    clip's share of the stream is its weight.
    """

    def _activate(self):
        self._weighted = False
        super()._activate()

    def _new_stream(self, idx):
        if not self._weighted:  # the first activation since _activate reset distribution_
            self.distribution_ = self.distribution_ * self.weights
            self.distribution_ /= self.distribution_.sum()
            self._weighted = True
        super()._new_stream(idx)


def patch_mux(
    store: PatchStore, clip_ids: np.ndarray, cfg, seed: int, mux_seed: np.random.SeedSequence | None = None
) -> WeightedMux:
    """The training mux over ``clip_ids``: it yields ``(store row, index into clip_ids)``.

    ``cfg`` is the ``stream`` config. Each clip's generator is seeded by (seed, clip id), so a
    clip's patch sequence does not depend on how clips are sharded over workers; the mux draws
    from ``mux_seed`` (default: ``worker_seed(seed, 0, 1)``). A fresh mux is a pure function of
    its seeds. Streamers hold only their row numbers, never the store: pescador deep-copies a
    streamer's arguments on every activation (a memory map would be copied into RAM).
    """
    if len(clip_ids) == 0:
        raise ValueError("patch_mux: no clips to stream")
    streamers, sizes = [], []
    for pos, clip_id in enumerate(clip_ids):
        rows = clip_rows(store, clip_id, cfg.patches_per_clip, seed)
        if len(rows) == 0:
            raise ValueError(f"clip {int(clip_id)} has no patches in {store.path}")
        streamers.append(pescador.Streamer(_rows_of_clip, rows, pos, _SharedRng([seed, int(clip_id), 1])))
        sizes.append(len(rows))
    mux_seed = mux_seed if mux_seed is not None else worker_seed(seed, 0, 1)
    return WeightedMux(
        streamers,
        n_active=min(cfg.n_active, len(streamers)),
        rate=cfg.rate,
        mode=cfg.mode,
        weights=mux_weights(cfg.weights, np.array(sizes)),
        random_state=int(mux_seed.generate_state(1)[0]),
    )


class RowReader:
    """Reads rows of a store's ``patches.npy`` with ``pread`` into a fresh array.

    The store stays memory-mapped for everything else, but the training sampler reads its random
    rows with one ``preadv`` each instead of faulting them into this process's mapping: mapped
    pages count towards the process's RSS, which would grow with every patch ever drawn (MTAT's
    store is 9.5 GB), whereas the page cache is the kernel's to evict. Opened lazily, so each
    DataLoader worker opens its own file descriptor.
    """

    def __init__(self, patches: np.ndarray):
        self.patches = patches
        mapped = isinstance(patches, np.memmap) and patches.flags.c_contiguous and hasattr(os, "preadv")
        self.filename: str | None = patches.filename if mapped else None  # type: ignore[attr-defined]  # a memmap
        self.offset = int(patches.offset) if mapped else 0  # type: ignore[attr-defined]
        self.row_bytes = int(np.prod(patches.shape[1:], dtype=np.int64)) * patches.dtype.itemsize
        self._fd: int | None = None
        self._pid: int | None = None

    def read(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), *item)`` in the store's dtype."""
        if self.filename is None:
            return np.asarray(self.patches[rows])
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.filename, os.O_RDONLY), os.getpid()
        out = np.empty((len(rows), *self.patches.shape[1:]), dtype=self.patches.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for i, r in enumerate(rows):
            got = os.preadv(self._fd, [flat[i]], self.offset + int(r) * self.row_bytes)
            if got != self.row_bytes:
                raise OSError(f"{self.filename}: short read of row {int(r)} ({got} of {self.row_bytes} bytes)")
        return out

    def __getstate__(self):  # a file descriptor does not cross into a worker process
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


def batches(
    mux: pescador.StochasticMux, store: PatchStore, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(x (B, *item) float32, y (B, n_tags) float32)`` batches from a ``patch_mux``.

    ``labels`` ``(n_clips, n_tags)`` is aligned with the mux's ``clip_ids``. The mux yields only
    integers; the patches of a batch are read at once and the labels gathered by clip position,
    so a label can only ever belong to its patch's clip.
    """
    reader = RowReader(store.patches)
    labels = np.asarray(labels, dtype=np.float32)
    items = mux.iterate()
    while True:
        picked = np.fromiter(
            (v for _, item in zip(range(batch_size), items) for v in item), dtype=np.int64, count=2 * batch_size
        ).reshape(batch_size, 2)
        x = store.verify(picked[:, 0], reader.read(picked[:, 0])).astype(np.float32)  # rows checked once
        yield torch.from_numpy(x), torch.from_numpy(labels[picked[:, 1]])


def worker_seed(seed: int, worker: int, n_workers: int) -> np.random.SeedSequence:
    """The mux seed of one DataLoader worker; without workers (0 of 1) the same stream as one."""
    return np.random.SeedSequence([seed, worker, n_workers])


class PatchStream(IterableDataset):
    """Endless training batches; each DataLoader worker streams its own shard of the clips.

    Worker ``w`` of ``n`` takes clips ``w, w + n, ...`` and its own seed (``worker_seed``), so
    no clip is served by two workers and the batch sequence (the DataLoader takes one batch from
    each worker in turn) is a pure function of the seed and the number of workers.
    """

    def __init__(self, store: PatchStore, clip_ids: np.ndarray, labels: np.ndarray, cfg, batch_size: int, seed: int):
        self.store, self.clip_ids, self.labels = store, np.asarray(clip_ids), np.asarray(labels)
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        shard = slice(wid, None, n)
        mux = patch_mux(self.store, self.clip_ids[shard], self.cfg, self.seed, worker_seed(self.seed, wid, n))
        return batches(mux, self.store, self.labels[shard], self.batch_size)


def train_loader(
    store: PatchStore,
    clip_ids: np.ndarray,
    labels: np.ndarray,
    cfg,
    batch_size: int,
    seed: int,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless iterator of training batches (take ``steps_per_epoch`` of them per epoch).

    ``cfg.num_workers`` DataLoader workers (at most one per clip) each stream a disjoint shard;
    ``pin_memory`` (set when training on CUDA) makes the DataLoader copy each batch into
    page-locked memory, so ``.to(device, non_blocking=True)`` overlaps with compute.
    """
    dataset = PatchStream(store, clip_ids, labels, cfg, batch_size, seed)
    workers = min(cfg.num_workers, len(clip_ids))
    if workers == 0 and not pin_memory:
        return iter(dataset)
    # The loader's own generator: without one, iter(loader) draws its base seed from torch's
    # global RNG, which shifts every later dropout mask, so a run resumed from a checkpoint's
    # RNG state would no longer train like the uninterrupted run.
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


def eval_batches(
    store: PatchStore,
    clip_ids: np.ndarray,
    batch_size: int,
    limit: int | None = None,
    seed: int = 0,
    spacing: str = "random",
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Every patch (or ``limit`` fixed patches, ``spacing`` random or even) of every clip, in order.

    Yields ``(x (B, *item) float32, clip (B,) int)`` where ``clip`` indexes ``clip_ids``.
    """
    rows = [clip_rows(store, c, limit, seed, spacing) for c in clip_ids]
    owner = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)]) if rows else np.zeros(0, int)
    flat = np.concatenate(rows) if rows else np.zeros(0, int)
    for s in range(0, len(flat), batch_size):
        x = np.asarray(store.read(flat[s : s + batch_size]), dtype=np.float32)
        yield torch.from_numpy(x), owner[s : s + batch_size]


def steps_per_epoch(
    policy: str, batch_size: int, declared: int, cached: int, patches: int, n: int | None = None
) -> int:
    """Optimiser steps per epoch under a policy (see conf/steps/)."""
    counts = {"declared": declared, "cached": cached, "patches": patches}
    if policy == "fixed":
        if not n or n < 1:
            raise ValueError(f"steps.policy=fixed needs steps.n >= 1, got {n!r}")
        return int(n)
    if policy not in counts:
        raise ValueError(f"steps.policy={policy!r}: expected one of declared, cached, patches, fixed")
    return max(1, counts[policy] // batch_size)


@dataclass(frozen=True)
class EpochCounts:
    """What the steps policies count, for the training split."""

    declared: int  # train rows of the annotations, with or without features
    cached: int  # train clips present in the feature store
    patches: int  # the patches of those clips the stream draws from (at most patches_per_clip each)


def epoch_counts(
    declared: int, clip_ids: np.ndarray, store: PatchStore, patches_per_clip: int | None = None
) -> EpochCounts:
    """Counts for ``steps_per_epoch``: ``clip_ids`` are the train clips that have features.

    ``patches_per_clip`` is ``stream.patches_per_clip``: with 1 (the report's single random
    patch) a clip contributes one patch, as many as the stream can ever draw from it.
    """
    drawable = sum(min(store.count(c), patches_per_clip or store.count(c)) for c in clip_ids)
    return EpochCounts(int(declared), len(clip_ids), int(drawable))
