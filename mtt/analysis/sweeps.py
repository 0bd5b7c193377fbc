"""The launching process's Hydra callback (conf/config.yaml ``hydra.callbacks``): it prepares the
MLflow store before jobs fan out and, for a sweep, ends the sweep's parent runs with the grouped
summary of their children.

Apart from ``mtt.tracking.runs`` because it needs both the store (``mtt.tracking.runs``) and the comparison
(``mtt.compare``, which reads the store through ``mtt.tracking.runs``): here, neither imports the other
back.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mtt.analysis.compare import sweep_summary
from mtt.config import exit_if_invalid
from mtt.core.fs import atomic_write_bytes
from mtt.tracking.runs import (
    SWEEP_FILE,
    end_with_summary,
    prepare_store,
    resolve_uri,
    running_sweep_parents,
    stop_on_signals,
    stop_received,
    sweep_targets,
    swept_value_errors,
    task_overrides,
)


class PrepareTracking(Callback):
    """Hydra callback (conf/config.yaml ``hydra.callbacks``) in the launching process.

    Before any job starts (single runs and sweeps, any launcher) it creates the store and the
    experiment (``prepare_store``). A sweep (``-m``) is ONE parent MLflow run per experiment its
    jobs log to (created by the first job, ``sweep_parent``): every job's run is its child (tag
    ``mlflow.parentRunId``); the parent carries the sweep's overrides and ``sweep_id``. When the
    sweep ends, this callback writes the grouped summary of the children into each parent
    (``mtt.compare``: ``<group>/test_roc_auc_mean`` ... metrics and ``summary.json``) and ends it.
    A sweep that fails or is interrupted still ends its parents (FAILED / KILLED, with the
    summary of the children that finished).

    First of all it checks the config's values, and a sweep's every swept value: a bad one ends
    the launch with exit status 2 before any store, run or job (``mtt.config.exit_if_invalid``).
    A store that cannot be prepared (unreachable, a login refused) ends it with one line and
    exit status 1: Hydra turns a callback's exception into a warning and would start the jobs.
    During a sweep, SIGTERM stops the launching process as Ctrl-C does (``stop_on_signals``):
    the parents end KILLED.
    """

    def __init__(self) -> None:
        self._sweep: tuple[str, list[str | None]] | None = None  # sweep id, tracking URIs
        self._interrupted = False
        self._signals = contextlib.ExitStack()

    def __getstate__(self) -> dict[str, Any]:
        # Hydra's joblib launcher pickles the callbacks into its workers: the signal handlers
        # (a generator-based context, which cannot be pickled) belong to the launching process.
        return {**self.__dict__, "_signals": contextlib.ExitStack()}

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._prepare(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._prepare(config, swept_value_errors(task_overrides(config)))
        if int(os.environ.get("RANK", "0")) != 0:
            return
        uris = sorted({u for u, _ in sweep_targets(config.tracking, task_overrides(config))}, key=str)
        self._sweep = (str(config.hydra.sweep.dir), uris)
        record = json.dumps({"overrides": " ".join(task_overrides(config))}).encode()
        atomic_write_bytes(Path(self._sweep[0]) / SWEEP_FILE, record)  # for the jobs that create parents
        previous = sys.excepthook

        def note_interrupt(kind, value, tb):  # Hydra re-raises Ctrl-C; other errors end in exit(1)
            self._interrupted = self._interrupted or issubclass(kind, KeyboardInterrupt)
            previous(kind, value, tb)

        sys.excepthook = note_interrupt
        atexit.register(self._end_parents, None)  # a failed or interrupted sweep skips the end hook
        self._signals.enter_context(stop_on_signals())

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end_parents("FINISHED")

    def _end_parents(self, status: str | None) -> None:
        self._signals.close()
        if self._sweep is None:
            return
        (sweep, uris), self._sweep = self._sweep, None
        bootstrap = status is not None
        if status is None:  # at exit, without on_multirun_end: the sweep did not finish
            status = "KILLED" if self._interrupted or stop_received() else "FAILED"
        for uri in uris:
            for run_id in running_sweep_parents(uri, sweep):
                # At interpreter exit no thread pool takes work, and MLflow downloads
                # artifacts through one: the summary of a broken sweep has no bootstrap.
                end_parent_run(uri, run_id, status, bootstrap)

    @staticmethod
    def _prepare(config: DictConfig, swept_errors: Sequence[str] = ()) -> None:
        exit_if_invalid(config, swept_errors)  # before the store exists: a bad value leaves nothing
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 touches the store
            return
        for uri, experiment in sweep_targets(config.tracking, task_overrides(config)):
            try:
                prepare_store(uri, experiment)
            except Exception as exc:  # noqa: BLE001 - any cause: one line, not a warning and a traceback
                line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if resolve_uri(uri) not in line:
                    line = f"tracking store {resolve_uri(uri)}: {line}"
                print(f"error: {line}", file=sys.stderr, flush=True)
                raise SystemExit(1) from None


def end_parent_run(uri: str | None, run_id: str, status: str, bootstrap: bool = True) -> None:
    """Summarise a sweep's children into its parent run and end it with ``status``."""
    try:
        summary = sweep_summary(uri, run_id, bootstrap)
    except LookupError as e:  # no finished child to summarise (or a refused mix): say so, still end
        summary = {"error": str(e)}
    end_with_summary(uri, run_id, summary, status)
