"""The tagger: VGGish conv backbone -> pooling -> head, built from config by ``build_model``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mtt.models.head import Head
from mtt.models.pooling import build_pool
from mtt.models.vggish import VGGish, freeze, load_torchvggish_state_dict

# Output activations over the tag logits. sigmoid treats tags as independent (right for
# multi-label); softmax makes them compete for one unit of probability mass, which is what the
# report used under binary cross-entropy: one tag can still reach 1, but only by pushing every
# other tag to 0, so a clip with k true tags can give each of them at most 1/k.
OUTPUTS = {"sigmoid": torch.sigmoid, "softmax": lambda z: torch.softmax(z, dim=-1)}


class Tagger(nn.Module):
    """``(B, 96, 64)`` log-mel patches -> ``(B, n_tags)`` logits.

    ``forward(x, from_backbone=True)`` takes backbone outputs ``(B, C, T, F)`` instead (the frozen
    backbone cache), so the same module serves both paths.
    """

    def __init__(self, backbone: VGGish, pool: nn.Module, head: Head, output: str = "sigmoid"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"head.output={output!r}: expected one of {sorted(OUTPUTS)}")
        self.backbone, self.pool, self.head, self.output = backbone, pool, head, output

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone output ``(B, C, T, F)``: the conv map, or the 128-d embedding as ``(B, 128, 1, 1)``."""
        if self.backbone.embeddings is not None:
            return self.backbone.embed(x)[:, :, None, None]
        return self.backbone(x)

    def forward(self, x: torch.Tensor, from_backbone: bool = False) -> torch.Tensor:
        fmap = x if from_backbone else self.encode(x)
        return self.head(self.pool(fmap.float()))

    @torch.no_grad()
    def init_output_bias(self, labels) -> None:
        """Set the last layer's bias to the training prior of each tag, ``labels`` ``(clips, tags)``.

        Sigmoid: the log-odds of each tag's frequency, so that before any step every tag is
        predicted at its base rate and BCE starts near its floor (about 0.1 on MTAT) instead of
        at log 2 = 0.69; frequencies are smoothed (``(k + 0.5) / (n + 1)``) so that a tag absent
        from training gets a small finite bias. Softmax: the log of the normalised frequencies.
        """
        y = torch.as_tensor(labels, dtype=torch.float64)
        prior = (y.sum(dim=0) + 0.5) / (y.shape[0] + 1)
        bias = torch.log(prior / (1 - prior)) if self.output == "sigmoid" else torch.log(prior / prior.sum())
        self.head.output_layer.bias.copy_(bias.to(self.head.output_layer.bias.dtype))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return OUTPUTS[self.output](logits.float())

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the output activation against ``(B, n_tags)`` 0/1 targets."""
        logits, targets = logits.float(), targets.float()
        if self.output == "sigmoid":
            loss = F.binary_cross_entropy_with_logits(logits, targets)
        else:
            probs = self.probabilities(logits).clamp(1e-7, 1 - 1e-7)
            loss = F.binary_cross_entropy(probs, targets)
        reg = getattr(self.pool, "regularization", None)
        return loss + reg() if reg is not None else loss


def build_model(cfg, n_tags: int, state_dict: Mapping[str, torch.Tensor] | None = None) -> Tagger:
    """Build the tagger of ``cfg`` (backbone, pool, head sections) for ``n_tags`` tags.

    ``state_dict`` holds pretrained VGGish weights in torchvggish's layout (``None``: random
    init). The backbone is frozen per ``backbone.freeze`` / ``backbone.finetune_last``.
    """
    b = cfg.backbone
    backbone = VGGish(width=b.width, embeddings=b.embeddings, embedding_relu=b.embedding_relu)
    if state_dict is not None:
        load_torchvggish_state_dict(backbone, state_dict)
    if b.freeze:
        freeze(backbone, b.finetune_last)
    channels = 128 if b.embeddings else backbone.out_channels
    pool = build_pool(cfg.pool, channels)
    head = Head(channels, n_tags, cfg.head.blocks, cfg.head.width, cfg.head.dropout)
    return Tagger(backbone, pool, head, cfg.head.output)
