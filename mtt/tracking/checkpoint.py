"""Checkpoints: the best epoch (for ``mtt.tag``) and the last training state (for resume).

Two kinds, both written atomically (temp file in the same folder, then ``os.replace``) into a
local run folder ``<paths.cache>/checkpoints/<run_id>/``, so a crash never leaves a truncated
file that a later resume would read as valid:

- ``best.safetensors`` (model state dict) + ``best.json`` (epoch, monitored metric and value,
  tag names, resolved config): the model of the best validation epoch, also logged to MLflow.
- ``last.pt``: everything an interrupted training needs to continue exactly where an
  uninterrupted one would be: model and optimiser state dicts, the epoch just finished, the
  torch / numpy / python RNG states, the best score so far and the metric history. The training
  stream needs no state of its own: it is a pure function of the seed, so a resume replays it
  (draws and drops the batches of the finished epochs; cheap next to training on them). It is
  deleted when the run finishes (a full-width model makes it ~0.3 GB).
  Written with ``torch.save`` of plain tensors, numbers and strings, read back with
  ``torch.load(weights_only=True)`` (no pickle of arbitrary objects).

Each file is written with a checksum sidecar (``<name>.sha256``: size and SHA-256, see
``mtt.core.fs.atomic_replace(checksum=True)``) and checked when it is read: a corrupt, truncated or
missing ``last.pt`` is refused in one line naming it (``trainer.resume=false`` or deleting it
starts over), never resumed; a corrupt best checkpoint is refused likewise. A ``last.pt`` without
a sidecar (written by an older mtt) is refused too; a best checkpoint without one (an older run's
artifacts, which ``mtt.tag`` may still read) is loaded with a warning that it is unchecked.

The run's tracking journal (``journal.*``, see ``mtt.tracking.journal``) lives in the same folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mtt.core.fs import CorruptFileError, atomic_replace, sidecar, verify_checksummed

log = logging.getLogger(__name__)

BEST_WEIGHTS = "best.safetensors"
BEST_META = "best.json"
LAST = "last.pt"
# What to do about a bad checkpoint (CorruptFileError's remedy): nothing rebuilds one but training.
LAST_REMEDY = "cannot resume from it: run with trainer.resume=false to start over, or delete it"
BEST_REMEDY = "the best model cannot be trusted: train the run again (trainer.resume=false)"


def run_dir(cache: str | Path, run_id: str) -> Path:
    """The local checkpoint folder of one MLflow run."""
    return Path(cache) / "checkpoints" / run_id


def save_best(folder: Path, model: torch.nn.Module, meta: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write the model weights (safetensors) and ``meta`` (JSON), each with its checksum sidecar;
    returns both paths."""
    # safetensors refuses shared or non-contiguous storage: save contiguous copies.
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights, meta_path = folder / BEST_WEIGHTS, folder / BEST_META
    atomic_replace(weights, lambda p: save_file(state, str(p)), checksum=True)
    atomic_replace(meta_path, lambda p: p.write_text(json.dumps(dict(meta), indent=2, default=str)), checksum=True)
    return weights, meta_path


def best_files(folder: Path) -> list[Path]:
    """The files of a best checkpoint, sidecars included (what a run logs as ``checkpoint/``)."""
    return [f for name in (BEST_WEIGHTS, BEST_META) for f in (folder / name, sidecar(folder / name)) if f.is_file()]


def load_best(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The best model's state dict and its metadata, checked against their sidecars;
    ``FileNotFoundError`` naming what is missing, ``CorruptFileError`` for a bad file."""
    folder = Path(folder)
    for name in (BEST_WEIGHTS, BEST_META):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: no best checkpoint")
    for name in (BEST_WEIGHTS, BEST_META):
        if not verify_checksummed(folder / name, BEST_REMEDY):
            log.warning("%s: no checksum (written by an older mtt): loaded unchecked", folder / name)
    try:
        return load_file(str(folder / BEST_WEIGHTS)), json.loads((folder / BEST_META).read_text())
    except Exception as exc:  # safetensors and json raise their own types for a damaged file
        raise CorruptFileError(folder, f"unreadable best checkpoint ({exc})", BEST_REMEDY) from None


def rng_state() -> dict[str, Any]:
    """torch, numpy and python RNG states as tensors / ints (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # type: ignore[attr-defined]
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


@dataclass
class TrainState:
    """Where a training is after ``epoch`` (``-1``: nothing done yet)."""

    epoch: int = -1
    best_score: float = float("-inf")
    best_epoch: int = -1
    # metric name -> one value per finished epoch (for the end-of-run plots)
    history: dict[str, list[float]] = field(default_factory=dict)
    # the last epoch's metrics and their MLflow timestamp, re-logged idempotently on resume
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_timestamp: int = 0


def save_last(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, scheduler=None
) -> Path:
    """Write the full training state after ``state.epoch`` to ``folder/last.pt`` (with the
    learning-rate scheduler's state when there is one)."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "epoch": state.epoch,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "last_metrics": state.last_metrics,
        "last_timestamp": state.last_timestamp,
    }
    path = folder / LAST
    atomic_replace(path, lambda p: torch.save(payload, p), checksum=True)
    return path


def drop_last(folder: Path) -> None:
    """Delete the resume state of a finished run (nothing is left to resume)."""
    (folder / LAST).unlink(missing_ok=True)
    sidecar(folder / LAST).unlink(missing_ok=True)


def has_last(folder: str | Path) -> bool:
    return (Path(folder) / LAST).is_file()


def verify_last(folder: str | Path) -> None:
    """``CorruptFileError`` unless ``folder/last.pt`` matches its sidecar: missing, truncated,
    changed, or written without one (by an older mtt) are all refused, never resumed."""
    path = Path(folder) / LAST
    if not verify_checksummed(path, LAST_REMEDY):
        raise CorruptFileError(path, "no checksum (written by an older mtt): cannot be checked", LAST_REMEDY)


def _read_last(folder: Path, mmap: bool = False) -> dict:
    verify_last(folder)
    try:
        return torch.load(folder / LAST, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CorruptFileError(folder / LAST, f"unreadable ({str(exc).splitlines()[0]})", LAST_REMEDY) from None


def last_epoch(folder: Path) -> int:
    """The epoch ``folder/last.pt`` was saved after, without reading its tensors (memory-mapped):
    a resume builds the optimiser that epoch trained with before loading its state."""
    return int(_read_last(folder, mmap=True)["epoch"])


def load_last(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> TrainState:
    """Restore model, optimiser, scheduler and RNG states from ``folder/last.pt`` (checked against
    its sidecar first); returns the train state."""
    payload = _read_last(folder)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler"):
        scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return TrainState(
        epoch=payload["epoch"],
        best_score=payload["best_score"],
        best_epoch=payload["best_epoch"],
        history={k: list(v) for k, v in payload["history"].items()},
        last_metrics=dict(payload["last_metrics"]),
        last_timestamp=payload["last_timestamp"],
    )


# Keys that do not change what a run computes, so a resume may differ in them.
_NOT_HASHED = ("trainer.resume", "trainer.progress")


# Keys that seeds of one variant differ in, or that say nothing about what is computed: runs that
# differ only in these form one group for ``mtt.compare`` (``mtt.group``).
NOT_GROUPED = (*_NOT_HASHED, "trainer.seed", "tracking", "paths")


def config_hash(cfg, ignore: tuple[str, ...] = _NOT_HASHED, salt: str = "") -> str:
    """Short SHA-256 of the resolved config minus ``ignore`` (``section`` or ``section.key``):
    with the default, which runs a resume may continue; ``salt`` adds what the config does not
    say (the kind of job)."""
    from omegaconf import OmegaConf

    flat: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]  # a config: a dict
    for key in ignore:
        section, _, name = key.partition(".")
        if name:
            flat.get(section, {}).pop(name, None)
        else:
            flat.pop(section, None)
    blob = json.dumps(flat, sort_keys=True, default=str) + salt
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resume_choice(spec) -> str | None:
    """``trainer.resume`` -> None (new run), ``"latest"`` or a run id."""
    if spec is None or str(spec).lower() in ("false", "none", "null", ""):
        return None
    return "latest" if str(spec).lower() == "true" else str(spec)
