"""Datasets by ``data.name``: the entries of ``mtt.core.components.DATASETS``, instead of ``if``s on
the name in several modules.

A dataset is a ``DatasetSpec``: its name, its config dataclass (extending
``mtt.core.components.DataConfig``, each field's rule in its metadata; stored as the option
``data=<name>``), ``index(data_cfg, progress) -> ClipIndex`` and an optional ``check(data_cfg)``:
one-line errors about ``data.root`` (missing, a file, someone else's folder that it would write
into), which every entry point runs before any data or MLflow work (``mtt.config.root_errors``). A dataset
of one's own is a module that registers one (named by ``data.module``) and a YAML under
conf/data/ (CONTRIBUTING.md; this one has a setting of its own, ``subset``)::

    # my_data/fma.py
    @dataclass
    class FmaConfig(DataConfig):
        name: str = "fma"
        root: str = MISSING
        subset: str = setting("small", one_of("small", "medium"))

    DATASETS.register(DatasetSpec("fma", config=FmaConfig, index=lambda data_cfg, progress: ...))

``register`` is the short form for a dataset without settings of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from mtt.core.components import DATASETS, DataConfig, Spec, integer, number, one_of, or_null, pattern, setting
from mtt.data.index import SPLIT_RULES, ClipIndex, build_index

Dataset = Callable[[Any, bool], ClipIndex]
Check = Callable[[Any], list[str]]


@dataclass(frozen=True)
class DatasetSpec(Spec):
    index: Dataset  # (data_cfg, progress) -> ClipIndex
    config: type = field(default=DataConfig, kw_only=True)
    check: Optional[Check] = None  # (data_cfg) -> one-line errors about data.root


def register(name: str, check: Check | None = None) -> Callable[[Dataset], Dataset]:
    """Decorator: register ``fn(data_cfg, progress) -> ClipIndex`` as dataset ``name`` (its
    config: ``DataConfig``), and ``check(data_cfg)``, the errors about ``data.root`` that stop a
    command before any work."""

    def add(fn: Dataset) -> Dataset:
        known = DATASETS._entries.get(name)
        if known is not None and known.index is not fn:
            raise ValueError(f"dataset {name!r} is already registered ({known.index.__module__})")
        DATASETS.register(DatasetSpec(name, index=fn, check=check), option=False)
        return fn

    return add


def get(name: str, module: str | None = None) -> DatasetSpec:
    """The dataset registered as ``name``; ``ValueError`` listing the known ones otherwise."""
    return DATASETS.get(name, module)


def _spec(data_cfg) -> DatasetSpec:
    return get(data_cfg.name, getattr(data_cfg, "module", None))


def index_from_config(data_cfg, progress: bool = True) -> ClipIndex:
    """The clip index of ``cfg.data``, by ``data.name`` (the embedded dataset is generated first)."""
    return _spec(data_cfg).index(data_cfg, progress)


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


# data.tags of an MTAT-format dataset (mtt.data.index.select_tags).
TAG_SETS = pattern(r"all|top50|freq[1-9][0-9]*", "all, top50 or freqN with N >= 1 (e.g. freq50)")


@dataclass
class MtatConfig(DataConfig):
    """``data=mtat``: real MagnaTagATune at ``data.root``, the folder that holds
    annotations_final.csv and the extracted audio folders 0-9, a-f (``python -m
    mtt.data.download data=mtat data.root=DIR`` puts it there)."""

    name: str = "mtat"
    root: str = MISSING
    annotations: str = "annotations_final.csv"
    clip_info: Optional[str] = "clip_info_final.csv"
    # How long a clip should be where clip_info has no segmentStart/End for it (MTAT: 29.1 s);
    # preprocessing reports clips shorter than that by more than one patch. null = no check.
    clip_seconds: Optional[float] = setting(29.1, or_null(number(0, lo_open=True)))
    # all | top50 (the published list: the field's standard benchmark subset) | freqN (the N most
    # frequent here, e.g. freq50); mtt.data.index.select_tags
    tags: str = setting("top50", TAG_SETS)
    # standard (folders 0-b / c / d-f) | report (first quarter test); mtt.data.index.SPLIT_RULES
    split: str = setting("standard", one_of(*SPLIT_RULES))
    drop_untagged: bool = True  # drop clips with no tag of the chosen set (published protocol)


def mtat(data_cfg, progress: bool) -> ClipIndex:
    """Real MagnaTagATune, already at ``data.root``."""
    return mtat_index(data_cfg)


DATASETS.register(DatasetSpec("mtat", config=MtatConfig, index=mtat, check=_mtat_root))


def _toy_root(data_cfg) -> list[str]:
    """The embedded dataset is written only where nothing but an earlier one of its own lives."""
    from mtt.data.embedded.cache import write_refusal

    refusal = write_refusal(data_cfg.root, data_cfg.synth) if data_cfg.synth is not None else None
    return [refusal] if refusal else []


@dataclass
class SynthConfig:
    """The embedded dataset's generator: how many clips, how long, from which seed."""

    clips_per_folder: int = setting(20, integer(1))  # x 16 folders
    seconds: float = setting(6.0, number(0.1, 600))  # clip length; real MTAT clips are 29.1 s
    seed: int = setting(0, integer(0))


@dataclass
class ToyConfig(MtatConfig):
    """``data=toy``, the embedded dataset (the default): a small MTAT-format dataset generated
    (seeded, by ``synth``) at ``root`` on first use, so that every command works on a machine
    without MagnaTagATune. 16 folders x 20 clips x 6 s."""

    name: str = "toy"
    root: str = "${paths.cache}/toy-v1/c${.synth.clips_per_folder}-s${.synth.seconds}-seed${.synth.seed}"
    clip_seconds: Optional[float] = setting("${.synth.seconds}", or_null(number(0, lo_open=True)))  # the generator's
    tags: str = setting("all", TAG_SETS)
    synth: SynthConfig = field(default_factory=SynthConfig)


def toy(data_cfg, progress: bool) -> ClipIndex:
    """The embedded dataset of ``data.synth``, generated at ``data.root`` on first use."""
    from mtt.data.embedded import ensure_dataset  # scipy and the synthesiser: only for this dataset

    if data_cfg.synth is None:
        raise ValueError("data.name=toy needs data.synth (clips_per_folder, seconds, seed): see ToyConfig")
    ensure_dataset(data_cfg.root, data_cfg.synth, progress=progress)
    return mtat_index(data_cfg)


DATASETS.register(DatasetSpec("toy", config=ToyConfig, index=toy, check=_toy_root))
