"""The ``experiment`` config group: the presets under ``<repo>/experiments``, on Hydra's search
path independently of the working directory.

Hydra's file search path lists only the top level of a config group, so
``'+experiment=glob(report/*)'`` would launch zero jobs, silently. ``ExperimentPresets`` is a
Hydra ``ConfigSource`` (scheme ``mtt-experiments``) that serves ``experiments/`` as the group
``experiment`` and lists nested presets by their full name (``report/prelim``), so the glob
sweeps them. ``PresetsSearchPath`` (a Hydra ``SearchPathPlugin``) appends
``mtt-experiments://experiments`` to every search path: the path is relative to the repository,
never to the working directory. (``hydra.searchpath`` in conf/config.yaml would not do: Hydra
lists a glob's options without reading the primary config.) ``mtt.config`` registers both when
imported, which ``mtt.run`` and every compose do before Hydra builds its search path.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin

# From mtt.core.paths, not mtt.config: that module imports this one while it registers the configs,
# and a worker process that unpickles one of these plugins first would then meet a
# half-initialised mtt.config.
from mtt.core.paths import REPO_ROOT  # noqa: E402

GROUP = "experiment"
_EXT = ".yaml"


class ExperimentPresets(ConfigSource):
    """Serves ``REPO_ROOT/<path>`` as config group ``experiment`` (nested folders included)."""

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        self.root = (REPO_ROOT / self.path).resolve()

    @staticmethod
    def scheme() -> str:
        return "mtt-experiments"

    def _inner(self, config_path: str) -> Optional[Path]:
        """``experiment/report/prelim`` -> ``<root>/report/prelim``; None outside the group."""
        if config_path == GROUP:
            return self.root
        if config_path.startswith(GROUP + "/"):
            return self.root / config_path[len(GROUP) + 1 :]
        return None

    def available(self) -> bool:
        return self.root.is_dir()

    def is_group(self, config_path: str) -> bool:
        if config_path == "":
            return True
        inner = self._inner(config_path)
        return inner is not None and inner.is_dir()

    def is_config(self, config_path: str) -> bool:
        inner = self._inner(self._normalize_file_name(config_path))
        return inner is not None and inner != self.root and inner.is_file()

    def load_config(self, config_path: str) -> ConfigResult:
        inner = self._inner(self._normalize_file_name(config_path))
        if inner is None or not inner.is_file():
            raise ConfigLoadError(f"experiment preset not found: {config_path} (looked in {self.root})")
        text = inner.read_text(encoding="utf-8")
        from omegaconf import OmegaConf

        return ConfigResult(
            config=OmegaConf.create(text) if text.strip() else OmegaConf.create({}),
            path=f"{self.scheme()}://{self.root}",
            provider=self.provider,
            header=ConfigSource._get_header_dict(text[:512]),
        )

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> builtins.list[str]:
        want_groups = results_filter in (None, ObjectType.GROUP)
        want_configs = results_filter in (None, ObjectType.CONFIG)
        if config_path == "":
            return [GROUP] if want_groups and self.available() else []
        inner = self._inner(config_path)
        if inner is None or not inner.is_dir():
            return []
        out: list[str] = []
        if want_groups:
            out += [p.name for p in inner.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
        if want_configs:
            # Every preset below, by its path: report/prelim is an option of `experiment`.
            for dirpath, dirnames, filenames in os.walk(inner):
                dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
                rel = Path(dirpath).relative_to(inner)
                out += [(rel / f[: -len(_EXT)]).as_posix() for f in filenames if f.endswith(_EXT)]
        return sorted(set(out))


class PresetsSearchPath(SearchPathPlugin):
    """Puts the presets on Hydra's search path, after conf/ (so conf/ wins on a clash)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="mtt-experiments", path=f"{ExperimentPresets.scheme()}://experiments")


def register_presets() -> None:
    """Make the ``mtt-experiments://`` scheme and its search-path entry known to Hydra (idempotent)."""
    Plugins.instance().register(ExperimentPresets)
    Plugins.instance().register(PresetsSearchPath)
