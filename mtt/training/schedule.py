"""The optimiser of a run and, with ``trainer.lr_schedule=phases``, when it changes.

``trainer.optimizer`` (adam | sgd, with ``momentum`` / ``nesterov``), ``lr`` and ``weight_decay``
give the first optimiser. ``trainer.phases`` lists from which epoch (counting from 0, as the logs)
another optimiser or learning rate takes over, optionally starting from the best checkpoint so far:
Won et al. 2020's recipe (experiments/anchors/shortchunk_res.yaml) is Adam 1e-4, then at epoch 80
SGD 1e-3 with Nesterov momentum, 1e-4 at 100 and 1e-5 at 120, each time from the best model.

A switch happens at the start of its epoch; a resumed run rebuilds the optimiser of the phase its
last finished epoch trained in (``optimizer_at``) before loading that optimiser's saved state, so
the state always meets an optimiser of its own kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def make_optimizer(kind: str, params, lr: float, t) -> torch.optim.Optimizer:
    """``kind`` (adam | sgd) over ``params`` at ``lr``, with ``t``'s (the trainer config's) weight
    decay, momentum and Nesterov setting."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    raise ValueError(f"trainer.optimizer={kind!r}: expected adam or sgd")


class Phases:
    """``trainer.phases`` of the trainer config ``t``; none unless ``lr_schedule`` (the schedule
    the run follows: ``t.lr_schedule``, or none where the split has no validation set) is phases."""

    def __init__(self, t, lr_schedule: str | None = None):
        self.t = t
        self.phases = list(t.phases) if (lr_schedule or t.lr_schedule) == "phases" else []

    def setting_at(self, epoch: int) -> tuple[str, float]:
        """(optimiser kind, lr) that epoch ``epoch`` trains with."""
        kind, lr = self.t.optimizer, self.t.lr
        for p in self.phases:
            if p.epoch <= epoch:
                kind, lr = p.optimizer or kind, p.lr
        return kind, lr

    def optimizer_at(self, params: list, epoch: int) -> torch.optim.Optimizer:
        """The optimiser of the phase epoch ``epoch`` is in (0: a new run; a resumed run: its
        last finished epoch)."""
        kind, lr = self.setting_at(max(epoch, 0))
        return make_optimizer(kind, params, lr, self.t)

    def enter(
        self, epoch: int, optimizer: torch.optim.Optimizer, params: list, reload_best: Callable[[], None]
    ) -> torch.optim.Optimizer:
        """Called before epoch ``epoch`` trains: at a phase's first epoch, reload the best model
        if the phase says so, then a new optimiser (another kind) or the new lr (same kind).
        Returns the optimiser to train with."""
        starting = [p for p in self.phases if p.epoch == epoch]
        if not starting:
            return optimizer
        phase = starting[-1]
        if phase.reload_best:
            reload_best()
        kind, lr = self.setting_at(epoch)
        before, _ = self.setting_at(epoch - 1)
        log.info(
            "epoch %d: phase %s lr=%g%s", epoch, kind, lr, " from the best checkpoint" if phase.reload_best else ""
        )
        if kind != before:
            return make_optimizer(kind, params, lr, self.t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return optimizer
