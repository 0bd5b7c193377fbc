"""Hydra entry point: ``python -m mtt.run [overrides]`` / ``python -m mtt.run -m ...`` (sweeps).

Thin on purpose: compose the config, open the MLflow run, train, return the best epoch's
monitored metric (``trainer.monitor`` at the selected epoch, on validation), so Hydra sweepers
(``hydra/sweeper=optuna``, mtt/analysis/search.py) optimise what selects the checkpoint.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mtt.config import MAX_RUN_NAME, exit_if_invalid, hydra_entry

log = logging.getLogger(__name__)


def run_name(overrides: list[str], seed: bool = True) -> str:
    """``+head=autopool trainer.epochs=2`` -> ``head=autopool,epochs=2`` (the last key part;
    ``+experiment/anchors/arms=x`` -> ``arms=x``);
    ``seed=False`` leaves ``trainer.seed`` out (the name of the run's group)."""
    parts = []
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        # Where things are stored, how they are shown and resuming say nothing about the experiment.
        if key.startswith(("tracking.", "hydra", "paths.", "trainer.progress", "trainer.resume")):
            continue
        if not seed and key == "trainer.seed":
            continue
        # the last part of a key or of a nested group (+experiment/anchors/arms -> arms)
        parts.append(f"{key.split('.')[-1].split('/')[-1]}={value}")
    return ",".join(parts) or "default"


def sweep_id(hc) -> str:
    """The multirun sweep folder (shared by every job of one ``-m`` call), else the run's folder."""
    return str(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir)


def resume_target(cfg, config_hash: str) -> str | None:
    """The run id that ``trainer.resume`` asks to continue, or None for a new run. Its
    ``last.pt`` is checked here, before the run is reopened: a corrupt one is refused
    (``CorruptFileError``), never skipped for an older run or a fresh start."""
    from mtt.tracking.checkpoint import has_last, resume_choice, run_dir, verify_last
    from mtt.tracking.runs import resumable_runs, run_exists

    choice = resume_choice(cfg.trainer.resume)
    if choice is None:
        return None
    if choice != "latest":
        if not run_exists(cfg.tracking.uri, choice):
            raise SystemExit(f"trainer.resume={choice}: no such MLflow run")
        if not has_last(run_dir(cfg.paths.cache, choice)):
            raise SystemExit(f"trainer.resume={choice}: no checkpoint under {run_dir(cfg.paths.cache, choice)}")
        verify_last(run_dir(cfg.paths.cache, choice))
        return choice
    for run_id in resumable_runs(cfg.tracking.uri, cfg.tracking.experiment, config_hash):
        if has_last(run_dir(cfg.paths.cache, run_id)):
            verify_last(run_dir(cfg.paths.cache, run_id))
            return run_id
    log.warning("trainer.resume=true: no unfinished run with this config and a checkpoint; starting a new run")
    return None


def clipped_run_name(name: str) -> str:
    """A name built from many overrides, cut to what MLflow's database keeps (``MAX_RUN_NAME``)."""
    return name if len(name) <= MAX_RUN_NAME else name[: MAX_RUN_NAME - 3] + "..."


def _prefixed(prefix: str | None, name: str) -> str:
    if not prefix:
        return name
    return prefix if name == "default" else f"{prefix},{name}"


def tracked(
    cfg, job, name_prefix: str | None = None, resumable: bool = False, entry: str = "mtt.run"
) -> dict[str, float]:
    """Run ``job(cfg, tracker, dist)`` inside one MLflow run of ``cfg.tracking`` (under torchrun:
    rank 0 tracks, the other ranks get a tracker that logs nothing) and return its metrics.

    The run is tagged with the Hydra choices, overrides, sweep id and config hash, and named
    after the overrides (``name_prefix`` first), with MLflow's source tags (``entry``, the git
    state: ``mtt.tracking.records.source_tags``). ``resumable`` honours ``trainer.resume``.
    """
    from mtt.core import distributed
    from mtt.tracking.checkpoint import NOT_GROUPED, config_hash
    from mtt.tracking.records import source_tags
    from mtt.tracking.runs import MlflowTracker, stop_on_signals, sweep_parent

    hc = HydraConfig.get()
    tags = {f"choice.{k}": v for k, v in hc.runtime.choices.items() if v is not None and not k.startswith("hydra/")}
    tags["overrides"] = " ".join(hc.overrides.task)
    tags["sweep_id"] = sweep_id(hc)
    tags["config_hash"] = config_hash(cfg)
    tags.update(source_tags(entry))
    # Runs that differ only in their seed form one group (mtt.compare aggregates over it).
    tags["mtt.group"] = config_hash(cfg, NOT_GROUPED, salt=name_prefix or "train")
    tags["mtt.group_name"] = _prefixed(name_prefix, run_name(list(hc.overrides.task), seed=False))
    name = cfg.tracking.run_name or clipped_run_name(_prefixed(name_prefix, run_name(list(hc.overrides.task))))
    d = distributed.init(cfg.trainer.device)  # a no-op unless started by torchrun
    if hc.mode == RunMode.MULTIRUN and d.main:  # a job of a sweep: a child of the sweep's parent run
        tags["mlflow.parentRunId"] = sweep_parent(cfg.tracking.uri, cfg.tracking.experiment, tags["sweep_id"])
    if not d.main:  # one copy of the epoch lines, from rank 0
        logging.getLogger("mtt").setLevel(logging.WARNING)
    # SIGTERM (Slurm, docker, timeout) ends the run as Ctrl-C does: KILLED, journal written.
    with stop_on_signals():
        try:
            if d.main:  # only rank 0 talks to MLflow; the others learn its run id
                resume = resume_target(cfg, tags["config_hash"]) if resumable else None
                with MlflowTracker(
                    cfg.tracking.uri,
                    cfg.tracking.experiment,
                    name,
                    tags,
                    resume_run_id=resume,
                    cache=cfg.paths.cache,
                    flush_timeout_s=cfg.tracking.flush_timeout_s,
                ) as tracker:
                    try:
                        distributed.broadcast(d, (tracker.run_id, tracker.resumed))
                        return job(cfg, tracker, d)
                    except KeyboardInterrupt as stop:
                        log.warning(
                            "run %s %s: ending it KILLED with the epochs it finished; trainer.resume=true continues it",
                            tracker.run_id,
                            stop.args[0] if stop.args else "stopped by SIGINT",
                        )
                        raise
            run_id, resumed = distributed.broadcast(d, None)
            return job(cfg, distributed.RankTracker(run_id, resumed), d)
        finally:
            distributed.shutdown(d)


def cli(entry, prog: str) -> None:
    """Run the Hydra entry ``entry``; a stop (``mtt.tracking.runs.Stopped``: SIGTERM, SIGINT) ends the
    process with one line and status 128 + the signal's number, as shells and schedulers read a
    process a signal ended, instead of a traceback."""
    try:
        entry()
    except KeyboardInterrupt as stop:
        signum = int(getattr(stop, "signum", signal.SIGINT))
        print(f"{prog}: stopped by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None


@hydra_entry
def main(cfg: DictConfig) -> float:
    exit_if_invalid(cfg)  # before any data, model or MLflow work
    from mtt.core.fs import exit_on_corrupt
    from mtt.training.preflight import checked
    from mtt.training.train import train

    # Before the run: the weights (an offline audioset run, before any data work), then what
    # depends on the data (freqN, the batch size).
    job = functools.partial(train, checked=checked(cfg))
    with exit_on_corrupt():  # a corrupt store or checkpoint: one line naming it, exit status 1
        metrics = tracked(cfg, job, resumable=True)
    return metrics.get(cfg.trainer.monitor, float("nan"))  # train() returns the best epoch's epoch metrics


if __name__ == "__main__":
    cli(main, "mtt.run")
