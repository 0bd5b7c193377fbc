"""Datasets by ``data.name``: one small registry instead of ``if``s on the name in several modules.

A dataset is a function ``(data_cfg, progress) -> ClipIndex`` registered under its name. Adding
one is a reader module and a ``conf/data/<name>.yaml`` that sets ``name``; the module registers
its function and is named in ``_MODULES``, which imports it on first lookup (a plain import here
would be a cycle: the module imports ``register`` from this one)::

    # mtt/data/fma.py
    from mtt.data.datasets import register

    @register("fma")
    def fma(data_cfg, progress: bool) -> ClipIndex: ...

A dataset may also register a ``check``: ``(data_cfg) -> [one-line errors]`` about ``data.root``
(missing, a file, someone else's folder that it would write into), which every entry point runs
before any data or MLflow work (``root_errors``, from ``mtt.preflight``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtt.data.index import ClipIndex, build_index

Dataset = Callable[[Any, bool], ClipIndex]
Check = Callable[[Any], list[str]]
_DATASETS: dict[str, Dataset] = {}
_CHECKS: dict[str, Check] = {}
# name -> the module that registers it, for datasets defined outside this module (mtat and toy
# are below).
_MODULES: dict[str, str] = {}


def register(name: str, check: Check | None = None) -> Callable[[Dataset], Dataset]:
    """Decorator: register ``fn(data_cfg, progress) -> ClipIndex`` as dataset ``name``, and
    ``check(data_cfg)``, the errors about ``data.root`` that stop a command before any work."""

    def add(fn: Dataset) -> Dataset:
        if name in _DATASETS and _DATASETS[name] is not fn:
            raise ValueError(f"dataset {name!r} is already registered ({_DATASETS[name].__module__})")
        _DATASETS[name] = fn
        if check is not None:
            _CHECKS[name] = check
        return fn

    return add


def get(name: str) -> Dataset:
    """The dataset registered as ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in _DATASETS and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _DATASETS:
        known = sorted({*_DATASETS, *_MODULES})
        raise ValueError(f"data.name={name!r}: no such dataset; known: {', '.join(known)}")
    return _DATASETS[name]


def root_errors(data_cfg) -> list[str]:
    """The registered ``check`` of ``data.name`` on ``data_cfg`` (one line per error; [] when the
    dataset registers none)."""
    get(data_cfg.name)  # imports the module that registers it
    check = _CHECKS.get(data_cfg.name)
    return check(data_cfg) if check is not None else []


def index_from_config(data_cfg, progress: bool = True) -> ClipIndex:
    """The clip index of ``cfg.data``, by ``data.name`` (the embedded dataset is generated first)."""
    return get(data_cfg.name)(data_cfg, progress)


def mtat_index(data_cfg) -> ClipIndex:
    """The index of an MTAT-format folder at ``data.root`` (``mtt.data.mtat``)."""
    return build_index(
        data_cfg.root,
        data_cfg.annotations,
        data_cfg.tags,
        data_cfg.split,
        data_cfg.drop_untagged,
        data_cfg.clip_info,
        data_cfg.clip_seconds,
    )


def _mtat_root(data_cfg) -> list[str]:
    """Real MTAT is read from data.root: it must be set, and a folder."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(data_cfg, "root"):
        return ["data.root is not set: data=mtat needs data.root=DIR, the folder holding annotations_final.csv and 0-f"]
    root = Path(data_cfg.root).expanduser()
    if not root.exists():
        return [
            f"data.root={data_cfg.root}: no such folder (download MTAT into it first: "
            f"python -m mtt.data.download data=mtat data.root={data_cfg.root})"
        ]
    if not root.is_dir():
        return [f"data.root={data_cfg.root}: a file, not a folder (expected the folder holding annotations_final.csv)"]
    return []


@register("mtat", check=_mtat_root)
def mtat(data_cfg, progress: bool) -> ClipIndex:
    """Real MagnaTagATune, already at ``data.root`` (``python -m mtt.data.download`` puts it there)."""
    return mtat_index(data_cfg)


def _toy_root(data_cfg) -> list[str]:
    """The generated dataset is written only where nothing but an earlier one of its own lives."""
    from mtt.data.embedded.cache import write_refusal

    refusal = write_refusal(data_cfg.root, data_cfg.synth) if data_cfg.synth is not None else None
    return [refusal] if refusal else []


@register("toy", check=_toy_root)
def toy(data_cfg, progress: bool) -> ClipIndex:
    """The embedded dataset of ``data.synth``, generated at ``data.root`` on first use."""
    from mtt.data.embedded import ensure_dataset  # scipy and the synthesiser: only for this dataset

    if data_cfg.synth is None:
        raise ValueError("data.name=toy needs data.synth (clips_per_folder, seconds, seed): see conf/data/toy.yaml")
    ensure_dataset(data_cfg.root, data_cfg.synth, progress=progress)
    return mtat_index(data_cfg)
