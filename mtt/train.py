"""Training and evaluation: ``train(cfg, tracker)``, no Hydra in here.

Data flows one way: clip index -> feature store -> (frozen-backbone cache) -> pescador stream ->
model -> clip-level evaluation -> tracker.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from mtt import distributed
from mtt.backbone_cache import build_backbone_cache, cache_key
from mtt.data.index import ClipIndex, index_from_config
from mtt.checkpoint import BEST_META, BEST_WEIGHTS, TrainState, drop_last, last_epoch, load_best, load_last, run_dir, \
    save_best, save_last
from mtt.config import validate
from mtt.metrics import per_tag_table, tagging_metrics
from mtt.models import Tagger, build_model
from mtt.models.pooling import log_alphas, project_constraints
from mtt.models.weights import WeightsInfo, load_state_dict, resolve_weights
from mtt.preprocess import build_feature_store
from mtt.schedule import Phases
from mtt.records import PREDICTIONS, per_tag_csv, plot_curves, provenance, save_predictions, digest_test_set
from mtt.stats import run_intervals
from mtt.store import PatchStore
from mtt.streams import epoch_counts, eval_batches, steps_per_epoch, train_loader

log = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={spec!r} but torch sees no CUDA device")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision: bf16 autocast on CUDA for ``auto``; None means full fp32."""
    choices = {"fp32": None, "bf16": torch.bfloat16,
               "auto": torch.bfloat16 if device.type == "cuda" else None}
    if precision not in choices:
        raise ValueError(f"trainer.precision={precision!r}: expected one of {sorted(choices)}")
    return choices[precision]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # A CPU reduction's order follows the thread count, which BLAS may change with the
        # machine's load: one thread makes two runs (or a run and its resume) bit-identical.
        torch.set_num_threads(1)


@dataclass
class Split:
    """The clips of one split that have features, with their labels ``(n, n_tags)``."""

    clip_ids: np.ndarray
    labels: np.ndarray
    declared: int  # clips of this split in the annotations, with or without features


def split_of(index: ClipIndex, store: PatchStore, name: str) -> Split:
    """The clips of split ``name`` that have at least one patch; clips shorter than one patch are
    kept in the store with 0 patches (see ``mtt.preprocess``) and left out here, with a count."""
    rows = index.subset(name)
    stored = np.array([int(index.clip_ids[r]) in store for r in rows], dtype=bool)
    present = np.array([ok and store.count(index.clip_ids[r]) > 0 for ok, r in zip(stored, rows)], dtype=bool)
    short = int(stored.sum() - present.sum())
    if short:
        log.warning("%s: %d clip(s) shorter than one patch (0 patches) left out", name, short)
    rows_ok = rows[present]
    return Split(index.clip_ids[rows_ok], index.labels[rows_ok], declared=len(rows))


@torch.no_grad()
def clip_probabilities(model: Tagger, inputs: PatchStore, split: Split, cfg, device: torch.device,
                       from_backbone: bool, amp: torch.dtype | None) -> np.ndarray:
    """Clip-level probabilities ``(clips, n_tags)``: every patch's, aggregated per clip (mean or max)."""
    model.eval()
    n, n_tags = len(split.clip_ids), split.labels.shape[1]
    agg = np.zeros((n, n_tags))
    counts = np.zeros(n)
    reduce = {"mean": np.add.at, "max": np.maximum.at}
    if cfg.eval.aggregate not in reduce:
        raise ValueError(f"eval.aggregate={cfg.eval.aggregate!r}: expected mean or max")
    for x, owner in eval_batches(inputs, split.clip_ids, cfg.eval.batch_size, cfg.eval.patches_per_clip,
                                 cfg.trainer.seed, spacing=cfg.eval.spacing):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x.to(device, non_blocking=True), from_backbone=from_backbone)
        probs = model.probabilities(logits).cpu().numpy().astype(np.float64)
        reduce[cfg.eval.aggregate](agg, owner, probs)
        np.add.at(counts, owner, 1)
    if cfg.eval.aggregate == "mean":
        agg /= np.maximum(counts, 1)[:, None]
    return agg


def clip_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``tagging_metrics`` plus the clip-level binary cross-entropy ``loss``."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    out = tagging_metrics(labels, probs)
    out["loss"] = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    return out


def train_epoch(model: Tagger, stream, optimizer: torch.optim.Optimizer, steps: int, epoch: int, cfg,
                device: torch.device, from_backbone: bool, frozen: bool, amp: torch.dtype | None,
                forward: torch.nn.Module | None = None) -> dict[str, float]:
    """``steps`` optimiser steps on batches of ``stream``; returns train loss and binary accuracy.

    ``forward`` is the module that runs the model (its DistributedDataParallel wrapper under
    torchrun, which averages the gradients across ranks); by default the model itself.

    Raises ``FloatingPointError`` as soon as the loss is NaN or infinite.
    """
    t = cfg.trainer
    model.train()
    if frozen:
        model.backbone.eval()
    loss_sum = correct = cells = 0.0
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{t.epochs}", unit="step", disable=not t.progress,
               leave=False)
    for step in bar:
        x, y = next(stream)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = (forward or model)(x, from_backbone=from_backbone)
        loss = model.loss(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {step}; stopping "
                                     f"(trainer.lr={t.lr} too high?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        project_constraints(model)  # AutoPool's cap: back into the interval after the step
        loss_sum += loss.item()
        with torch.no_grad():
            correct += ((model.probabilities(logits) >= 0.5) == (y >= 0.5)).sum().item()
            cells += y.numel()
        bar.set_postfix(loss=f"{loss_sum / (step + 1):.4f}")  # tqdm syncs bar.n lazily
    return {"train_loss": loss_sum / steps, "train_accuracy": correct / cells}


def split_probabilities(d: distributed.Dist, model: Tagger, inputs: PatchStore, split: Split, cfg,
                        device: torch.device, from_backbone: bool, amp: torch.dtype | None) -> np.ndarray:
    """``clip_probabilities`` of a whole split; under torchrun each rank computes every
    world-th clip and the ranks exchange results, so each clip is evaluated exactly once."""
    def part(rows: np.ndarray) -> np.ndarray:
        sub = Split(split.clip_ids[rows], split.labels[rows], split.declared)
        return clip_probabilities(model, inputs, sub, cfg, device, from_backbone, amp)

    return distributed.gather_rows(d, len(split.clip_ids), part)


def monitor_score(metrics: dict[str, float], monitor: str) -> float:
    """The monitored metric, oriented so that higher is better (losses are negated); NaN -> -inf."""
    if monitor not in metrics:
        raise KeyError(f"trainer.monitor={monitor!r} is not an epoch metric; have {sorted(metrics)}")
    score = metrics[monitor] * (-1 if monitor.endswith("loss") else 1)
    return -math.inf if math.isnan(score) else score


def patience_spent(state: TrainState, patience: int | None) -> bool:
    """Early stopping: ``patience`` epochs have passed since the best one (never with None)."""
    return patience is not None and state.best_epoch >= 0 and state.epoch - state.best_epoch >= patience


def skip_batches(stream, n: int) -> None:
    """Draw and drop ``n`` batches: a resumed run's stream continues where the killed one was."""
    for _ in range(n):
        next(stream)


def log_records(cfg, tracker, derived: dict, weights, store: PatchStore) -> None:
    """Everything a reader needs to trust the run later (params, provenance, config.yaml)."""
    tracker.log_params(OmegaConf.to_container(cfg, resolve=True))
    tracker.log_params({f"derived.{k}": v for k, v in derived.items()})
    tracker.set_tags({"backbone_pretrained": weights.path is not None, "weights_source": weights.source,
                      "weights_sha256": weights.sha256 or "", "feature_store": store.fingerprint,
                      "seed": cfg.trainer.seed, "device": derived["device"],
                      "steps_policy": cfg.steps.policy, "steps_per_epoch": derived["steps_per_epoch"],
                      **provenance()})
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def log_test(tracker, tags, split: Split, probs: np.ndarray, step: int, seed: int,
             extra: dict[str, float] | None = None) -> dict[str, float]:
    """Score the test split and record it: ``test_*`` metrics with their bootstrap intervals
    (resampling the test clips, seeded), the clip probabilities (``test_predictions.npz``), the
    per-tag table and the test set's digest. Returns the ``test_*`` metrics."""
    final = {f"test_{k}": v for k, v in clip_metrics(split.labels, probs).items()}
    intervals = run_intervals(split.labels, probs, seed=seed)
    tracker.log_metrics({**final, **intervals, **(extra or {})}, step=step)
    tracker.set_tags({"test_clips_sha256": digest_test_set(split.clip_ids, split.labels),
                      "test_clips": len(split.clip_ids)})
    tracker.log_text(per_tag_csv(per_tag_table(tags, split.labels, probs)), "per_tag_test.csv")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_predictions(Path(tmp) / PREDICTIONS, split.clip_ids, tags, probs, split.labels)
        tracker.log_artifact(path)
    return {**final, **intervals}


def log_plots(tracker, state: TrainState) -> None:
    """End-of-run curve plots (PNG) of the epoch history."""
    with tempfile.TemporaryDirectory() as tmp:
        plot_curves(state.history, Path(tmp))
        tracker.log_artifacts(tmp, "plots")


@dataclass
class Prepared:
    """Everything a run needs before its first step: data, features, model and where they live."""

    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None = fp32
    weights: WeightsInfo
    index: ClipIndex
    store: PatchStore  # the log-mel feature store
    model: Tagger
    inputs: PatchStore  # what the model reads: the feature store, or the frozen backbone's cache
    from_backbone: bool  # inputs are backbone outputs (the cache), not log-mel patches
    frozen: bool  # the whole backbone is frozen
    valid_is_test: bool  # the split has no validation set of its own (data.split=report)
    train: Split
    valid: Split
    test: Split


def prepare(cfg, d: distributed.Dist = distributed.Dist(), cache: bool | None = None) -> Prepared:
    """Seed, resolve the weights, build (or open) the dataset, the feature store, the model and,
    for a frozen backbone, the cache of its outputs; split the clips.

    ``cache`` forces the backbone cache on (the linear probe reads frozen outputs even when the
    config fine-tunes) or off; by default it follows ``backbone.freeze``/``finetune_last``/``cache``.
    """
    validate(cfg)  # library callers too: a bad value fails here, not deep in the loop
    t = cfg.trainer
    seed_everything(t.seed, t.deterministic)
    device = distributed.device_for(d, resolve_device(t.device))
    amp = autocast_dtype(t.precision, device)
    frozen = cfg.backbone.freeze and cfg.backbone.finetune_last == 0
    from_backbone = (frozen and cfg.backbone.cache) if cache is None else cache
    with distributed.main_first(d):  # rank 0 downloads and builds, the others then find it all
        # The weights first: an offline `audioset` run fails here, before any data work.
        weights = resolve_weights(cfg.backbone.weights, cfg.backbone.url, cfg.backbone.hub_dir)
        index = index_from_config(cfg.data, progress=t.progress)
        store = build_feature_store(index, cfg.features, progress=t.progress)
        state_dict = load_state_dict(weights.path) if weights.path is not None else None
        model = build_model(cfg, len(index.tags), state_dict).to(device)
        if t.channels_last:  # NHWC convolutions: faster on CUDA tensor cores, no slower on CPU
            model.backbone.to(memory_format=torch.channels_last)
        inputs = store
        if from_backbone:
            key = cache_key(store, weights.sha256, cfg.backbone, model.backbone, device=device, autocast_dtype=amp)
            inputs = build_backbone_cache(store, model.encode, key, f"{cfg.paths.cache}/backbone", device,
                                          progress=t.progress, autocast_dtype=amp)
    splits = [split_of(index, store, s) for s in ("train", "valid", "test")]
    if len(splits[0].clip_ids) == 0:
        raise RuntimeError(f"no training clips with features under {cfg.data.root}")
    valid_is_test = np.array_equal(index.subset("valid"), index.subset("test"))
    return Prepared(device, amp, weights, index, store, model, inputs, from_backbone, frozen, valid_is_test, *splits)


def train(cfg, tracker, d: distributed.Dist = distributed.Dist()) -> dict[str, float]:
    """Train the tagger of ``cfg`` and log everything to ``tracker``; returns the final metrics.

    With ``tracker.resumed`` the training continues from the last checkpoint of that run. ``d``
    is this process's place in a torchrun job (see ``mtt.distributed``); by default one process.
    """
    t = cfg.trainer
    p = prepare(cfg, d)
    device, amp, weights, index, store, model, inputs = p.device, p.amp, p.weights, p.index, p.store, p.model, p.inputs
    from_backbone, frozen = p.from_backbone, p.frozen
    train_split, val_split, test_split = p.train, p.valid, p.test
    counts = epoch_counts(train_split.declared, train_split.clip_ids, store, cfg.stream.patches_per_clip)
    steps = steps_per_epoch(cfg.steps.policy, t.batch_size, counts.declared, counts.cached, counts.patches,
                            cfg.steps.n)
    mine = distributed.shard(d, len(train_split.clip_ids))  # this rank's training clips
    shards = distributed.gather(d, train_split.clip_ids[mine].tolist())
    derived = {"steps_per_epoch": steps, "train_clips": len(train_split.clip_ids),
               "train_clips_declared": train_split.declared, "train_patches": counts.patches,
               "val_clips": len(val_split.clip_ids), "test_clips": len(test_split.clip_ids),
               "n_tags": len(index.tags), "device": str(device), "backbone_cached": from_backbone,
               "world_size": d.world, "truncated_clips": len(store.truncated)}
    if not tracker.resumed:  # a resumed run has its records already (MLflow params are write-once)
        log_records(cfg, tracker, derived, weights, store)
        if d.active:
            tracker.log_text(json.dumps({str(r): ids for r, ids in enumerate(shards)}), "ddp_shards.json")

    # Where the split has no validation set of its own (the report split validates on the test
    # clips), no epoch is chosen on it: the last epoch is the model, without early stopping or
    # a schedule driven by the test set.
    selection = "last" if p.valid_is_test else "best_val"
    patience, lr_schedule = (None, "none") if p.valid_is_test else (t.patience, t.lr_schedule)
    if p.valid_is_test and (t.patience is not None or t.lr_schedule != "none"):
        log.warning("data.split=%s has no validation split (valid == test): ignoring trainer.patience=%s and "
                    "trainer.lr_schedule=%s, and testing the last epoch", cfg.data.split, t.patience, t.lr_schedule)
    if not tracker.resumed:
        tracker.set_tags({"selection": selection})
    if cfg.head.bias_init == "prior":  # from the training labels, before any step
        model.init_output_bias(train_split.labels)
    params = [p for p in model.parameters() if p.requires_grad]
    folder = run_dir(cfg.paths.cache, tracker.run_id)
    phases = Phases(t, lr_schedule)  # trainer.optimizer, and trainer.phases (mtt.schedule)
    optimizer = phases.optimizer_at(params, last_epoch(folder) if tracker.resumed else 0)
    scheduler = None
    if lr_schedule == "plateau":
        # threshold 0: "better" means what it means for early stopping and the best checkpoint
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=t.lr_factor,
                                                               patience=t.lr_patience, threshold=0.0)
    state = TrainState()
    if tracker.resumed:
        state = load_last(folder, model, optimizer, scheduler)
        # The killed process may have died between its checkpoint and its metrics: log them again
        # with their original timestamp, which MLflow stores once.
        tracker.log_metrics(state.last_metrics, step=state.epoch, timestamp=state.last_timestamp)
        log.info("resuming run %s after epoch %d", tracker.run_id, state.epoch)
    stream = train_loader(inputs, train_split.clip_ids[mine], train_split.labels[mine], cfg.stream,
                          distributed.local_batch(d, t.batch_size), t.seed, pin_memory=device.type == "cuda")
    skip_batches(stream, steps * (state.epoch + 1))
    forward = distributed.wrap(d, model, device)
    evaluate_split = functools.partial(split_probabilities, d, model, inputs, cfg=cfg, device=device,
                                       from_backbone=from_backbone, amp=amp)
    meta = {"monitor": t.monitor, "tags": list(index.tags), "config": OmegaConf.to_container(cfg, resolve=True)}

    def reload_best() -> None:  # a phase of trainer.phases that starts from the best checkpoint
        distributed.barrier(d)  # rank 0 saved it
        model.load_state_dict(load_best(folder)[0])

    epoch = state.epoch + 1
    while epoch < t.epochs and not patience_spent(state, patience):
        optimizer = phases.enter(epoch, optimizer, params, reload_best)
        local = train_epoch(model, stream, optimizer, steps, epoch, cfg, device, from_backbone, frozen, amp, forward)
        distributed.sync_buffers(d, model)  # every rank evaluates (and rank 0 saves) one model
        # Every rank ran the same number of equal-sized steps: the mean of means is the mean.
        metrics = {k: float(np.mean([m[k] for m in distributed.gather(d, local)])) for k in local}
        val = clip_metrics(val_split.labels, evaluate_split(val_split))
        metrics.update({f"val_{k}": v for k, v in val.items()})
        metrics["lr"] = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        score = monitor_score(metrics, t.monitor)
        improved = selection == "last" or state.best_epoch < 0 or score > state.best_score
        if scheduler is not None:
            scheduler.step(score)
        if improved:
            state.best_score, state.best_epoch = score, epoch
        state.epoch, state.last_metrics, state.last_timestamp = epoch, metrics, int(time.time() * 1000)
        for k, v in metrics.items():
            state.history.setdefault(k, []).append(v)
        if d.main:  # one writer; checkpoint first, then the metrics: a kill in between is healed on resume
            if improved:
                save_best(folder, model, {**meta, "epoch": epoch, "value": metrics[t.monitor]})
            save_last(folder, model, optimizer, state, scheduler)
        tracker.log_metrics(metrics, step=epoch, timestamp=state.last_timestamp)
        epoch += 1
    if patience_spent(state, patience):
        log.info("early stop after epoch %d: %s has not improved for %d epochs (best epoch %d)",
                 state.epoch, t.monitor, patience, state.best_epoch)

    distributed.barrier(d)  # rank 0's best checkpoint is on disk for every rank
    best, _ = load_best(folder)
    model.load_state_dict(best)
    for name in (BEST_WEIGHTS, BEST_META):
        tracker.log_artifact(folder / name, "checkpoint")
    probs = evaluate_split(test_split)
    # The test metrics are those of the selected epoch's model, logged after the last epoch, with
    # that epoch's validation metrics beside them (selected_val_*: what a comparison may rank by).
    end = state.epoch + 1
    selected = {f"selected_{k}": v[state.best_epoch] for k, v in state.history.items() if k.startswith("val_")}
    final = log_test(tracker, index.tags, test_split, probs, step=end, seed=t.seed,
                     extra={"best_epoch": state.best_epoch, "epochs_trained": end, **selected})
    log_alphas(model.pool, tracker, step=end)  # AutoPool's learned alphas (no-op for GAP)
    log.info("test (%s epoch %d): %s", selection, state.best_epoch,
             " ".join(f"{k}={v:.4f}" for k, v in final.items() if "_ci" not in k))
    log_plots(tracker, state)
    distributed.barrier(d)
    if d.main:
        drop_last(folder)
    best_metrics = {k: v[state.best_epoch] for k, v in state.history.items()}
    return {**best_metrics, **final, **selected, "best_epoch": state.best_epoch, "epochs_trained": end}
