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

from typing import Iterator

import numpy as np
import pescador
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtt.store import PatchStore


def clip_rows(store: PatchStore, clip_id: int, limit: int | None, seed: int) -> np.ndarray:
    """Row numbers of a clip's patches; with ``limit`` a fixed random subset (the report kept
    one random patch per clip), chosen by ``seed`` and the clip id so it never changes."""
    rows = np.arange(store.rows(clip_id).start, store.rows(clip_id).stop)
    if limit is not None and len(rows) > limit:
        rng = np.random.default_rng([seed, int(clip_id)])
        rows = np.sort(rng.choice(rows, size=limit, replace=False))
    return rows


def _patches(store: PatchStore, rows: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """Endless random patches of one clip: ``{"x": item (float16), "y": label}``."""
    while True:
        yield {"x": store.patches[rows[rng.integers(len(rows))]], "y": label}


def patch_mux(store: PatchStore, clip_ids: np.ndarray, labels: np.ndarray, cfg, seed: int) -> pescador.StochasticMux:
    """The training mux over ``clip_ids`` (labels ``(n_clips, n_tags)`` aligned with them).

    ``cfg`` is the ``stream`` config. Each streamer owns a generator seeded by (seed, clip id),
    and the mux draws from ``seed``, so the stream is a pure function of the seed.
    """
    streamers = []
    for clip_id, label in zip(clip_ids, labels):
        rows = clip_rows(store, clip_id, cfg.patches_per_clip, seed)
        rng = np.random.default_rng([seed, int(clip_id), 1])
        streamers.append(pescador.Streamer(_patches, store, rows, label, rng))
    return pescador.StochasticMux(streamers, n_active=min(cfg.n_active, len(streamers)),
                                  rate=cfg.rate, mode=cfg.mode, random_state=seed)


def batches(mux: pescador.StochasticMux, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(x (B, *item) float32, y (B, n_tags) float32)`` batches from a mux."""
    items = mux.iterate()
    while True:
        chunk = [next(items) for _ in range(batch_size)]
        x = torch.from_numpy(np.stack([c["x"] for c in chunk]).astype(np.float32))
        y = torch.from_numpy(np.stack([c["y"] for c in chunk]).astype(np.float32))
        yield x, y


class PatchStream(IterableDataset):
    """Endless training batches; each DataLoader worker streams its own shard of the clips."""

    def __init__(self, store: PatchStore, clip_ids: np.ndarray, labels: np.ndarray, cfg,
                 batch_size: int, seed: int):
        self.store, self.clip_ids, self.labels = store, clip_ids, labels
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        shard = slice(wid, None, n)
        mux = patch_mux(self.store, self.clip_ids[shard], self.labels[shard], self.cfg, self.seed + wid)
        return batches(mux, self.batch_size)


def train_loader(store: PatchStore, clip_ids: np.ndarray, labels: np.ndarray, cfg, batch_size: int,
                 seed: int, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless iterator of training batches (take ``steps_per_epoch`` of them per epoch)."""
    dataset = PatchStream(store, clip_ids, labels, cfg, batch_size, seed)
    if cfg.num_workers == 0 and not pin_memory:
        return iter(dataset)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin_memory,
                        persistent_workers=cfg.num_workers > 0)
    return iter(loader)


def eval_batches(store: PatchStore, clip_ids: np.ndarray, batch_size: int, limit: int | None = None,
                 seed: int = 0) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Every patch (or ``limit`` fixed patches) of every clip, in order.

    Yields ``(x (B, *item) float32, clip (B,) int)`` where ``clip`` indexes ``clip_ids``.
    """
    rows = [clip_rows(store, c, limit, seed) for c in clip_ids]
    owner = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)]) if rows else np.zeros(0, int)
    flat = np.concatenate(rows) if rows else np.zeros(0, int)
    for s in range(0, len(flat), batch_size):
        x = np.asarray(store.patches[flat[s:s + batch_size]], dtype=np.float32)
        yield torch.from_numpy(x), owner[s:s + batch_size]


def steps_per_epoch(policy: str, batch_size: int, declared: int, cached: int, patches: int,
                    n: int | None = None) -> int:
    """Optimiser steps per epoch under a policy (see conf/steps/)."""
    counts = {"declared": declared, "cached": cached, "patches": patches}
    if policy == "fixed":
        if not n or n < 1:
            raise ValueError(f"steps.policy=fixed needs steps.n >= 1, got {n!r}")
        return int(n)
    if policy not in counts:
        raise ValueError(f"steps.policy={policy!r}: expected one of declared, cached, patches, fixed")
    return max(1, counts[policy] // batch_size)
