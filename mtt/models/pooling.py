"""Pooling of a backbone's map ``(batch, channels, time, freq)`` into ``(batch, channels)``.

A new pool is one class and its entry in ``mtt.core.components.POOLS`` (registered at the end of this
module, with its config dataclass). The class declares what it reads:

- ``reads``: ``FREQ_MEAN`` (the map's mean over frequency, ``(C, T, 1)``) or ``MAP`` (the whole
  ``(C, T, F)`` map; the default of a class that declares nothing). The frozen-backbone cache
  stores only that (``mtt.training.backbone_cache``, ``reduce_map``): VGGish's ``(512, 6, 4)`` map is
  24,576 bytes per patch in float16, its frequency mean a quarter of it. A ``FREQ_MEAN`` pool's
  forward takes either the whole map (a live backbone) or the reduced one (the cache) and gives
  the same output on both (tests/test_heads.py checks every registered pool).

and may define hooks, which the trainer calls on any pool that has them (``call_hook``), so that
the training loop knows no pool by name:

- ``regularization() -> scalar tensor``: added to the loss (``mtt.models.Tagger.loss``);
- ``after_step()``: after every optimiser step (AutoPool's cap projection);
- ``log_end(tracker, step)``: once at the end of a run, after the test metrics (AutoPool logs
  its learned alphas).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mtt.core.components import POOLS, PoolConfig, Spec, finite, number, one_of, setting

MAP = "map"  # the whole (C, T, F) map
FREQ_MEAN = "freq_mean"  # its mean over frequency, kept as a frequency axis of 1: (C, T, 1)
READS = (MAP, FREQ_MEAN)
HOOKS = ("regularization", "after_step", "log_end")


def reduce_map(fmap: torch.Tensor, reads: str) -> torch.Tensor:
    """What a pool that ``reads`` this reads of ``fmap`` ``(B, C, T, F)``: the map itself
    (``MAP``) or ``(B, C, T, 1)``, its mean over frequency (``FREQ_MEAN``)."""
    if reads == MAP:
        return fmap
    if reads == FREQ_MEAN:
        return fmap.mean(dim=3, keepdim=True)
    raise ValueError(f"a pool's reads={reads!r}: expected one of {', '.join(READS)}")


def reads_of(pool: nn.Module) -> str:
    """What ``pool`` declares it reads of a map (``MAP`` unless it declares ``reads``)."""
    return getattr(pool, "reads", MAP)


def call_hook(pool: nn.Module, name: str, *args, **kwargs):
    """Call ``pool``'s hook ``name`` (one of ``HOOKS``) and return what it returns; None, and no
    call, for a pool that does not define it."""
    if name not in HOOKS:
        raise ValueError(f"call_hook: {name!r} is not a pool hook ({', '.join(HOOKS)})")
    hook = getattr(pool, name, None)
    return hook(*args, **kwargs) if hook is not None else None


class GlobalAveragePool(nn.Module):
    """Mean over time and frequency: ``(B, C, T, F) -> (B, C)`` (the report's baseline)."""

    reads = FREQ_MEAN  # the mean over (T, F) is the mean over T of the mean over F

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GlobalMaxPool(nn.Module):
    """Max over time and frequency: ``(B, C, T, F) -> (B, C)`` (Won et al. 2020's short-chunk
    CNNs, whose frequency axis is 1 by then: a max over time)."""

    reads = MAP  # a max over frequency is not a function of the frequency mean

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
    its gradient is never cut off, and ``project_()``, called after every optimiser step (the
    ``after_step`` hook), moves it back into the interval. ``alpha_l2 > 0`` adds
    ``alpha_l2 * sum(alpha**2)`` to the loss through ``regularization()`` (the paper's RAP).
    """

    reads = FREQ_MEAN  # the frequency axis is averaged before anything else

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
        """Hook: the RAP penalty added to the loss."""
        return self.alpha_l2 * (self.alpha**2).sum()

    def after_step(self) -> None:
        """Hook: the cap's projection after every optimiser step."""
        self.project_()

    def log_end(self, tracker, step: int) -> None:
        """Hook: the learned alphas to ``tracker``, ``autopool_alpha.json`` and ``alpha_*``
        metrics (``alpha_summary``)."""
        summary = alpha_summary(self)
        tracker.log_text(json.dumps(summary, indent=1), "autopool_alpha.json")
        tracker.log_metrics(summary["metrics"], step=step)


@dataclass(frozen=True)
class PoolSpec(Spec):
    """A pool: ``build(pool_cfg, channels) -> nn.Module`` mapping ``(B, C, T, F)`` to ``(B, C)``."""

    build: Callable


def build_pool(cfg, channels: int) -> nn.Module:
    """``cfg`` is the ``pool`` config: the entry it names builds the module."""
    return POOLS.get(cfg.name, cfg.get("module")).build(cfg, channels)


def alpha_summary(pool: AutoPool) -> dict:
    """AutoPool's learned alphas as plain data.

    ``{"alpha": [...C values], "constraint", "cap", "metrics": {"alpha_mean", "alpha_std",
    "alpha_min", "alpha_max"}}``; under ``cap`` the values lie within it (projected each step).
    """
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
