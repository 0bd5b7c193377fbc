"""Pooling of a backbone's map ``(batch, channels, time, freq)`` into ``(batch, channels)``, by
``pool.name`` (the entries of ``mtt.components.POOLS``, registered at the end of this module)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mtt.components import POOLS, PoolConfig, Spec, finite, number, one_of, setting


class GlobalAveragePool(nn.Module):
    """Mean over time and frequency: ``(B, C, T, F) -> (B, C)`` (the report's baseline)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GlobalMaxPool(nn.Module):
    """Max over time and frequency: ``(B, C, T, F) -> (B, C)`` (Won et al. 2020's short-chunk
    CNNs, whose frequency axis is 1 by then: a max over time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


class AutoPool(nn.Module):
    """AutoPool (McFee, Salamon & Bello, 2018): adaptive soft-max pooling over time.

    ``(B, C, T, F) -> (B, C)``. The frequency axis is averaged first (it is not a sequence over
    which a tag is present or absent), then each channel ``c`` is pooled over time with weights
    ``softmax(alpha_c * x[..., t])``: ``alpha = 0`` is mean pooling, ``alpha -> +inf`` max
    pooling, ``alpha -> -inf`` min pooling. ``alpha`` has one learnable value per channel,
    initialised to ``alpha_init``. ``constraint='cap'`` keeps alpha in ``[-alpha_max, alpha_max]``
    (the paper's constrained CAP) by projection: the forward pass uses the parameter as it is, so
    its gradient is never cut off, and ``project_()``, called after every optimiser step
    (``project_constraints``), moves it back into the interval. ``alpha_l2 > 0`` adds
    ``alpha_l2 * sum(alpha**2)`` to the loss through ``regularization()`` (the paper's RAP).
    """

    def __init__(
        self,
        channels: int,
        alpha_init: float = 0.0,
        constraint: str = "none",
        alpha_max: float = 10.0,
        alpha_l2: float = 0.0,
    ):
        super().__init__()
        if constraint not in ("none", "cap"):
            raise ValueError(f"pool.constraint={constraint!r}: expected 'none' or 'cap'")
        self.alpha = nn.Parameter(torch.full((channels,), float(alpha_init)))
        self.constraint = constraint
        self.alpha_max = alpha_max
        self.alpha_l2 = alpha_l2
        self.project_()  # an alpha_init outside the cap starts on its edge

    @torch.no_grad()
    def project_(self) -> None:
        """Under ``cap``, clip the parameter into ``[-alpha_max, alpha_max]`` in place."""
        if self.constraint == "cap":
            self.alpha.clamp_(-self.alpha_max, self.alpha_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=3)  # (B, C, T)
        alpha = self.alpha.to(x.dtype)[None, :, None]
        weights = torch.softmax(alpha * x, dim=2)
        return (x * weights).sum(dim=2)

    def regularization(self) -> torch.Tensor:
        return self.alpha_l2 * (self.alpha**2).sum()


def project_constraints(model: nn.Module) -> None:
    """Project every constrained parameter of ``model`` back into its set; call it after each
    ``optimizer.step()``. A no-op for models without constraints (GAP, AutoPool without cap)."""
    for module in model.modules():
        if isinstance(module, AutoPool):
            module.project_()


@dataclass(frozen=True)
class PoolSpec(Spec):
    """A pool: ``build(pool_cfg, channels) -> nn.Module`` mapping ``(B, C, T, F)`` to ``(B, C)``."""

    build: Callable


def build_pool(cfg, channels: int) -> nn.Module:
    """``cfg`` is the ``pool`` config: the entry it names builds the module."""
    return POOLS.get(cfg.name, cfg.get("module")).build(cfg, channels)


def alpha_summary(pool: nn.Module) -> dict | None:
    """AutoPool's learned alphas as plain data (None for a pool without alphas).

    ``{"alpha": [...C values], "constraint", "cap", "metrics": {"alpha_mean", "alpha_std",
    "alpha_min", "alpha_max"}}``; under ``cap`` the values lie within it (projected each step).
    """
    if not isinstance(pool, AutoPool):
        return None
    alpha = pool.alpha.detach().double().cpu()
    return {
        "alpha": alpha.tolist(),
        "constraint": pool.constraint,
        "cap": pool.alpha_max,
        "metrics": {
            "alpha_mean": alpha.mean().item(),
            "alpha_std": alpha.std(unbiased=False).item(),
            "alpha_min": alpha.min().item(),
            "alpha_max": alpha.max().item(),
        },
    }


def log_alphas(pool: nn.Module, tracker, step: int) -> None:
    """Log AutoPool's alphas to ``tracker``: ``autopool_alpha.json`` and ``alpha_*`` metrics.

    A no-op for pools without alphas, so the training loop can call it unconditionally.
    """
    summary = alpha_summary(pool)
    if summary is None:
        return
    tracker.log_text(json.dumps(summary, indent=1), "autopool_alpha.json")
    tracker.log_metrics(summary["metrics"], step=step)


# The pools: each one's settings, its rules beside them, and its builder.


@dataclass
class GapConfig(PoolConfig):
    """``pool=gap``: global average pooling over time and frequency (the report's baseline)."""

    name: str = "gap"


@dataclass
class MaxConfig(PoolConfig):
    """``pool=max``: global max pooling over time and frequency (Won et al. 2020's short-chunk CNNs)."""

    name: str = "max"


@dataclass
class AutoPoolConfig(PoolConfig):
    """``pool=autopool``: AutoPool (McFee, Salamon & Bello 2018), learnable soft-max pooling over
    time, one alpha per channel; alpha=0 starts as mean pooling."""

    name: str = "autopool"
    alpha_init: float = setting(0.0, finite())  # 0 = mean pooling
    # none | cap (alpha projected into [-alpha_max, alpha_max] after each step)
    constraint: str = setting("none", one_of("none", "cap"))
    alpha_max: float = setting(10.0, number(0, lo_open=True))
    alpha_l2: float = setting(0.0, number(0))  # L2 penalty on alpha (RAP)


POOLS.register(PoolSpec("gap", config=GapConfig, build=lambda cfg, channels: GlobalAveragePool()))
POOLS.register(
    PoolSpec(
        "autopool",
        config=AutoPoolConfig,
        build=lambda cfg, channels: AutoPool(channels, cfg.alpha_init, cfg.constraint, cfg.alpha_max, cfg.alpha_l2),
    )
)
POOLS.register(PoolSpec("max", config=MaxConfig, build=lambda cfg, channels: GlobalMaxPool()))
