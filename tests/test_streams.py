"""Patch stores, pescador training streams, evaluation order and steps-per-epoch policies."""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import numpy as np
import pescador
import pytest
import torch
from omegaconf import OmegaConf

from mtt.config import FeaturesConfig, StreamConfig
from mtt.data.embedded import complete_tags, render_clip
from mtt.data.index import build_index
from mtt.data.mtat import SAMPLE_RATE, write_annotations, write_mp3
from mtt.features import streams
from mtt.features.preprocess import build_feature_store
from mtt.features.store import MANIFEST, PatchStore, pack
from mtt.features.streams import (
    ChunkGrid,
    EpochSampler,
    RowReader,
    WeightedMux,
    batches,
    clip_rows,
    epoch_counts,
    eval_batches,
    eval_cuts,
    mux_over,
    mux_weights,
    pass_sizes,
    patch_mux,
    simulate_coverage,
    steps_per_epoch,
    sums_to_one,
    train_loader,
)
from mtt.training.train import split_of
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

    from mtt.core.fs import locked

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


def frame_store(path: Path, n_clips: int = 11, hop: int = 3, frames: int = 5) -> tuple[PatchStore, np.ndarray]:
    """Clip ``c`` (id 100 + c) has ``c % 5 + 2`` overlapping rows: row ``k`` holds its frames
    ``k * hop .. k * hop + frames - 1``, each frame's values ``c * 100 + frame``, so a chunk shows
    where it was cut from."""
    counts = {100 + c: c % 5 + 2 for c in range(n_clips)}

    def load(clip_id):
        c = clip_id - 100
        rows = [c * 100 + k * hop + np.arange(frames) for k in range(counts[clip_id])]
        return np.stack([np.repeat(r[:, None], 2, axis=1) for r in rows]).astype(np.float16)

    store = pack(path, counts, load, (frames, 2), {"test": 2})
    return store, np.eye(n_clips, dtype=np.uint8)


def epoch_loader(store, labels, n, batch_size=4, workers=0, grid=ChunkGrid(3, 5, True), seed=0, **kw):
    cfg = stream_cfg(mode="epoch", num_workers=workers, **kw)
    it = train_loader(store, store.clip_ids, labels, cfg, batch_size, seed=seed, grid=grid, clips=True)
    return list(itertools.islice(it, n))


def test_epoch_mode_draws_every_clip_once_per_pass_at_a_random_frame(tmp_path):
    """stream.mode=epoch: 11 clips in batches of 4 make passes of 3 batches (4, 4, 3); each pass
    holds every clip exactly once, in an order of its own; each chunk is `frames` consecutive
    frames of its clip starting at any frame up to the last row's start, and its label and
    reported position are its clip's."""
    store, labels = frame_store(tmp_path / "s")
    got = epoch_loader(store, labels, 3 * 4)
    assert [len(x) for x, _, _ in got] == [4, 4, 3] * 4
    orders = []
    for p in range(4):
        order = np.concatenate([pos.numpy() for _, _, pos in got[3 * p : 3 * p + 3]])
        assert sorted(order.tolist()) == list(range(11))
        orders.append(order.tolist())
    assert len({tuple(o) for o in orders}) == 4  # shuffled anew each pass
    for x, y, pos in got:
        v = x[:, :, 0].numpy().astype(int)
        clip, start = v[:, 0] // 100, v[:, 0] % 100
        assert (clip == pos.numpy()).all() and (y.numpy().argmax(axis=1) == clip).all()
        assert (v == v[:, :1] + np.arange(5)).all()  # consecutive frames of one clip
        assert (start <= (clip % 5 + 1) * 3).all()  # within the stored frames


def test_epoch_mode_offsets_are_uniform_over_every_start_frame(tmp_path):
    """Over many passes a clip with 6 rows (hop 3) starts its chunk at each of the frames 0..15
    about equally often, frames between rows included (a chi-square test against uniform)."""
    rows = [np.arange(10, 16)]  # one clip, 6 rows
    sampler = EpochSampler(rows * 1, steps=1, batch_size=1, seed=3, hop=3)
    starts = collections.Counter()
    for g in range(3200):
        r, within, _ = sampler.batch(g)
        starts[int((r[0] - 10) * 3 + within[0])] += 1
    assert sorted(starts) == list(range(16))
    got = np.array([starts[f] for f in range(16)])
    assert ((got - 200) ** 2 / 200).sum() < 45  # 15 degrees of freedom: beyond 45 has p < 1e-4
    # Without frame cuts (a backbone cache) the offset is a whole stored row, each about as often.
    whole = EpochSampler(rows, steps=1, batch_size=1, seed=3, hop=None)
    picked = collections.Counter(int(whole.batch(g)[0][0]) for g in range(600))
    assert sorted(picked) == list(range(10, 16)) and min(picked.values()) > 60
    assert all(whole.batch(g)[1][0] == 0 for g in range(50))


def test_epoch_mode_is_one_sequence_whatever_the_workers(tmp_path):
    """Workers take every n-th batch of one sequence, so 0, 1 and 2 workers yield the same
    batches; a fresh sampler replays it (a resume skips the same batches); another seed differs."""
    store, labels = frame_store(tmp_path / "s")
    plain = epoch_loader(store, labels, 9)
    for workers in (1, 2):
        other = epoch_loader(store, labels, 9, workers=workers)
        assert all(torch.equal(a, b) for pa, pb in zip(plain, other) for a, b in zip(pa, pb)), workers
    assert all(torch.equal(a, b) for pa, pb in zip(plain, epoch_loader(store, labels, 9)) for a, b in zip(pa, pb))
    seeded = epoch_loader(store, labels, 9, seed=1)
    assert any(not torch.equal(a[2], b[2]) for a, b in zip(plain, seeded))


def test_epoch_mode_without_frame_cuts_reads_whole_rows(tmp_path):
    """On a grid that cannot be cut (the backbone cache) or with stream.patches_per_clip, every
    chunk is one stored row: with patches_per_clip=1 always the clip's one fixed row."""
    store, labels = frame_store(tmp_path / "s")
    for x, _, _ in epoch_loader(store, labels, 6, grid=ChunkGrid(3, 5, False)):
        assert (x[:, 0, 0].numpy().astype(int) % 100 % 3 == 0).all()  # rows start every 3 frames
    for x, _, pos in epoch_loader(store, labels, 6, patches_per_clip=1):
        for xi, p in zip(x.numpy(), pos.numpy()):
            (row,) = clip_rows(store, store.clip_ids[p], 1, seed=0)
            assert (xi == store.patches[row].astype(np.float32)).all()


def test_pass_sizes_keep_every_clip_once_and_no_batch_of_one():
    assert steps_per_epoch("epoch", 16, declared=0, cached=15247, patches=0) == 953  # ceil: one pass
    assert pass_sizes(15247, 953, 16).tolist() == [16] * 952 + [15]  # MTAT's top-50 training clips
    assert pass_sizes(33, 3, 16).tolist() == [16, 9, 8]  # a rest of 1 shares the last two batches
    # torchrun, 17 clips, 2 ranks of 8: ceil(17 / 16) = 2 steps on both; rank 0 has 9 clips, rank 1 has 8.
    assert pass_sizes(9, 2, 8).tolist() == [5, 4] and pass_sizes(8, 2, 8).tolist() == [4, 4]
    with pytest.raises(ValueError, match="leave a batch empty"):
        pass_sizes(1, 2, 1)
    with pytest.raises(ValueError, match="do not make 2 batches"):
        pass_sizes(40, 2, 16)


def test_mux_batches_report_the_clips_they_drew(tmp_path):
    """With two workers each streams its own shard; the clip positions a batch reports are
    positions in the caller's clip list, the clips of the batch's patches."""
    store, labels = make_store(tmp_path / "s", n_clips=12)
    it = train_loader(store, store.clip_ids, labels, stream_cfg(n_active=4, num_workers=2), 8, seed=0, clips=True)
    for x, y, pos in itertools.islice(it, 20):
        clip = x[:, 0, 0].numpy().astype(int) // 10
        assert (pos.numpy() == clip).all() and (y.numpy().argmax(axis=1) == clip).all()


@pytest.mark.parametrize("clip_seconds, clamped", [(29.1, 0), (24.0, 1)])
def test_even_chunks_start_at_won_et_als_offsets(tmp_path, clip_seconds, clamped):
    """eval.spacing=even, 16 chunks of a clip of L samples: chunk i starts at the frame nearest
    sample i * ((L - 59049) // 16) (their get_tensor), cut from the stored rows of the short-chunk
    store (231 frames every 99, 256 samples a frame). A start past the last stored row's (a 24 s
    clip: frame 1190 of rows ending at 1188 + 231) is that row's. On a grid that cannot be cut, the
    nearest stored row."""
    samples = int(round(clip_seconds * 16000))
    n_frames = 1 + samples // 256
    n_rows = 1 + (n_frames - 231) // 99
    store = pack(
        tmp_path / "s",
        {7: n_rows},
        lambda c: np.stack([k * 99 + np.arange(231.0) for k in range(n_rows)])[:, :, None].astype(np.float16),
        (231, 1),
        {"test": 3},
    )
    grid = ChunkGrid(99, 231, True, hop_samples=256, chunk_samples=59049, samples={"7": samples})
    (x, owner), *_ = eval_batches(store, np.array([7]), 64, limit=16, spacing="even", grid=grid)
    theirs = np.array([i * ((samples - 59049) // 16) for i in range(16)])  # sample offsets
    starts = x[:, 0, 0].numpy().astype(int)
    assert len(starts) == 16 and (owner == 0).all()
    assert (x[:, :, 0].numpy() == starts[:, None] + np.arange(231)).all()  # whole chunks, frame by frame
    nearest = np.floor(theirs / 256 + 0.5).astype(int)
    assert (np.abs(nearest * 256 - theirs) <= 128).all()
    assert (starts == np.minimum(nearest, (n_rows - 1) * 99)).all() and (starts != nearest).sum() == clamped
    hop = (samples - 59049) // 16  # 25,409 samples (1.6 s) at 29.1 s: the clip's last hop is never scored
    assert starts[-1] * 256 + 59049 <= samples - hop + 128
    rows, _ = eval_cuts(store, 7, 16, 0, "even", ChunkGrid(99, 231, False, 256, 59049, {"7": samples}))
    assert (rows == np.minimum(np.floor(nearest / 99 + 0.5), n_rows - 1)).all()


def test_coverage_simulation_counts_what_the_mux_draws():
    """simulate_coverage: the default mux over 240 clips of 6 patches, one epoch of 45 steps of 32
    (steps=patches): far from every clip; epoch mode: every clip once."""
    sizes = np.full(240, 6)
    (mux,) = simulate_coverage(sizes, stream_cfg(), 32, 45)
    assert 0.3 < mux["train_clip_coverage"] < 1 and mux["train_draws_per_clip"] > 1.5
    epoch = simulate_coverage(sizes, stream_cfg(mode="epoch"), 32, 8, epochs=2)
    assert epoch == [{"train_clip_coverage": 1.0, "train_draws_per_clip": 1.0}] * 2


class PescadorDraws(WeightedMux):
    """``WeightedMux`` drawing as pescador 3.0 itself does: ``RandomState.choice`` for every
    draw, the clips' distribution divided by its sum before every activation."""

    def _choice(self, name, p):
        return self.rng.choice(len(p), p=p)

    def _replace_stream(self, idx):
        pescador.StochasticMux._replace_stream(self, idx)


@pytest.mark.parametrize("n_clips", [7, 1000, 19_397])  # 19,397: MTAT's training clips (report split)
@pytest.mark.parametrize("weights", ["uniform", "length"])
@pytest.mark.parametrize("mode", ["with_replacement", "single_active"])
def test_the_mux_streams_what_pescadors_own_draws_give(monkeypatch, n_clips, weights, mode):
    """The mux's cached draws (mtt.features.streams.WeightedMux) are pescador's, item for item."""
    rng = np.random.default_rng(n_clips)
    rows = [1000 * i + np.arange(k) for i, k in enumerate(rng.integers(1, 31, n_clips))]
    cfg = stream_cfg(mode=mode, weights=weights)
    fast = list(itertools.islice(mux_over(rows, np.arange(n_clips), cfg, seed=3).iterate(), 4000))
    monkeypatch.setattr(streams, "WeightedMux", PescadorDraws)
    reference = mux_over(rows, np.arange(n_clips), cfg, seed=3)
    assert type(reference) is PescadorDraws
    assert fast == list(itertools.islice(reference.iterate(), 4000))
    assert len({clip for _, clip in fast}) >= min(n_clips, 100)  # many activations were drawn


@pytest.mark.parametrize("n", [3, 7, 1000, 19_396, 19_397])
def test_a_distribution_made_to_sum_to_one_moves_by_ulps(n):
    for p in (np.full(n, 1.0 / n), np.random.default_rng(n).random(n)):
        p = p / p.sum()
        q = sums_to_one(p)
        assert np.sum(q) == 1.0
        assert np.abs(q - p).max() <= 8 * np.finfo(np.float64).eps


@pytest.mark.parametrize("mode", ["with_replacement", "epoch", "eval"])
def test_every_reader_yields_the_stored_values_as_float32(tmp_path, mode):
    """Training batches (pescador's and the epoch sampler's) and evaluation batches carry the
    stored float16 values exactly, as float32: what a backbone's float32 weights take."""
    store, labels = make_store(tmp_path / "s")
    if mode == "eval":
        x, owner = next(eval_batches(store, store.clip_ids, batch_size=8))
        rows = np.concatenate([np.arange(*store.rows(c).indices(len(store.patches))) for c in store.clip_ids])[:8]
    else:
        it = train_loader(store, store.clip_ids, labels, stream_cfg(mode=mode), 8, seed=0, clips=True)
        x, y, pos = next(it)
        rows = None
    assert x.dtype == torch.float32 and x.shape[1:] == store.item_shape
    if rows is not None:
        np.testing.assert_array_equal(x.numpy(), np.asarray(store.patches[rows], dtype=np.float32))
    else:  # each patch encodes (clip, patch): clip * 10 + patch, and stored float16 holds it exactly
        assert (x == x[:, :1, :1]).all() and set(x[:, 0, 0].tolist()) <= set(
            np.asarray(store.patches, np.float32)[:, 0, 0]
        )
