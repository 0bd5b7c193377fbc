"""Hyperparameter searches: ``hydra/sweeper=optuna``, a Hydra Sweeper over a current Optuna.

``python -m mtt.run -m +experiment=search`` asks Optuna's TPE sampler for ``n_trials`` trials
over ``hydra.sweeper.params`` (Hydra's sweep syntax: ``interval(a, b)``, ``tag(log, interval(a,
b))``, ``choice(...)``, ``range(...)``; a sweep override on the command line adds a dimension, a
plain one fixes a key the params would search), runs each through the configured launcher (one
``mtt.run`` job: its return value, the best epoch's ``trainer.monitor``, is the trial's value)
and tells Optuna the result. A job that fails or returns NaN is a failed trial.

The study lives in a database (Optuna's RDB storage): by default ``optuna.db`` beside a sqlite
MLflow store (else under ``paths.cache``), named ``<tracking.experiment>-<study_name>``, so the
same command again resumes it: trials that were running when the search was interrupted (Ctrl-C,
a kill) are marked failed and asked again with the same parameters, and the search stops once
``n_trials`` trials have finished. Every trial's run is a child of the sweep's parent run
(``mtt.tracking.runs.PrepareTracking``); ``experiments/search.yaml`` keeps one sweep folder per study
so that a resumed search goes on under the same parent. One process at a time per study.

Why our own plugin (measured, docs/searches.md): ``hydra-optuna-sweeper`` 1.3.0 pins optuna
2.10.1, whose database storage fails beside the SQLAlchemy 2.1 that mlflow brings;
``hydra-optuna-mlflow-sweeper`` 0.1.3 takes the same module path (``hydra_plugins.
hydra_optuna_sweeper``), registers ``hydra/sweeper=mlflow_optuna``, finds its MLflow store only
under ``trainer.logger.*`` keys and leaves interrupted trials RUNNING for good.

Hydra instantiates sweepers only from the ``hydra_plugins`` namespace package: the class Hydra
sees is ``hydra_plugins.mtt_optuna_sweeper.OptunaSweeper``, this one. Optuna is imported only
when a search runs.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

STUDY_DB = "optuna.db"
RESULTS = "optimization_results.json"  # in the sweep folder: the best trial, when the search ends


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.mtt_optuna_sweeper.OptunaSweeper"
    n_trials: int = 20  # finished trials (complete or failed) the study should have
    direction: Optional[str] = None  # maximize | minimize; null: minimize a *loss monitor, else maximize
    study_name: str = "search"  # the study is <tracking.experiment>-<study_name>
    storage: Optional[str] = None  # an Optuna RDB URL; null: optuna.db beside the MLflow sqlite store
    seed: int = 0  # TPE sampler's seed
    n_startup_trials: int = 10  # random trials before TPE models the results (Optuna's default)
    # key: Hydra sweep expression, e.g. trainer.lr: tag(log, interval(1e-4, 1e-2))
    params: dict[str, str] = field(default_factory=dict)


def register_sweeper() -> None:
    """``hydra/sweeper=optuna`` in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="mtt")


def distribution(override: Override):
    """The Optuna distribution of one sweep override (``choice``/``range`` -> categorical,
    ``interval`` -> float, or int when both ends are integers or it is tagged ``int``;
    ``log`` tag -> log scale)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if override.is_choice_sweep() or override.is_range_sweep():
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))  # type: ignore[arg-type]  # scalars
    if override.is_interval_sweep():
        value = override.value()
        assert isinstance(value, IntervalSweep)
        log_scale = "log" in value.tags
        if "int" in value.tags or (isinstance(value.start, int) and isinstance(value.end, int)):
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(
        f"hydra/sweeper=optuna: cannot search {override.input_line!r} (use choice(...), range(...) or interval(a, b))"
    )


def search_space(params: dict[str, str], arguments: list[str]) -> tuple[dict, list[str]]:
    """``({key: distribution}, fixed overrides)`` from the sweeper's params and the command line."""
    parser = OverridesParser.create()
    space = {
        o.get_key_element(): distribution(o) for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
    }
    fixed = []
    for o in parser.parse_overrides(list(arguments)):
        key = o.get_key_element()
        if o.is_sweep_override():
            space[key] = distribution(o)
        else:
            if space.pop(key, None) is not None:
                log.info("%s is fixed by the command line (%s), not searched", key, o.input_line)
            fixed.append(o.input_line)
    return space, fixed


def default_storage(config: DictConfig) -> str:
    """``sqlite:///<folder of the MLflow sqlite store>/optuna.db``; for a tracking server,
    ``sqlite:///<paths.cache>/optuna.db``."""
    from mtt.tracking.runs import resolve_uri

    uri = resolve_uri(config.tracking.uri)
    folder = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else Path(config.paths.cache)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / STUDY_DB}"


def study_name(config: DictConfig, name: str) -> str:
    return f"{config.tracking.experiment}-{name}"


class OptunaSweeper(Sweeper):
    """See the module doc. Hydra calls ``setup`` and then ``sweep`` with the task overrides."""

    def __init__(
        self,
        n_trials: int,
        direction: Optional[str],
        study_name: str,
        storage: Optional[str],
        seed: int,
        n_startup_trials: int,
        params: Optional[dict[str, str]] = None,
    ):
        if n_trials < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials}: expected an integer >= 1")
        if direction not in (None, "maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction={direction}: expected maximize, minimize or null")
        self.n_trials, self.direction, self.name, self.storage = n_trials, direction, study_name, storage
        self.seed, self.n_startup_trials = seed, n_startup_trials
        self.params = dict(params or {})

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context  # validate_batch_is_legal reads them
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _open_study(self, space: dict, fixed: list[str]):
        import optuna
        from optuna.distributions import distribution_to_json

        monitor = str(OmegaConf.select(self.config, "trainer.monitor", default="val_roc_auc"))
        direction = self.direction or ("minimize" if monitor.endswith("loss") else "maximize")
        storage = self.storage or default_storage(self.config)
        name = study_name(self.config, self.name)
        # What the study searches: a resumed study must search the same, or its trials mean nothing.
        what = json.dumps(
            {
                "space": {k: distribution_to_json(d) for k, d in sorted(space.items())},
                "fixed": sorted(fixed),
                "monitor": monitor,
                "direction": direction,
            },
            sort_keys=True,
        )
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction=direction,  # type: ignore[arg-type]  # 'maximize' or 'minimize'
            load_if_exists=True,
        )
        # Seeded by the history too: a resumed study's sampler must not draw the first run's
        # random start-up points again.
        study.sampler = optuna.samplers.TPESampler(
            seed=self.seed + len(study.trials), n_startup_trials=self.n_startup_trials
        )
        known = study.user_attrs.get("search")
        if known is None:
            study.set_user_attr("search", what)
        elif known != what:
            raise ValueError(
                f"Optuna study {name!r} in {storage} searches {known}, not {what}: "
                f"choose another hydra.sweeper.study_name for a new search"
            )
        return study, storage

    @staticmethod
    def _requeue_interrupted(study) -> int:
        """Mark the trials left RUNNING by an interrupted search failed (their numbers kept in the
        study's ``interrupted`` attribute, so they do not count as finished) and ask their
        parameters again; returns how many."""
        import optuna

        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if running:
            study.set_user_attr("interrupted", [*study.user_attrs.get("interrupted", []), *(t.number for t in running)])
        for t in running:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params, skip_if_exists=False)
        return len(running)

    @staticmethod
    def finished(study) -> int:
        """Trials that count toward ``n_trials``: complete or failed, not interrupted."""
        import optuna

        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        interrupted = set(study.user_attrs.get("interrupted", []))
        return sum(1 for t in study.get_trials(deepcopy=False, states=done) if t.number not in interrupted)

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        space, fixed = search_space(self.params, arguments)
        if not space:
            raise ValueError("hydra/sweeper=optuna: nothing to search (set hydra.sweeper.params or sweep a key)")
        study, storage = self._open_study(space, fixed)
        requeued = self._requeue_interrupted(study)
        done = self.finished(study)
        log.info(
            "Optuna study %s in %s: %d of %d trials finished%s",
            study.study_name,
            storage,
            done,
            self.n_trials,
            f", {requeued} interrupted trial(s) asked again" if requeued else "",
        )
        n_jobs = max(1, int(OmegaConf.select(self.config, "hydra.launcher.n_jobs", default=1) or 1))
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(n_jobs, self.n_trials - done))]
            batch = [tuple(f"{k}={v}" for k, v in t.params.items()) + tuple(fixed) for t in trials]
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            for trial, ret in zip(trials, returns):
                try:
                    value = float(ret.return_value)  # raises the job's error when it failed
                except Exception as exc:  # noqa: BLE001 - a failed job is a failed trial, the search goes on
                    log.warning("trial %d failed: %s", trial.number, exc)
                    value = math.nan
                if math.isnan(value):
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, value)
            done += len(trials)
        self._write_results(study, storage)

    def _write_results(self, study, storage: str) -> None:
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        result = {
            "study": study.study_name,
            "storage": storage,
            "direction": study.direction.name.lower(),
            "trials": len(study.trials),
            "complete": len(complete),
        }
        if complete:
            best = study.best_trial
            result.update(best_trial=best.number, best_value=best.value, best_params=best.params)
            log.info("best trial %d: %s = %s", best.number, result["direction"], best.value)
        folder = Path(str(self.config.hydra.sweep.dir))
        folder.mkdir(parents=True, exist_ok=True)
        from mtt.core.fs import atomic_write_bytes

        atomic_write_bytes(folder / RESULTS, json.dumps(result, indent=1).encode())


register_sweeper()
