"""Components by name: each backbone, pool, head, dataset and steps policy is one registry entry
that declares its name, its own config dataclass (each field's rule in its metadata) and its
builder, so that a new one with settings of its own is one module and one YAML (CONTRIBUTING.md).

A registry (``BACKBONES``, ``POOLS``, ``HEADS``, ``DATASETS``, ``STEPS`` below) is the only place
that lists what a config may name: ``register`` stores the entry's dataclass in Hydra's
ConfigStore as the option of its config group (``pool=autopool`` is ``AutoPoolConfig``), the
rules of ``mtt.config.RULES`` are read from the dataclasses' field metadata, and the code that
uses a value trusts it (it was checked when the config was composed).

An entry outside mtt is found through ``<group>.module`` (the module that registers it, imported
before the config is checked); its YAML need not repeat its defaults: the config is completed
from the entry's dataclass (``complete``) before an entry point runs.

This module imports no torch and none of mtt's other modules: mtt.config builds on it, and the
modules that register entries import it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, TypeVar

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict

# ---------------------------------------------------------------------------------------------
# Rules: what a value may be (its type is the dataclass field's). A value outside its rule fails
# when the config is composed (mtt.config.validate), naming the key, the value and what is allowed.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    allowed: str  # what the error says is allowed


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(lo: int, hi: int | None = None) -> Rule:
    if hi is None:
        return Rule(lambda v: is_int(v) and v >= lo, f"an integer >= {lo}")
    return Rule(lambda v: is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")


def number(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def ok(v) -> bool:
        return is_number(v) and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))

    if hi is None:
        return Rule(ok, f"a number {'>' if lo_open else '>='} {lo:g}")
    return Rule(ok, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"one of {', '.join(choices)}")


def pattern(regex: str, allowed: str) -> Rule:
    return Rule(lambda v: isinstance(v, str) and re.fullmatch(regex, v) is not None, allowed)


def or_null(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"{rule.allowed}, or null")


def either(a: Rule, b: Rule) -> Rule:
    return Rule(lambda v: a.ok(v) or b.ok(v), f"{a.allowed} or {b.allowed}")


def finite() -> Rule:
    return Rule(is_number, "a finite number")


def number_list() -> Rule:
    return Rule(
        lambda v: isinstance(v, (list, tuple, ListConfig)) and len(v) > 0 and all(is_number(c) and c > 0 for c in v),
        "a non-empty list of numbers > 0",
    )


def show(value) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(show(v) for v in value) + "]"
    text = str(value)
    return text if len(text) <= 80 else f"{text[:40]}... ({len(text)} characters)"


def value_error(rule: Rule, key: str, value) -> str | None:
    """``key=value: expected <what rule allows>`` (one line), or None when ``rule`` allows it."""
    return None if rule.ok(value) else f"{key}={show(value)}: expected {rule.allowed}"


RULE = "mtt.rule"  # the field-metadata key of a field's Rule


def setting(default: Any = MISSING, rule: Rule | None = None, *, factory: Callable | None = None) -> Any:
    """A dataclass field with its rule beside it: ``alpha_max: float = setting(10.0, number(0, lo_open=True))``."""
    metadata = {RULE: rule} if rule is not None else {}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_rules(cls: type, prefix: str) -> dict[str, Rule]:
    """``{prefix + key: Rule}`` of every field of dataclass ``cls`` with a rule in its metadata,
    nested dataclasses included (``data.synth.seed``), in field order."""
    hints = typing.get_type_hints(cls)
    rules: dict[str, Rule] = {}
    for f in dataclasses.fields(cls):
        if RULE in f.metadata:
            rules[prefix + f.name] = f.metadata[RULE]
        node = dataclass_of(hints[f.name])
        if node is not None:
            rules.update(field_rules(node, f"{prefix}{f.name}."))
    return rules


def dataclass_of(tp) -> Any:
    """The dataclass a field holds (``Optional[X]`` -> ``X``), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def field_keys(cls: type, prefix: str) -> dict[str, Any]:
    """Every dotted key of dataclass ``cls`` -> the dataclass it holds, or None for a value."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        node = dataclass_of(hints[f.name])
        keys[prefix + f.name] = node
        if node is not None:
            keys.update(field_keys(node, f"{prefix}{f.name}."))
    return keys


def defaults_of(cls: type) -> dict:
    """The defaults of dataclass ``cls`` as plain data (``???`` for a required value,
    interpolations unresolved): the untyped node a group starts from before its option."""
    return OmegaConf.to_container(OmegaConf.structured(cls), resolve=False)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# What every entry of a group shares: its config's name and module keys, its own errors.
# ---------------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    """What every backbone's config holds; a backbone's own dataclass extends it."""

    name: str = MISSING  # a registered backbone (``BACKBONES``)
    # The module that registers `name` when imported (e.g. a backbone of your own, on PYTHONPATH);
    # null = the built-in backbones (vggish, shortchunk, shortchunk_res). CONTRIBUTING.md.
    module: Optional[str] = None
    # none (random init) | audioset (official torchvggish file, downloaded once) | a local path
    weights: str = "none"
    url: str = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
    hub_dir: Optional[str] = None  # torch hub cache; None = torch.hub.get_dir()
    freeze: bool = True  # the report froze the whole conv stack
    # With freeze=true, still train the last N layers; a backbone that fine-tunes layer by layer
    # widens this rule in its own dataclass (VGGish: its 6 conv layers).
    finetune_last: int = setting(0, Rule(lambda v: v == 0, "0 (this backbone fine-tunes all or nothing)"))
    width: float = setting(1.0, number(0, lo_open=True))  # channel multiplier; pretrained weights need 1.0
    cache: bool = True  # with a frozen backbone, compute its maps once and reuse them


@dataclass
class PoolConfig:
    """What every pool's config holds: ``(B, C, T, F) -> (B, C)`` by ``name``."""

    name: str = MISSING  # a registered pool (``POOLS``)
    module: Optional[str] = None  # the module that registers it (a pool of your own); null = mtt's


@dataclass
class HeadConfig:
    """The classification head over the pooled vector (``head.name``: ``HEADS``). Not a group
    option: conf/head/ holds presets (``+head=autopool``) that change the default's values."""

    name: str = "bn_dropout_dense"
    module: Optional[str] = None  # the module that registers it (a head of your own); null = mtt's
    blocks: int = setting(2, integer(1))  # all but the last Dense have a ReLU
    width: int = setting(256, integer(1))  # hidden width of every block but the last
    dropout: float = setting(0.2, number(0, 1, hi_open=True))
    # sigmoid (independent tags) | softmax (the report's, wrong here); mtt.models.OUTPUTS
    output: str = setting("sigmoid", one_of("sigmoid", "softmax"))
    # Output-layer bias at the start: prior = log-odds of each tag's training frequency, so the
    # loss starts near its floor (most tags are on 1-5% of clips) | zero (the report's, Keras'
    # zeros) | default (PyTorch's init, uniform within +-1/sqrt(fan in): Won et al.'s).
    bias_init: str = setting("prior", one_of("prior", "zero", "default"))


@dataclass
class DataConfig:
    """What every dataset's config holds (``data.name``: ``DATASETS``)."""

    name: str = MISSING
    module: Optional[str] = None  # the module that registers it (a dataset of your own); null = mtt's


@dataclass
class StepsConfig:
    """Optimiser steps per epoch, by ``policy`` (``STEPS``)."""

    policy: str = MISSING
    module: Optional[str] = None  # the module that registers it (a policy of your own); null = mtt's
    n: Optional[int] = setting(None, or_null(integer(1)))  # the step count of policies that take one


@dataclass(frozen=True)
class Spec:
    """One registry entry: ``name``, its config dataclass (``config``, the group's base or a
    subclass of it) and ``config_errors(cfg)``: one line per value of the whole config this entry
    cannot work with (values that depend on other keys), reported with the rules' errors."""

    name: str
    config: type = field(kw_only=True)
    config_errors: Callable[[Any], list[str]] = field(default=lambda cfg: [], kw_only=True)

    def errors(self, cfg: Any) -> list[str]:
        """What this entry finds wrong with ``cfg`` beyond its fields' rules."""
        return list(self.config_errors(cfg))


E = TypeVar("E", bound=Spec)


class RegistryError(LookupError, ValueError):
    """A name that no entry has, or a module that cannot be imported (one line)."""


class Registry(Generic[E]):
    """The entries of config group ``group``, by the value of ``<group>.<key>``.

    ``builtin``: mtt's modules that register entries, imported before any lookup (so that the
    built-ins need no ``module`` key). ``unknown``: the error for a name that no entry has
    (``{key}``, ``{name}``, ``{where}``, ``{names}``). ``name_rule``: ``mtt.config.RULES`` lists
    the name with the allowed values. ``options``: its entries are the options of config group
    ``group`` (False for heads: conf/head/ holds presets that change the default head).
    """

    def __init__(
        self,
        group: str,
        base: type,
        builtin: Iterable[str],
        key: str = "name",
        unknown: str = "{key}={name}: expected one of {names}{where}",
        name_rule: bool = True,
        options: bool = True,
    ):
        self.group, self.base, self.key = group, base, key
        self.builtin = tuple(builtin)
        self.unknown, self.name_rule, self.options = unknown, name_rule, options
        self._entries: dict[str, E] = {}

    def register(self, entry: E, option: bool | None = None) -> E:
        """Make ``entry`` selectable as ``<group>.<key>=<entry.name>`` (call it at import time);
        registering a name again replaces it (a re-imported module). ``option``: also store its
        dataclass as the Hydra option ``<group>=<name>`` (False where a YAML of that name under
        conf/<group>/ is the option, e.g. a backbone that also chooses its front end and head;
        by default the registry's ``options``)."""
        if not (isinstance(entry.config, type) and issubclass(entry.config, self.base)):
            raise TypeError(
                f"{self.group} {entry.name!r}: its config must be a dataclass extending {self.base.__name__}"
            )
        self._entries[entry.name] = entry
        if self.options if option is None else option:
            from hydra.core.config_store import ConfigStore

            node = OmegaConf.structured(entry.config)
            if OmegaConf.is_missing(node, self.key):  # a dataclass that several entries share
                node[self.key] = entry.name
            ConfigStore.instance().store(group=self.group, name=entry.name, node=node)
        return entry

    def load_builtins(self) -> None:
        for module in self.builtin:
            importlib.import_module(module)

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        self.load_builtins()
        return list(self._entries)

    def entries(self) -> list[E]:
        self.load_builtins()
        return list(self._entries.values())

    def get(self, name: Any, module: str | None = None) -> E:
        """The entry registered as ``name``, importing ``module`` first when given; a one-line
        ``RegistryError`` naming the key and what is registered otherwise."""
        if module:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise RegistryError(
                    f"{self.group}.module={module}: cannot be imported ({e}); it must be on "
                    f"PYTHONPATH and register the {self.group}"
                ) from e
        names = self.names()
        if name not in self._entries:
            where = f" after importing {self.group}.module={module}" if module else ""
            key = f"{self.group}.{self.key}"
            raise RegistryError(self.unknown.format(key=key, name=name, where=where, names=", ".join(names)))
        return self._entries[name]

    def of(self, node: Any) -> E:
        """The entry a composed ``<group>`` node names (its ``module`` imported first)."""
        return self.get(node.get(self.key), node.get("module"))

    def keys(self) -> dict[str, Any]:
        """Every dotted key some entry's dataclass has (``pool.alpha_init``) -> its dataclass or None."""
        keys: dict[str, Any] = field_keys(self.base, f"{self.group}.")
        for entry in self.entries():
            keys.update(field_keys(entry.config, f"{self.group}."))
        return keys

    def rules(self) -> dict[str, Rule]:
        """The rules of every entry's fields; a key two entries rule differently allows what
        either allows (each config is checked against its own entry's: ``node_errors``)."""
        rules: dict[str, Rule] = {}
        if self.name_rule:
            rules[f"{self.group}.{self.key}"] = one_of(*self.names())
        for entry in [self.base, *(e.config for e in self.entries())]:
            for key, rule in field_rules(entry, f"{self.group}.").items():
                old = rules.get(key)
                rules[key] = rule if old is None or old.allowed == rule.allowed else either(old, rule)
        return rules

    def node_errors(self, cfg: Any) -> list[str]:
        """One line per problem of ``cfg``'s node of this group: a name no entry has (or a module
        that cannot be imported), a value outside its entry's rules, the entry's own errors."""
        node = cfg.get(self.group)
        if node is None:
            return []
        try:
            entry = self.of(node)
        except RegistryError as e:
            return [str(e)]
        errors = []
        for key, rule in field_rules(entry.config, f"{self.group}.").items():
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
            if value is not _ABSENT:
                errors.append(value_error(rule, key, value))
        return [e for e in errors if e] + entry.errors(cfg)

    def complete(self, cfg: DictConfig) -> None:
        """Add to ``cfg``'s node of this group the defaults of its entry's dataclass that it lacks
        (a YAML that sets only what differs); a node whose entry cannot be found is left as it is
        (``node_errors`` names it)."""
        node = cfg.get(self.group)
        if not isinstance(node, DictConfig):
            return
        try:
            entry = self.of(node)
        except RegistryError:
            return
        _fill(node, OmegaConf.structured(entry.config))


_ABSENT = object()


def _fill(node: DictConfig, defaults: DictConfig) -> None:
    """Add the keys of ``defaults`` that ``node`` lacks, in nested nodes too (``data.synth.seed``)."""
    with open_dict(node):
        for key in defaults:
            value = node.get(key) if key in node else _ABSENT
            if value is _ABSENT:
                node[key] = defaults._get_node(key)  # interpolations kept
            elif isinstance(value, DictConfig) and isinstance(defaults.get(key), DictConfig):
                _fill(value, defaults[key])


# The five registries, each filled by the modules that define its entries.
BACKBONES: Registry = Registry(
    "backbone",
    BackboneConfig,
    builtin=("mtt.models.vggish", "mtt.models.shortchunk"),
    unknown="{key}={name}: not a registered backbone{where}; registered: {names} (a backbone of your own: "
    "set backbone.module, CONTRIBUTING.md)",
    name_rule=False,
)
POOLS: Registry = Registry("pool", PoolConfig, builtin=("mtt.models.pooling",))
HEADS: Registry = Registry("head", HeadConfig, builtin=("mtt.models.head",), options=False)
DATASETS: Registry = Registry(
    "data",
    DataConfig,
    builtin=("mtt.data.datasets",),
    unknown="{key}={name!r}: no such dataset{where}; known: {names}",
    name_rule=False,
)
STEPS: Registry = Registry("steps", StepsConfig, builtin=("mtt.features.streams",), key="policy")

REGISTRIES: Mapping[str, Registry] = {r.group: r for r in (DATASETS, BACKBONES, POOLS, HEADS, STEPS)}


def load_builtins() -> None:
    """Import mtt's own entries (and so store their dataclasses as Hydra options)."""
    for registry in REGISTRIES.values():
        registry.load_builtins()
