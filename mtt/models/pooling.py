"""Pooling of the VGGish conv map ``(batch, channels, time, freq)`` into ``(batch, channels)``."""

from __future__ import annotations

import json

import torch
from torch import nn


class GlobalAveragePool(nn.Module):
    """Mean over time and frequency: ``(B, C, T, F) -> (B, C)`` (the report's baseline)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class AutoPool(nn.Module):
    """AutoPool (McFee, Salamon & Bello, 2018): adaptive soft-max pooling over time.

    ``(B, C, T, F) -> (B, C)``. The frequency axis is averaged first (it is not a sequence over
    which a tag is present or absent), then each channel ``c`` is pooled over time with weights
    ``softmax(alpha_c * x[..., t])``: ``alpha = 0`` is mean pooling, ``alpha -> +inf`` max
    pooling, ``alpha -> -inf`` min pooling. ``alpha`` has one learnable value per channel,
    initialised to ``alpha_init``. ``constraint='cap'`` clips alpha to ``[-alpha_max, alpha_max]``
    (the paper's constrained CAP); ``alpha_l2 > 0`` adds ``alpha_l2 * sum(alpha**2)`` to the loss
    through ``regularization()`` (the paper's regularized RAP).
    """

    def __init__(self, channels: int, alpha_init: float = 0.0, constraint: str = "none",
                 alpha_max: float = 10.0, alpha_l2: float = 0.0):
        super().__init__()
        if constraint not in ("none", "cap"):
            raise ValueError(f"pool.constraint={constraint!r}: expected 'none' or 'cap'")
        self.alpha = nn.Parameter(torch.full((channels,), float(alpha_init)))
        self.constraint = constraint
        self.alpha_max = alpha_max
        self.alpha_l2 = alpha_l2

    def effective_alpha(self) -> torch.Tensor:
        if self.constraint == "cap":
            return self.alpha.clamp(-self.alpha_max, self.alpha_max)
        return self.alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=3)  # (B, C, T)
        alpha = self.effective_alpha().to(x.dtype)[None, :, None]
        weights = torch.softmax(alpha * x, dim=2)
        return (x * weights).sum(dim=2)

    def regularization(self) -> torch.Tensor:
        return self.alpha_l2 * (self.alpha ** 2).sum()


def build_pool(cfg, channels: int) -> nn.Module:
    """``cfg`` is the ``pool`` config (name gap | autopool)."""
    builders = {
        "gap": lambda: GlobalAveragePool(),
        "autopool": lambda: AutoPool(channels, cfg.alpha_init, cfg.constraint, cfg.alpha_max, cfg.alpha_l2),
    }
    if cfg.name not in builders:
        raise ValueError(f"pool.name={cfg.name!r}: expected one of {sorted(builders)}")
    return builders[cfg.name]()


def alpha_summary(pool: nn.Module) -> dict | None:
    """AutoPool's learned alphas as plain data (None for a pool without alphas).

    ``{"alpha": [...C effective values], "alpha_raw": [...], "constraint", "alpha_max",
    "metrics": {"alpha_mean", "alpha_std", "alpha_min", "alpha_max"}}``; the effective alphas are
    the ones the model uses (clipped under ``cap``).
    """
    if not isinstance(pool, AutoPool):
        return None
    alpha = pool.effective_alpha().detach().double().cpu()
    return {"alpha": alpha.tolist(), "alpha_raw": pool.alpha.detach().double().cpu().tolist(),
            "constraint": pool.constraint, "cap": pool.alpha_max,
            "metrics": {"alpha_mean": alpha.mean().item(), "alpha_std": alpha.std(unbiased=False).item(),
                        "alpha_min": alpha.min().item(), "alpha_max": alpha.max().item()}}


def log_alphas(pool: nn.Module, tracker, step: int) -> None:
    """Log AutoPool's alphas to ``tracker``: ``autopool_alpha.json`` and ``alpha_*`` metrics.

    A no-op for pools without alphas, so the training loop can call it unconditionally.
    """
    summary = alpha_summary(pool)
    if summary is None:
        return
    tracker.log_text(json.dumps(summary, indent=1), "autopool_alpha.json")
    tracker.log_metrics(summary["metrics"], step=step)
