"""The CUDA path measured: throughput and peak GPU memory of mtt's own code paths on one GPU, the
full-MTAT time of each preset computed from them, and the suite's CUDA tests run on the device.

    make bench-gpu                                    # CUDA: prints, writes docs/gpu.md + docs/gpu.json
    make venv >/dev/null && OUT=$OUT make bench-gpu   # a bare device machine: the record under $OUT
    .venv/bin/python tests/benchmarks/bench_gpu.py --cpu --out /tmp/g   # the same code paths on CPU

Every figure runs mtt's code as a run does: ``mtt.training.train.prepare`` (model build, device,
precision, channels-last, the backbone cache build), ``mtt.training.train.start`` (optimiser, pescador or
epoch stream with pinned memory on CUDA), ``mtt.training.train.train_epoch`` (the training step) and
``Run.evaluate`` (clip-level evaluation), on a synthetic MTAT-shaped dataset (dataset ``bench``
below: 16 folders, the standard split, 50 tags, 29.1 s clips) whose feature store is written
directly (random float16 patches: the figures are compute and I/O, not tagging). Each figure is
timed after a warm-up over a window split into 3 segments: the median segment's rate, with the
lowest and highest beside it. Windows share ``--budget`` seconds; the CUDA tests then run with
``--tests-timeout``. The full-MTAT table multiplies the figures by each preset's epochs, steps
and evaluated patches on MTAT (``preset_seconds``).

Without CUDA (and without ``--cpu``) it prints "no CUDA device" and why, writes nothing and exits
0. ``--cpu`` runs the same measurements on the CPU at tiny sizes (VGGish and the short-chunk
ResNet at 1/8 width, small stores; ``--width 1`` for full size), for the figures' code paths to
be checked anywhere (tests/test_bench_gpu.py runs it). A measurement that fails is recorded with its
error and the others still run; the exit status is then 1, as when a CUDA test fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mtt.core.distributed import Dist, RankTracker  # noqa: E402
from mtt.core.fs import atomic_write_text  # noqa: E402
from mtt.data.datasets import register  # noqa: E402
from mtt.data.index import STANDARD_SPLIT, ClipIndex  # noqa: E402
from mtt.features.frontend import build_front_end  # noqa: E402
from mtt.features.preprocess import frontend_params, store_path  # noqa: E402
from mtt.features.store import MANIFEST, pack  # noqa: E402
from mtt.features.streams import eval_cuts, steps_per_epoch  # noqa: E402
from mtt.tracking.records import GIT_COMMIT, GIT_DIRTY, git_state  # noqa: E402
from mtt.training.train import Run, autocast_dtype, prepare, start, train_epoch  # noqa: E402
from tests.helpers import SHORTCHUNK_SMALL, compose_cfg  # noqa: E402

NO_CUDA = "no CUDA device"
SCHEMA = 1
CLIP_SECONDS = 29.1  # an MTAT clip (/work/shared/MTAT.md); the bench dataset's clips are as long
N_TAGS, TAG_DENSITY = 50, 2.685 / 50  # MTAT top-50: 2.685 tags per clip
FOLDERS = "0123456789abcdef"
SHORTCHUNK = "+experiment=anchors/shortchunk_res"  # the anchor's recipe: batch 16, epoch mode, 16 even chunks


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is on a device kind."""

    width: float  # backbone.width of VGGish and the short-chunk ResNet
    forward_batch: int  # patches per VGGish forward (the cache build's batch is 256)
    pilot_per_folder: int  # clips per folder of the small store whose cache build sizes the main one
    max_per_folder: int  # the main VGGish store's largest size
    shortchunk_per_folder: int
    steps_chunk: int  # training steps per train_epoch call
    min_window: float  # seconds: the shortest timed window
    budget: float  # default --budget
    tests_timeout: float  # default --tests-timeout
    shortchunk_overrides: tuple[str, ...] = ()  # smaller chunks than the paper's 231 x 128 (CPU)


CUDA_SIZES = Sizes(1.0, 256, 4, 256, 32, 20, 1.0, 210.0, 150.0)
# Smaller chunks than the paper's (tests.helpers.SHORTCHUNK_SMALL; the experiment sets the backbone).
CPU_SIZES = Sizes(0.125, 16, 1, 4, 2, 1, 0.05, 20.0, 300.0, tuple(SHORTCHUNK_SMALL[1:]))


@register("bench")
def bench_dataset(data_cfg, progress: bool) -> ClipIndex:
    """``data.name=bench``: ``data.synth.clips_per_folder`` x 16 folders of ``data.synth.seconds``
    clips with seeded sparse labels over 50 tags, split as MTAT's standard split (folders 0-b /
    c / d-f). No audio: ``make_store`` writes its feature store."""
    per = int(data_cfg.synth.clips_per_folder)
    n = per * len(FOLDERS)
    paths = tuple(f"{FOLDERS[i % len(FOLDERS)]}/bench-{i}.mp3" for i in range(n))
    labels = (np.random.default_rng(data_cfg.synth.seed).random((n, N_TAGS)) < TAG_DENSITY).astype(np.uint8)
    splits = {s: np.flatnonzero([p[0] in folders for p in paths]) for s, folders in STANDARD_SPLIT.items()}
    tags = tuple(f"tag{i}" for i in range(N_TAGS))
    seconds = np.full(n, float(data_cfg.synth.seconds))
    return ClipIndex(Path(data_cfg.root), tags, np.arange(n, dtype=np.int64), paths, labels, splits, seconds)


def make_store(cfg) -> int:
    """Write the feature store of ``cfg``'s bench dataset where ``mtt.preprocess`` looks for it
    (random patches of the front end's shape, as many per clip as a real clip of its length
    has); returns the store's patches."""
    index = bench_dataset(cfg.data, False)
    path = store_path(index, cfg.features)
    f = cfg.features
    per_clip = build_front_end(f).n_patches(int(round(cfg.data.synth.seconds * f.sample_rate)))
    if not (path / MANIFEST).is_file():
        pool = np.random.default_rng(0).standard_normal((8, per_clip, f.patch_frames, f.n_mels)).astype(np.float16)
        counts = {int(c): per_clip for c in index.clip_ids}
        seconds = {str(int(c)): float(cfg.data.synth.seconds) for c in index.clip_ids}
        pack(
            path,
            counts,
            lambda c: pool[c % len(pool)],
            (f.patch_frames, f.n_mels),
            frontend_params(f),
            extra={"seconds": seconds, "truncated": {}},
        )
    return per_clip * len(index.clip_ids)


@dataclass
class Figure:
    """One measured figure: ``value`` (the median segment's rate) in ``unit``, ``low``/``high``
    the slowest and fastest segment, over ``seconds`` of timed work after a warm-up."""

    kind: str  # forward | cache | train | eval (Bench.WEIGHTS)
    what: str
    unit: str
    value: float
    low: float
    high: float
    seconds: float
    work: int  # units of work timed (patches, steps, chunks)
    settings: dict = field(default_factory=dict)
    peak_memory_bytes: int | None = None  # torch.cuda.max_memory_allocated during the figure
    base_memory_bytes: int | None = None  # allocated before it (left by earlier figures)


def precision(amp: torch.dtype | None) -> str:
    """The autocast dtype a run resolved (``mtt.training.train.autocast_dtype``) as ``trainer.precision`` names it."""
    return {None: "fp32", torch.bfloat16: "bf16"}[amp]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], int], seconds: float, device: torch.device, segments: int = 3) -> dict:
    """Run ``step`` (returns the units of work it did) once to warm up, then for ``seconds`` in
    ``segments`` slices (at least one step each; CUDA synchronised at each slice's end)."""
    step()
    sync(device)
    rates, work, total = [], 0, 0.0
    for _ in range(segments):
        done, t0 = 0, time.perf_counter()
        while True:
            done += step()
            if time.perf_counter() - t0 >= seconds / segments:
                sync(device)
                break
        elapsed = time.perf_counter() - t0
        rates.append(done / elapsed)
        work, total = work + done, total + elapsed
    return {"value": statistics.median(rates), "low": min(rates), "high": max(rates), "seconds": total, "work": work}


@contextlib.contextmanager
def gpu_memory(device: torch.device) -> Iterator[dict]:
    """Peak allocated GPU memory of the block (reset before it); empty on CPU."""
    gc.collect()
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        out["base_memory_bytes"] = torch.cuda.memory_allocated(device)
    yield out
    if device.type == "cuda":
        sync(device)
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)


class Bench:
    """The measurements of one device, each within its share of the budget."""

    WEIGHTS = {"forward": 1, "cache": 3, "train": 2, "eval": 1}  # relative window lengths

    def __init__(self, device: torch.device, sizes: Sizes, budget: float, tmp: Path):
        self.device, self.sizes, self.tmp = device, sizes, tmp
        self.deadline = time.perf_counter() + budget
        # figures still to measure, by kind: 4 forwards, 1 cache build, 4 trainings, 4 evaluations
        self.todo = {"forward": 4, "cache": 1, "train": 4, "eval": 4}
        self.figures: dict[str, Figure] = {}
        self.errors: dict[str, str] = {}  # a group of figures that failed -> its exception

    def attempt(self, group: str, measure: Callable, *args):
        """``measure(*args)``; where it raises, the error is kept (and its traceback printed) and
        the other groups still run: one device run brings back every figure that works."""
        try:
            return measure(*args)
        except Exception as exc:  # any failure of mtt's code is a finding to record, not the end
            traceback.print_exc()
            self.errors[group] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"  {group}: FAILED ({self.errors[group]})", flush=True)
            return None

    def window(self, kind: str) -> float:
        """This figure's timed seconds: its weight's share of 60% of the budget left (the other
        40% pays for stores, model builds and warm-ups)."""
        left = max(0.0, self.deadline - time.perf_counter())
        weights = sum(self.WEIGHTS[k] * n for k, n in self.todo.items())
        self.todo[kind] -= 1
        return max(self.sizes.min_window, 0.6 * left * self.WEIGHTS[kind] / max(weights, 1))

    def cfg(self, per_folder: int, *overrides: str):
        """The bench dataset of ``per_folder`` x 16 clips with ``overrides``, on this device."""
        return compose_cfg(
            [
                "data.name=bench",
                f"data.root={self.tmp}/bench-{per_folder}",
                f"data.synth.clips_per_folder={per_folder}",
                f"data.synth.seconds={CLIP_SECONDS}",
                f"data.clip_seconds={CLIP_SECONDS}",
                f"backbone.width={self.sizes.width}",
                f"trainer.device={self.device.type}",
                "trainer.progress=false",
                *overrides,
            ],
            cache=self.tmp / "cache",
        )

    def add(self, name: str, figure: Figure) -> None:
        self.figures[name] = figure
        mem = figure.peak_memory_bytes
        peak = f", peak {mem / 2**30:.2f} GiB" if mem is not None else ""
        print(
            f"  {name:32s} {figure.value:12,.1f} {figure.unit:10s} [{figure.low:,.1f}, {figure.high:,.1f}]"
            f" over {figure.seconds:.1f} s{peak}",
            flush=True,
        )

    def measure(self, name: str, what: str, unit: str, kind: str, step, settings: dict) -> None:
        seconds = self.window(kind)
        with gpu_memory(self.device) as mem:
            result = timed(step, seconds, self.device)
        self.add(name, Figure(kind, what, unit, **result, settings=settings, **mem))

    # -- the figures -------------------------------------------------------------------------

    def forward(self) -> None:
        """VGGish's conv stack (``Tagger.encode``, no grad) on a batch already on the device, in
        fp32 and bf16 autocast, channels-last off and on, each placed by ``prepare``."""
        b = self.sizes.forward_batch
        for prec in ("fp32", "bf16"):
            for layout in (False, True):
                cfg = self.cfg(
                    self.sizes.pilot_per_folder,
                    f"trainer.precision={prec}",
                    f"trainer.channels_last={str(layout).lower()}",
                    "backbone.cache=false",
                )
                make_store(cfg)
                p = prepare(cfg)
                x = torch.randn(b, cfg.features.patch_frames, cfg.features.n_mels, device=self.device)

                @torch.no_grad()
                def step(model=p.model, amp=p.amp, x=x) -> int:
                    with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                        model.encode(x)
                    return len(x)

                name = f"vggish_forward_{prec}_{'channels_last' if layout else 'nchw'}"
                settings = {"batch": b, "precision": precision(p.amp), "channels_last": layout}
                self.measure(name, "VGGish forward (no grad)", "patches/s", "forward", step, settings)
                del p, x, step

    def cache_build(self) -> dict:
        """``prepare`` building the frozen backbone's cache as a run does (default precision and
        layout): a small store first (warm-up, and its rate sizes the main store to the window),
        then the main one, timed whole. Returns the main store's config for the head figures."""
        s = self.sizes
        pilot = self.cfg(s.pilot_per_folder)
        n_pilot = make_store(pilot)
        t0 = time.perf_counter()
        prepare(pilot)
        pilot_rate = n_pilot / (time.perf_counter() - t0)
        seconds = self.window("cache")
        per_clip = n_pilot // (s.pilot_per_folder * len(FOLDERS))
        per_folder = int(min(s.max_per_folder, max(s.pilot_per_folder, pilot_rate * seconds / per_clip / len(FOLDERS))))
        cfg = self.cfg(per_folder)
        n = make_store(cfg)
        t0 = time.perf_counter()
        base = prepare(cfg, cache=False)  # the same work without the cache (store, model)
        overhead = time.perf_counter() - t0
        del base
        with gpu_memory(self.device) as mem:
            t0 = time.perf_counter()
            p = prepare(cfg)
            sync(self.device)
            elapsed = time.perf_counter() - t0
        rate = n / elapsed
        assert p.from_backbone, "prepare built no cache"
        settings = {
            **run_settings(cfg, self.device),
            "patches": n,
            "batch": 256,
            "prepare_without_cache_s": round(overhead, 3),
            "pilot_patches_per_s": round(pilot_rate, 1),
        }
        what = "backbone cache build (prepare, one build, store read to cache written)"
        self.add("cache_build", Figure("cache", what, "patches/s", rate, rate, rate, elapsed, n, settings, **mem))
        return {"per_folder": per_folder}

    def training(self, name: str, what: str, cfg, per_step: int, unit: str) -> Run:
        """``train_epoch`` of a run ``start``ed on ``cfg`` (stream, pinned memory, optimiser as a
        run has them), ``steps_chunk`` steps per call; the figure is steps (x ``per_step``) per second."""
        p = prepare(cfg)
        run = start(cfg, RankTracker("bench", resumed=False), p, Dist())
        run.steps = self.sizes.steps_chunk

        def step() -> int:
            train_epoch(run, 0)
            return run.steps * per_step

        settings = {**run_settings(cfg, self.device), "batch": cfg.trainer.batch_size, "stream": cfg.stream.mode}
        assert settings["cached"] == p.from_backbone and settings["precision"] == precision(p.amp)
        self.measure(name, what, unit, "train", step, settings)
        return run

    def evaluation(self, name: str, what: str, run: Run, unit: str) -> None:
        """``Run.evaluate`` of the validation split (clip-level, every chunk the config evaluates)."""
        cfg, p = run.cfg, run.p
        e = cfg.eval
        chunks = sum(
            len(eval_cuts(p.inputs, c, e.patches_per_clip, cfg.trainer.seed, e.spacing, p.grid)[0])
            for c in p.valid.clip_ids
        )

        def step() -> int:
            run.evaluate(p.valid)
            return chunks

        settings = {**run_settings(cfg, self.device), "batch": e.batch_size, "clips": len(p.valid.clip_ids)}
        settings["chunks"] = chunks
        self.measure(name, what, unit, "eval", step, settings)

    def heads_and_finetuning(self, per_folder: int) -> None:
        cfg = self.cfg(per_folder)
        run = self.training("head_train_cached", "head training on the backbone cache", cfg, 1, "steps/s")
        self.evaluation("head_eval_cached", "evaluation on the backbone cache", run, "patches/s")
        del run
        cfg = self.cfg(per_folder, "backbone.finetune_last=2")
        run = self.training("finetune_train", "live fine-tuning (backbone.finetune_last=2)", cfg, 1, "steps/s")
        self.evaluation("finetune_eval", "evaluation through the live VGGish", run, "patches/s")

    def shortchunk(self) -> None:
        """The short-chunk ResNet with the anchor's recipe, in its own fp32/NCHW and in mtt's
        CUDA default (bf16 autocast, channels-last)."""
        for prec, layout in (("fp32", False), ("bf16", True)):
            cfg = self.cfg(
                self.sizes.shortchunk_per_folder,
                SHORTCHUNK,
                f"trainer.precision={prec}",
                f"trainer.channels_last={str(layout).lower()}",
                *self.sizes.shortchunk_overrides,
            )
            make_store(cfg)
            tag = f"{prec}_{'channels_last' if layout else 'nchw'}"
            b = cfg.trainer.batch_size
            what = f"short-chunk ResNet training, batch {b}"
            run = self.training(f"shortchunk_train_{tag}", what, cfg, b, "chunks/s")
            self.evaluation(f"shortchunk_eval_{tag}", "short-chunk ResNet evaluation", run, "chunks/s")
            del run


# -- full MTAT per preset ----------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """MTAT's clips under one (split, tag set) protocol (/work/shared/MTAT.md)."""

    declared: int  # training rows of the annotations
    train: int  # training clips with features (the 3 empty mp3s dropped)
    valid: int  # validation clips (the report split validates on its test clips)
    test: int
    store: int  # clips in the feature store, whose every patch the cache build runs


MTAT = {
    # The report's split: the first quarter of the 25,863 rows is test, the rest train, every row
    # kept (drop_untagged=false), all 188 tags; at most 3 empty mp3s fall in its train rows.
    ("report", "all"): Split(declared=19_398, train=19_395, valid=6_465, test=6_465, store=25_860),
    # Folders 0-b / c / d-f, clips with a top-50 tag (Won et al.'s clean split, as mtt drops them).
    ("standard", "top50"): Split(declared=15_247, train=15_247, valid=1_529, test=4_332, store=21_108),
}
# preset -> [(config overrides of one run, runs)]; a sweep's arms with their seeds.
PRESETS = {
    "report/prelim": [(["+experiment=report/prelim"], 1)],
    "report/revised_steps": [(["+experiment=report/revised_steps"], 1)],
    "report/three_blocks": [(["+experiment=report/three_blocks"], 1)],
    "report/autopool": [(["+experiment=report/autopool"], 1)],
    "modern": [(["+experiment=modern"], 1)],
    "modern + backbone.finetune_last=2 (not a preset)": [(["+experiment=modern", "backbone.finetune_last=2"], 1)],
    "anchors/shortchunk_res": [([SHORTCHUNK], 1)],
    "anchors/transfer_vs_scratch": [
        (["+experiment/anchors/arms=vggish_gap3", "backbone.weights=audioset"], 3),
        (["+experiment/anchors/arms=shortchunk_res"], 3),
    ],
}


def run_settings(cfg, device: torch.device) -> dict:
    """What a figure of a run of ``cfg`` on ``device`` depends on, as ``prepare`` decides it: the
    backbone, which of its layers train, whether it reads the backbone cache, the precision and
    the layout. A preset's time uses the figure measured with the same settings."""
    b = cfg.backbone
    frozen = b.freeze and b.finetune_last == 0
    return {
        "backbone": b.name,
        "trained_layers": "all" if not b.freeze else b.finetune_last,
        "cached": bool(frozen and b.cache),
        "precision": precision(autocast_dtype(cfg.trainer.precision, device)),
        "channels_last": bool(cfg.trainer.channels_last),
    }


def rate_for(figures: dict[str, dict], kind: str, cfg, device: torch.device) -> tuple[str, float]:
    """The figure of ``kind`` (train | eval | cache) measured with a run of ``cfg``'s settings
    (``run_settings``; training: at its batch too): its name and rate in the units a preset's
    time needs (training: steps/s; evaluation: chunks/s; cache build: patches/s). ``KeyError``
    naming what was not measured."""
    want = run_settings(cfg, device)
    if kind == "cache":
        want = {k: want[k] for k in ("backbone", "precision", "channels_last")}
    if kind == "train":
        want["batch"] = cfg.trainer.batch_size
    for name, f in figures.items():
        if f["kind"] == kind and all(f["settings"].get(k) == v for k, v in want.items()):
            per_step = cfg.trainer.batch_size if kind == "train" and f["unit"] == "chunks/s" else 1
            return name, f["value"] / per_step
    raise KeyError(f"{kind} with {', '.join(f'{k}={v}' for k, v in want.items())}")


def preset_seconds(cfg, figures: dict[str, dict], device: torch.device) -> dict:
    """Seconds of one run of ``cfg`` on full MTAT from the measured ``figures``: the backbone
    cache build (frozen backbone), ``trainer.epochs`` (the most; early stopping may end sooner)
    x (steps per epoch / steps per second + one validation), and one test evaluation."""
    split = MTAT[(cfg.data.split, cfg.data.tags)]
    f = cfg.features
    per_clip = build_front_end(f).n_patches(int(round(CLIP_SECONDS * f.sample_rate)))
    drawn = min(per_clip, cfg.stream.patches_per_clip or per_clip)
    steps = steps_per_epoch(
        cfg.steps.policy, cfg.trainer.batch_size, split.declared, split.train, split.train * drawn, cfg.steps.n
    )
    if cfg.eval.patches_per_clip is None:
        chunks = per_clip
    else:
        even = cfg.eval.spacing == "even"
        chunks = cfg.eval.patches_per_clip if even else min(cfg.eval.patches_per_clip, per_clip)
    used = {}
    used["train"], train_rate = rate_for(figures, "train", cfg, device)
    used["eval"], eval_rate = rate_for(figures, "eval", cfg, device)
    cached = cfg.backbone.freeze and cfg.backbone.finetune_last == 0 and cfg.backbone.cache
    build = 0.0
    if cached:
        used["cache"], cache_rate = rate_for(figures, "cache", cfg, device)
        build = split.store * per_clip / cache_rate
    epochs = cfg.trainer.epochs
    train = epochs * steps / train_rate
    evaluation = (epochs * split.valid + split.test) * chunks / eval_rate
    return {
        "epochs": epochs,
        "steps_per_epoch": steps,
        "eval_chunks_per_clip": chunks,
        "cache_build_s": build,
        "train_s": train,
        "eval_s": evaluation,
        "total_s": build + train + evaluation,
        "figures": used,
    }


def mtat_table(figures: dict[str, dict], device: torch.device) -> dict[str, dict]:
    """Every preset's full-MTAT time: the sum over its runs (a sweep: arms x seeds); a cache is
    built once per arm (the AudioSet weights make every seed's key the same)."""
    out = {}
    for preset, arms in PRESETS.items():
        total = {"cache_build_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
        detail, missing = [], None
        for overrides, runs in arms:
            cfg = compose_cfg([*overrides, "data=mtat", "data.root=/data/mtat"])
            try:
                one = preset_seconds(cfg, figures, device)
            except KeyError as exc:
                missing = str(exc).strip("'\"")
                break
            total["cache_build_s"] += one["cache_build_s"]
            total["train_s"] += runs * one["train_s"]
            total["eval_s"] += runs * one["eval_s"]
            detail.append({"overrides": overrides, "runs": runs, **one})
        if missing is not None:
            out[preset] = {"not_measured": missing}
            continue
        total_s = sum(total.values())
        out[preset] = {**total, "total_s": total_s, "hours": total_s / 3600, "runs": detail}
    return out


# -- the CUDA tests ----------------------------------------------------------------------------


def run_cuda_tests(paths: list[str], timeout: float, tmp: Path) -> dict:
    """``pytest -m cuda`` over ``paths`` in a subprocess; counts and each test's outcome (from
    pytest's JUnit XML), the command and the end of its output."""
    junit = tmp / "cuda-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *paths]
    out: dict = {"command": shlex.join(["python", "-m", "pytest", "-m", "cuda", *paths]), "timeout_s": timeout}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {
            **out,
            "returncode": None,
            "timed_out": True,
            "tail": tail[-3000:],
            "passed": 0,
            "failed": 0,
            "errors": 0,
            "skipped": 0,
            "cases": [],
        }
    out.update({"returncode": proc.returncode, "timed_out": False, "seconds": round(time.perf_counter() - t0, 1)})
    out["tail"] = (proc.stdout + proc.stderr)[-3000:]
    cases = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for kind in ("failure", "error", "skipped"):
                node = case.find(kind)
                if node is not None:
                    outcome, message = kind, node.get("message", "")
            cases.append(
                {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message}
            )
    out["cases"] = cases
    for key, kind in (("passed", "passed"), ("failed", "failure"), ("errors", "error"), ("skipped", "skipped")):
        out[key] = sum(c["outcome"] == kind for c in cases)
    return out


# -- the record and its page -------------------------------------------------------------------


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": "cpu", "name": f"CPU ({platform.machine()}), {torch.get_num_threads()} torch threads"}
    props = torch.cuda.get_device_properties(device)
    info = {
        "type": "cuda",
        "name": torch.cuda.get_device_name(device),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "memory_bytes": props.total_memory,
        "count": torch.cuda.device_count(),
    }
    info["driver"] = nvidia_smi("driver_version")
    return info


def nvidia_smi(query: str) -> str | None:
    """The first GPU's ``nvidia-smi --query-gpu=<query>``, None where there is no such program."""
    try:
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = smi.stdout.strip().splitlines()
    return lines[0] if smi.returncode == 0 and lines else None


def versions(commit: str | None = None) -> dict:
    """Python, torch, CUDA, cuDNN, numpy and the code's commit (``commit`` where git cannot tell:
    a copied tree without ``.git``, as on a device machine)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    git = git_state()
    if git[GIT_COMMIT] == "unknown" and commit:
        git = {GIT_COMMIT: commit, GIT_DIRTY: "unknown (given by --commit)"}
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "numpy": np.__version__,
        "git_commit": git[GIT_COMMIT],
        "git_dirty": git[GIT_DIRTY],
    }


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def hours(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"


def render(record: dict) -> str:
    """docs/gpu.md from the JSON record."""
    d, v, cuda = record["device"], record["versions"], record["mode"] == "cuda"
    lines = [
        "# mtt on a GPU: measured figures" if cuda else "# mtt's GPU benchmark in CPU mode (not GPU figures)",
        "",
        f"Written by `make bench-gpu` (tests/benchmarks/bench_gpu.py) on {record['created']}, with the JSON "
        "record `gpu.json` beside this page; docs/real-mtat.md says how to read it.",
        "",
        f"- device: **{d['name']}**"
        + (
            f" (compute capability {d['capability']}, {gib(d['memory_bytes'])}, driver {d.get('driver')})"
            if cuda
            else ""
        ),
        f"- torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, Python {v['python']}; mtt "
        f"{v['git_commit']}" + (" (with uncommitted changes)" if v["git_dirty"] == "true" else ""),
        f"- settings: {json.dumps(record['settings'])}",
        "",
    ]
    if not cuda:
        lines += [
            f"CPU mode at backbone width {record['settings']['width']}: the figures show the code "
            "paths work; they say nothing about a GPU.",
            "",
        ]
    lines += [
        "## Throughput and peak memory",
        "",
        "One process, one run of the script: each figure is the median of 3 consecutive segments of its "
        "timed window (after a warm-up), with the slowest and fastest segment; the cache build is one build. "
        "Synthetic inputs of the real shapes (the bench dataset: 29.1 s clips, 50 tags, MTAT's standard split).",
        "",
        "| figure | what | settings | rate [slowest, fastest] | timed | peak GPU memory |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in record["figures"].items():
        s = ", ".join(f"{k}={v}" for k, v in f["settings"].items())
        lines.append(
            f"| `{name}` | {f['what']} | {s} | {f['value']:,.1f} {f['unit']} [{f['low']:,.1f}, {f['high']:,.1f}] "
            f"| {f['seconds']:.1f} s, {f['work']:,} | {gib(f['peak_memory_bytes'])} |"
        )
    if record["errors"]:
        lines += [
            "",
            "Failed, so not measured (the run's output holds each traceback):",
            "",
        ]
        lines += [f"- {group}: `{message}`" for group, message in record["errors"].items()]
    t = record.get("tests")
    lines += ["", "## The CUDA tests (`pytest -m cuda`)", ""]
    if t is None:
        lines.append("Not run (`--no-tests`).")
    else:
        lines.append(
            f"`{t['command']}`: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
            f"{t['skipped']} skipped" + (" (timed out)" if t.get("timed_out") else "") + "."
        )
        lines += ["", "| test | outcome |", "| --- | --- |"]
        lines += [f"| `{c['test']}` | {c['outcome']} {c['message']} |" for c in t["cases"]]
    lines += [
        "",
        "## Full MTAT per preset, computed from the figures above",
        "",
        ("One GPU" if cuda else f"This CPU at backbone width {record['settings']['width']} (not an MTAT figure)")
        + ", after `mtt.preprocess` (CPU, not counted). Per run: the backbone cache build over every "
        "patch of the store (frozen presets; once per sweep arm, the AudioSet weights' key being every "
        "seed's), `trainer.epochs` x (steps per epoch at the measured steps/s + one validation) + one "
        "test evaluation, at the measured chunks/s. `trainer.epochs` is the most: early stopping "
        "(`modern`, the VGGish arm) can end sooner. The head figures are the default head's (GAP + 2 "
        "blocks, all patches drawn); other heads and one patch per clip are assumed to run at the same "
        "steps/s on the cache. MTAT: 29.1 s clips; "
        + "; ".join(
            f"split={split} tags={tags}: {c.train:,} train / {c.valid:,} valid / {c.test:,} test clips, "
            f"{c.store:,} in the store"
            for (split, tags), c in MTAT.items()
        )
        + " (valid = test on the report split).",
        "",
        "| preset | runs | steps/epoch x epochs | cache build | training | evaluation | total |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    unit = "GPU h" if cuda else "h"
    for preset, m in record["mtat"].items():
        if "not_measured" in m:
            lines.append(f"| `{preset}` | | | | | | not measured: {m['not_measured']} |")
            continue
        runs = " + ".join(f"{r['runs']}" for r in m["runs"])
        steps = " / ".join(f"{r['steps_per_epoch']:,} x {r['epochs']}" for r in m["runs"])
        lines.append(
            f"| `{preset}` | {runs} | {steps} | {hours(m['cache_build_s'])} | {hours(m['train_s'])} | "
            f"{hours(m['eval_s'])} | **{m['hours']:.2f} {unit}** |"
        )
    return "\n".join(lines) + "\n"


def no_cuda_reason() -> str:
    """Why torch sees no CUDA device, in one line (the build, the visible devices, the driver)."""
    parts = [f"torch {torch.__version__} (built for CUDA {torch.version.cuda})"]
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        parts.append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}")
    try:
        parts.append(f"{torch.cuda.device_count()} devices visible")
    except RuntimeError as exc:
        parts.append(str(exc).splitlines()[0])
    smi = nvidia_smi("name,driver_version")  # a GPU the driver sees but this torch cannot use
    parts.append(f"nvidia-smi: {smi}" if smi else "no nvidia-smi")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU at tiny sizes (the code paths)")
    ap.add_argument("--out", type=Path, help="write gpu.md and gpu.json into this folder (make bench-gpu: docs/)")
    ap.add_argument("--budget", type=float, help="seconds for the measurements (CUDA 210, CPU 20)")
    ap.add_argument("--tests-timeout", type=float, help="seconds for the CUDA tests (CUDA 150, CPU 300)")
    ap.add_argument("--no-tests", action="store_true", help="do not run the CUDA tests")
    ap.add_argument("--tests-path", nargs="+", default=["tests"], help="where pytest looks for -m cuda tests")
    ap.add_argument("--width", type=float, help="backbone width (CUDA 1.0, CPU 0.125)")
    ap.add_argument("--commit", help="the tree's commit, recorded where git cannot tell (a copy without .git)")
    ap.add_argument(
        "--threads", type=int, help="torch threads (CUDA: torch's default; CPU: 1, which tiny models run fastest on)"
    )
    args = ap.parse_args(argv)
    # The short-chunk front end's 128 bands over 257 FFT bins leave one filter empty (theirs too):
    # said once by mtt.preprocess; here only its patch count is asked for.
    warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero values")
    t_start = time.perf_counter()
    if not args.cpu and not torch.cuda.is_available():
        print(f"{NO_CUDA}: {no_cuda_reason()}; nothing measured or written (--cpu measures on this CPU).")
        return 0
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.threads is not None or args.cpu:
        torch.set_num_threads(args.threads or 1)
    sizes = CPU_SIZES if args.cpu else CUDA_SIZES
    if args.width is not None:
        sizes = Sizes(args.width, *list(asdict(sizes).values())[1:])
    budget = args.budget if args.budget is not None else sizes.budget
    info = device_info(device)
    print(f"bench-gpu on {info['name']}: torch {torch.__version__}, CUDA {torch.version.cuda}, budget {budget:.0f} s")
    with tempfile.TemporaryDirectory(prefix="mtt-bench-gpu-") as tmp:
        bench = Bench(device, sizes, budget, Path(tmp))
        bench.attempt("vggish_forward", bench.forward)
        main_store = bench.attempt("cache_build", bench.cache_build) or {"per_folder": sizes.pilot_per_folder}
        bench.attempt("heads_and_finetuning", bench.heads_and_finetuning, main_store["per_folder"])
        bench.attempt("shortchunk", bench.shortchunk)
        figures = {k: asdict(f) for k, f in bench.figures.items()}
        mtat = mtat_table(figures, device)
        tests = None
        if not args.no_tests:
            timeout = args.tests_timeout if args.tests_timeout is not None else sizes.tests_timeout
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the tests' process gets the memory this one cached
            print(f"CUDA tests: pytest -m cuda {' '.join(args.tests_path)} (timeout {timeout:.0f} s)", flush=True)
            tests = run_cuda_tests(args.tests_path, timeout, Path(tmp))
    record = {
        "schema": SCHEMA,
        "mode": device.type,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": info,
        "versions": versions(args.commit),
        "settings": {
            "budget_s": budget,
            "width": sizes.width,
            "forward_batch": sizes.forward_batch,
            "torch_threads": torch.get_num_threads(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        },
        "figures": figures,
        "errors": bench.errors,
        "mtat": mtat,
        "tests": tests,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    where = "one GPU" if device.type == "cuda" else f"this CPU at width {sizes.width}, not an MTAT figure"
    print(f"full MTAT per preset ({where}, from these figures):")
    for preset, m in mtat.items():
        print(f"  {preset:50s} " + (f"{m['hours']:8.2f} h" if "hours" in m else f"not measured: {m['not_measured']}"))
    if tests is not None:
        print(
            f"CUDA tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped" + (" (timed out)" if tests["timed_out"] else "")
        )
        for c in tests["cases"]:
            if c["outcome"] != "passed":
                print(f"  {c['outcome']}: {c['test']} {c['message']}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "gpu.json", json.dumps(record, indent=1) + "\n")
        atomic_write_text(args.out / "gpu.md", render(record))
        print(f"wrote {args.out / 'gpu.md'} and {args.out / 'gpu.json'} ({record['wall_s']:.0f} s)")
    failed = tests is not None and (tests["timed_out"] or tests["returncode"] != 0)
    return 1 if failed or bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
