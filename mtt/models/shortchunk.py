"""Short-chunk CNNs of Won et al. 2020, trained from scratch: ``shortchunk_res`` and ``shortchunk``.

Won, Ferraro, Bogdanov & Serra, "Evaluation of CNN-based automatic music tagging models", SMC
2020; code: github.com/minzwon/sota-music-tagging-models (``training/model.py``
``ShortChunkCNN_Res`` / ``ShortChunkCNN``, ``training/modules.py`` ``Res_2d`` / ``Conv_2d``).

The backbone here is their model from the spectrogram's batch norm to the last block; the front
end (16 kHz, 128-band mel, FFT 512, hop 256, 0-8000 Hz, dB) is ``features=shortchunk``
(mtt.features.frontend.MelDbFrontEnd: stored once in the feature store, not recomputed on every step), the
global max pool is ``pool=max`` and their dense layers are ``head.name=dense_bn`` (Dense 512 ->
512, BatchNorm, ReLU, Dropout 0.5, Dense 512 -> tags), all selected by conf/backbone/*.yaml.

Module names follow theirs (``spec_bn``, ``layer1`` ... ``layer7``, ``conv_1``, ``bn_1``, ...)
and the convolutions run in their (mel, time) orientation, so the backbone part of one of their
``best_model.pth`` state dicts loads as it is (``load_weights``), and the whole of it, dense layers
included, with their head's three keys renamed (``load_model``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from mtt.models.registry import BackboneSpec, fit_errors, register_backbone, strict_load

CHANNELS = (1, 128, 128, 256, 256, 256, 256, 512)  # input, then the output of each of 7 blocks


class Res2d(nn.Module):
    """``Res_2d``: 3x3 conv (stride) -> BN -> ReLU -> 3x3 conv -> BN, plus a shortcut 3x3 conv
    (stride) -> BN when the shape changes, ReLU after the sum. ``(B, cin, H, W) -> (B, cout,
    ceil(H / stride), ceil(W / stride))``."""

    def __init__(self, cin: int, cout: int, stride: int = 2):
        super().__init__()
        self.conv_1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.bn_1 = nn.BatchNorm2d(cout)
        self.conv_2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn_2 = nn.BatchNorm2d(cout)
        self.diff = stride != 1 or cin != cout
        if self.diff:
            self.conv_3 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
            self.bn_3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn_2(self.conv_2(self.relu(self.bn_1(self.conv_1(x)))))
        shortcut = self.bn_3(self.conv_3(x)) if self.diff else x
        return self.relu(shortcut + out)


class Conv2d(nn.Module):
    """``Conv_2d``: 3x3 conv -> BN -> ReLU -> 2x2 max-pool. ``(B, cin, H, W) -> (B, cout, H // 2, W // 2)``."""

    def __init__(self, cin: int, cout: int, pooling: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.mp = nn.MaxPool2d(pooling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mp(self.relu(self.bn(self.conv(x))))


class ShortChunkCNN(nn.Module):
    """dB mel patches ``(B, frames, mels)`` -> ``(B, C, T, F)`` = (batch, channels, time, freq).

    ``BatchNorm2d(1)`` on the spectrogram, then 7 blocks (``Res2d`` with stride 2 when
    ``residual``, else ``Conv2d`` with 2x2 max-pooling) of ``CHANNELS`` times ``width`` (1.0 is
    the paper's). For the paper's (231 frames, 128 mels) chunk of 59,049 samples the map is
    ``(512, 2, 1)`` with residuals (each stride-2 block: ``ceil(n / 2)``) and ``(512, 1, 1)``
    without (each pool: ``n // 2``).
    """

    def __init__(self, residual: bool = True, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        channels = [CHANNELS[0], *(max(1, round(c * width)) for c in CHANNELS[1:])]
        block = Res2d if residual else Conv2d
        self.residual = residual
        self.spec_bn = nn.BatchNorm2d(1)
        for i in range(7):
            setattr(self, f"layer{i + 1}", block(channels[i], channels[i + 1]))
        self.out_channels = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"expected (batch, time, mel) patches, got shape {tuple(x.shape)}")
        # Their orientation, (B, 1, mel, time), so that their kernels load unchanged.
        h = self.spec_bn(x.transpose(1, 2).unsqueeze(1))
        for i in range(7):
            h = getattr(self, f"layer{i + 1}")(h)
        return h.transpose(2, 3)  # (B, C, mel, time) -> (B, C, time, mel)


def output_shape(model: ShortChunkCNN, item_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``(C, T, F)`` after 7 halvings of ``(frames, mels)``: ``ceil`` (stride 2) or ``floor`` (pool)."""
    halve = (lambda n: math.ceil(n / 2)) if model.residual else (lambda n: n // 2)
    t, f = item_shape
    for _ in range(7):
        t, f = halve(t), halve(f)
    return (model.out_channels, t, f)


def load_weights(model: ShortChunkCNN, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load the backbone's own state dict (``spec_bn``, ``layer1`` ... ``layer7``), strictly. A
    whole model of theirs goes through ``load_model`` instead."""
    strict_load(model, state_dict)


# Their dense layers (model.py: dense1 -> bn -> relu -> dropout -> dense2) are, in mtt, the
# DenseHead of head.name=dense_bn with head.blocks=2: Linear, BatchNorm1d, ReLU, Dropout, Linear.
THEIR_HEAD = {"net.0": "dense1", "net.1": "bn", "net.4": "dense2"}
FRONT_END = "spec"  # their MelSpectrogram: its window and mel filterbank are in their state dict


def their_key(key: str) -> str:
    """A tagger's state-dict key -> the same tensor's key in their ``ShortChunkCNN(_Res)``
    (``backbone.layer1.conv_1.weight`` -> ``layer1.conv_1.weight``, ``head.net.4.bias`` ->
    ``dense2.bias``)."""
    part, _, rest = key.partition(".")
    if part == "backbone":
        return rest
    layer, param = ".".join(rest.split(".")[:2]), ".".join(rest.split(".")[2:])
    return f"{THEIR_HEAD[layer]}.{param}"


def load_model(tagger: nn.Module, state_dict: Mapping[str, torch.Tensor], cfg) -> bool:
    """Load a state dict saved by sota-music-tagging-models' ``ShortChunkCNN_Res`` (or
    ``ShortChunkCNN``) into ``tagger``: backbone and head, strictly; False for a backbone-only
    state dict (no ``spec.*`` or head key), which ``load_weights`` loads.

    Every key of theirs must be used and every tensor of the tagger given: the backbone's by
    name, the head's as ``THEIR_HEAD`` renames them; their front end's window and filterbank
    (``spec.*``) must equal ``features``' (mtt computes the front end in the feature store, so a
    model trained on another one would be fed inputs it never saw). ``ValueError`` names what
    does not fit: a config that is not their model (head, pooling, output), a missing, unused or
    misshapen key, a front-end tensor that differs.
    """
    heads = set(THEIR_HEAD.values())
    if not any(k.split(".")[0] in (FRONT_END, *heads) for k in state_dict):
        return False
    model = "ShortChunkCNN_Res" if cfg.backbone.name == "shortchunk_res" else "ShortChunkCNN"
    h = cfg.head
    wrong = [
        *(
            [f"head.name={h.name}, head.blocks={h.blocks}: their head is head.name=dense_bn, head.blocks=2"]
            if (h.name, h.blocks) != ("dense_bn", 2)
            else []
        ),
        *(
            [f"pool.name={cfg.pool.name}: their model max-pools over time (pool.name=max)"]
            if cfg.pool.name != "max"
            else []
        ),
        *([f"head.output={h.output}: their model ends in a sigmoid"] if h.output != "sigmoid" else []),
    ]
    if wrong:
        raise ValueError(f"a {model} state dict (backbone and head) needs their model: {'; '.join(wrong)}")
    from mtt.features.frontend import MelDbFrontEnd  # here: the feature code is needed only for their files

    mine = tagger.state_dict()
    front = MelDbFrontEnd(cfg.features).state_dict()  # spec.spectrogram.window, spec.mel_scale.fb
    expected = {**{their_key(k): v for k, v in mine.items()}, **front}
    errors = fit_errors(expected, state_dict)
    differ = [
        f"{k} (max |difference| {float((state_dict[k].float() - v).abs().max()):.3g})"
        for k, v in front.items()
        if k in state_dict
        and state_dict[k].shape == v.shape
        and not torch.allclose(state_dict[k].float(), v, atol=1e-5)
    ]
    if differ:
        errors += f"; front end differs from features (features.name={cfg.features.name}): {differ}"
    if errors:
        raise ValueError(f"state dict does not fit {model} with mtt's backbone={cfg.backbone.name}{errors}")
    tagger.load_state_dict({k: state_dict[their_key(k)] for k in mine})
    return True


def _errors(name: str):
    def errors(cfg) -> list[str]:
        out = []
        if cfg.backbone.weights == "audioset":
            out.append(
                f"backbone.weights=audioset: {name} has no published AudioSet weights (those at "
                "backbone.url are VGGish's); use none or the path of a state dict"
            )
        if cfg.backbone.get("embeddings"):  # a key of VGGish's config, left by backbone.name=
            out.append(f"backbone.embeddings=true: {name} has no embedding layers (VGGish's)")
        return out

    return errors


for _name, _residual in (("shortchunk_res", True), ("shortchunk", False)):
    register_backbone(
        BackboneSpec(
            name=_name,
            front_end="mel_db",
            build=lambda b, item_shape, residual=_residual: ShortChunkCNN(residual=residual, width=b.width),
            output_shape=output_shape,
            load_weights=load_weights,
            load_model=load_model,
            config_errors=_errors(_name),
        ),
        option=False,  # conf/backbone/<name>.yaml is the option: it also picks the front end, pool and head
    )
