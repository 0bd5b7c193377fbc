"""Training and evaluation: ``train(cfg, tracker)``, no Hydra in here.

Data flows one way: clip index -> feature store -> (frozen-backbone cache) -> pescador stream ->
model -> clip-level evaluation -> tracker.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from mtt.backbone_cache import build_backbone_cache, cache_key
from mtt.data.index import ClipIndex, index_from_config
from mtt.metrics import tagging_metrics
from mtt.models import Tagger, build_model
from mtt.models.pooling import log_alphas
from mtt.models.weights import load_state_dict, resolve_weights
from mtt.preprocess import build_feature_store
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
def evaluate(model: Tagger, inputs: PatchStore, split: Split, cfg, device: torch.device,
             from_backbone: bool, amp: torch.dtype | None) -> dict[str, float]:
    """Clip-level metrics: every patch's probabilities, aggregated per clip (mean or max)."""
    model.eval()
    n, n_tags = len(split.clip_ids), split.labels.shape[1]
    agg = np.zeros((n, n_tags))
    counts = np.zeros(n)
    reduce = {"mean": np.add.at, "max": np.maximum.at}
    if cfg.eval.aggregate not in reduce:
        raise ValueError(f"eval.aggregate={cfg.eval.aggregate!r}: expected mean or max")
    for x, owner in eval_batches(inputs, split.clip_ids, cfg.eval.batch_size, cfg.eval.patches_per_clip,
                                 cfg.trainer.seed):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x.to(device, non_blocking=True), from_backbone=from_backbone)
        probs = model.probabilities(logits).cpu().numpy().astype(np.float64)
        reduce[cfg.eval.aggregate](agg, owner, probs)
        np.add.at(counts, owner, 1)
    if cfg.eval.aggregate == "mean":
        agg /= np.maximum(counts, 1)[:, None]
    p = np.clip(agg, 1e-7, 1 - 1e-7)
    y = split.labels.astype(np.float64)
    out = tagging_metrics(split.labels, agg)
    out["loss"] = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    return out


def train(cfg, tracker) -> dict[str, float]:
    """Train the tagger of ``cfg`` and log everything to ``tracker``; returns the final metrics."""
    t = cfg.trainer
    seed_everything(t.seed, t.deterministic)
    device = resolve_device(t.device)
    amp = autocast_dtype(t.precision, device)
    # Resolve the weights first: an offline `audioset` run fails here, before any data work.
    weights = resolve_weights(cfg.backbone.weights, cfg.backbone.url, cfg.backbone.hub_dir)

    index = index_from_config(cfg.data, progress=t.progress)
    store = build_feature_store(index, cfg.features, progress=t.progress)
    state = load_state_dict(weights.path) if weights.path is not None else None
    model = build_model(cfg, len(index.tags), state).to(device)
    if t.channels_last:  # NHWC convolutions: faster on CUDA tensor cores, no slower on CPU
        model.backbone.to(memory_format=torch.channels_last)

    frozen = cfg.backbone.freeze and cfg.backbone.finetune_last == 0
    from_backbone = frozen and cfg.backbone.cache
    inputs = store
    if from_backbone:
        key = cache_key(store, weights.sha256, cfg.backbone, model.backbone)
        inputs = build_backbone_cache(store, model.encode, key, f"{cfg.paths.cache}/backbone", device,
                                      progress=t.progress, autocast_dtype=amp)

    train_split, val_split, test_split = (split_of(index, store, s) for s in ("train", "valid", "test"))
    if len(train_split.clip_ids) == 0:
        raise RuntimeError(f"no training clips with features under {cfg.data.root}")
    counts = epoch_counts(train_split.declared, train_split.clip_ids, store)
    n_patches = counts.patches
    steps = steps_per_epoch(cfg.steps.policy, t.batch_size, counts.declared, counts.cached, counts.patches,
                            cfg.steps.n)

    tracker.log_params(OmegaConf.to_container(cfg, resolve=True))
    tracker.log_params({"derived.steps_per_epoch": steps, "derived.train_clips": len(train_split.clip_ids),
                        "derived.train_clips_declared": train_split.declared,
                        "derived.train_patches": n_patches, "derived.val_clips": len(val_split.clip_ids),
                        "derived.test_clips": len(test_split.clip_ids), "derived.n_tags": len(index.tags),
                        "derived.device": str(device), "derived.backbone_cached": from_backbone})
    tracker.set_tags({"backbone_pretrained": weights.path is not None, "weights_source": weights.source,
                      "weights_sha256": weights.sha256 or "", "feature_store": store.fingerprint})
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    stream = train_loader(inputs, train_split.clip_ids, train_split.labels, cfg.stream, t.batch_size,
                          t.seed, pin_memory=device.type == "cuda")
    best, best_state = -math.inf, None
    for epoch in range(t.epochs):
        model.train()
        if frozen:
            model.backbone.eval()
        loss_sum = correct = cells = 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{t.epochs}", unit="step", disable=not t.progress,
                   leave=False)
        for _ in bar:
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x, from_backbone=from_backbone)
            loss = model.loss(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}; stopping (lower trainer.lr?)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            with torch.no_grad():
                correct += ((model.probabilities(logits) >= 0.5) == (y >= 0.5)).sum().item()
                cells += y.numel()
            bar.set_postfix(loss=f"{loss_sum / (bar.n + 1):.4f}")
        val = evaluate(model, inputs, val_split, cfg, device, from_backbone, amp)
        metrics = {"train_loss": loss_sum / steps, "train_accuracy": correct / cells,
                   **{f"val_{k}": v for k, v in val.items()}}
        tracker.log_metrics(metrics, step=epoch)
        log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        # Higher is better, except for losses.
        score = metrics.get(t.monitor, float("nan")) * (-1 if t.monitor.endswith("loss") else 1)
        if best_state is None or score > best:
            best = score if not math.isnan(score) else best
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model.load_state_dict(best_state)
    test = evaluate(model, inputs, test_split, cfg, device, from_backbone, amp)
    final = {f"test_{k}": v for k, v in test.items()}
    tracker.log_metrics(final, step=t.epochs)
    log_alphas(model.pool, tracker, step=t.epochs)  # AutoPool's learned alphas (no-op for GAP)
    log.info("test: %s", " ".join(f"{k}={v:.4f}" for k, v in final.items()))
    return {**metrics, **final}
