"""Patch stores, pescador training streams, evaluation order and steps-per-epoch policies."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mtt.config import StreamConfig
from mtt.store import MANIFEST, PatchStore, pack
from mtt.streams import batches, clip_rows, eval_batches, patch_mux, steps_per_epoch, train_loader


def make_store(path: Path, n_clips: int = 12, item=(4, 3)) -> tuple[PatchStore, np.ndarray]:
    """Clip 100 + c has c % 5 + 2 patches whose every value encodes (clip, patch): c * 10 + patch."""
    counts = {100 + c: c % 5 + 2 for c in range(n_clips)}

    def load(clip_id):
        n = counts[clip_id]
        return np.stack([np.full(item, (clip_id - 100) * 10 + k, dtype=np.float16) for k in range(n)])

    store = pack(path, counts, load, item, {"test": 1})
    labels = np.eye(n_clips, dtype=np.uint8)  # clip i carries tag i only
    return store, labels


def stream_cfg(**kw):
    return OmegaConf.structured(StreamConfig(**kw))


def test_store_roundtrip_and_manifest(tmp_path):
    store, _ = make_store(tmp_path / "s")
    again = PatchStore(tmp_path / "s")
    assert len(again) == 12 and again.item_shape == (4, 3)
    assert again.count(103) == 5 and (again.get(103)[:, 0, 0] == [30 + k for k in range(5)]).all()
    assert again.fingerprint == store.fingerprint
    (tmp_path / "s" / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="not a finished store"):
        PatchStore(tmp_path / "s")


def first_batches(store, labels, seed, n=5, **kw):
    ids = store.clip_ids
    it = batches(patch_mux(store, ids, stream_cfg(n_active=4, **kw), seed), store, labels, 8)
    return [next(it) for _ in range(n)]


def test_same_seed_same_batches_and_different_seeds_differ(tmp_path):
    store, labels = make_store(tmp_path / "s")
    a, b, c = (first_batches(store, labels, s) for s in (7, 7, 8))
    assert all((x1 == x2).all() and (y1 == y2).all() for (x1, y1), (x2, y2) in zip(a, b))
    assert any(not (x1 == x2).all() for (x1, _), (x2, _) in zip(a, c))


def test_labels_always_match_their_clip(tmp_path):
    store, labels = make_store(tmp_path / "s")
    for x, y in first_batches(store, labels, 0, n=20):
        clip_of_patch = x[:, 0, 0].numpy().astype(int) // 10
        assert (clip_of_patch == y.numpy().argmax(axis=1)).all()


def test_every_train_clip_is_visited(tmp_path):
    store, labels = make_store(tmp_path / "s", n_clips=30)
    seen = set()
    for _, y in first_batches(store, labels, 3, n=200):
        seen.update(store.clip_ids[y.numpy().argmax(axis=1)].tolist())
    assert seen == set(store.clip_ids.tolist())


def test_single_patch_per_clip_is_fixed(tmp_path):
    store, labels = make_store(tmp_path / "s")
    for clip in store.clip_ids:
        rows = clip_rows(store, clip, 1, seed=5)
        assert len(rows) == 1 and (rows == clip_rows(store, clip, 1, seed=5)).all()
    for x, y in first_batches(store, labels, 0, n=10, patches_per_clip=1):
        for xi, yi in zip(x.numpy(), y.numpy()):
            clip = int(store.clip_ids[yi.argmax()])
            assert (xi == store.patches[clip_rows(store, clip, 1, seed=0)[0]].astype(np.float32)).all()


def test_two_workers_stream_disjoint_clip_shards(tmp_path):
    store, labels = make_store(tmp_path / "s", n_clips=16)
    it = train_loader(store, store.clip_ids, labels, stream_cfg(n_active=4, num_workers=2), 8, seed=1)
    per_batch_clips = [set(store.clip_ids[y.numpy().argmax(axis=1)].tolist()) for _, y in itertools.islice(it, 200)]
    # The DataLoader alternates workers: even batches come from worker 0, odd from worker 1.
    w0 = set().union(*per_batch_clips[0::2])
    w1 = set().union(*per_batch_clips[1::2])
    assert w0 and w1 and not (w0 & w1)
    assert w0 | w1 == set(store.clip_ids.tolist())


def test_eval_batches_cover_every_patch_in_order(tmp_path):
    store, _ = make_store(tmp_path / "s")
    ids = store.clip_ids[[3, 0, 7]]
    xs, owners = zip(*eval_batches(store, ids, batch_size=4))
    x, owner = np.concatenate([t.numpy() for t in xs]), np.concatenate(owners)
    expected = np.concatenate([store.get(c).astype(np.float32) for c in ids])
    assert (x == expected).all()
    assert owner.tolist() == sum(([i] * store.count(c) for i, c in enumerate(ids)), [])


def test_steps_policies():
    kw = dict(batch_size=32, declared=1000, cached=800, patches=800 * 30)
    assert steps_per_epoch("declared", **kw) == 31
    assert steps_per_epoch("cached", **kw) == 25
    assert steps_per_epoch("patches", **kw) == 750
    assert steps_per_epoch("fixed", **kw, n=7) == 7
    assert steps_per_epoch("cached", batch_size=32, declared=3, cached=3, patches=9) == 1
    with pytest.raises(ValueError, match="steps.n"):
        steps_per_epoch("fixed", **kw)
    with pytest.raises(ValueError, match="'epochal'"):
        steps_per_epoch("epochal", **kw)
