"""MLflow tracking: the only module that imports mlflow.

``MlflowTracker`` is a context manager around one run: it creates the run in an explicitly
resolved experiment (never the "active experiment" global), and on exit marks it FINISHED,
FAILED (with the error recorded) or KILLED (Ctrl-C), so a run's status is always true.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mtt.config import REPO_ROOT

DEFAULT_URI = f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
# MLflow rejects param values longer than this.
_MAX_PARAM = 6000


def resolve_uri(uri: str | None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the repo's ``mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside its file (``<dir>/mlartifacts``), not into the working
    directory's ``./mlruns`` (MLflow's default); other stores choose their own (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Id of experiment ``name``, created if missing (tolerating a concurrent creator)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def now_ms() -> int:
    return int(time.time() * 1000)


def resumable_runs(uri: str | None, experiment: str, config_hash: str) -> list[str]:
    """Ids of the unfinished runs (RUNNING: killed hard; KILLED; FAILED) of ``experiment`` whose
    ``config_hash`` tag equals ``config_hash``, newest first."""
    client = MlflowClient(tracking_uri=resolve_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], f"tags.config_hash = '{config_hash}'",
                              order_by=["attributes.start_time DESC"])
    return [r.info.run_id for r in runs if r.info.status in ("RUNNING", "KILLED", "FAILED")]


def run_exists(uri: str | None, run_id: str) -> bool:
    try:
        MlflowClient(tracking_uri=resolve_uri(uri)).get_run(run_id)
    except MlflowException:
        return False
    return True


class MlflowTracker:
    """One MLflow run. Use as ``with MlflowTracker(uri, experiment, run_name, tags) as t: ...``."""

    def __init__(self, uri: str | None, experiment: str, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, resume_run_id: str | None = None):
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        # Reopen this existing run (resume) instead of creating one.
        self.resumed = resume_run_id is not None
        self._resume_run_id = resume_run_id

    def __enter__(self) -> "MlflowTracker":
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = ensure_experiment(self.client, self.experiment)
        if self.resumed:
            run = self.client.get_run(self._resume_run_id)
            if run.info.experiment_id != self.experiment_id:
                raise ValueError(f"run {self._resume_run_id} belongs to experiment {run.info.experiment_id}, "
                                 f"not {self.experiment!r}")
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            # The run keeps its original tags (overrides, sweep id); only count the resumes.
            self.set_tags({"resumes": int(run.data.tags.get("resumes", 0)) + 1})
            return self
        run = self.client.create_run(self.experiment_id, run_name=self.run_name,
                                     tags={k: str(v) for k, v in self.tags.items()})
        self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
            message = "".join(traceback.format_exception(exc_type, exc, tb))
            self.client.set_tag(self.run_id, "error", f"{exc_type.__name__}: {exc}"[:5000])
            self.client.log_text(self.run_id, message, "error.txt")
        self.client.set_terminated(self.run_id, status)
        return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp: int | None = None) -> None:
        """Log one step. With the same ``timestamp`` a repeated call adds no second point (resume)."""
        now = timestamp if timestamp is not None else now_ms()
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if not math.isnan(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


def download_artifacts(uri: str | None, run_id: str, artifact_path: str, dst: str | Path) -> str:
    """Download one artifact (file or folder) of ``run_id`` under ``dst``; returns its local path."""
    from mlflow.artifacts import download_artifacts as _download

    return _download(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst),
                     tracking_uri=resolve_uri(uri))
