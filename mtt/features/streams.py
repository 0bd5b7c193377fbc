"""pescador streams of patches for training, ordered clip-level batches for evaluation.

Training, ``stream.mode`` a pescador mode (the default ``with_replacement``): one
``pescador.Streamer`` per training clip yields random stored patches of that clip (with the clip's
tag vector) straight from the memory-mapped store; a ``StochasticMux`` keeps ``n_active`` of them
open (the report's 20) and replaces each after about ``rate`` samples, so a batch mixes patches of
many clips. With DataLoader workers each worker multiplexes a disjoint shard of the clips, so no
clip is served by two workers.

Training, ``stream.mode=epoch`` (Won et al. 2020's loader): passes over the training clips, each
pass every clip exactly once in a shuffled order, each at a uniformly random offset, in batches of
distinct clips (``EpochSampler``). The offset has frame resolution where chunks can be cut between
stored rows (``ChunkGrid``), else it picks a stored row.

Evaluation never samples: every patch of every clip, in order, or ``eval.patches_per_clip`` fixed
chunks of each (a seeded subset, or Won et al.'s evenly spaced offsets), so val/test metrics are
exactly repeatable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pescador
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtt.core.components import STEPS, Spec, StepsConfig, integer, or_null, setting
from mtt.features.store import PatchStore

EPOCH = "epoch"  # stream.mode of EpochSampler; the other modes are pescador's


@dataclass(frozen=True)
class ChunkGrid:
    """Where a store's rows lie in their clips, so that a chunk may start between two rows.

    Row ``k`` of a clip holds frames ``[k * hop, k * hop + frames)`` of the clip's spectrogram.
    With ``cuttable`` (the store holds patches whose rows touch or overlap, ``hop <= frames``) a
    chunk may start at any frame ``f <= (rows - 1) * hop``: its frames come from rows ``f // hop``
    and the next one (``cut_chunks``). Otherwise (a frozen backbone's cache holds one output per
    row, or rows with gaps between them) a chunk is a whole stored row.

    ``hop_samples``, ``chunk_samples`` and ``samples`` place Won et al.'s sample offsets on the
    frames (``even_cuts``): samples per frame, the samples one chunk spans in their formula (their
    59,049), and each clip's decoded length in samples (clip id as a string -> samples).
    """

    hop: int
    frames: int
    cuttable: bool
    hop_samples: int = 1
    chunk_samples: int = 0
    samples: Mapping[str, int] = field(default_factory=dict)


def clip_rows(store: PatchStore, clip_id: int, limit: int | None, seed: int) -> np.ndarray:
    """Row numbers of a clip's patches; with ``limit`` a fixed random subset (the report kept
    one random patch per clip), chosen by ``seed`` and the clip id so it never changes."""
    rows = np.arange(store.rows(clip_id).start, store.rows(clip_id).stop)
    if limit is not None and len(rows) > limit:
        rng = np.random.default_rng([seed, int(clip_id)])
        rows = np.sort(rng.choice(rows, size=limit, replace=False))
    return rows


def even_offsets(n_samples: int, chunk_samples: int, count: int) -> np.ndarray:
    """Won et al.'s evaluation chunks (sota-music-tagging-models ``get_tensor``): ``count`` chunks
    of ``chunk_samples`` starting at ``i * ((n_samples - chunk_samples) // count)`` samples,
    ``i < count``, so the last one ends about ``(n_samples - chunk_samples) / count`` samples
    before the clip does. ``(count,)`` sample offsets."""
    return np.arange(count, dtype=np.int64) * max(0, (n_samples - chunk_samples) // count)


def even_cuts(first: int, n_rows: int, n_samples: int, count: int, grid: ChunkGrid) -> tuple[np.ndarray, np.ndarray]:
    """``count`` chunks of a clip at ``even_offsets`` as ``(stored row, frames into it)``.

    Each sample offset goes to the nearest frame (within half a frame: 8 ms for the short-chunk
    front end), then to a cut of the stored rows ``first .. first + n_rows - 1``; a start past the
    last row's start (the clip's last ``< hop`` frames are not stored) is clamped to it: for the
    short-chunk store never at 27.44-29.1 s, the last chunk by at most 49 frames at 15-27.44 s.
    On a grid that cannot be cut, the nearest stored row.
    """
    frame = np.floor(even_offsets(n_samples, grid.chunk_samples, count) / grid.hop_samples + 0.5).astype(np.int64)
    if grid.cuttable:
        frame = np.minimum(frame, (n_rows - 1) * grid.hop)
        return first + frame // grid.hop, frame % grid.hop
    row = np.minimum(np.floor(frame / grid.hop + 0.5).astype(np.int64), n_rows - 1)
    return first + row, np.zeros(count, dtype=np.int64)


def cut_chunks(read: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, within: np.ndarray, hop: int) -> np.ndarray:
    """Chunks ``(B, frames, *rest)`` that start ``within[i]`` frames into stored row ``rows[i]``.

    ``read(rows)`` returns a fresh ``(B, frames, *rest)`` array of stored rows. A chunk that
    starts inside a row takes that row's tail and the head of the next row: row ``r + 1`` starts
    ``hop`` frames after row ``r``, so frame ``frames + t`` of row ``r`` is frame
    ``frames - hop + t`` of row ``r + 1``.
    """
    x = read(rows)
    cut = np.flatnonzero(within)
    if len(cut):
        frames = x.shape[1]
        after = read(rows[cut] + 1)
        for j, i in enumerate(cut):
            w = int(within[i])
            x[i] = np.concatenate([x[i, w:], after[j, frames - hop : frames - hop + w]])
    return x


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
    if kind != "length":  # a library caller's value (a composed config was checked)
        raise ValueError(f"stream.weights={kind!r}: expected uniform or length")
    return np.asarray(sizes, dtype=np.float64) / float(np.sum(sizes))


def sums_to_one(p: np.ndarray) -> np.ndarray:
    """``p`` (``(n,)``, summing to 1 up to rounding) with the rounding residual added to its
    largest entry, so that ``np.sum`` of it is exactly 1.0 where a few ulps do it (else ``p``)."""
    p, i = p.copy(), int(np.argmax(p))
    for _ in range(4):
        total = np.sum(p)
        if total == 1.0:
            break
        p[i] += 1.0 - total
    return p


class WeightedMux(pescador.StochasticMux):
    """``StochasticMux`` whose ``weights`` decide how often each streamer is drawn overall.

    pescador 3.0 picks the streamer to activate uniformly and uses ``weights`` only to mix the
    active set; since every activation yields about ``rate`` samples whatever its weight, over a
    long stream every clip is drawn equally often. Here activations are drawn by weight, so a
    clip's share of the stream is its weight.

    pescador draws the active streamer of every sample, and the clip of every activation, with
    ``RandomState.choice(n, p=...)``, which checks ``p`` and sums it up on every call (about
    200 us over MTAT's 19,397 training clips), after dividing the clips' distribution by its sum,
    whose rounding makes it cycle through a few states that differ in their last bits: together
    most of the stream's 2 ms per batch of 32 (tests/benchmarks/bench_backbone_cache.py). Here the
    distribution is made to sum to exactly 1.0 once (``sums_to_one``: a few ulps on one clip), so
    the division changes nothing and is skipped, and ``_choice`` is pescador's draw (one
    ``random_sample`` searched in the same cumulative sum) reusing the sum while ``p`` is
    unchanged: the stream is what pescador's own draws give, item for item (tests/test_streams.py).
    """

    def _activate(self) -> None:
        self._weighted = False
        self._cdfs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        super()._activate()

    def _choice(self, name: str, p: np.ndarray) -> int:
        """``self.rng.choice(len(p), p=p)``: the same index from the same generator state (numpy's
        own algorithm), the cumulative sum of ``p`` kept under ``name`` while ``p`` is unchanged."""
        cached = self._cdfs.get(name)
        if cached is None or cached[0].shape != p.shape or not (cached[0] == p).all():
            cdf = p.cumsum()
            cdf /= cdf[-1]
            cached = self._cdfs[name] = (p.copy(), cdf)
        return int(cached[1].searchsorted(self.rng.random_sample(), side="right"))

    def _next_sample_index(self):
        return self._choice("active", self.stream_weights_ / self.weight_norm_)

    def _new_stream(self, idx):
        if not self._weighted:  # the first activation since _activate reset distribution_
            self.distribution_ = self.distribution_ * self.weights
            self.distribution_ /= self.distribution_.sum()
            self.distribution_ = sums_to_one(self.distribution_)
            self._weighted = True
        # pescador's StochasticMux._new_stream, drawing through _choice
        self.stream_idxs_[idx] = self._choice("streams", self.distribution_)
        self.streams_[idx], self.stream_weights_[idx] = self._activate_stream(self.stream_idxs_[idx], idx)
        self.stream_counts_[idx] = 0

    def _replace_stream(self, idx):
        # pescador's StochasticMux._replace_stream, without dividing by a sum of 1.0
        if (self.distribution_ > 0).any():
            total = np.sum(self.distribution_)
            if total != 1.0:
                self.distribution_[:] /= total
            self._new_stream(idx)
        else:
            self.stream_weights_[idx] = 0.0
        self.weight_norm_ = np.sum(self.stream_weights_)


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
    rows = [clip_rows(store, clip_id, cfg.patches_per_clip, seed) for clip_id in clip_ids]
    for clip_id, r in zip(clip_ids, rows):
        if len(r) == 0:
            raise ValueError(f"clip {int(clip_id)} has no patches in {store.path}")
    return mux_over(rows, clip_ids, cfg, seed, mux_seed)


def mux_over(
    rows: list[np.ndarray], clip_ids: np.ndarray, cfg, seed: int, mux_seed: np.random.SeedSequence | None = None
) -> WeightedMux:
    """``patch_mux`` over given row numbers per clip (``rows[i]`` those of ``clip_ids[i]``)."""
    streamers = [
        pescador.Streamer(_rows_of_clip, r, pos, _SharedRng([seed, int(clip_id), 1]))
        for pos, (clip_id, r) in enumerate(zip(clip_ids, rows))
    ]
    mux_seed = mux_seed if mux_seed is not None else worker_seed(seed, 0, 1)
    return WeightedMux(
        streamers,
        n_active=min(cfg.n_active, len(streamers)),
        rate=cfg.rate,
        mode=cfg.mode,
        weights=mux_weights(cfg.weights, np.array([len(r) for r in rows])),
        random_state=int(mux_seed.generate_state(1)[0]),
    )


def pass_sizes(n_clips: int, steps: int, batch_size: int) -> np.ndarray:
    """The batch sizes ``(steps,)`` of one pass over ``n_clips`` clips: ``batch_size`` each but the
    last, which takes the rest (Won et al.'s loader keeps it: ``drop_last=False``). Where the rest
    is fewer than 2 clips the last two batches share their clips evenly instead, since batch norm
    in training mode refuses a batch of one.

    ``steps`` is ``ceil(clips / batch)`` of the whole training set, the same on every torchrun rank
    (``ceil(ceil(n / world) / (batch / world)) = ceil(n / batch)``); a rank whose shard is one clip
    short gets a rest one smaller. ``ValueError`` when some batch would be empty.
    """
    sizes = np.full(steps, batch_size, dtype=np.int64)
    rest = n_clips - batch_size * (steps - 1)
    if not 0 <= rest <= batch_size:
        raise ValueError(f"stream.mode=epoch: {n_clips} clips do not make {steps} batches of at most {batch_size}")
    sizes[-1] = rest
    if steps >= 2 and rest < 2 <= batch_size:
        both = batch_size + rest
        sizes[-2:] = (both - both // 2, both // 2)
    if (sizes == 0).any():
        raise ValueError(f"stream.mode=epoch: {n_clips} clips in {steps} batches of {batch_size} leave a batch empty")
    return sizes


@dataclass(frozen=True)
class Pass:
    """One pass of ``EpochSampler``: the clip order, and each clip's chunk (row, frames into it)."""

    order: np.ndarray  # (clips,) clip positions, shuffled
    rows: np.ndarray  # (clips,) the stored row each clip's chunk starts in, by clip position
    within: np.ndarray  # (clips,) frames into that row (0 on a grid that cannot be cut)


class EpochSampler:
    """``stream.mode=epoch``: pass after pass over the clips, every clip exactly once per pass, in
    a shuffled order, each at a uniformly random offset, in batches of distinct clips (Won et al.
    2020's loader: ``shuffle=True`` over the training clips, a random crop of each).

    ``rows[i]`` are the stored rows clip ``i`` may be drawn from. On a ``cuttable`` grid whose
    clips keep all their rows (``stream.patches_per_clip=null``), the offset is a uniformly random
    frame in ``[0, (rows - 1) * hop]``, the starts from which a whole chunk can be cut out of the
    stored rows (the clip's last ``< hop`` frames are not stored); otherwise a uniformly random
    stored row. Pass ``p`` is drawn from the seed and ``p`` alone, so batch ``g`` of the stream (pass
    ``g // steps``, batch ``g % steps`` of it) is the same whoever draws it: DataLoader workers take
    every n-th batch of one sequence, and a resumed run replays it.
    """

    def __init__(self, rows: list[np.ndarray], steps: int, batch_size: int, seed: int, hop: int | None):
        if len(rows) == 0:
            raise ValueError("stream.mode=epoch: no clips to stream")
        self.first = np.array([r[0] for r in rows], dtype=np.int64)
        self.count = np.array([len(r) for r in rows], dtype=np.int64)
        contiguous = all(len(r) == r[-1] - r[0] + 1 for r in rows)
        self.hop = hop if hop is not None and contiguous else None  # frame offsets, else whole rows
        self.flat = np.concatenate(rows).astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.count)[:-1]])
        self.steps, self.seed = steps, seed
        self.bounds = np.concatenate([[0], np.cumsum(pass_sizes(len(rows), steps, batch_size))])
        self._pass: tuple[int, Pass] | None = None

    def plan(self, p: int) -> Pass:
        """Pass ``p``: the clip order and each clip's chunk (the last pass drawn is kept)."""
        if self._pass is None or self._pass[0] != p:
            rng = np.random.default_rng([self.seed, 2, p])
            order = rng.permutation(len(self.count))
            if self.hop is not None:
                frame = rng.integers(0, (self.count - 1) * self.hop + 1)
                rows, within = self.first + frame // self.hop, frame % self.hop
            else:
                rows = self.flat[self.starts + rng.integers(0, self.count)]
                within = np.zeros_like(rows)
            self._pass = (p, Pass(order, rows, within))
        return self._pass[1]

    def batch(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch ``g`` of the stream: ``(rows, frames into them, clip positions)``, each ``(B,)``."""
        p, s = divmod(g, self.steps)
        plan = self.plan(p)
        pos = plan.order[self.bounds[s] : self.bounds[s + 1]]
        return plan.rows[pos], plan.within[pos], pos


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


def as_float32(x: np.ndarray) -> torch.Tensor:
    """Stored float16 rows ``(B, *item)`` as a float32 tensor: torch's conversion, exact like
    numpy's ``astype`` but about 20x faster (numpy converts float16 element by element; 0.7 ms
    of a full-map batch of 32, 0.16 ms of a frequency-mean one)."""
    return torch.from_numpy(x if x.flags.writeable else x.copy()).float()


def batches(
    mux: pescador.StochasticMux,
    store: PatchStore,
    labels: np.ndarray,
    batch_size: int,
    positions: np.ndarray | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless ``(x (B, *item) float32, y (B, n_tags) float32)`` batches from a ``patch_mux``.

    ``labels`` ``(n_clips, n_tags)`` is aligned with the mux's ``clip_ids``. The mux yields only
    integers; the patches of a batch are read at once and the labels gathered by clip position,
    so a label can only ever belong to its patch's clip. With ``positions`` (``(n_clips,)``: the
    position of each of the mux's clips in the caller's list) each batch also carries its clips
    ``(B,) int64``, which the training loop counts (``train_clip_coverage``).
    """
    reader = RowReader(store.patches)
    labels = np.asarray(labels, dtype=np.float32)
    items = mux.iterate()
    while True:
        picked = np.fromiter(
            (v for _, item in zip(range(batch_size), items) for v in item), dtype=np.int64, count=2 * batch_size
        ).reshape(batch_size, 2)
        x = as_float32(store.verify(picked[:, 0], reader.read(picked[:, 0])))  # rows checked once
        batch = (x, torch.from_numpy(labels[picked[:, 1]]))
        yield batch if positions is None else (*batch, torch.from_numpy(positions[picked[:, 1]]))


def epoch_batches(
    sampler: EpochSampler,
    store: PatchStore,
    labels: np.ndarray,
    worker: int = 0,
    n_workers: int = 1,
    clips: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless batches ``(x (B, *item) float32, y (B, n_tags) float32[, clips (B,) int64])`` of an
    ``EpochSampler``: batches ``worker, worker + n_workers, ...`` of its sequence."""
    reader = RowReader(store.patches)
    labels = np.asarray(labels, dtype=np.float32)
    g = worker

    def read(r: np.ndarray) -> np.ndarray:
        return store.verify(r, reader.read(r))  # rows checked once

    while True:
        rows, within, pos = sampler.batch(g)
        x = as_float32(cut_chunks(read, rows, within, sampler.hop or 1))
        batch = (x, torch.from_numpy(labels[pos]))
        yield (*batch, torch.from_numpy(pos)) if clips else batch
        g += n_workers


def worker_seed(seed: int, worker: int, n_workers: int) -> np.random.SeedSequence:
    """The mux seed of one DataLoader worker; without workers (0 of 1) the same stream as one."""
    return np.random.SeedSequence([seed, worker, n_workers])


def epoch_sampler(
    store: PatchStore, clip_ids: np.ndarray, cfg, batch_size: int, seed: int, pass_steps: int, grid: ChunkGrid | None
) -> EpochSampler:
    """The ``EpochSampler`` of ``clip_ids`` (``cfg`` the ``stream`` config): frame offsets where
    ``grid`` can be cut and clips keep all their rows, else stored rows."""
    rows = [clip_rows(store, c, cfg.patches_per_clip, seed) for c in clip_ids]
    for clip_id, r in zip(clip_ids, rows):
        if len(r) == 0:
            raise ValueError(f"clip {int(clip_id)} has no patches in {store.path}")
    # Frame offsets need every row of a clip: a stream.patches_per_clip subset is drawn from as it is.
    hop = grid.hop if grid is not None and grid.cuttable and cfg.patches_per_clip is None else None
    return EpochSampler(rows, pass_steps, batch_size, seed, hop)


class PatchStream(IterableDataset):
    """Endless training batches.

    Under a pescador mode each DataLoader worker streams its own shard of the clips: worker ``w``
    of ``n`` takes clips ``w, w + n, ...`` and its own seed (``worker_seed``), so no clip is
    served by two workers and the batch sequence (the DataLoader takes one batch from each worker
    in turn) is a pure function of the seed and the number of workers. Under ``stream.mode=epoch``
    every worker holds the same ``EpochSampler`` and yields every n-th of its batches, so the
    sequence does not depend on the number of workers at all. With ``clips`` each batch carries its
    clips' positions in ``clip_ids`` as a third item.
    """

    def __init__(
        self,
        store: PatchStore,
        clip_ids: np.ndarray,
        labels: np.ndarray,
        cfg,
        batch_size: int,
        seed: int,
        pass_steps: int | None = None,
        grid: ChunkGrid | None = None,
        clips: bool = False,
    ):
        self.store, self.clip_ids, self.labels = store, np.asarray(clip_ids), np.asarray(labels)
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.pass_steps, self.grid, self.clips = pass_steps, grid, clips

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.cfg.mode == EPOCH:
            steps = self.pass_steps or math.ceil(len(self.clip_ids) / self.batch_size)
            sampler = epoch_sampler(self.store, self.clip_ids, self.cfg, self.batch_size, self.seed, steps, self.grid)
            return epoch_batches(sampler, self.store, self.labels, wid, n, self.clips)
        shard = slice(wid, None, n)
        mux = patch_mux(self.store, self.clip_ids[shard], self.cfg, self.seed, worker_seed(self.seed, wid, n))
        positions = np.arange(len(self.clip_ids))[shard] if self.clips else None
        return batches(mux, self.store, self.labels[shard], self.batch_size, positions)


def train_loader(
    store: PatchStore,
    clip_ids: np.ndarray,
    labels: np.ndarray,
    cfg,
    batch_size: int,
    seed: int,
    pin_memory: bool = False,
    **options,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """An endless iterator of training batches (take ``steps_per_epoch`` of them per epoch).

    ``cfg.num_workers`` DataLoader workers (at most one per clip) share the work (``PatchStream``);
    ``pin_memory`` (set when training on CUDA) makes the DataLoader copy each batch into
    page-locked memory, so ``.to(device, non_blocking=True)`` overlaps with compute. ``options``
    are ``PatchStream``'s: under ``stream.mode=epoch``, ``pass_steps`` is the batches of one pass
    (default ``ceil(clips / batch)``; under torchrun the whole set's, ``pass_sizes``) and ``grid``
    says whether offsets may fall between stored rows; with ``clips`` every batch also carries its
    clips' positions in ``clip_ids`` ``(B,) int64``.
    """
    dataset = PatchStream(store, clip_ids, labels, cfg, batch_size, seed, **options)
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


def eval_cuts(
    store: PatchStore,
    clip_id: int,
    limit: int | None,
    seed: int,
    spacing: str = "random",
    grid: ChunkGrid | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The chunks evaluation reads of one clip, ``(stored rows, frames into them)``.

    Every stored patch (``limit`` null); ``limit`` fixed random ones (``spacing="random"``, all
    of a clip with fewer); or exactly ``limit`` chunks at Won et al.'s evenly spaced offsets
    (``spacing="even"``, ``even_cuts``: needs the ``grid`` with the clips' lengths).
    """
    if limit is not None and spacing == "even":
        if grid is None:
            raise ValueError("eval.spacing=even needs the clips' lengths (a ChunkGrid)")
        span = store.rows(clip_id)
        return even_cuts(span.start, span.stop - span.start, grid.samples[str(int(clip_id))], limit, grid)
    rows = clip_rows(store, clip_id, limit, seed)
    return rows, np.zeros(len(rows), dtype=np.int64)


def eval_batches(
    store: PatchStore,
    clip_ids: np.ndarray,
    batch_size: int,
    limit: int | None = None,
    seed: int = 0,
    spacing: str = "random",
    grid: ChunkGrid | None = None,
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Every patch (or ``limit`` fixed chunks, ``eval_cuts``) of every clip, in order.

    Yields ``(x (B, *item) float32, clip (B,) int)`` where ``clip`` indexes ``clip_ids``.
    """
    cuts = [eval_cuts(store, c, limit, seed, spacing, grid) for c in clip_ids]
    owner = np.concatenate([np.full(len(r), i) for i, (r, _) in enumerate(cuts)]) if cuts else np.zeros(0, int)
    rows = np.concatenate([r for r, _ in cuts]) if cuts else np.zeros(0, int)
    within = np.concatenate([w for _, w in cuts]) if cuts else np.zeros(0, int)
    hop = grid.hop if grid is not None else 1

    for s in range(0, len(rows), batch_size):
        x = cut_chunks(store.read, rows[s : s + batch_size], within[s : s + batch_size], hop)
        yield as_float32(x), owner[s : s + batch_size]


@dataclass(frozen=True)
class StepsSpec(Spec):
    """A steps policy: ``count(counts, batch_size, steps_cfg) -> int`` optimiser steps per epoch,
    ``counts`` holding ``declared`` (annotated train clips), ``cached`` (train clips with
    features) and ``patches`` (their stored patches)."""

    count: Callable[[Mapping[str, int], int, Any], int]


def steps_for(steps_cfg, batch_size: int, declared: int, cached: int, patches: int) -> int:
    """Optimiser steps per epoch under the policy ``steps_cfg`` names (its entry in ``STEPS``)."""
    entry = STEPS.get(steps_cfg.policy, steps_cfg.get("module") if hasattr(steps_cfg, "get") else None)
    return entry.count({"declared": declared, "cached": cached, "patches": patches}, batch_size, steps_cfg)


def steps_per_epoch(
    policy: str, batch_size: int, declared: int, cached: int, patches: int, n: int | None = None
) -> int:
    """``steps_for`` a registered ``policy`` (and ``n``, the fixed policy's count), for a library
    caller: a name or count that a composed config could not hold is a ``ValueError``."""
    if policy not in STEPS.names():
        raise ValueError(f"steps.policy={policy!r}: expected one of {', '.join(STEPS.names())}")
    if policy == "fixed" and (not n or n < 1):
        raise ValueError(f"steps.policy=fixed needs steps.n >= 1, got {n!r}")
    return steps_for(SimpleNamespace(policy=policy, n=n), batch_size, declared, cached, patches)


@dataclass
class DeclaredSteps(StepsConfig):
    """``steps=declared``: annotated train clips // batch size, whether or not their features
    exist (the report's first setting, which over-counted)."""

    policy: str = "declared"


@dataclass
class CachedSteps(StepsConfig):
    """``steps=cached``: train clips that have features // batch size (the report's revised setting)."""

    policy: str = "cached"


@dataclass
class PatchesSteps(StepsConfig):
    """``steps=patches`` (the default): cached train patches // batch size, so that an epoch sees
    about every stored patch once."""

    policy: str = "patches"


@dataclass
class FixedSteps(StepsConfig):
    """``steps=fixed``: ``n`` steps per epoch."""

    policy: str = "fixed"
    n: Optional[int] = setting(100, or_null(integer(1)))


@dataclass
class EpochSteps(StepsConfig):
    """``steps=epoch``: one pass of ``stream.mode=epoch``, every train clip with features once,
    ceil(clips / batch) steps (the last batch smaller, as Won et al.'s loader)."""

    policy: str = "epoch"


def _fixed_errors(cfg) -> list[str]:
    return ["steps.n=null: expected an integer >= 1 with steps.policy=fixed"] if cfg.steps.n is None else []


def _epoch_errors(cfg) -> list[str]:
    if cfg.stream.mode == EPOCH:
        return []
    return [f"steps.policy=epoch, stream.mode={cfg.stream.mode}: steps=epoch counts the passes of stream.mode=epoch"]


def _per_batch(count: str) -> Callable[[Mapping[str, int], int, Any], int]:
    return lambda counts, batch_size, steps_cfg: max(1, counts[count] // batch_size)


STEPS.register(StepsSpec("declared", config=DeclaredSteps, count=_per_batch("declared")))
STEPS.register(StepsSpec("cached", config=CachedSteps, count=_per_batch("cached")))
STEPS.register(StepsSpec("patches", config=PatchesSteps, count=_per_batch("patches")))
STEPS.register(
    StepsSpec(
        "fixed", config=FixedSteps, count=lambda counts, b, steps_cfg: int(steps_cfg.n), config_errors=_fixed_errors
    )
)
STEPS.register(
    StepsSpec(
        "epoch",
        config=EpochSteps,
        count=lambda counts, b, steps_cfg: max(1, math.ceil(counts["cached"] / b)),
        config_errors=_epoch_errors,
    )
)


def clip_coverage(seen: int, draws: int, n_clips: int) -> dict[str, float]:
    """An epoch's ``train_clip_coverage`` (the fraction of the ``n_clips`` training clips it drew
    at least once, from ``seen`` distinct clips) and ``train_draws_per_clip`` (``draws`` patches
    over the clips seen: how often a seen clip came back)."""
    return {"train_clip_coverage": seen / n_clips, "train_draws_per_clip": draws / max(seen, 1)}


def simulate_coverage(
    sizes: np.ndarray, cfg, batch_size: int, steps: int, epochs: int = 1, seed: int = 0, hop: int | None = None
) -> list[dict[str, float]]:
    """``clip_coverage`` of each of ``epochs`` epochs of ``steps`` batches, drawn by the training
    stream of ``cfg`` (the ``stream`` config) over clips of ``sizes`` stored rows, seeded as
    training seeds it (one process, no workers), without reading any patch: which clip a draw
    comes from depends only on the seed, the clips' sizes and ``cfg``. ``hop``: frames between
    rows where chunks can be cut (epoch mode's offsets; no effect on coverage)."""
    rows = [np.arange(int(s)) for s in sizes]
    n = len(rows)
    if cfg.mode == EPOCH:
        sampler = EpochSampler(rows, math.ceil(n / batch_size), batch_size, seed, hop)

        def epoch(e: int) -> np.ndarray:
            return np.concatenate([sampler.batch(g)[2] for g in range(e * steps, (e + 1) * steps)])
    else:
        items = mux_over(rows, np.arange(n), cfg, seed).iterate()

        def epoch(e: int) -> np.ndarray:
            return np.fromiter((pos for _, (_, pos) in zip(range(steps * batch_size), items)), np.int64)

    out = []
    for e in range(epochs):
        counts = np.bincount(epoch(e), minlength=n)
        out.append(clip_coverage(int((counts > 0).sum()), int(counts.sum()), n))
    return out


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
