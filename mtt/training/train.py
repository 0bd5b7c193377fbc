"""Training: ``train(cfg, tracker)`` = ``prepare`` -> ``fit`` -> ``test``, no Hydra in here.

Data flows one way: clip index -> feature store -> (frozen-backbone cache) -> pescador stream ->
model -> clip-level evaluation (``mtt.training.evaluate``) -> tracker. The state of a run between those
steps is one ``Run``.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from mtt.config import validate
from mtt.core import distributed
from mtt.data.datasets import index_from_config
from mtt.data.index import ClipIndex
from mtt.features.preprocess import build_feature_store
from mtt.features.store import PatchStore
from mtt.features.streams import EPOCH, ChunkGrid, clip_coverage, epoch_counts, steps_for, steps_per_epoch, train_loader
from mtt.models import Tagger, build_model, reads_backbone_cache
from mtt.models.pooling import call_hook, reads_of
from mtt.models.weights import WeightsInfo, load_state_dict, resolve_weights
from mtt.tracking.checkpoint import (
    TrainState,
    best_files,
    drop_last,
    last_epoch,
    load_best,
    load_last,
    run_dir,
    save_best,
    save_last,
)
from mtt.tracking.records import dataset_inputs, plot_curves, run_note, versions
from mtt.training.backbone_cache import build_backbone_cache, cache_key

# Re-exported: callers (mtt.probe, tests) import the evaluation helpers from here too.
from mtt.training.evaluate import (  # noqa: F401
    Split,
    chunk_grid,
    clip_metrics,
    clip_probabilities,
    log_test,
    monitor_score,
    split_of,
    split_scores,
)
from mtt.training.preflight import Checked
from mtt.training.schedule import Phases

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
    choices = {"fp32": None, "bf16": torch.bfloat16, "auto": torch.bfloat16 if device.type == "cuda" else None}
    if precision not in choices:  # a library caller's value (a composed config was checked)
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


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """``run.steps`` optimiser steps on batches of ``run.stream``; returns train loss and binary
    accuracy. The model runs through ``run.forward`` (its DistributedDataParallel wrapper under
    torchrun, which averages the gradients across ranks).

    Raises ``FloatingPointError`` as soon as the loss is NaN or infinite.
    """
    t, p, model = run.cfg.trainer, run.p, run.p.model
    model.train()
    if p.frozen:
        model.backbone.eval()
    loss_sum = correct = cells = 0.0
    draws = np.zeros(len(run.train_clips), dtype=np.int64)  # this epoch's draws of each training clip
    # Epochs are numbered from 0 everywhere: this bar, the log lines, MLflow's steps, best_epoch.
    bar = tqdm(range(run.steps), desc=f"epoch {epoch}/{t.epochs - 1}", unit="step", disable=not t.progress, leave=False)
    for step in bar:
        x, y, clips = next(run.stream)
        draws += np.bincount(clips.numpy(), minlength=len(draws))
        x, y = x.to(p.device, non_blocking=True), y.to(p.device, non_blocking=True)
        with torch.autocast(p.device.type, dtype=p.amp, enabled=p.amp is not None):
            logits = run.forward(x, from_backbone=p.from_backbone)
        loss = model.loss(logits, y)
        if not torch.isfinite(loss):
            if not torch.isfinite(x).all():  # the data, not the optimisation
                raise nonfinite_inputs(p, epoch, step)
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {epoch} step {step}; stopping (trainer.lr={t.lr} too high?)"
            )
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        call_hook(model.pool, "after_step")  # e.g. AutoPool's cap: back into the interval
        loss_sum += loss.item()
        with torch.no_grad():
            correct += ((model.probabilities(logits) >= 0.5) == (y >= 0.5)).sum().item()
            cells += y.numel()
        bar.set_postfix(loss=f"{loss_sum / (step + 1):.4f}")  # tqdm syncs bar.n lazily
    return {
        "train_loss": loss_sum / run.steps,
        "train_accuracy": correct / cells,
        "clips_seen": int((draws > 0).sum()),
        "draws": int(draws.sum()),
    }


_NAMED = 5  # clips a non-finite-input error names


def nonfinite_inputs(p: Prepared, epoch: int, step: int) -> FloatingPointError:
    """The error for a batch holding NaN or infinite inputs: which stored clips hold them (the
    feature store first, then the backbone cache computed from it), with their files, and how to
    rebuild the store. Read only when it happens (a pass over the training clips)."""
    where = f"non-finite input features (NaN or inf) at epoch {epoch} step {step}, not the learning rate"
    rows = {int(c): i for i, c in enumerate(p.index.clip_ids)}
    for store in dict.fromkeys([p.store, p.inputs]):
        bad: list[int] = []
        for c in p.train.clip_ids:
            if int(c) in store and not np.isfinite(store.get(c)).all():
                bad.append(int(c))
                if len(bad) == _NAMED:
                    break
        if bad:
            named = ", ".join(f"{c} ({p.index.audio_path(rows[c])})" for c in bad)
            source = "the audio (python -m mtt.preprocess)" if store is p.store else "the features by the next run"
            more = f" (the first {_NAMED})" if len(bad) == _NAMED else ""
            return FloatingPointError(
                f"{where}: {store.path} holds them for clip(s){more} {named}; delete it to have it rebuilt from {source}"
            )
    return FloatingPointError(f"{where}: the stored training clips hold none, so the batch was damaged in memory")


def patience_spent(state: TrainState, patience: int | None) -> bool:
    """Early stopping: ``patience`` epochs have passed since the best one (never with None)."""
    return patience is not None and state.best_epoch >= 0 and state.epoch - state.best_epoch >= patience


def skip_batches(stream, n: int) -> None:
    """Draw and drop ``n`` batches: a resumed run's stream continues where the killed one was."""
    for _ in range(n):
        next(stream)


def log_records(
    cfg, tracker, derived: dict, weights, store: PatchStore, splits: dict[str, Split], kind: str = "trained tagger"
) -> None:
    """Everything a reader needs to trust the run later (params, library versions, config.yaml,
    the data of each split as MLflow dataset inputs, the run page's note; the code version is
    tagged when the run is created, ``mtt.run.tracked``)."""
    tracker.log_params(OmegaConf.to_container(cfg, resolve=True))
    tracker.log_params({f"derived.{k}": v for k, v in derived.items()})
    tracker.set_tags(
        {
            "backbone_pretrained": weights.path is not None,
            "weights_source": weights.source,
            "weights_sha256": weights.sha256 or "",
            "feature_store": store.fingerprint,
            "seed": cfg.trainer.seed,
            "device": derived["device"],
            "steps_policy": cfg.steps.policy,
            "steps_per_epoch": derived["steps_per_epoch"],
            "mlflow.note.content": run_note(cfg, derived, kind),
            **versions(),
        }
    )
    tracker.log_inputs(dataset_inputs(cfg.data, store.fingerprint, {k: s.clip_ids for k, s in splits.items()}))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


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
    grid: ChunkGrid  # where the inputs' rows lie in their clips (epoch offsets, even evaluation chunks)


def prepare(
    cfg, d: distributed.Dist = distributed.Dist(), cache: bool | None = None, checked: Checked | None = None
) -> Prepared:
    """Seed, resolve the weights, build (or open) the dataset, the feature store, the model and,
    for a frozen backbone, the cache of its outputs; split the clips.

    ``cache`` forces the backbone cache on (the linear probe reads frozen outputs even when the
    config fine-tunes) or off; by default it follows ``backbone.freeze``/``finetune_last``/``cache``.
    ``checked``: the clip index and the resolved weights when the caller has them already
    (``mtt.training.preflight``).
    """
    validate(cfg)  # library callers too: a bad value fails here, not deep in the loop
    t = cfg.trainer
    seed_everything(t.seed, t.deterministic)
    device = distributed.device_for(d, resolve_device(t.device))
    amp = autocast_dtype(t.precision, device)
    frozen = cfg.backbone.freeze and cfg.backbone.finetune_last == 0
    from_backbone = reads_backbone_cache(cfg.backbone) if cache is None else cache
    with distributed.main_first(d):  # rank 0 downloads and builds, the others then find it all
        # The weights first: an offline `audioset` run fails here, before any data work.
        if checked is None:
            weights = resolve_weights(cfg.backbone.weights, cfg.backbone.url, cfg.backbone.hub_dir)
            index = index_from_config(cfg.data, progress=t.progress)
        else:
            weights, index = checked.weights, checked.index
        store = build_feature_store(index, cfg.features, progress=t.progress)
        state_dict = load_state_dict(weights.path) if weights.path is not None else None
        model = build_model(cfg, len(index.tags), state_dict).to(device)
        if t.channels_last:  # NHWC convolutions: faster on CUDA tensor cores, no slower on CPU
            model.backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs lack it
        inputs = store
        if from_backbone:
            key = cache_key(
                store,
                weights.sha256,
                cfg.backbone,
                model.backbone,
                device=device,
                autocast_dtype=amp,
                reads=reads_of(model.pool),
            )
            inputs = build_backbone_cache(
                store, model.encode, key, f"{cfg.paths.cache}/backbone", device, progress=t.progress, autocast_dtype=amp
            )
    splits = [split_of(index, store, s) for s in ("train", "valid", "test")]
    if len(splits[0].clip_ids) == 0:
        raise RuntimeError(f"no training clips with features under {cfg.data.root}")
    valid_is_test = np.array_equal(index.subset("valid"), index.subset("test"))
    grid = chunk_grid(cfg, store, from_backbone)
    fields = (device, amp, weights, index, store, model, inputs, from_backbone, frozen, valid_is_test)
    return Prepared(*fields, train=splits[0], valid=splits[1], test=splits[2], grid=grid)


@dataclass
class Run:
    """The state of one training run between ``prepare`` and ``test``: what ``fit`` steps and
    checkpoints, in one place instead of a dozen parameters."""

    cfg: Any
    d: distributed.Dist
    p: Prepared
    optimizer: torch.optim.Optimizer
    scheduler: Any  # ReduceLROnPlateau, or None
    stream: Iterator  # training batches (x, y), endless
    forward: torch.nn.Module  # what runs the model: itself, or its DDP wrapper under torchrun
    steps: int  # optimiser steps per epoch
    folder: Path  # checkpoints
    state: TrainState  # where the run is (resumed from the last checkpoint, or fresh)
    selection: str  # best_val: test the best validation epoch; last: the last one
    patience: int | None  # early stopping, None = never
    phases: Phases  # the optimiser of each epoch (trainer.optimizer, trainer.phases: mtt.training.schedule)
    params: list  # the trained parameters, for an optimiser a phase builds
    train_clips: np.ndarray  # this rank's training clips, which the stream's clip positions index

    def scores(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """Clip probabilities ``(clips, n_tags)`` of ``split`` and each clip's mean chunk BCE
        ``(clips,)`` (``mtt.training.evaluate.clip_scores``; across the ranks under torchrun)."""
        p = self.p
        return split_scores(self.d, p.model, p.inputs, split, self.cfg, p.device, p.from_backbone, p.amp, p.grid)

    def evaluate(self, split: Split) -> np.ndarray:
        """Clip probabilities ``(clips, n_tags)`` of ``split``."""
        return self.scores(split)[0]

    def validate(self) -> dict[str, float]:
        """The validation metrics: ``clip_metrics`` of the clip probabilities, and ``chunk_loss``
        (Won et al.'s criterion: the BCE of every evaluated chunk, averaged per clip, then over
        the clips; each clip has as many chunks under ``eval.patches_per_clip``)."""
        probs, chunk_losses = self.scores(self.p.valid)
        return {**clip_metrics(self.p.valid.labels, probs), "chunk_loss": float(np.mean(chunk_losses))}


def train(cfg, tracker, d: distributed.Dist = distributed.Dist(), checked: Checked | None = None) -> dict[str, float]:
    """Train the tagger of ``cfg`` and log everything to ``tracker``; returns the final metrics.

    prepare (data, features, model) -> fit (epochs, checkpoints, validation) -> test (the
    selected epoch's model on the test split). With ``tracker.resumed`` the training continues
    from the last checkpoint of that run. ``d`` is this process's place in a torchrun job (see
    ``mtt.core.distributed``); by default one process. ``checked``: what ``mtt.training.preflight`` has read
    and resolved already.
    """
    run = start(cfg, tracker, prepare(cfg, d, checked=checked), d)
    fit(run, tracker)
    return test(run, tracker)


def start(cfg, tracker, p: Prepared, d: distributed.Dist) -> Run:
    """The run's records (a fresh run), optimiser, schedule, checkpoint folder and stream; a
    resumed run's state from its last checkpoint, with its stream where the killed one was."""
    t = cfg.trainer
    counts = epoch_counts(p.train.declared, p.train.clip_ids, p.store, cfg.stream.patches_per_clip)
    steps = steps_for(cfg.steps, t.batch_size, counts.declared, counts.cached, counts.patches)
    mine = distributed.shard(d, len(p.train.clip_ids))  # this rank's training clips
    shards = distributed.gather(d, p.train.clip_ids[mine].tolist())
    derived = {
        "steps_per_epoch": steps,
        "train_clips": len(p.train.clip_ids),
        "train_clips_declared": p.train.declared,
        "train_patches": counts.patches,
        "val_clips": len(p.valid.clip_ids),
        "test_clips": len(p.test.clip_ids),
        "n_tags": len(p.index.tags),
        "device": str(p.device),
        "backbone_cached": p.from_backbone,
        "world_size": d.world,
        "truncated_clips": len(p.store.truncated),
    }
    if not tracker.resumed:  # a resumed run has its records already (MLflow params are write-once)
        log_records(cfg, tracker, derived, p.weights, p.store, {"train": p.train, "valid": p.valid, "test": p.test})
        if d.active:
            tracker.log_text(json.dumps({str(r): ids for r, ids in enumerate(shards)}), "ddp_shards.json")

    # Where the split has no validation set of its own (the report split validates on the test
    # clips), no epoch is chosen on it: the last epoch is the model, without early stopping or
    # a schedule driven by the test set.
    selection = "last" if p.valid_is_test else "best_val"
    patience, lr_schedule = (None, "none") if p.valid_is_test else (t.patience, t.lr_schedule)
    if p.valid_is_test and (t.patience is not None or t.lr_schedule != "none"):
        log.warning(
            "data.split=%s has no validation split (valid == test): ignoring trainer.patience=%s and "
            "trainer.lr_schedule=%s, and testing the last epoch",
            cfg.data.split,
            t.patience,
            t.lr_schedule,
        )
    if not tracker.resumed:
        tracker.set_tags({"selection": selection})
    model = p.model
    if model.pretrained_head:  # a head from backbone.weights keeps its trained bias
        log.info("head.bias_init=%s not applied: the output layer comes from backbone.weights", cfg.head.bias_init)
    elif cfg.head.bias_init == "prior":  # from the training labels, before any step
        model.init_output_bias(p.train.labels)
    elif cfg.head.bias_init == "zero":  # Keras' zeros (the report's); "default" keeps PyTorch's init
        model.zero_output_bias()
    params = [w for w in model.parameters() if w.requires_grad]
    folder = run_dir(cfg.paths.cache, tracker.run_id)
    phases = Phases(t, lr_schedule)  # trainer.optimizer, and trainer.phases (mtt.training.schedule)
    optimizer = phases.optimizer_at(params, last_epoch(folder) if tracker.resumed else 0)
    scheduler = None
    if lr_schedule == "plateau":
        # threshold 0: "better" means what it means for early stopping and the best checkpoint
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=t.lr_factor, patience=t.lr_patience, threshold=0.0
        )
    state = TrainState()
    if tracker.resumed:
        state = load_last(folder, model, optimizer, scheduler)
        # The killed process may have died between its checkpoint and its metrics: log them again
        # with their original timestamp, which MLflow stores once.
        tracker.log_metrics(state.last_metrics, step=state.epoch, timestamp=state.last_timestamp)
        log.info("resuming run %s after epoch %d", tracker.run_id, state.epoch)
    stream = train_loader(
        p.inputs,
        p.train.clip_ids[mine],
        p.train.labels[mine],
        cfg.stream,
        distributed.local_batch(d, t.batch_size),
        t.seed,
        pin_memory=p.device.type == "cuda",
        pass_steps=steps_per_epoch(EPOCH, t.batch_size, 0, len(p.train.clip_ids), 0),  # the whole set's
        grid=p.grid,
        clips=True,
    )
    skip_batches(stream, steps * (state.epoch + 1))
    return Run(
        cfg,
        d,
        p,
        optimizer,
        scheduler,
        stream,
        distributed.wrap(d, model, p.device),
        steps,
        folder,
        state,
        selection,
        patience,
        phases,
        params,
        p.train.clip_ids[mine],
    )


def fit(run: Run, tracker) -> None:
    """Train epoch after epoch until ``trainer.epochs`` or early stopping; after each, validate,
    checkpoint (the last state, and the best model) and log the epoch's metrics."""
    cfg, d, p, state = run.cfg, run.d, run.p, run.state
    t = cfg.trainer
    meta = {"monitor": t.monitor, "tags": list(p.index.tags), "config": OmegaConf.to_container(cfg, resolve=True)}

    def reload_best() -> None:  # a phase of trainer.phases that starts from the best checkpoint
        distributed.barrier(d)  # rank 0 saved it
        p.model.load_state_dict(load_best(run.folder)[0])

    epoch = state.epoch + 1
    while epoch < t.epochs and not patience_spent(state, run.patience):
        run.optimizer = run.phases.enter(epoch, run.optimizer, run.params, reload_best)
        ranks = distributed.gather(d, train_epoch(run, epoch))
        distributed.sync_buffers(d, p.model)  # every rank evaluates (and rank 0 saves) one model
        # Every rank ran the same number of equal-sized steps: the mean of means is the mean.
        metrics = {k: float(np.mean([m[k] for m in ranks])) for k in ("train_loss", "train_accuracy")}
        # The ranks' clips are disjoint: the clips seen are the sum of each rank's.
        seen, draws = (sum(m[k] for m in ranks) for k in ("clips_seen", "draws"))
        metrics.update(clip_coverage(seen, draws, len(p.train.clip_ids)))
        metrics.update({f"val_{k}": v for k, v in run.validate().items()})
        metrics["lr"] = run.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        score = monitor_score(metrics, t.monitor)
        improved = run.selection == "last" or state.best_epoch < 0 or score > state.best_score
        if run.scheduler is not None:
            run.scheduler.step(score)
        if improved:
            state.best_score, state.best_epoch = score, epoch
        state.epoch, state.last_metrics, state.last_timestamp = epoch, metrics, int(time.time() * 1000)
        for k, v in metrics.items():
            state.history.setdefault(k, []).append(v)
        if d.main:  # one writer; checkpoint first, then the metrics: a kill in between is healed on resume
            if improved:
                save_best(run.folder, p.model, {**meta, "epoch": epoch, "value": metrics[t.monitor]})
            save_last(run.folder, p.model, run.optimizer, state, run.scheduler)
        tracker.log_metrics(metrics, step=epoch, timestamp=state.last_timestamp)
        epoch += 1
    if patience_spent(state, run.patience):
        log.info(
            "early stop after epoch %d: %s has not improved for %d epochs (best epoch %d)",
            state.epoch,
            t.monitor,
            run.patience,
            state.best_epoch,
        )


def test(run: Run, tracker) -> dict[str, float]:
    """Load the selected epoch's model, score it on the test split and log it; returns the run's
    final metrics (the selected epoch's, the test ones and their intervals)."""
    d, p, state = run.d, run.p, run.state
    distributed.barrier(d)  # rank 0's best checkpoint is on disk for every rank
    best, _ = load_best(run.folder)
    p.model.load_state_dict(best)
    for file in best_files(run.folder):  # with their checksum sidecars, which mtt.tag checks
        tracker.log_artifact(file, "checkpoint")
    if d.main:  # the tagger as an MLflow model (model/): what mtt.tag and `mlflow models serve` load
        from mtt.serving.pyfunc import log_tagger

        log_tagger(tracker, run.folder, p.from_backbone, reads_of(p.model.pool))
    probs = run.evaluate(p.test)
    # The test metrics are those of the selected epoch's model, logged after the last epoch, with
    # that epoch's validation metrics beside them (selected_val_*: what a comparison may rank by).
    end = state.epoch + 1
    selected = {f"selected_{k}": v[state.best_epoch] for k, v in state.history.items() if k.startswith("val_")}
    final = log_test(
        tracker,
        p.index.tags,
        p.test,
        probs,
        step=end,
        seed=run.cfg.trainer.seed,
        extra={"best_epoch": state.best_epoch, "epochs_trained": end, **selected},
    )
    call_hook(p.model.pool, "log_end", tracker, step=end)  # e.g. AutoPool's learned alphas
    log.info(
        "test (%s epoch %d): %s",
        run.selection,
        state.best_epoch,
        " ".join(f"{k}={v:.4f}" for k, v in final.items() if "_ci" not in k),
    )
    log_plots(tracker, state)
    distributed.barrier(d)
    if d.main:
        drop_last(run.folder)
    best_metrics = {k: v[state.best_epoch] for k, v in state.history.items()}
    return {**best_metrics, **final, **selected, "best_epoch": state.best_epoch, "epochs_trained": end}
