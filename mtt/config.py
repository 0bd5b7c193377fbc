"""Typed configuration schema for every run, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` only change values of these dataclasses, so a misspelt key or a
value of the wrong type fails while the config is composed, before any data or model work; a value
of the right type outside what its key allows (``trainer.batch_size=0``) fails ``validate``, which
every entry point calls first (``exit_if_invalid``: one line, exit status 2). A key, group or option
that does not exist (``+hed=autopool``, which Hydra would add silently) is refused the same way,
before Hydra composes (``hydra_entry``, the entry points' ``@hydra.main``) and after
(``unknown_key_errors``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import secrets
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from mtt.paths import CONF_DIR, REPO_ROOT  # noqa: F401  (re-exported: the entry points' config_path)


@dataclass
class PathsConfig:
    # Root of everything mtt generates or downloads (toy dataset, feature stores, weights).
    cache: str = "${oc.env:MTT_CACHE,${oc.env:HOME}/.cache/mtt}"


@dataclass
class SynthConfig:
    """Parameters of the embedded, generated MTAT-format dataset (``data=toy``)."""

    clips_per_folder: int = 20  # x 16 folders
    seconds: float = 6.0  # clip length; real MTAT clips are 29.1 s
    seed: int = 0


@dataclass
class DataConfig:
    name: str = MISSING
    # Folder holding annotations_final.csv and the audio folders 0-9, a-f.
    root: str = MISSING
    annotations: str = "annotations_final.csv"
    clip_info: Optional[str] = "clip_info_final.csv"
    # How long a clip should be where clip_info has no segmentStart/End for it (MTAT: 29.1 s);
    # preprocessing reports clips shorter than that by more than one patch. null = no check.
    clip_seconds: Optional[float] = None
    tags: str = "all"  # all | top50 (published list) | freqN (N most frequent here, e.g. freq50)
    split: str = "standard"  # standard (folders 0-b / c / d-f) | report (first quarter test)
    drop_untagged: bool = True  # drop clips with no tag of the chosen set (published protocol)
    # When set, the dataset is generated at `root` on first use (the embedded default).
    synth: Optional[SynthConfig] = None


@dataclass
class FeaturesConfig:
    """The front end (by default VGGish's log-mel, Google's vggish_params) and where its patches
    are stored. ``name`` picks the front end (mtt.features.FRONT_ENDS); the feature store is keyed
    by every value here but ``store`` and ``workers``."""

    # vggish: log(mel + log_offset), HTK mel, no centring (Google's reference) | mel_db: torchaudio's
    # MelSpectrogram (centred frames, n_fft = window) then AmplitudeToDB (Won et al. 2020)
    name: str = "vggish"
    sample_rate: int = 16000
    window_seconds: float = 0.025
    hop_seconds: float = 0.010
    n_mels: int = 64
    fmin: float = 125.0
    fmax: float = 7500.0
    log_offset: float = 0.01
    patch_frames: int = 96  # 0.96 s
    patch_hop_frames: int = 96  # non-overlapping patches
    store: str = "${paths.cache}/features"
    workers: int = 0  # preprocessing processes; 0 = one per core


@dataclass
class BackboneConfig:
    name: str = "vggish"  # a registered backbone (mtt.models.registry)
    # The module that registers `name` when imported (e.g. a backbone of your own, on PYTHONPATH);
    # null = the built-in backbones (vggish, shortchunk, shortchunk_res). CONTRIBUTING.md.
    module: Optional[str] = None
    # none (random init) | audioset (official torchvggish file, downloaded once) | a local path
    weights: str = "none"
    url: str = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
    hub_dir: Optional[str] = None  # torch hub cache; None = torch.hub.get_dir()
    freeze: bool = True  # the report froze the whole conv stack
    finetune_last: int = 0  # with freeze=true, still train the last N conv layers
    width: float = 1.0  # channel multiplier; must be 1.0 for pretrained weights (tests use less)
    embeddings: bool = False  # append VGGish's 128-d embedding layers after the conv stack
    embedding_relu: bool = True  # torchvggish keeps a ReLU after the last embedding layer
    cache: bool = True  # with a frozen backbone, compute its conv maps once and reuse them


@dataclass
class PoolConfig:
    name: str = "gap"  # gap | autopool | max (global max over time and frequency)
    alpha_init: float = 0.0  # autopool: 0 = mean pooling
    constraint: str = "none"  # autopool: none | cap (alpha projected into [-alpha_max, alpha_max] after each step)
    alpha_max: float = 10.0
    alpha_l2: float = 0.0  # autopool: L2 penalty on alpha (RAP)


@dataclass
class HeadConfig:
    # bn_dropout_dense: blocks of (BatchNorm, Dropout, Dense), the report's | dense_bn: (Dense,
    # BatchNorm, ReLU, Dropout) blocks then the output Dense (Won et al. 2020's short-chunk CNN)
    name: str = "bn_dropout_dense"
    blocks: int = 2  # BatchNorm + Dropout + Dense blocks; all but the last Dense have a ReLU
    width: int = 256  # hidden width of every block but the last
    dropout: float = 0.2
    output: str = "sigmoid"  # sigmoid (independent tags) | softmax (the report's, wrong here)
    # Output-layer bias at the start: prior = log-odds of each tag's training frequency, so the
    # loss starts near its floor (most tags are on 1-5% of clips) | zero (the report's, Keras'
    # zeros) | default (PyTorch's init, uniform within +-1/sqrt(fan in): Won et al.'s).
    bias_init: str = "prior"


@dataclass
class StepsConfig:
    # declared: annotated train clips // batch; cached: train clips with features // batch;
    # patches: cached train patches // batch (the default: an epoch sees the data); fixed: n;
    # epoch: one pass of stream.mode=epoch, ceil(cached train clips / batch)
    policy: str = "patches"
    n: Optional[int] = None


@dataclass
class StreamConfig:
    n_active: int = 20  # streamers the mux keeps open (the report's 20)
    rate: Optional[float] = 8.0  # mean patches drawn from a streamer before it is replaced
    # pescador StochasticMux mode (with_replacement | single_active), or epoch: passes over the
    # training clips, each clip once per pass in a shuffled order at a random offset (Won et al.)
    mode: str = "with_replacement"
    patches_per_clip: Optional[int] = None  # None = all; 1 = the report's single random patch
    num_workers: int = 0  # DataLoader workers (each streams a disjoint shard of clips)
    # The mux's sampling distribution over clips: uniform | length (proportional to a clip's
    # patches, so every patch is about equally likely)
    weights: str = "uniform"


@dataclass
class EvalConfig:
    aggregate: str = "mean"  # how patch probabilities become a clip's: mean | max
    patches_per_clip: Optional[int] = None  # None = all patches (clip-level); 1 = report's
    batch_size: int = 128
    # Which patches_per_clip chunks: random (a fixed, seeded subset of the stored patches) | even
    # (Won et al. 2020's: chunk i starts at i * ((clip samples - chunk_samples) // patches_per_clip)
    # samples, to the nearest frame)
    spacing: str = "random"
    # The samples one chunk spans in even's formula (Won et al.: 59049); null = the fewest samples
    # that make one patch of the front end
    chunk_samples: Optional[int] = None


@dataclass
class PhaseConfig:
    """From ``epoch`` on (epochs count from 0), train with ``optimizer`` (null: keep) at ``lr``."""

    epoch: int = MISSING
    lr: float = MISSING
    optimizer: Optional[str] = None  # adam | sgd | null (the one before)
    reload_best: bool = False  # start the phase from the best checkpoint so far (Won et al. do)


@dataclass
class TrainerConfig:
    epochs: int = 60  # the maximum with early stopping (patience); the report trained 12
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | sgd (the first phase's; trainer.phases may switch)
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA) | fp32 | bf16
    channels_last: bool = True  # NHWC convolutions (tensor cores on CUDA)
    deterministic: bool = False
    monitor: str = "val_roc_auc"  # metric that picks the best checkpoint
    # Early stopping: stop after this many epochs without a better `monitor` (epochs is then the
    # maximum); null = train all epochs (the report's fixed schedules).
    patience: Optional[int] = 10
    # Learning-rate schedule: none | plateau (multiply the lr by lr_factor after lr_patience
    # epochs without a better `monitor`) | phases (trainer.phases: optimiser and lr by epoch).
    lr_schedule: str = "plateau"
    phases: list[PhaseConfig] = field(default_factory=list)
    lr_patience: int = 3
    lr_factor: float = 0.3
    progress: bool = True
    # Continue an interrupted run from its last checkpoint, into the same MLflow run:
    # true = the newest unfinished run with this config; a run id = that run; null/false = new run.
    resume: Optional[str] = None


@dataclass
class ProbeConfig:
    """The linear-probe reference (``python -m mtt.probe``, see mtt/probe.py)."""

    # Inverse L2 strengths tried (scikit-learn's C); the best on the validation split is kept.
    C: list = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    experiment: str = "mtt"
    run_name: Optional[str] = None  # None: built from the command-line overrides
    # Seconds a finished run keeps trying to ship its journal to an unreachable store before it
    # exits anyway (0, naming the journal and the `python -m mtt.sync` command that ships it).
    flush_timeout_s: float = 120.0


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    steps: StepsConfig = field(default_factory=StepsConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ---------------------------------------------------------------------------------------------
# Values: the schema's types say what a key may hold, these rules what it may be. A value
# outside them fails when the config is composed (``validate``), naming the key, the value and
# what is allowed, instead of dividing by zero, streaming forever or failing after the MLflow
# run was created.
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config value outside what its key allows (the message is one line)."""


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    allowed: str  # what the error says is allowed


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(lo: int, hi: int | None = None) -> Rule:
    if hi is None:
        return Rule(lambda v: _is_int(v) and v >= lo, f"an integer >= {lo}")
    return Rule(lambda v: _is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")


def number(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def ok(v) -> bool:
        return _is_number(v) and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))

    if hi is None:
        return Rule(ok, f"a number {'>' if lo_open else '>='} {lo:g}")
    return Rule(ok, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"one of {', '.join(choices)}")


def pattern(regex: str, allowed: str) -> Rule:
    return Rule(lambda v: isinstance(v, str) and re.fullmatch(regex, v) is not None, allowed)


def or_null(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"{rule.allowed}, or null")


# The longest names every MLflow store keeps (see the rules below).
MAX_EXPERIMENT_NAME = 256
MAX_RUN_NAME = 250

# The metrics every epoch logs that can pick the best checkpoint (mtt.train.monitor_score).
# val_loss is the BCE of the clip-level probabilities; val_chunk_loss the mean BCE of every
# evaluated chunk against its clip's tags (Won et al.'s validation loss, mtt.evaluate).
MONITORS = ("val_roc_auc", "val_pr_auc", "val_loss", "val_chunk_loss", "val_accuracy", "train_loss", "train_accuracy")

RULES: dict[str, Rule] = {
    "data.tags": pattern(r"all|top50|freq[1-9][0-9]*", "all, top50 or freqN with N >= 1 (e.g. freq50)"),
    "data.split": one_of("standard", "report"),
    "data.clip_seconds": or_null(number(0, lo_open=True)),
    "data.synth.clips_per_folder": integer(1),
    "data.synth.seconds": number(0.1, 600),
    "data.synth.seed": integer(0),
    "features.name": one_of("vggish", "mel_db"),
    "features.sample_rate": integer(1),
    "features.window_seconds": number(0, lo_open=True),
    "features.hop_seconds": number(0, lo_open=True),
    "features.n_mels": integer(1),
    "features.fmin": number(0),
    "features.fmax": number(0, lo_open=True),
    "features.log_offset": number(0, lo_open=True),
    "features.patch_frames": integer(1),
    "features.patch_hop_frames": integer(1),
    "features.workers": integer(0),
    "backbone.finetune_last": integer(0, 6),  # VGGish has 6 conv layers
    "backbone.width": number(0, lo_open=True),
    "pool.name": one_of("gap", "autopool", "max"),
    "pool.alpha_init": Rule(_is_number, "a finite number"),
    "pool.constraint": one_of("none", "cap"),
    "pool.alpha_max": number(0, lo_open=True),
    "pool.alpha_l2": number(0),
    "head.name": one_of("bn_dropout_dense", "dense_bn"),
    "head.blocks": integer(1),
    "head.width": integer(1),
    "head.dropout": number(0, 1, hi_open=True),
    "head.output": one_of("sigmoid", "softmax"),
    "head.bias_init": one_of("prior", "zero", "default"),
    "steps.policy": one_of("declared", "cached", "patches", "fixed", "epoch"),
    "steps.n": or_null(integer(1)),
    "stream.n_active": integer(1),
    # null would never replace an active clip: training would see only n_active clips, forever.
    "stream.rate": Rule(number(0, lo_open=True).ok, "a number > 0 (null never replaces an active clip)"),
    # exhaustive ends the stream once every clip was drawn from: training needs an endless one.
    "stream.mode": Rule(
        one_of("with_replacement", "single_active", "epoch").ok,
        "one of with_replacement, single_active, epoch (exhaustive would end the endless stream)",
    ),
    "stream.patches_per_clip": or_null(integer(1)),
    "stream.num_workers": integer(0),
    "stream.weights": one_of("uniform", "length"),
    "eval.aggregate": one_of("mean", "max"),
    "eval.patches_per_clip": or_null(integer(1)),
    "eval.batch_size": integer(1),
    "eval.spacing": one_of("random", "even"),
    "eval.chunk_samples": or_null(integer(1)),
    "trainer.epochs": integer(1),
    "trainer.batch_size": integer(1),
    "trainer.lr": number(0, lo_open=True),
    "trainer.weight_decay": number(0),
    "trainer.optimizer": one_of("adam", "sgd"),
    "trainer.momentum": number(0, 1, hi_open=True),
    "trainer.seed": integer(0, 2**32 - 1),  # numpy's seed range
    "trainer.device": pattern(r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda or cuda:N"),
    "trainer.precision": one_of("auto", "fp32", "bf16"),
    "trainer.monitor": one_of(*MONITORS),
    "trainer.patience": or_null(integer(1)),
    "trainer.lr_schedule": one_of("none", "plateau", "phases"),
    "trainer.phases": Rule(
        lambda v: isinstance(v, (list, tuple, ListConfig)) and all(_phase_ok(p) for p in v),
        "a list of {epoch: an integer >= 1, lr: a number > 0, optimizer: adam, sgd or null}",
    ),
    "trainer.lr_patience": integer(0),
    "trainer.lr_factor": number(0, 1, lo_open=True, hi_open=True),
    "probe.C": Rule(
        lambda v: isinstance(v, (list, tuple, ListConfig)) and len(v) > 0 and all(_is_number(c) and c > 0 for c in v),
        "a non-empty list of numbers > 0",
    ),
    # MLflow's database columns: experiments.name VARCHAR(256) (its own check allows 500, which
    # PostgreSQL and MySQL then refuse), runs.name VARCHAR(250).
    "tracking.experiment": Rule(
        lambda v: isinstance(v, str) and v.strip() != "" and len(v) <= MAX_EXPERIMENT_NAME,
        f"a non-empty name of at most {MAX_EXPERIMENT_NAME} characters",
    ),
    "tracking.run_name": or_null(
        Rule(lambda v: isinstance(v, str) and len(v) <= MAX_RUN_NAME, f"a name of at most {MAX_RUN_NAME} characters")
    ),
    "tracking.flush_timeout_s": number(0),
}


# ---------------------------------------------------------------------------------------------
# Keys: only the schema's. Hydra refuses a misspelt key (head.blockz=3) in a long message, but a
# key added with + (+hed=autopool, +trainer.epochz=3) is accepted and silently ignored: the run
# trains the default and is named after the typo. Both are refused here in one line, with the
# closest key or group, before composition (``override_errors``, the command line) and after it
# (``unknown_key_errors``, whatever composed the config: a preset, a library caller).
# ---------------------------------------------------------------------------------------------


def _schema_node(tp) -> Any:
    """The dataclass a field holds (``Optional[X]`` -> ``X``), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _keys_of(cls: Any, prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        node = _schema_node(hints[f.name])
        keys[prefix + f.name] = node
        if node is not None:
            keys.update(_keys_of(node, f"{prefix}{f.name}."))
    return keys


@functools.cache
def schema_keys() -> dict[str, Any]:
    """Every dotted key of the schema (``trainer``, ``trainer.epochs``, ``data.synth.seed``) ->
    the dataclass it holds, or None for a value (a number, a string, a list)."""
    return _keys_of(Config, "")


def _known(key: str) -> bool:
    """A schema key, or an element inside a list-valued one (``trainer.phases.0.lr``)."""
    keys = schema_keys()
    parts = key.split(".")
    return key in keys or any(keys.get(".".join(parts[:i]), 0) is None for i in range(1, len(parts)))


def unknown_key_error(key: str, value: str, groups: Sequence[str] = (), defaults: Sequence[str] = ()) -> str:
    """``key=value`` names no key of the schema (nor a config group): one line, with the closest
    known key or group (``groups``; those in ``defaults`` are changed without ``+``)."""
    keys = [k for k in schema_keys() if k.count(".") <= key.count(".") + 1]
    close = difflib.get_close_matches(key, [*groups, *keys], n=1, cutoff=0.6)
    what = "key or config group" if "." not in key else "key"
    if not close:
        top = sorted({*groups, *(k for k in schema_keys() if "." not in k)})
        return f"{key}={value}: no config {what} {key!r}; the top-level ones: {', '.join(top)}"
    best = close[0]
    plus = "+" if best in groups and best not in defaults else ""
    kind = "the config group" if best in groups else "the key"
    return f"{key}={value}: no config {what} {key!r}; did you mean {kind} {best} ({plus}{best}={value})?"


@functools.cache
def config_groups() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(mtt's top-level config groups: conf/'s folders and ``experiment``; those of them in
    conf/config.yaml's defaults list, changed without ``+``)."""
    from mtt.presets import GROUP

    groups = sorted({p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"} | {GROUP})
    primary = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))
    defaults = primary.get("defaults", []) if isinstance(primary, dict) else []
    in_defaults = sorted(str(k) for d in defaults if isinstance(d, dict) for k in d)
    return tuple(groups), tuple(in_defaults)


def unknown_key_errors(cfg) -> list[str]:
    """One line per key of a composed config that the schema does not have (``+hed=autopool``
    composes to a top-level ``hed``). Hydra's own ``hydra`` node is Hydra's to check."""
    errors: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        values = OmegaConf.to_container(node, resolve=False)
        assert isinstance(values, dict)
        for key, value in values.items():
            path = f"{prefix}{key!s}"
            if path == "hydra":
                continue
            if path not in schema_keys():
                errors.append(unknown_key_error(path, _show(value), *config_groups()))
            elif schema_keys()[path] is not None and isinstance(value, dict):  # (data.synth may be null)
                walk(node[key], path + ".")

    walk(cfg, "")
    return errors


def _phase_ok(p) -> bool:
    return (
        _is_int(p.get("epoch"))
        and p["epoch"] >= 1
        and _is_number(p.get("lr"))
        and p["lr"] > 0
        and p.get("optimizer") in (None, "adam", "sgd")
    )


_ABSENT = object()


def _show(value) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    text = str(value)
    return text if len(text) <= 80 else f"{text[:40]}... ({len(text)} characters)"


def check_value(key: str, value) -> str | None:
    """The error for ``key=value`` under ``RULES`` (None when allowed or the key has no rule)."""
    rule = RULES.get(key)
    if rule is None or rule.ok(value):
        return None
    return f"{key}={_show(value)}: expected {rule.allowed}"


def config_errors(cfg) -> list[str]:
    """One line per value of a composed config outside ``RULES`` or the rules that tie two keys
    together, naming the key(s), the value and what is allowed. Keys the config does not have (no
    ``data.synth`` for real data) are skipped."""
    errors = unknown_key_errors(cfg)
    for key in RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if value is not _ABSENT:
            errors.append(check_value(key, value))
    f = cfg.features
    if _is_number(f.fmin) and _is_number(f.fmax) and _is_int(f.sample_rate):
        if not f.fmin < f.fmax <= f.sample_rate / 2:
            errors.append(
                f"features.fmin={_show(f.fmin)}, features.fmax={_show(f.fmax)}: expected "
                f"fmin < fmax <= sample_rate / 2 = {f.sample_rate / 2:g}"
            )
    if cfg.steps.policy == "fixed" and cfg.steps.n is None:
        errors.append("steps.n=null: expected an integer >= 1 with steps.policy=fixed")
    if cfg.steps.policy == "epoch" and cfg.stream.mode != "epoch":
        errors.append(
            f"steps.policy=epoch, stream.mode={cfg.stream.mode}: steps=epoch counts the passes of stream.mode=epoch"
        )
    t = cfg.trainer
    epochs = [p.epoch for p in t.phases] if check_value("trainer.phases", t.phases) is None else None
    if t.lr_schedule == "phases" and epochs is not None and (not epochs or epochs != sorted(set(epochs))):
        errors.append(
            f"trainer.phases={_show(epochs)} (epochs): expected a non-empty list in increasing "
            "epoch order with trainer.lr_schedule=phases"
        )
    if t.nesterov and t.momentum == 0:
        errors.append("trainer.nesterov=true, trainer.momentum=0.0: expected a momentum > 0 for Nesterov")
    from mtt.models.registry import backbone_errors  # here, not at the top: it imports torch

    errors += backbone_errors(cfg)
    return [e for e in errors if e]


def validate(cfg) -> None:
    """Raise ``ConfigError`` (one line) when ``config_errors`` finds anything."""
    errors = config_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors))


# The commands (Hydra job names) that create data.root rather than read it: mtt.data.download.
CREATES_DATA_ROOT = ("download",)


def exit_if_invalid(cfg, more_errors: Sequence[str] = (), data: bool = True) -> None:
    """``validate`` for an entry point (and the launcher, with ``more_errors`` about swept
    values): a bad value ends the process with ``error: <what>`` on stderr and exit status 2 (a
    usage error), before any data, model or MLflow work.

    ``data``: also check ``data.root`` on disk (``mtt.data.datasets.root_errors``: a dataset that
    would be written into someone else's folder, or read from a missing one); False for the
    command that creates it (``mtt.data.download``, which checks its target itself).
    """
    errors = [*config_errors(cfg), *more_errors]
    # The launcher's callback checks every command's config before its job: it knows the command
    # by Hydra's job name (its module's), and the one that creates data.root must not be told
    # that it does not exist yet.
    if data and OmegaConf.select(cfg, "hydra.job.name", default=None) not in CREATES_DATA_ROOT:
        from mtt.data.datasets import root_errors  # here: the datasets import their readers

        errors += root_errors(cfg.data)
    if errors:
        print(f"error: {'; '.join(errors)}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def launch_id() -> str:
    """A random id for one launch (``${mtt.launch_id:}`` in conf/config.yaml's sweep folder):
    two sweeps started in the same second get folders (and sweep ids) of their own. Drawn
    once per launch: OmegaConf caches a resolver's value in the config, and Hydra copies that
    cache into every job's config (as it does for ``${now:...}``), so a sweep's jobs agree."""
    return secrets.token_hex(3)


_SEARCHED = "hydra.sweeper.params."


def _option_errors(o, group: str, options: list[str], shown: str) -> list[str]:
    """The values of group override ``o`` (a choice sweep's every one) that are no option."""
    if o.is_delete() or (o.value_type is not None and o.value_type.name == "GLOB_CHOICE_SWEEP"):
        return []  # a glob picks among the options; ~group removes one
    values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else [o.get_value_element_as_str()]
    errors = []
    for value in values:
        if value not in options and value != "null":
            close = difflib.get_close_matches(value, options, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            errors.append(f"{shown}: no option {value!r} in config group {group} ({hint}options: {', '.join(options)})")
    return errors


def override_errors(overrides: Sequence[str]) -> list[str]:
    """One line per command-line override whose key is neither a schema key nor a config group,
    or whose group option does not exist (every value of a sweep), with the closest known one.
    Hydra's own keys and groups (``hydra.*``, ``hydra/launcher=...``) are Hydra's to check; so
    is the search space of ``hydra.sweeper.params``, but for its keys, which must be mtt's."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return []  # a syntax error: Hydra says where
    groups, defaults = config_groups()
    errors = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for o in parsed:
            key, shown = o.key_or_group, o.input_line or o.key_or_group
            searched = key.startswith(_SEARCHED)  # an Optuna dimension: its key must be mtt's
            key = key[len(_SEARCHED) :] if searched else key
            if (o.is_hydra_override() and not searched) or o.package is not None:
                continue
            parent, _, name = key.lstrip("+").rpartition("/")
            if name in loader.list_groups(parent):  # a group: each option (of a sweep too) must exist
                if not searched:
                    errors += _option_errors(o, key, loader.get_group_options(key), shown)
            elif not _known(key.lstrip("+")):
                prefix = _SEARCHED if searched else shown[: len(shown) - len(shown.lstrip("+~"))]
                value = o.get_value_string() if "=" in (o.input_line or "") else ""
                errors.append(prefix + unknown_key_error(key.lstrip("+"), value, groups, defaults))
    return errors


def hydra_entry(task: Callable) -> Callable:
    """``@hydra.main`` on conf/config.yaml for mtt's entry points, after ``override_errors`` on
    the command line: a mistyped key or group ends the process with ``error: <what>`` and exit
    status 2 before Hydra composes anything (``--help``, ``--cfg``, another config: Hydra's)."""
    import hydra

    main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)

    @functools.wraps(task)
    def entry(*args, **kwargs):
        if not args and not kwargs:  # from the command line (Hydra reads sys.argv)
            from hydra._internal.utils import get_args_parser

            try:
                known, _ = get_args_parser().parse_known_args(sys.argv[1:])
            except SystemExit:  # argparse's own usage error: Hydra repeats it
                known = None
            plain = known is not None and not (
                known.help
                or known.hydra_help
                or known.info
                or known.shell_completion
                or known.config_name
                or known.config_path
                or known.config_dir
                or known.experimental_rerun
            )
            errors = override_errors(known.overrides) if plain else []
            if errors:
                print(f"error: {'; '.join(errors)}", file=sys.stderr, flush=True)
                raise SystemExit(2)
        return main(*args, **kwargs)

    return entry


def register_configs() -> None:
    """Register the schema so that conf/config.yaml can extend it, and its resolver (idempotent)."""
    OmegaConf.register_new_resolver("mtt.launch_id", launch_id, use_cache=True, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    from mtt.presets import register_presets  # the `experiment` group (experiments/)

    register_presets()
    # hydra/sweeper=optuna is registered by its plugin (hydra_plugins/mtt_optuna_sweeper), which
    # Hydra imports while scanning for plugins: mtt.search needs mtt.tracking, which needs this.


register_configs()
