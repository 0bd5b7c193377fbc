"""Classification heads over the pooled vector, by ``head.name`` (the entries of
``mtt.core.components.HEADS``, registered at the end of this module)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mtt.core.components import HEADS, HeadConfig, Spec


class Head(nn.Module):
    """``(B, in_features) -> (B, n_tags)`` logits.

    ``blocks`` blocks of (BatchNorm1d, Dropout, Linear); every Linear but the last is followed by
    a ReLU and has ``width`` units, the last maps to the tags. ``blocks=2`` is the report's head
    (one ReLU hidden layer, then the output layer), ``blocks=3`` its third experiment.
    """

    # The defaults are the config's (mtt.core.components.HeadConfig), so the two cannot drift apart.
    def __init__(
        self,
        in_features: int,
        n_tags: int,
        blocks: int = HeadConfig.blocks,
        width: int = HeadConfig.width,
        dropout: float = HeadConfig.dropout,
    ):
        super().__init__()
        self.net = nn.Sequential(*self.layers(in_features, n_tags, blocks, width, dropout))

    @staticmethod
    def layers(in_features: int, n_tags: int, blocks: int, width: int, dropout: float) -> list[nn.Module]:
        layers: list[nn.Module] = []
        size = in_features
        for i in range(blocks):
            last = i == blocks - 1
            out = n_tags if last else width
            layers += [nn.BatchNorm1d(size), nn.Dropout(dropout), nn.Linear(size, out)]
            if not last:
                layers.append(nn.ReLU(inplace=True))
            size = out
        return layers

    @property
    def output_layer(self) -> nn.Linear:
        """The last Dense layer (over the tags)."""
        return self.net[-1]  # type: ignore[return-value]  # built as nn.Linear above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DenseHead(Head):
    """Won et al. 2020's dense layers: ``(B, in_features) -> (B, n_tags)`` logits.

    ``blocks - 1`` blocks of (Linear to ``width``, BatchNorm1d, ReLU, Dropout), then the output
    Linear. ``blocks=2, width=512, dropout=0.5`` over 512 channels is their ``dense1 -> bn ->
    relu -> dropout -> dense2``.
    """

    @staticmethod
    def layers(in_features: int, n_tags: int, blocks: int, width: int, dropout: float) -> list[nn.Module]:
        layers: list[nn.Module] = []
        size = in_features
        for _ in range(blocks - 1):
            layers += [nn.Linear(size, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            size = width
        return [*layers, nn.Linear(size, n_tags)]


@dataclass(frozen=True)
class HeadSpec(Spec):
    """A head: ``build(head_cfg, in_features, n_tags) -> nn.Module`` of ``(B, in_features)`` to
    ``(B, n_tags)`` logits, whose ``output_layer`` is the last Linear (its bias: head.bias_init)."""

    build: Callable


def build_head(cfg, in_features: int, n_tags: int) -> nn.Module:
    """``cfg`` is the ``head`` config: the entry it names builds the module."""
    return HEADS.get(cfg.name, cfg.get("module")).build(cfg, in_features, n_tags)


def _blocks(cls: type[Head]) -> Callable:
    return lambda cfg, in_features, n_tags: cls(in_features, n_tags, cfg.blocks, cfg.width, cfg.dropout)


# bn_dropout_dense: blocks of (BatchNorm, Dropout, Dense), the report's | dense_bn: (Dense,
# BatchNorm, ReLU, Dropout) blocks then the output Dense (Won et al. 2020's short-chunk CNN).
HEADS.register(HeadSpec("bn_dropout_dense", config=HeadConfig, build=_blocks(Head)))
HEADS.register(HeadSpec("dense_bn", config=HeadConfig, build=_blocks(DenseHead)))
