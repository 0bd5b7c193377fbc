"""mtt's Optuna sweeper, where Hydra looks for plugins: Hydra instantiates a sweeper only by the
name it registered while scanning the ``hydra_plugins`` namespace package (``module.Class``), so
the class Hydra sees is defined here. The code is ``mtt.analysis.search``."""

from mtt.analysis import search

search.register_sweeper()  # hydra/sweeper=optuna in the ConfigStore, before any config is composed


class OptunaSweeper(search.OptunaSweeper):
    """``hydra/sweeper=optuna`` (``mtt.analysis.search.OptunaSweeper``)."""
