"""Typed configuration schema for every run, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` only change values of these dataclasses and of the registry
entries' (mtt.core.components: a backbone, pool, head, dataset or steps policy declares its own), so a
misspelt key or a value of the wrong type fails while the config is composed, before any data or
model work; a value of the right type outside what its key allows (``trainer.batch_size=0``), the
rule in its field's metadata, fails ``validate``, which every entry point calls first
(``exit_if_invalid``: one line, exit status 2). A key, group or option that does not exist
(``+hed=autopool``, which Hydra would add silently) is refused the same way, before Hydra composes
(``hydra_entry``, the entry points' ``@hydra.main``) and after (``unknown_key_errors``).

Nothing is registered on import: ``register_configs`` stores the schema, mtt's entries and the
presets, and ``hydra_entry`` (or a caller that composes by itself) calls it first.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import secrets
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from mtt.core.components import (  # noqa: F401  (Rule and its constructors: re-exported)
    DATASETS,
    REGISTRIES,
    BackboneConfig,
    DataConfig,
    HeadConfig,
    PoolConfig,
    RegistryError,
    Rule,
    StepsConfig,
    defaults_of,
    field_keys,
    field_rules,
    integer,
    is_int,
    is_number,
    load_builtins,
    number,
    number_list,
    one_of,
    or_null,
    pattern,
    setting,
    show,
    value_error,
)
from mtt.core.paths import CONF_DIR, REPO_ROOT  # noqa: F401  (re-exported: the entry points' config_path)

# stream.mode: pescador's StochasticMux modes that never end, and mtt's epoch passes (mtt.features.streams).
STREAM_MODES = ("with_replacement", "single_active", "epoch")


@dataclass
class PathsConfig:
    # Root of everything mtt generates or downloads (the embedded dataset, feature stores, weights).
    cache: str = "${oc.env:MTT_CACHE,${oc.env:HOME}/.cache/mtt}"


@dataclass
class FeaturesConfig:
    """The front end (by default VGGish's log-mel, Google's vggish_params) and where its patches
    are stored. ``name`` picks the front end (mtt.features.frontend.FRONT_ENDS); the feature store is keyed
    by every value here but ``store`` and ``workers``."""

    # vggish: log(mel + log_offset), HTK mel, no centring (Google's reference) | mel_db: torchaudio's
    # MelSpectrogram (centred frames, n_fft = window) then AmplitudeToDB (Won et al. 2020)
    name: str = "vggish"
    sample_rate: int = setting(16000, integer(1))
    window_seconds: float = setting(0.025, number(0, lo_open=True))
    hop_seconds: float = setting(0.010, number(0, lo_open=True))
    n_mels: int = setting(64, integer(1))
    fmin: float = setting(125.0, number(0))
    fmax: float = setting(7500.0, number(0, lo_open=True))
    log_offset: float = setting(0.01, number(0, lo_open=True))
    patch_frames: int = setting(96, integer(1))  # 0.96 s
    patch_hop_frames: int = setting(96, integer(1))  # non-overlapping patches
    store: str = "${paths.cache}/features"
    workers: int = setting(0, integer(0))  # preprocessing processes; 0 = one per core


@dataclass
class StreamConfig:
    n_active: int = setting(20, integer(1))  # streamers the mux keeps open (the report's 20)
    # Mean patches drawn from a streamer before it is replaced; null would never replace an
    # active clip: training would see only n_active clips, forever.
    rate: Optional[float] = setting(
        8.0, Rule(number(0, lo_open=True).ok, "a number > 0 (null never replaces an active clip)")
    )
    # pescador StochasticMux mode (with_replacement | single_active), or epoch: passes over the
    # training clips, each clip once per pass in a shuffled order at a random offset (Won et al.).
    # exhaustive ends the stream once every clip was drawn from: training needs an endless one.
    mode: str = setting(
        "with_replacement",
        Rule(
            one_of(*STREAM_MODES).ok,
            f"one of {', '.join(STREAM_MODES)} (exhaustive would end the endless stream)",
        ),
    )
    # None = all; 1 = the report's single random patch
    patches_per_clip: Optional[int] = setting(None, or_null(integer(1)))
    num_workers: int = setting(0, integer(0))  # DataLoader workers (each streams a disjoint shard of clips)
    # The mux's sampling distribution over clips: uniform | length (proportional to a clip's
    # patches, so every patch is about equally likely); mtt.features.streams.mux_weights
    weights: str = setting("uniform", one_of("uniform", "length"))


@dataclass
class EvalConfig:
    # How patch probabilities become a clip's: mean | max (mtt.training.evaluate.AGGREGATES)
    aggregate: str = setting("mean", one_of("mean", "max"))
    # None = all patches (clip-level); 1 = report's
    patches_per_clip: Optional[int] = setting(None, or_null(integer(1)))
    batch_size: int = setting(128, integer(1))
    # Which patches_per_clip chunks: random (a fixed, seeded subset of the stored patches) | even
    # (Won et al. 2020's: chunk i starts at i * ((clip samples - chunk_samples) // patches_per_clip)
    # samples, to the nearest frame)
    spacing: str = setting("random", one_of("random", "even"))
    # The samples one chunk spans in even's formula (Won et al.: 59049); null = the fewest samples
    # that make one patch of the front end
    chunk_samples: Optional[int] = setting(None, or_null(integer(1)))


# The optimisers trainer.optimizer and a phase may name (mtt.training.schedule builds them).
OPTIMIZERS = ("adam", "sgd")


@dataclass
class PhaseConfig:
    """From ``epoch`` on (epochs count from 0), train with ``optimizer`` (null: keep) at ``lr``."""

    epoch: int = MISSING
    lr: float = MISSING
    optimizer: Optional[str] = None  # one of OPTIMIZERS | null (the one before)
    reload_best: bool = False  # start the phase from the best checkpoint so far (Won et al. do)


def _phase_ok(p) -> bool:
    return (
        is_int(p.get("epoch"))
        and p["epoch"] >= 1
        and is_number(p.get("lr"))
        and p["lr"] > 0
        and p.get("optimizer") in (None, *OPTIMIZERS)
    )


# The metrics every epoch logs that can pick the best checkpoint (mtt.training.train.monitor_score).
# val_loss is the BCE of the clip-level probabilities; val_chunk_loss the mean BCE of every
# evaluated chunk against its clip's tags (Won et al.'s validation loss, mtt.training.evaluate).
MONITORS = ("val_roc_auc", "val_pr_auc", "val_loss", "val_chunk_loss", "val_accuracy", "train_loss", "train_accuracy")


@dataclass
class TrainerConfig:
    epochs: int = setting(60, integer(1))  # the maximum with early stopping (patience); the report trained 12
    batch_size: int = setting(32, integer(1))
    lr: float = setting(1e-3, number(0, lo_open=True))
    weight_decay: float = setting(0.0, number(0))
    # The first phase's optimiser (trainer.phases may switch)
    optimizer: str = setting("adam", one_of(*OPTIMIZERS))
    momentum: float = setting(0.9, number(0, 1, hi_open=True))  # sgd only
    nesterov: bool = False  # sgd only
    seed: int = setting(0, integer(0, 2**32 - 1))  # numpy's seed range
    device: str = setting("auto", pattern(r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda or cuda:N"))
    # auto (bf16 autocast on CUDA) | fp32 | bf16 (mtt.training.train.autocast_dtype)
    precision: str = setting("auto", one_of("auto", "fp32", "bf16"))
    channels_last: bool = True  # NHWC convolutions (tensor cores on CUDA)
    deterministic: bool = False
    monitor: str = setting("val_roc_auc", one_of(*MONITORS))  # metric that picks the best checkpoint
    # Early stopping: stop after this many epochs without a better `monitor` (epochs is then the
    # maximum); null = train all epochs (the report's fixed schedules).
    patience: Optional[int] = setting(10, or_null(integer(1)))
    # Learning-rate schedule: none | plateau (multiply the lr by lr_factor after lr_patience
    # epochs without a better `monitor`) | phases (trainer.phases: optimiser and lr by epoch).
    lr_schedule: str = setting("plateau", one_of("none", "plateau", "phases"))
    phases: list[PhaseConfig] = setting(
        rule=Rule(
            lambda v: isinstance(v, (list, tuple, ListConfig)) and all(_phase_ok(p) for p in v),
            f"a list of {{epoch: an integer >= 1, lr: a number > 0, optimizer: {', '.join(OPTIMIZERS)} or null}}",
        ),
        factory=list,
    )
    lr_patience: int = setting(3, integer(0))
    lr_factor: float = setting(0.3, number(0, 1, lo_open=True, hi_open=True))
    progress: bool = True
    # Continue an interrupted run from its last checkpoint, into the same MLflow run:
    # true = the newest unfinished run with this config; a run id = that run; null/false = new run.
    resume: Optional[str] = None


@dataclass
class ProbeConfig:
    """The linear-probe reference (``python -m mtt.probe``, see mtt/training/probe.py)."""

    # Inverse L2 strengths tried (scikit-learn's C); the best on the validation split is kept.
    C: list = setting(rule=number_list(), factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])


# The longest names every MLflow store keeps: its database columns experiments.name VARCHAR(256)
# (its own check allows 500, which PostgreSQL and MySQL then refuse), runs.name VARCHAR(250).
MAX_EXPERIMENT_NAME = 256
MAX_RUN_NAME = 250


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    experiment: str = setting(
        "mtt",
        Rule(
            lambda v: isinstance(v, str) and v.strip() != "" and len(v) <= MAX_EXPERIMENT_NAME,
            f"a non-empty name of at most {MAX_EXPERIMENT_NAME} characters",
        ),
    )
    # None: built from the command-line overrides
    run_name: Optional[str] = setting(
        None,
        or_null(
            Rule(
                lambda v: isinstance(v, str) and len(v) <= MAX_RUN_NAME, f"a name of at most {MAX_RUN_NAME} characters"
            )
        ),
    )
    # Seconds a finished run keeps trying to ship its journal to an unreachable store before it
    # exits anyway (0, naming the journal and the `python -m mtt.sync` command that ships it).
    flush_timeout_s: float = setting(120.0, number(0))


def _group(base: type) -> Any:
    """A component group's field: untyped until its option (a registry entry's dataclass, or a
    YAML completed from one: mtt.core.components) is chosen, holding the keys every entry shares."""
    return field(default_factory=lambda: defaults_of(base))


@dataclass
class Config:
    """Every run's config. The component groups (data, backbone, pool, head, steps) take their
    schema from the registry entry they name (mtt.core.components); the rest is typed here."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: Any = _group(DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    backbone: Any = _group(BackboneConfig)
    pool: Any = _group(PoolConfig)
    head: Any = _group(HeadConfig)  # no option: conf/head/ holds presets; the default head's values
    steps: Any = _group(StepsConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ---------------------------------------------------------------------------------------------
# Values: the schema's types say what a key may hold, the rules in its fields' metadata what it
# may be. A value outside them fails when the config is composed (``validate``), naming the key,
# the value and what is allowed, instead of dividing by zero, streaming forever or failing after
# the MLflow run was created.
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config value outside what its key allows (the message is one line)."""


def _front_end_names() -> list[str]:
    """The front ends ``features.name`` may name (mtt.features.frontend.FRONT_ENDS, which imports torch)."""
    return list(importlib.import_module("mtt.features.frontend").FRONT_ENDS)


def all_rules() -> dict[str, Rule]:
    """Every key's rule, in the schema's order: the typed groups' field metadata and each
    registry's (its entries' dataclasses, and the names it knows)."""
    rules: dict[str, Rule] = {}
    for f in dataclasses.fields(Config):
        if f.name in REGISTRIES:
            rules.update(REGISTRIES[f.name].rules())
            continue
        if f.name == "features":
            rules["features.name"] = one_of(*_front_end_names())
        rules.update(field_rules(typing.get_type_hints(Config)[f.name], f"{f.name}."))
    return rules


class _Rules(Mapping):
    """``RULES``: ``all_rules()`` as a read-only mapping, computed when read (a module imported
    later may register an entry with rules of its own)."""

    def __getitem__(self, key: str) -> Rule:
        return all_rules()[key]

    def __iter__(self):
        return iter(all_rules())

    def __len__(self) -> int:
        return len(all_rules())


RULES: Mapping[str, Rule] = _Rules()


# ---------------------------------------------------------------------------------------------
# Keys: only the schema's. Hydra refuses a misspelt key (head.blockz=3) in a long message, but a
# key added with + (+hed=autopool, +trainer.epochz=3) is accepted and silently ignored: the run
# trains the default and is named after the typo. Both are refused here in one line, with the
# closest key or group, before composition (``override_errors``, the command line) and after it
# (``unknown_key_errors``, whatever composed the config: a preset, a library caller).
# ---------------------------------------------------------------------------------------------


def schema_keys() -> dict[str, Any]:
    """Every dotted key of the schema (``trainer``, ``trainer.epochs``, ``data.synth.seed``) ->
    the dataclass it holds, or None for a value (a number, a string, a list). A component group's
    keys are those of every registered entry's dataclass (mtt.core.components.Registry.keys)."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name in REGISTRIES:
            keys[f.name] = REGISTRIES[f.name].base
            keys.update(REGISTRIES[f.name].keys())
        else:
            keys[f.name] = hints[f.name]
            keys.update(field_keys(hints[f.name], f"{f.name}."))
    return keys


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
    """(mtt's top-level config groups: conf/'s folders, the registries whose entries are options
    and ``experiment``; those of them in conf/config.yaml's defaults list, changed without ``+``)."""
    from mtt.config.presets import GROUP

    folders = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"}
    groups = sorted(folders | {g for g, r in REGISTRIES.items() if r.options} | {GROUP})
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
                errors.append(unknown_key_error(path, show(value), *config_groups()))
            elif schema_keys()[path] is not None and isinstance(value, dict):  # (data.synth may be null)
                walk(node[key], path + ".")

    walk(cfg, "")
    return errors


_ABSENT = object()


def check_value(key: str, value) -> str | None:
    """The error for ``key=value`` under ``RULES`` (None when allowed or the key has no rule)."""
    rule = RULES.get(key)
    return None if rule is None else value_error(rule, key, value)


def _import_entries(cfg) -> None:
    """Import the modules that register the entries ``cfg`` names (``<group>.module``), so that
    their keys are known; a name or module that cannot be found is named by ``config_errors``."""
    for group, registry in REGISTRIES.items():
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            try:
                registry.of(node)
            except LookupError:
                pass


def config_errors(cfg) -> list[str]:
    """One line per value of a composed config outside its rule (``RULES``; a component's, its
    entry's) or the rules that tie two keys together, naming the key(s), the value and what is
    allowed. Keys the config does not have are skipped."""
    _import_entries(cfg)
    errors = unknown_key_errors(cfg)
    rules = all_rules()
    for f in dataclasses.fields(Config):
        if f.name in REGISTRIES:
            errors += REGISTRIES[f.name].node_errors(cfg)
            continue
        for key, rule in rules.items():
            if key.startswith(f"{f.name}."):
                try:
                    value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
                except InterpolationResolutionError:
                    # A value drawn from the job's own Hydra config (tracking.run_name=
                    # head-${hydra:runtime.choices.head}) cannot be resolved before a job has one:
                    # the launch hook leaves it to the job, which checks what it resolves to (as
                    # a swept one).
                    if HydraConfig.initialized():
                        raise
                    continue
                if value is not _ABSENT:
                    errors.append(value_error(rule, key, value))
    f = cfg.features
    if is_number(f.fmin) and is_number(f.fmax) and is_int(f.sample_rate):
        if not f.fmin < f.fmax <= f.sample_rate / 2:
            errors.append(
                f"features.fmin={show(f.fmin)}, features.fmax={show(f.fmax)}: expected "
                f"fmin < fmax <= sample_rate / 2 = {f.sample_rate / 2:g}"
            )
    t = cfg.trainer
    epochs = [p.epoch for p in t.phases] if check_value("trainer.phases", t.phases) is None else None
    if t.lr_schedule == "phases" and epochs is not None and (not epochs or epochs != sorted(set(epochs))):
        errors.append(
            f"trainer.phases={show(epochs)} (epochs): expected a non-empty list in increasing "
            "epoch order with trainer.lr_schedule=phases"
        )
    if t.nesterov and t.momentum == 0:
        errors.append("trainer.nesterov=true, trainer.momentum=0.0: expected a momentum > 0 for Nesterov")
    return [e for e in errors if e]


def complete(cfg) -> Any:
    """Give each component node of ``cfg`` the defaults of its entry's dataclass that it lacks
    (a YAML of one's own sets only what differs); returns ``cfg``."""
    _import_entries(cfg)
    for registry in REGISTRIES.values():
        registry.complete(cfg)
    return cfg


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

    ``data``: also check ``data.root`` on disk (``root_errors``: a dataset that
    would be written into someone else's folder, or read from a missing one); False for the
    command that creates it (``mtt.data.download``, which checks its target itself).
    """
    errors = [*config_errors(cfg), *more_errors]
    # The launcher's callback checks every command's config before its job: it knows the command
    # by Hydra's job name (its module's), and the one that creates data.root must not be told
    # that it does not exist yet.
    if data and OmegaConf.select(cfg, "hydra.job.name", default=None) not in CREATES_DATA_ROOT:
        errors += root_errors(cfg.data)
    if errors:
        print(f"error: {'; '.join(errors)}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def root_errors(data_cfg) -> list[str]:
    """The ``check`` that dataset ``data.name`` registers (mtt.data.datasets.DatasetSpec: one line
    per problem with ``data.root``); [] when it registers none or cannot be found (which
    ``config_errors`` reports)."""
    try:
        spec = DATASETS.of(data_cfg)
    except RegistryError:
        return []
    check = getattr(spec, "check", None)
    return check(data_cfg) if check is not None else []


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
    is the search space of ``hydra.sweeper.params``, but for its keys, which must be mtt's.

    Groups and their options are looked up on the search path Hydra composes from: conf/ plus
    ``hydra.searchpath`` (conf/config.yaml's, or the command line's), so a backbone YAML of
    one's own in another folder is an option (CONTRIBUTING.md)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return []  # a syntax error: Hydra says where
    groups, defaults = config_groups()
    # A group set to an option that no registry entry is (a YAML of one's own): its keys are the
    # entry's that the YAML names, known only once composed (``unknown_key_errors`` checks them).
    own = {
        o.key_or_group
        for o in parsed
        if o.key_or_group in REGISTRIES
        and REGISTRIES[o.key_or_group].options
        and o.get_value_element_as_str() not in REGISTRIES[o.key_or_group].names()
    }
    errors = []
    # Hydra reads the search path from the primary config and this override alone.
    searchpath = [o.input_line for o in parsed if o.key_or_group == "hydra.searchpath" and o.input_line]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()

        def options(group: str, kind: ObjectType = ObjectType.CONFIG) -> list[str]:
            return loader.get_group_options(group, kind, config_name="config", overrides=searchpath)

        for o in parsed:
            key, shown = o.key_or_group, o.input_line or o.key_or_group
            searched = key.startswith(_SEARCHED)  # an Optuna dimension: its key must be mtt's
            key = key[len(_SEARCHED) :] if searched else key
            if (o.is_hydra_override() and not searched) or o.package is not None:
                continue
            parent, _, name = key.lstrip("+").rpartition("/")
            if name in options(parent, ObjectType.GROUP):  # a group: each option (of a sweep too) must exist
                if not searched:
                    errors += _option_errors(o, key, options(key), shown)
            elif not _known(key.lstrip("+")) and key.lstrip("+").split(".")[0] not in own:
                prefix = _SEARCHED if searched else shown[: len(shown) - len(shown.lstrip("+~"))]
                value = o.get_value_string() if "=" in (o.input_line or "") else ""
                errors.append(prefix + unknown_key_error(key.lstrip("+"), value, groups, defaults))
    return errors


def hydra_entry(task: Callable) -> Callable:
    """``@hydra.main`` on conf/config.yaml for mtt's entry points, after ``override_errors`` on
    the command line: a mistyped key or group ends the process with ``error: <what>`` and exit
    status 2 before Hydra composes anything (``--help``, ``--cfg``, another config: Hydra's)."""
    import hydra

    @functools.wraps(task)  # Hydra names the job after the task's module (CREATES_DATA_ROOT)
    def completed(cfg):
        return task(complete(cfg))

    main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(completed)

    @functools.wraps(task)
    def entry(*args, **kwargs):
        register_configs()
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
    """Store the schema (``base_config``, which conf/config.yaml extends), mtt's registry
    entries (each its group's option: ``pool=autopool``), the presets (``experiment``) and the
    resolver in Hydra's ConfigStore (idempotent). Every composition needs it first: the entry
    points call it (``hydra_entry``), so does a caller that composes by itself."""
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("mtt.launch_id", launch_id, use_cache=True, replace=True)
    ConfigStore.instance().store(name="base_config", node=Config)
    load_builtins()
    from mtt.config.presets import register_presets  # the `experiment` group (experiments/)

    register_presets()
