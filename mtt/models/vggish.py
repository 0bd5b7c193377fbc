"""VGGish conv backbone (and optional embedding layers) in torchvggish's exact layout.

Module and parameter names follow ``torchvggish.make_layers()`` / ``torchvggish.VGG``
(``features.0.weight``, ``features.3.weight``, ..., ``embeddings.0.weight``, ...), so the
published AudioSet state dict ``vggish-10086976.pth`` loads without any key conversion.

Known discrepancy, made explicit by ``embedding_relu``: torchvggish keeps a ReLU after the last
128-d embedding layer; Google's current TF reference (vggish_slim.py, ``activation_fn=None`` on
``fc2``) does not. The default follows torchvggish, whose weights are the ones we load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mtt.core.components import BackboneConfig, integer, setting
from mtt.models.registry import BackboneSpec, register_backbone, strict_load

# torchvggish.make_layers(): channels of each 3x3 conv, "M" = 2x2 max-pool.
_LAYOUT: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
_TIME, _FREQ = 6, 4  # conv map size for a (96, 64) patch after four 2x2 pools


class VGGish(nn.Module):
    """VGGish: log-mel patches -> conv map (and optionally the 128-d embedding).

    Args:
        width: channel multiplier (channels ``max(1, round(c * width))``); only 1.0 can load
            the pretrained weights. Tests use 0.125.
        embeddings: add torchvggish's fully connected layers ``embeddings.0/2/4``
            (``out_channels * 24 -> 4096 -> 4096 -> 128``) for :meth:`embed`.
        embedding_relu: keep the ReLU after the last embedding layer (torchvggish) or not
            (Google's TF reference).
    """

    def __init__(self, width: float = 1.0, embeddings: bool = False, embedding_relu: bool = True):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        layers: list[nn.Module] = []
        channels = 1
        for v in _LAYOUT:
            if isinstance(v, str):  # "M"
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = max(1, round(v * width))
                layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.out_channels = channels
        self.embeddings = None
        if embeddings:
            head: list[nn.Module] = [
                nn.Linear(channels * _TIME * _FREQ, 4096),
                nn.ReLU(inplace=True),
                nn.Linear(4096, 4096),
                nn.ReLU(inplace=True),
                nn.Linear(4096, 128),
            ]
            if embedding_relu:
                head.append(nn.ReLU(inplace=True))
            self.embeddings = nn.Sequential(*head)

    @property
    def conv_layers(self) -> list[nn.Conv2d]:
        """The conv layers in input-to-output order (for "fine-tune the last N")."""
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, 96, 64)`` log-mel patches -> conv map ``(batch, out_channels, 6, 4)`` =
        (batch, channels, time, freq)."""
        if x.dim() != 3:
            raise ValueError(f"expected (batch, time, mel) patches, got shape {tuple(x.shape)}")
        return self.features(x.unsqueeze(1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, 96, 64)`` -> ``(batch, 128)`` VGGish embedding (before PCA/quantisation)."""
        if self.embeddings is None:
            raise RuntimeError("VGGish.embed needs a model built with embeddings=True")
        maps = self(x)
        # torchvggish flattens (batch, time, freq, channels), the TF layout the weights expect.
        return self.embeddings(maps.permute(0, 2, 3, 1).flatten(1))


def load_torchvggish_state_dict(model: VGGish, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a torchvggish-layout state dict (e.g. ``vggish-10086976.pth``) into ``model``.

    ``embeddings.*`` entries are ignored when the model has no embedding layers. Raises
    ValueError naming missing/unexpected keys and shape mismatches (e.g. ``width != 1.0``).
    """
    if model.embeddings is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("embeddings.")}
    strict_load(model, state_dict, mismatch_hint="(pretrained weights need width=1.0)")


def freeze(model: VGGish, finetune_last: int = 0) -> None:
    """Set ``requires_grad=False`` on every parameter except those of the last ``finetune_last``
    conv layers (embedding layers are frozen too).

    VGGish has no BatchNorm or Dropout, so a frozen VGGish computes the same in train and eval
    mode; no ``.eval()`` is needed to keep it fixed.
    """
    convs = model.conv_layers
    if not 0 <= finetune_last <= len(convs):
        raise ValueError(f"finetune_last must be in [0, {len(convs)}], got {finetune_last}")
    model.requires_grad_(False)
    for conv in convs[len(convs) - finetune_last :]:
        conv.requires_grad_(True)


def _output_shape(model: VGGish, item_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Four 2x2 max-pools: ``(C, frames // 16, mels // 16)``, or the embedding as ``(128, 1, 1)``."""
    if model.embeddings is not None:
        return (128, 1, 1)
    return (model.out_channels, item_shape[0] // 16, item_shape[1] // 16)


def _encode(model: VGGish, x: torch.Tensor) -> torch.Tensor:
    """The conv map, or the 128-d embedding as ``(B, 128, 1, 1)``."""
    return model.embed(x)[:, :, None, None] if model.embeddings is not None else model(x)


@dataclass
class VGGishConfig(BackboneConfig):
    """``backbone=vggish`` (the default): the conv stack (6 conv + 4 max-pool). ``weights: none``
    so that the embedded default runs offline; ``backbone.weights=audioset`` (or a local .pth path)
    for transfer learning."""

    name: str = "vggish"
    finetune_last: int = setting(0, integer(0, 6))  # with freeze=true, still train the last N of its 6 conv layers
    embeddings: bool = False  # append VGGish's 128-d embedding layers after the conv stack
    embedding_relu: bool = True  # torchvggish keeps a ReLU after the last embedding layer


register_backbone(
    BackboneSpec(
        name="vggish",
        config=VGGishConfig,
        front_end="vggish",
        build=lambda b, item_shape: VGGish(width=b.width, embeddings=b.embeddings, embedding_relu=b.embedding_relu),
        output_shape=_output_shape,
        load_weights=load_torchvggish_state_dict,
        freeze=freeze,
        encode=_encode,
    )
)
