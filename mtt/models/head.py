"""Classification head: N blocks of BatchNorm + Dropout + Dense over the pooled vector."""

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
    def __init__(self, in_features: int, n_tags: int, blocks: int = HeadConfig.blocks,
                 width: int = HeadConfig.width, dropout: float = HeadConfig.dropout):
        super().__init__()
        if blocks < 1:
            raise ValueError(f"head.blocks={blocks}: need at least 1 block")
        layers: list[nn.Module] = []
        size = in_features
        for i in range(blocks):
            last = i == blocks - 1
            out = n_tags if last else width
            layers += [nn.BatchNorm1d(size), nn.Dropout(dropout), nn.Linear(size, out)]
            if not last:
                layers.append(nn.ReLU(inplace=True))
            size = out
        self.net = nn.Sequential(*layers)

    @property
    def output_layer(self) -> nn.Linear:
        """The last Dense layer (over the tags)."""
        return self.net[-1]  # type: ignore[return-value]  # built as nn.Linear above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
