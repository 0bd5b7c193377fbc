"""Backbones by name: the small interface ``build_model`` assembles a tagger from.

A backbone module registers a ``BackboneSpec`` when it is imported (``register_backbone``, into
``mtt.core.components.BACKBONES``); the config names it (``backbone.name``) and, for a backbone
outside mtt, the module that registers it (``backbone.module``, imported before the config is
checked). Pools, heads, datasets and steps policies are registries of the same kind
(mtt.core.components). CONTRIBUTING.md has the recipe for a new backbone: one module and one YAML
under conf/backbone/.

What a backbone declares:

- ``front_end``: the ``features.name`` whose patches it consumes. The feature store is keyed by
  every ``features.*`` value (mtt.features.preprocess.store_path), so a backbone's YAML selects its
  ``features`` option and the patches it trains on are stored once, resumable, like VGGish's.
- ``build(backbone_cfg, item_shape)``: an ``nn.Module`` mapping patches ``(B, frames, mels)`` to
  a map ``(B, C, T, F)`` = (batch, channels, time, freq) that a pool reduces to ``(B, C)``.
- ``output_shape(module, item_shape)``: that map's ``(C, T, F)`` for one patch (the pool and
  head are sized from it); by default measured with one forward of a zero patch.
- ``load_weights(module, state_dict)``: load a pretrained state dict (``backbone.weights``),
  raising ``ValueError`` naming what does not fit; ``freeze(module, finetune_last)``.
- ``load_model(tagger, state_dict, cfg)``: where ``state_dict`` is a whole model saved by
  another code base (backbone and head), load all of it into the tagger, strictly, and return
  True; return False for the backbone's own state dict (then ``load_weights``). By default False.
- ``encode(module, x)``: what the pool reads (VGGish may append its embedding layers); by default
  the module's forward.
- ``config``: its settings, a dataclass extending ``mtt.core.components.BackboneConfig`` with each
  field's rule in its metadata (``setting(3, integer(1))``); stored as the option
  ``backbone=<name>``, and the defaults a YAML of one's own need not repeat.
- ``config_errors(cfg)``: one line per config value this backbone cannot work with, reported
  with the schema's own errors before any work (mtt.config.config_errors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from mtt.core.components import BACKBONES, BackboneConfig, Spec


def measured_output_shape(module: nn.Module, item_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``(C, T, F)`` of ``module``'s output for one zero patch of ``item_shape``, measured in eval
    mode (batch norm in training mode refuses a batch of one) and without gradients."""
    was_training = module.training
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        module.eval()
        with torch.no_grad():
            return tuple(module(torch.zeros(1, *item_shape, device=device)).shape[1:])
    finally:
        module.train(was_training)


def freeze_all(module: nn.Module, finetune_last: int = 0) -> None:
    """``requires_grad=False`` everywhere (``finetune_last`` is 0: BackboneConfig's rule, which a
    backbone that fine-tunes layer by layer widens in its own dataclass)."""
    module.requires_grad_(False)


def fit_errors(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], mismatch_hint: str = ""
) -> str:
    """What keeps ``state_dict`` from fitting ``expected`` (a module's state dict, by the same
    names): ``"; missing keys: [...]; unexpected keys: [...]; shape mismatches: [...]"``, or ``""``
    when every key is there, used, and of its shape (``mismatch_hint`` follows shape mismatches)."""
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    return (
        (f"; missing keys: {missing}" if missing else "")
        + (f"; unexpected keys: {unexpected}" if unexpected else "")
        + (f"; shape mismatches: {mismatched}" if mismatched else "")
        + (f" {mismatch_hint}" if mismatched and mismatch_hint else "")
    )


def strict_load(module: nn.Module, state_dict: Mapping[str, torch.Tensor], mismatch_hint: str = "") -> None:
    """``load_state_dict`` naming missing and unexpected keys and shape mismatches in one error
    (``mismatch_hint`` is appended when shapes differ)."""
    errors = fit_errors(module.state_dict(), state_dict, mismatch_hint)
    if errors:
        raise ValueError(f"state dict does not fit this {type(module).__name__}{errors}")
    module.load_state_dict(state_dict)


@dataclass(frozen=True)
class BackboneSpec(Spec):
    front_end: str  # the features.name it consumes
    build: Callable  # (backbone_cfg, item_shape) -> nn.Module
    # Its settings: mtt.core.components.BackboneConfig or a dataclass extending it (rules in metadata).
    config: type = field(default=BackboneConfig, kw_only=True)
    output_shape: Callable = measured_output_shape  # (module, item_shape) -> (C, T, F)
    load_weights: Callable = strict_load  # (module, state_dict) -> None
    freeze: Callable = freeze_all  # (module, finetune_last) -> None
    encode: Callable = field(default=lambda module, x: module(x))  # (module, x) -> (B, C, T, F)
    load_model: Callable = field(default=lambda tagger, state_dict, cfg: False)  # -> loaded as a whole?

    def errors(self, cfg) -> list[str]:
        """A front end other than the one it consumes, then its own ``config_errors``."""
        errors = []
        if cfg.features.name != self.front_end:
            errors.append(
                f"features.name={cfg.features.name}: backbone.name={self.name} consumes "
                f"features.name={self.front_end} patches (choose its YAML: backbone={self.name})"
            )
        return errors + list(self.config_errors(cfg))


def register_backbone(spec: BackboneSpec, option: bool = True) -> BackboneSpec:
    """Make ``spec`` buildable as ``backbone.name=<spec.name>`` (call it at import time), its
    dataclass the option ``backbone=<spec.name>`` (``option=False`` where a YAML of that name,
    under conf/backbone/, is the option). Registering a name again replaces it."""
    return BACKBONES.register(spec, option)


def backbone_names() -> list[str]:
    return BACKBONES.names()


def get_backbone(name: str, module: str | None = None) -> BackboneSpec:
    """The spec registered as ``name``, importing ``module`` first when given. ``LookupError``
    (one line) names the key and what is registered."""
    return BACKBONES.get(name, module)


def backbone_errors(cfg) -> list[str]:
    """What keeps ``cfg``'s backbone from being built: an unknown name or module, a value outside
    its dataclass's rules, a front end other than the one it consumes, or its own ``config_errors``."""
    return BACKBONES.node_errors(cfg)


__all__ = [
    "BackboneSpec",
    "backbone_errors",
    "backbone_names",
    "fit_errors",
    "freeze_all",
    "get_backbone",
    "measured_output_shape",
    "register_backbone",
    "strict_load",
]
