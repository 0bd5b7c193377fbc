"""Patch stores, pescador training streams, evaluation order and steps-per-epoch policies."""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mtt.config import FeaturesConfig, StreamConfig
from mtt.data.embedded import complete_tags, render_clip
from mtt.data.index import build_index
from mtt.data.mtat import SAMPLE_RATE, write_annotations, write_mp3
from mtt.preprocess import build_feature_store
from mtt.store import MANIFEST, PatchStore, pack
from mtt.streams import (
    RowReader,
    batches,
    clip_rows,
    epoch_counts,
    eval_batches,
    mux_weights,
    patch_mux,
    steps_per_epoch,
    train_loader,
)
from mtt.train import split_of
from tests.helpers import compose_cfg


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


def test_lock_admits_one_holder_at_a_time_and_leaves_no_file(tmp_path):
    """store.locked: eight threads (each its own open file, as separate processes have) never
    overlap inside the lock, although every holder deletes the lock file as it leaves."""
    import threading
    import time

    from mtt.fs import locked

    inside, most, lock = [0], [0], tmp_path / ".x.lock"

    def work():
        for _ in range(5):
            with locked(lock):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.002)
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert most[0] == 1 and not lock.exists()


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


def pairs_of(x: torch.Tensor) -> list[tuple[int, int]]:
    """(clip position, patch) of every patch of a batch, decoded from make_store's values."""
    v = x[:, 0, 0].numpy().astype(int)
    return list(zip((v // 10).tolist(), (v % 10).tolist()))


def test_every_patch_is_drawn_not_replayed(tmp_path):
    # rate=1: every activation of a streamer yields one patch. pescador deep-copies a streamer's
    # arguments on activation, so a per-clip generator passed as an argument would restart each
    # time and always yield the same patch of the clip.
    store, labels = make_store(tmp_path / "s", n_clips=6)
    seen = set()
    for x, _ in first_batches(store, labels, 0, n=100, rate=1.0):
        seen.update(pairs_of(x))
    assert seen == {(c, k) for c in range(6) for k in range(c % 5 + 2)}


def clip_frequencies(store, labels, weights, n=1500):
    counts = np.zeros(len(store))
    for _, y in first_batches(store, labels, 0, n=n, weights=weights):
        counts += y.numpy().sum(axis=0)
    return counts / counts.sum()


def test_sampling_distribution_follows_stream_weights(tmp_path):
    store, labels = make_store(tmp_path / "s", n_clips=10)  # clips of 2..6 patches
    uniform = clip_frequencies(store, labels, "uniform")
    by_length = clip_frequencies(store, labels, "length")
    sizes = store.counts / store.counts.sum()
    assert np.abs(uniform - 0.1).max() < 0.035
    assert np.abs(by_length - sizes).max() < 0.035
    # A 6-patch clip is drawn about 3x as often as a 2-patch one under `length` only.
    assert by_length[4] / by_length[0] > 2 and uniform[4] / uniform[0] < 1.5
    with pytest.raises(ValueError, match="stream.weights='by_size'"):
        mux_weights("by_size", store.counts)


def loader_batches(store, labels, workers, n, seed=1, pin_memory=False, batch_size=8, **kw):
    it = train_loader(
        store,
        store.clip_ids,
        labels,
        stream_cfg(n_active=4, num_workers=workers, **kw),
        batch_size,
        seed=seed,
        pin_memory=pin_memory,
    )
    return list(itertools.islice(it, n))


def test_two_workers_stream_disjoint_clip_shards(tmp_path):
    store, labels = make_store(tmp_path / "s", n_clips=16)
    per_batch_clips = [
        set(store.clip_ids[y.numpy().argmax(axis=1)].tolist()) for _, y in loader_batches(store, labels, 2, 200)
    ]
    # The DataLoader alternates workers: even batches come from worker 0, odd from worker 1.
    w0 = set().union(*per_batch_clips[0::2])
    w1 = set().union(*per_batch_clips[1::2])
    assert w0 and w1 and not (w0 & w1)
    assert w0 | w1 == set(store.clip_ids.tolist())


def test_workers_are_reproducible_and_one_worker_is_the_plain_stream(tmp_path):
    store, labels = make_store(tmp_path / "s", n_clips=16)
    a, b = loader_batches(store, labels, 2, 20), loader_batches(store, labels, 2, 20)
    assert all((xa == xb).all() and (ya == yb).all() for (xa, ya), (xb, yb) in zip(a, b))
    c = loader_batches(store, labels, 2, 20, seed=2)
    assert any(not (xa == xc).all() for (xa, _), (xc, _) in zip(a, c))
    plain, one = loader_batches(store, labels, 0, 20), loader_batches(store, labels, 1, 20)
    assert all((xp == xo).all() and (yp == yo).all() for (xp, yp), (xo, yo) in zip(plain, one))


def test_two_workers_serve_no_pair_more_often_than_the_mux_does(tmp_path):
    """Acceptance 1: the (clip, patch) pairs of 2 workers against the mux's own sampling.

    With ``rate=1`` every draw is an independent draw from the mux's distribution (each clip 1/12,
    its patches alike), so each pair's count in a long stream is binomial: the counts of a 2-worker
    stream and of a 1-worker stream must both pass a chi-square test against it and stay far from
    the factor 2 that a duplicated sample means. Duplication across workers (both streaming the
    same clips with the same seed) would also show as consecutive batches sharing pairs: the two
    workers' consecutive batches share none, while the mux's own consecutive batches do.
    """
    store, labels = make_store(tmp_path / "s", n_clips=12)  # 45 (clip, patch) pairs
    n, b = 300, 32  # 9600 draws: 133 to 400 per pair expected
    counts, overlap = {}, {}
    for workers in (0, 2):
        got = [pairs_of(x) for x, _ in loader_batches(store, labels, workers, n, batch_size=b, rate=1.0)]
        counts[workers] = collections.Counter(itertools.chain.from_iterable(got))
        overlap[workers] = np.mean([len(set(got[i]) & set(got[i + 1])) for i in range(0, n - 1, 2)])
    pairs = [(c, k) for c in range(12) for k in range(c % 5 + 2)]
    assert set(counts[0]) == set(counts[2]) == set(pairs)
    expected = np.array([n * b / 12 / (c % 5 + 2) for c, _ in pairs])
    for w in (0, 2):
        got = np.array([counts[w][p] for p in pairs])
        assert (got / expected).max() < 1.4 and (got / expected).min() > 0.6, (w, (got / expected).round(2))
        chi2 = ((got - expected) ** 2 / expected).sum()
        assert chi2 < 100, (w, chi2)  # 44 degrees of freedom: beyond 100 has p < 1e-6
    two_vs_one = np.array([counts[2][p] / counts[0][p] for p in pairs])
    assert two_vs_one.max() < 1.6, two_vs_one.round(2)
    assert overlap[2] == 0 < overlap[0]


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")  # CPU-only torch: pins nothing
@pytest.mark.parametrize("workers, pin_memory", [(2, False), (0, True)])
def test_starting_the_loader_leaves_the_global_rng_alone(tmp_path, workers, pin_memory):
    """Exact resume restores torch's RNG, then starts the stream: starting it must not draw from
    that RNG (a DataLoader without its own generator draws its base seed there, which shifted
    every later dropout mask of a resumed run)."""
    store, labels = make_store(tmp_path / "s", n_clips=8)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    loader_batches(store, labels, workers, 3, pin_memory=pin_memory)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")  # CPU-only torch: pins nothing
def test_pinned_memory_loader_yields_the_same_batches(tmp_path):
    store, labels = make_store(tmp_path / "s", n_clips=8)
    plain = loader_batches(store, labels, 0, 5)
    pinned = loader_batches(store, labels, 0, 5, pin_memory=True)
    assert all((xa == xb).all() and (ya == yb).all() for (xa, ya), (xb, yb) in zip(plain, pinned))
    assert all(x.is_pinned() == torch.cuda.is_available() for x, _ in pinned)


def test_row_reader_reads_what_the_memory_map_holds(tmp_path):
    store, _ = make_store(tmp_path / "s")
    rows = np.array([5, 0, 5, len(store.patches) - 1])
    assert (RowReader(store.patches).read(rows) == store.patches[rows]).all()
    plain = np.asarray(store.patches)  # not a memory map: plain indexing
    assert (RowReader(plain).read(rows) == store.patches[rows]).all()


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


def generated_tree(root: Path) -> None:
    """An MTAT-format tree: 10 train clips (folders 0-b), 2 valid (c), 2 test (d). Train clips
    last 1, 2 or 3 s (1, 2 or 3 patches of 0.96 s); three train clips have no mp3 and one an empty
    mp3, so preprocessing records 4 failures."""
    rng = np.random.default_rng(0)
    rows = []
    layout = [(f, s) for f, s in zip("0123456789", (1, 2, 3, 1, 2, 3, 1, 2, 3, 3))] + [
        ("c", 1),
        ("c", 1),
        ("d", 1),
        ("d", 1),
    ]
    for i, (folder, seconds) in enumerate(layout):
        tags = complete_tags({"guitar"} if i % 2 else {"techno"})
        path = f"{folder}/artist-album-{i:02d}-song-{i}-0-30.mp3"
        rows.append((1000 + i, tags, path))
        (root / folder).mkdir(parents=True, exist_ok=True)
        if i in (1, 4, 7):  # annotated, but its mp3 is missing
            continue
        if i == 2:  # annotated, but its mp3 is empty (as three of MTAT's are)
            (root / path).write_bytes(b"")
            continue
        write_mp3(root / path, render_clip(sorted(tags), seconds, SAMPLE_RATE, rng), SAMPLE_RATE)
    write_annotations(root / "annotations_final.csv", rows)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    generated_tree(root / "mtat")
    index = build_index(root / "mtat")
    store = build_feature_store(index, FeaturesConfig(store=str(root / "features")), progress=False)
    return index, store


@pytest.mark.parametrize("policy, expected", [("declared", 5), ("cached", 3), ("patches", 6), ("fixed", 4)])
def test_steps_policies_on_a_store_with_missing_features(generated, policy, expected):
    """Acceptance 2, through train()'s path: split_of -> epoch_counts -> steps_per_epoch.

    Train clips 0-9 last 1,2,3,1,2,3,1,2,3,3 s; 1, 2, 4, 7 have no features. Declared: 10 rows;
    cached: 6 clips (0, 3, 5, 6, 8, 9); their patches: 1+1+3+1+3+3 = 12. Batch 2.
    """
    index, store = generated
    assert sorted(int(c) for c in store.failed) == [1001, 1002, 1004, 1007]
    cfg = compose_cfg([f"steps={policy}", "steps.n=4", "trainer.batch_size=2"])
    split = split_of(index, store, "train")
    counts = epoch_counts(split.declared, split.clip_ids, store)
    assert (counts.declared, counts.cached, counts.patches) == (10, 6, 12)
    assert counts.declared > counts.cached
    assert cfg.steps.policy == policy
    assert (
        steps_per_epoch(
            cfg.steps.policy, cfg.trainer.batch_size, counts.declared, counts.cached, counts.patches, cfg.steps.n
        )
        == expected
    )


def test_patches_policy_counts_only_the_patches_the_stream_can_draw(generated):
    """With stream.patches_per_clip=1 an epoch of steps=patches is one patch per clip, not every
    stored patch: the six cached clips hold 12 patches, but the stream draws from six."""
    index, store = generated
    split = split_of(index, store, "train")
    assert epoch_counts(split.declared, split.clip_ids, store, patches_per_clip=1).patches == 6
    assert epoch_counts(split.declared, split.clip_ids, store, patches_per_clip=2).patches == 1 + 1 + 2 + 1 + 2 + 2
    assert epoch_counts(split.declared, split.clip_ids, store, patches_per_clip=None).patches == 12
