"""The tagger: backbone -> pooling -> head, assembled by name from config by ``build_model``
(the registries of mtt.core.components: ``BACKBONES``, ``POOLS``, ``HEADS``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mtt.models.head import build_head
from mtt.models.pooling import build_pool, call_hook
from mtt.models.registry import get_backbone

# Output activations over the tag logits. sigmoid treats tags as independent (right for
# multi-label); softmax makes them compete for one unit of probability mass, which is what the
# report used under binary cross-entropy: one tag can still reach 1, but only by pushing every
# other tag to 0, so a clip with k true tags can give each of them at most 1/k.
OUTPUTS = {"sigmoid": torch.sigmoid, "softmax": lambda z: torch.softmax(z, dim=-1)}


class Tagger(nn.Module):
    """Patches ``(B, frames, mels)`` (VGGish: ``(B, 96, 64)`` log-mel) -> ``(B, n_tags)`` logits.

    ``forward(x, from_backbone=True)`` takes backbone outputs ``(B, C, T, F)`` instead (the frozen
    backbone cache), so the same module serves both paths. ``encode_fn(backbone, x)`` is the
    backbone spec's ``encode`` (by default the backbone's forward).
    """

    def __init__(self, backbone: nn.Module, pool: nn.Module, head: nn.Module, output: str = "sigmoid", encode_fn=None):
        super().__init__()
        self.backbone, self.pool, self.head, self.output = backbone, pool, head, output
        self._encode = encode_fn
        self.pretrained_head = False  # the head's weights came with backbone.weights (build_model)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone output ``(B, C, T, F)`` (VGGish: the conv map, or the 128-d embedding as
        ``(B, 128, 1, 1)``)."""
        return self._encode(self.backbone, x) if self._encode is not None else self.backbone(x)

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
        layer: torch.nn.Linear = self.head.output_layer  # type: ignore[assignment]  # every registered head has one
        layer.bias.copy_(bias.to(layer.bias.dtype))

    @torch.no_grad()
    def zero_output_bias(self) -> None:
        """Set the last layer's bias to 0 (Keras' default, ``head.bias_init=zero``)."""
        layer: torch.nn.Linear = self.head.output_layer  # type: ignore[assignment]  # every registered head has one
        layer.bias.zero_()

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
        reg = call_hook(self.pool, "regularization")  # e.g. AutoPool's RAP penalty
        return loss + reg if reg is not None else loss


def reads_backbone_cache(backbone_cfg) -> bool:
    """Whether training reads the backbone cache instead of patches: a frozen backbone (no layer
    fine-tuned) with ``backbone.cache``."""
    return bool(backbone_cfg.freeze and backbone_cfg.finetune_last == 0 and backbone_cfg.cache)


def training_input_shape(cfg) -> tuple[int, ...] | None:
    """The shape of one training input of ``cfg``: the patch ``(features.patch_frames,
    features.n_mels)``, or where training reads the backbone cache (``reads_backbone_cache``) the
    backbone's encoding of one patch, e.g. ``(C, T, F)``. The backbone is built and run on
    PyTorch's meta device: shapes only, no memory, no weights. None where it cannot run there (an
    operation of a backbone of one's own without a meta kernel)."""
    item_shape = (cfg.features.patch_frames, cfg.features.n_mels)
    if not reads_backbone_cache(cfg.backbone):
        return item_shape
    spec = get_backbone(cfg.backbone.name, cfg.backbone.get("module"))
    try:
        with torch.device("meta"):
            encoded = spec.encode(spec.build(cfg.backbone, item_shape), torch.zeros(1, *item_shape))
    except (RuntimeError, NotImplementedError):
        return None
    return tuple(encoded.shape[1:])


def build_model(cfg, n_tags: int, state_dict: Mapping[str, torch.Tensor] | None = None) -> Tagger:
    """Build the tagger of ``cfg`` for ``n_tags`` tags: the backbone registered as
    ``backbone.name`` (mtt.models.registry), ``pool.name`` and ``head.name``, sized from the
    backbone's output shape for a ``(features.patch_frames, features.n_mels)`` patch.

    ``state_dict`` holds pretrained weights (``None``: random init): the backbone's, in the layout
    it loads (VGGish: torchvggish's), or a whole model that the backbone's ``load_model`` knows
    (Won et al.'s ``ShortChunkCNN_Res`` state dict: backbone and head, the head's keys remapped;
    ``Tagger.pretrained_head`` is then True). Either is loaded strictly: a missing, unused or
    misshapen key is a ``ValueError`` naming it. The backbone is frozen per ``backbone.freeze`` /
    ``backbone.finetune_last``.
    """
    b = cfg.backbone
    spec = get_backbone(b.name, b.get("module"))
    item_shape = (cfg.features.patch_frames, cfg.features.n_mels)
    backbone = spec.build(b, item_shape)
    channels = spec.output_shape(backbone, item_shape)[0]
    pool = build_pool(cfg.pool, channels)
    head = build_head(cfg.head, channels, n_tags)
    tagger = Tagger(backbone, pool, head, cfg.head.output, encode_fn=spec.encode)
    if state_dict is not None:
        tagger.pretrained_head = bool(spec.load_model(tagger, state_dict, cfg))
        if not tagger.pretrained_head:
            spec.load_weights(backbone, state_dict)
    if b.freeze:
        spec.freeze(backbone, b.finetune_last)
    return tagger
