"""Classification heads over the pooled vector, by ``head.name`` (``HEADS``)."""

from __future__ import annotations

import torch
from torch import nn

from mtt.config import HeadConfig


class Head(nn.Module):
    """``(B, in_features) -> (B, n_tags)`` logits.

    ``blocks`` blocks of (BatchNorm1d, Dropout, Linear); every Linear but the last is followed by
    a ReLU and has ``width`` units, the last maps to the tags. ``blocks=2`` is the report's head
    (one ReLU hidden layer, then the output layer), ``blocks=3`` its third experiment.
    """

    # The defaults are the config's (mtt.config.HeadConfig), so the two cannot drift apart.
    def __init__(
        self,
        in_features: int,
        n_tags: int,
        blocks: int = HeadConfig.blocks,
        width: int = HeadConfig.width,
        dropout: float = HeadConfig.dropout,
    ):
        super().__init__()
        if blocks < 1:
            raise ValueError(f"head.blocks={blocks}: need at least 1 block")
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


# head.name -> class(in_features, n_tags, blocks, width, dropout); mtt.config.RULES lists the names.
HEADS = {"bn_dropout_dense": Head, "dense_bn": DenseHead}


def build_head(cfg, in_features: int, n_tags: int) -> nn.Module:
    """``cfg`` is the ``head`` config."""
    if cfg.name not in HEADS:
        raise ValueError(f"head.name={cfg.name!r}: expected one of {sorted(HEADS)}")
    return HEADS[cfg.name](in_features, n_tags, cfg.blocks, cfg.width, cfg.dropout)
