"""MLflow tracking of training runs: ``MlflowTracker``, the journal that ships to the store, sweeps'
parent runs (mtt.serving.pyfunc, mtt.tag and mtt.ui import mlflow too: the packaged model, its use, the UI).

``MlflowTracker`` is a context manager around one run: it creates the run in an explicitly
resolved experiment (never the "active experiment" global), and on exit marks it FINISHED,
FAILED (with the error recorded) or KILLED (Ctrl-C; SIGTERM inside ``stop_on_signals``), so a
run's status is always true. What it logs goes to the run's journal (``mtt.tracking.journal``) first
and is shipped to the store by a background thread (``Shipper``, ``ship``), so an unreachable
store never stops a training; ``python -m mtt.sync`` ships what a run could not, and with
``--close-stale`` ends the runs whose process died without a word.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from mtt.config import RULES, check_value
from mtt.core.fs import locked
from mtt.core.paths import REPO_ROOT
from mtt.tracking.journal import Journal, JournalError

log = logging.getLogger(__name__)

DEFAULT_URI = f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
# MLflow rejects param values longer than this.
_MAX_PARAM = 6000


def resolve_uri(uri: str | None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the repo's ``mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer.

    MLflow's own client retries for minutes before giving up; a run should not start its data
    and model work against a server it will never reach.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(
            f"MLflow tracking server {uri} is not reachable ({reason}); start it "
            f"(make mlflow-server) or set tracking.uri / MLFLOW_TRACKING_URI"
        ) from exc


def artifact_root(uri: str) -> str | None:
    """Where a local store keeps artifacts: beside the sqlite file, never in the working directory
    (MLflow's default for a database store is ``./mlruns``). Servers decide for themselves."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


# MLflow's experiment kind: the UI shows an experiment of this kind as model training (runs
# table), not as GenAI development (traces), and does not ask the user which it is.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Id of experiment ``name``, created if missing (tolerating a concurrent creator), with
    ``EXPERIMENT_KIND``."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(client.tracking_uri)
    try:
        return client.create_experiment(
            name, artifact_location=f"{root}/{name}" if root else None, tags=EXPERIMENT_KIND
        )
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def prepare_store(uri: str | None, experiment: str) -> str:
    """Create the store (schema) and the experiment if missing; returns the experiment id.

    Call it ONCE, in the launching process, before parallel jobs start: with mlflow 3.17.2 and
    four processes starting together on a sqlite file that does not exist yet, the concurrent
    schema creation fails in three of them and can leave the file unusable, and a racing
    experiment creation files runs under ``Default``. Once both exist, concurrent writers are
    safe (mlflow sets a 20 s sqlite busy timeout), but for the one row jobs share: a dataset
    input, which ``_send`` sends again when a job loses its insert (``lost_race``).
    """
    check_reachable(resolve_uri(uri))
    client = MlflowClient(tracking_uri=resolve_uri(uri))
    try:
        client.search_experiments(max_results=1)  # opening the store creates/migrates its schema
    except MlflowException as e:
        status = e.get_http_status_code()
        if status in (401, 403):  # a server with MLflow's login (make mlflow-server SERVER_AUTH=basic)
            raise PermissionError(
                f"MLflow tracking server {resolve_uri(uri)} refused the request (HTTP {status}): "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user "
                "allowed to log runs"
            ) from None
        raise
    return ensure_experiment(client, experiment)


def sweep_targets(tracking_cfg, task_overrides: list[str]) -> list[tuple[str | None, str]]:
    """Every (uri, experiment) a launch will write to: the config's, or each swept value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = {"uri": [tracking_cfg.uri], "experiment": [tracking_cfg.experiment]}
    for o in OverridesParser.create().parse_overrides(list(task_overrides)):
        field = o.key_or_group.removeprefix("tracking.")
        if field in values and o.key_or_group.startswith("tracking.") and o.is_sweep_override():
            values[field] = list(o.sweep_string_iterator())
    return [(u, e) for u in values["uri"] for e in values["experiment"]]


def swept_value_errors(task_overrides: list[str]) -> list[str]:
    """``mtt.config.check_value`` of every value of every sweep override (``trainer.lr=0.1,-1``):
    the launching process sees a bad value before the first job starts. An interpolation
    (``${...}``) is left to the job, whose composed config resolves it and is checked there."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    errors = []
    for o in OverridesParser.create().parse_overrides(list(task_overrides)):
        # Only keys with a rule: a group choice such as +experiment=glob(report/*) has none, and
        # expanding its glob needs Hydra's config loader, which a callback does not have. An
        # interval (an Optuna search space) has no values to list.
        if o.is_sweep_override() and o.key_or_group in RULES and not o.is_interval_sweep():
            errors += [
                e
                for v in o.sweep_iterator()
                if not (isinstance(v, str) and "${" in v) and (e := check_value(o.key_or_group, v))
            ]
    return errors


SWEEP_TAG = "mtt.sweep"


SWEEP_FILE = ".mtt-sweep.json"  # in the sweep's folder: what the launching process was asked


def sweep_parent(uri: str | None, experiment: str, sweep_id: str) -> str:
    """The id of the parent run of sweep ``sweep_id`` in ``experiment``, created by the first job
    that asks (a job knows its experiment only once its config is composed: a preset may set it).

    Jobs of one sweep may start together (joblib, Slurm): they serialise on a lock file in the
    sweep's folder (shared by all of them, like ``paths.cache``), so exactly one creates it.
    """
    client = MlflowClient(tracking_uri=resolve_uri(uri))
    exp_id = ensure_experiment(client, experiment)
    key = hashlib.sha256(f"{resolve_uri(uri)}|{experiment}".encode()).hexdigest()[:16]
    with locked(Path(sweep_id) / f".mtt-parent-{key}.lock"):
        for run in client.search_runs([exp_id], f"tags.sweep_id = '{sweep_id}'"):
            if run.data.tags.get(SWEEP_TAG) == "true":
                if run.info.status != "RUNNING":  # a resumed search (same folder): its parent goes on
                    client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id
        try:
            overrides = json.loads((Path(sweep_id) / SWEEP_FILE).read_text())["overrides"]
        except (OSError, ValueError, KeyError):  # a launcher without our callback
            overrides = ""
        run = client.create_run(
            exp_id,
            run_name=f"sweep {overrides}"[:250],
            tags={SWEEP_TAG: "true", "overrides": overrides, "sweep_id": sweep_id},
        )
        client.log_batch(run.info.run_id, params=[Param("sweep.overrides", overrides[:_MAX_PARAM])])
        return run.info.run_id


def metric_key(name: str) -> str:
    """``head=gap2,epochs=3`` -> ``head:gap2 epochs:3``: MLflow metric names allow only
    letters, digits and ``_ - . / : space``."""
    key = re.sub(r"[^/\w.\- :]", "_", name.replace("=", ":").replace(",", " "))
    return key[:200]  # MLflow keys are at most 250 characters; the metric's name follows


def task_overrides(config: DictConfig) -> list[str]:
    """The command line's overrides as typed: an override may hold an interpolation (say
    ``tracking.run_name=head-${hydra:runtime.choices.head}``) that only a job can resolve."""
    return [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]


def running_sweep_parents(uri: str | None, sweep: str) -> list[str]:
    """The run ids of sweep ``sweep``'s parent runs at ``uri`` that are still RUNNING."""
    client = MlflowClient(tracking_uri=resolve_uri(uri))
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [
        run.info.run_id
        for run in (client.search_runs(experiments, f"tags.sweep_id = '{sweep}'") if experiments else [])
        if run.data.tags.get(SWEEP_TAG) == "true" and run.info.status == "RUNNING"
    ]


def end_with_summary(uri: str | None, run_id: str, summary: dict, status: str) -> None:
    """Log a sweep's grouped ``summary`` (``mtt.analysis.compare.sweep_summary``) into its parent run
    (``<group>/<metric>_mean`` ... metrics and ``summary.json``) and end it with ``status``."""
    client = MlflowClient(tracking_uri=resolve_uri(uri))
    metrics = []
    now = now_ms()
    for group in summary.get("groups", []):
        for metric, stats in group["metrics"].items():
            for k in ("mean", "std", "n"):
                if stats.get(k) is not None and not math.isnan(stats[k]):
                    metrics.append(Metric(f"{metric_key(group['name'])}/{metric}_{k}", float(stats[k]), now, 0))
            lo, hi = stats.get("ci95") or (None, None)
            if lo is not None and not math.isnan(lo):
                metrics += [
                    Metric(f"{metric_key(group['name'])}/{metric}_ci95_low", lo, now, 0),
                    Metric(f"{metric_key(group['name'])}/{metric}_ci95_high", hi, now, 0),
                ]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    client.log_text(run_id, json.dumps(summary, indent=1), "summary.json")
    client.set_terminated(run_id, status)


def child_runs(uri: str | None, parent_run_id: str) -> list[dict[str, Any]]:
    """The runs whose ``mlflow.parentRunId`` is ``parent_run_id``, as ``read_runs`` dicts."""
    client = MlflowClient(tracking_uri=resolve_uri(uri))
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=50000,
        order_by=["attributes.start_time ASC"],
    )
    return [_as_dict(r) for r in runs]


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
    runs = client.search_runs(
        [exp.experiment_id], f"tags.config_hash = '{config_hash}'", order_by=["attributes.start_time DESC"]
    )
    return [r.info.run_id for r in runs if r.info.status in ("RUNNING", "KILLED", "FAILED")]


def run_exists(uri: str | None, run_id: str) -> bool:
    try:
        MlflowClient(tracking_uri=resolve_uri(uri)).get_run(run_id)
    except MlflowException:
        return False
    return True


# MLflow's log_batch limits per request (mlflow.utils.validation).
_BATCH_METRICS = 1000
_BATCH_PARAMS_TAGS = 100
# The background shipper's retry delays: doubling from the first, capped (seconds); once the
# run has ended and waits for the store (tracking.flush_timeout_s), capped lower: the process
# has nothing else to do, and the sooner it sees the store back, the sooner it exits.
_RETRY_FIRST_S, _RETRY_MAX_S, _RETRY_MAX_ENDING_S = 1.0, 30.0, 5.0
# How long a stopped run (SIGTERM, Ctrl-C) waits for the store at most: schedulers kill for good
# soon after their SIGTERM (Slurm's KillWait 30 s, docker stop 10 s); the journal keeps the rest.
STOPPED_FLUSH_S = 5.0
# How often an ``inputs`` entry is sent when it loses a race with another job (``lost_race``):
# one retry finds the other job's row; more only if several jobs insert new datasets at once.
_RACE_TRIES = 3
# Tags that say why a run ended; a resumed run drops them (it runs again).
ENDING_TAGS = ("error", "killed_by")


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM from Slurm, docker or ``timeout``; SIGINT) raised in the main
    thread by ``stop_on_signals``: a ``KeyboardInterrupt``, so everything that ends a run on
    Ctrl-C (the tracker's KILLED status, cleanups) ends it the same way."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")


_stops: list[int] = []  # the stop signals this process received (``stop_received``)


def stop_received() -> bool:
    """Whether a stop signal reached this process through ``stop_on_signals``."""
    return bool(_stops)


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Inside the block, SIGTERM and SIGINT raise ``Stopped`` in the main thread (Python's
    default for SIGTERM ends the process at once: no status, no flushed journal). A no-op outside
    the main thread, where handlers cannot be set. A child forked inside (a DataLoader worker)
    dies of the signal as it would have without the handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _stops.append(signum)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            if h is not None:  # None: set outside Python, cannot be put back
                signal.signal(s, h)


def sync_command(uri: str, journal: Journal) -> str:
    """The command that ships ``journal`` later: ``python -m mtt.sync --tracking-uri URI PATH``."""
    return f"python -m mtt.sync --tracking-uri {shlex.quote(uri)} {shlex.quote(str(journal.folder))}"


def rejected(exc: BaseException) -> bool:
    """The store refused the request (bad value, unknown run, no permission): retrying the same
    entry cannot help, unlike an unreachable or overloaded store (5xx, 429, 409, no answer)."""
    if isinstance(exc, JournalError):
        return True
    return isinstance(exc, MlflowException) and exc.get_http_status_code() in (400, 401, 403, 404)


def lost_race(exc: BaseException) -> bool:
    """A store's unique-row error: MLflow looks a dataset up in the experiment, then inserts it,
    in two steps, so two jobs of a sweep logging the same dataset at once both insert and the
    later one fails (``UNIQUE constraint failed``: SQLite; ``duplicate key value``: PostgreSQL;
    ``Duplicate entry``: MySQL). The same request again finds the row the other job wrote."""
    text = str(exc)
    return isinstance(exc, MlflowException) and any(
        cause in text for cause in ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")
    )


def _batches(entries: list[dict]) -> Iterator[list[dict]]:
    """Consecutive params/tags/metrics entries merged into groups one ``log_batch`` can carry
    (an oversized entry alone: ``_send`` splits it); artifacts, inputs, untags and status one by
    one."""
    group: list[dict] = []
    n_metrics = n_keys = 0
    params: dict[str, str] = {}
    for e in entries:
        data = e["kind"] in ("params", "tags", "metrics")
        m = len(e.get("metrics", ()))
        k = len(e.get("params", ())) + len(e.get("tags", ()))
        # A param logged twice with different values must reach the store as two requests, so
        # that its write-once rule rejects the second, as a direct call would.
        clash = any(params.get(key, v) != v for key, v in e.get("params", {}).items())
        if group and (
            not data
            or clash
            or n_metrics + m > _BATCH_METRICS
            or n_keys + k > _BATCH_PARAMS_TAGS
            or group[-1]["kind"] not in ("params", "tags", "metrics")
        ):
            yield group
            group, n_metrics, n_keys, params = [], 0, 0, {}
        group.append(e)
        n_metrics, n_keys = n_metrics + m, n_keys + k
        params.update(e.get("params", {}))
    if group:
        yield group


def _send(client: MlflowClient, run_id: str, folder: Path, group: list[dict]) -> None:
    """One group of ``_batches`` to the store (several requests for an oversized entry)."""
    e = group[0]
    if e["kind"] == "artifacts":
        if not (folder / e["dir"]).is_dir():
            raise JournalError(f"{folder / e['dir']}: the files of journal entry {e['seq']} are missing")
        client.log_artifacts(run_id, str(folder / e["dir"]), e["artifact_path"])
        return
    if e["kind"] == "inputs":  # the store keeps one input per dataset and run: shipping again adds none
        inputs = [
            DatasetInput(
                Dataset(d["name"], d["digest"], d["source_type"], d["source"], None, d.get("profile")),
                [InputTag("mlflow.data.context", d["context"])],
            )
            for d in e["datasets"]
        ]
        for attempt in range(_RACE_TRIES):
            try:
                client.log_inputs(run_id, inputs)
                return
            except MlflowException as exc:
                if not lost_race(exc) or attempt == _RACE_TRIES - 1:
                    raise
    if e["kind"] == "untags":
        for key in e["keys"]:
            try:
                client.delete_tag(run_id, key)
            except MlflowException as exc:  # not there (never set, or shipped before): done
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        return
    if e["kind"] == "status":
        if e["status"] == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, e["status"], end_time=e["end_time"])
        return
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    metrics: list[Metric] = []
    for x in group:
        for k, v in x.get("params", {}).items():
            params.setdefault(k, v)
        tags.update(x.get("tags", {}))  # a tag set twice keeps its later value, as in order
        metrics += [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in x.get("metrics", ())]
    keys = [Param(k, v) for k, v in params.items()] + [RunTag(k, v) for k, v in tags.items()]
    while keys or metrics:
        part, keys = keys[:_BATCH_PARAMS_TAGS], keys[_BATCH_PARAMS_TAGS:]
        chunk, metrics = metrics[: _BATCH_METRICS - len(part)], metrics[_BATCH_METRICS - len(part) :]
        client.log_batch(
            run_id,
            metrics=chunk,
            params=[p for p in part if isinstance(p, Param)],
            tags=[t for t in part if isinstance(t, RunTag)],
        )


def ship(client: MlflowClient, journal: Journal, on_ack: Callable[[int], None] | None = None) -> int:
    """Ship ``journal``'s unacknowledged entries to ``client``'s store, in order, recording each
    acknowledged group (``journal.ack``); returns how many entries were shipped.

    Idempotent: an entry shipped again (its acknowledgement lost to a kill) changes nothing, as
    MLflow stores an identical metric point (key, value, step, timestamp) once, accepts a param
    logged again with its value, and overwrites tags and artifacts with the same content.
    Raises whatever the store raises; the entries from the failed group on stay pending.
    """
    pending = journal.pending()
    run_id = journal.header["run_id"]
    for group in _batches(pending):
        _send(client, run_id, journal.folder, group)
        journal.ack(group[-1]["seq"])
        if on_ack is not None:
            on_ack(group[-1]["seq"])
    return len(pending)


def ship_to(uri: str | None, journal: Journal, on_ack: Callable[[int], None] | None = None) -> int:
    """``ship`` to the store at ``uri`` (``resolve_uri``)."""
    return ship(MlflowClient(tracking_uri=resolve_uri(uri)), journal, on_ack)


class Shipper(threading.Thread):
    """Ships a journal in the background while the process lives: wakes on every entry, retries
    a failure after 1, 2, 4 ... (at most 30; 5 once the run ended) seconds, and never raises
    into training.

    A store that rejects an entry (``rejected``) stops it: the entry and the ones after it stay
    in the journal for ``mtt.sync`` once the cause is fixed; ``error`` says why.
    """

    def __init__(self, client: MlflowClient, journal: Journal, last_seq: int):
        super().__init__(name=f"mtt-shipper-{journal.folder.name}", daemon=True)
        self.client, self.journal = client, journal
        self.error: BaseException | None = None  # what stopped it for good
        self.failing: BaseException | None = None  # the last failure of an ongoing outage
        self._cond = threading.Condition()
        self._written, self._acked = last_seq, -1
        self._ending = False  # the run ended: stop once everything is shipped
        self._nudge = False  # cut the current retry delay short, once (the run just ended)
        self._abandon = False  # the wait for the store timed out: stop now
        self._done = False

    def wrote(self, seq: int) -> None:
        """The tracker appended entry ``seq``: ship it."""
        with self._cond:
            self._written = max(self._written, seq)
            self._cond.notify_all()

    def _on_ack(self, seq: int) -> None:
        with self._cond:
            self._acked = seq
            self._cond.notify_all()

    def run(self) -> None:
        try:
            with self.journal.shipping_lock():  # a running `mtt.sync` of this journal finishes first
                self._on_ack(max(self.journal.acked(), 0))  # 0: the header, nothing to ship
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - nothing may reach the training loop
            self.error = exc
            log.error("shipping %s stopped: %s", self.journal.path, _short(exc))
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _loop(self) -> None:
        delay = _RETRY_FIRST_S
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._written > self._acked or self._ending or self._abandon)
                if self._abandon or self._written <= self._acked:
                    return
            try:
                ship(self.client, self.journal, self._on_ack)
            except Exception as exc:
                if rejected(exc):
                    raise
                if self.failing is None:
                    log.warning(
                        "tracking store %s unreachable (%s); journaling to %s and retrying in the background",
                        self.client.tracking_uri,
                        _short(exc),
                        self.journal.path,
                    )
                self.failing = exc
                with self._cond:
                    nudged = self._cond.wait_for(lambda: self._nudge or self._abandon, timeout=delay)
                    self._nudge = False
                delay = (
                    _RETRY_FIRST_S if nudged else min(delay * 2, _RETRY_MAX_ENDING_S if self._ending else _RETRY_MAX_S)
                )
                continue
            if self.failing is not None:
                log.info("tracking store %s reachable again; journal shipped", self.client.tracking_uri)
            self.failing, delay = None, _RETRY_FIRST_S

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every written entry to be acknowledged (retrying at once
        if it is waiting out a delay); True when the store has everything. Either way the thread
        then ends, releasing the journal to ``mtt.sync``."""
        with self._cond:
            self._ending = self._nudge = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._acked >= self._written or self._done, timeout=timeout_s)
            shipped = self._acked >= self._written
            if not shipped:
                self._abandon = True
                self._cond.notify_all()
            return shipped


def _short(exc: BaseException) -> str:
    """An error on part of a line: MLflow's connection errors nest the real cause deep inside."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    cause = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    return cause.group(0).strip() if cause else text[:300]


class MlflowTracker:
    """One MLflow run. Use as ``with MlflowTracker(uri, experiment, run_name, tags) as t: ...``.

    The run is created (or, with ``resume_run_id``, reopened) on the store at the start, which
    fails within seconds when the store does not answer. Everything logged afterwards goes to
    the run's journal (``mtt.tracking.journal``) in ``run_dir(cache, run_id)`` first (a temporary folder
    without ``cache``, removed once shipped) and is shipped by a background ``Shipper``, so a
    store that goes away during training never stops it. The tracker claims that folder for
    its process (``Journal.claim``: what ``mtt.sync --close-stale`` checks) until it exits. On
    exit it waits up to ``flush_timeout_s`` for the store (``STOPPED_FLUSH_S`` when stopped); if
    it is still away, one warning line names the journal and the ``mtt.sync`` command that
    ships it. A resumed run drops ``ENDING_TAGS`` and logs no second point for a metric and step
    it logged before.
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
        cache: str | Path | None = None,
        flush_timeout_s: float = 120.0,
    ):
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        # Reopen this existing run (resume) instead of creating one.
        self.resumed = resume_run_id is not None
        self._resume_run_id = resume_run_id
        self.cache = cache
        self.flush_timeout_s = flush_timeout_s
        self.journal: Journal | None = None
        self._shipper: Shipper | None = None
        self._temporary: Path | None = None
        self._held = contextlib.ExitStack()  # the run folder's claim and the open journal
        self._logged: set[tuple[str, int]] = set()  # (key, step) a resumed run had logged before

    def __enter__(self) -> MlflowTracker:
        check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = ensure_experiment(self.client, self.experiment)
        if self.resumed:
            run = self.client.get_run(self._resume_run_id)
            if run.info.experiment_id != self.experiment_id:
                raise ValueError(
                    f"run {self._resume_run_id} belongs to experiment {run.info.experiment_id}, not {self.experiment!r}"
                )
            self.run_id = run.info.run_id
            resumes = int(run.data.tags.get("resumes", 0))
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=self.run_name, tags={k: str(v) for k, v in self.tags.items()}
            )
            self.run_id = run.info.run_id
        with contextlib.ExitStack() as stack:
            stack.callback(self._close_journal)  # until __enter__ returns: a failure lets go of it all
            self._open_journal()
            entries = self.journal.entries()
            if self.resumed:
                # A journaled status, not a direct call: the killed process's pending entries
                # (its own status among them) reach the store first. Count the resumes the
                # journal holds too, in case the store has not seen the last one yet.
                resumes = max(
                    [resumes, *(int(e["tags"]["resumes"]) for e in entries if "resumes" in e.get("tags", {}))]
                )
                self._write(self.journal.append("status", status="RUNNING", end_time=None))
                # The run keeps its original tags (overrides, sweep id); only count the resumes,
                # and drop what said why it stopped: it runs again.
                self.set_tags({"resumes": resumes + 1})
                self._write(self.journal.append("untags", keys=list(ENDING_TAGS)))
                # What the run logged before: a step that logs again (the last epoch healed, the
                # test of a run stopped after it) adds no second point.
                self._logged = {(m["key"], m["step"]) for e in entries for m in e.get("metrics", ())}
            self.set_tags({"mtt.host": socket.gethostname(), "mtt.pid": os.getpid()})
            stack.pop_all()
        return self

    def _open_journal(self) -> None:
        """Claim the run's folder for this process (``Journal.claim``), open its journal and
        start shipping it."""
        from mtt.tracking.checkpoint import run_dir  # torch: only where a run trains

        if self.cache is not None:
            folder = run_dir(self.cache, self.run_id)
        else:
            self._temporary = Path(tempfile.mkdtemp(prefix="mtt-journal-"))
            folder = self._temporary / self.run_id
        self.journal = Journal(folder)
        self._held.enter_context(self.journal.claim())
        self.journal.open(
            {"uri": self.uri, "run_id": self.run_id, "experiment_id": self.experiment_id, "experiment": self.experiment}
        )
        self._held.callback(self.journal.close)
        self._shipper = Shipper(self.client, self.journal, self.journal.entries()[-1]["seq"])
        self._shipper.start()

    def _close_journal(self) -> None:
        """Stop shipping at once (whatever is unshipped stays in the journal) and let go of the
        run's folder."""
        if self._shipper is not None and self._shipper.is_alive():
            self._shipper.flush(0)
        self._held.close()

    def _write(self, seq: int) -> None:
        self._shipper.wrote(seq)

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        timeout, shipped = self.flush_timeout_s, False
        try:
            if exc_type is None:
                status = "FINISHED"
            elif issubclass(exc_type, KeyboardInterrupt):
                status = "KILLED"
                self.set_tags({"killed_by": getattr(exc, "signal_name", "SIGINT")})
                # Stopped: a scheduler's grace period (Slurm 30 s, docker 10 s) is short, and
                # the journal on disk has everything for `mtt.sync`.
                timeout = min(timeout, STOPPED_FLUSH_S)
            else:
                status = "FAILED"
                message = "".join(traceback.format_exception(exc_type, exc, tb))
                self.set_tags({"error": f"{exc_type.__name__}: {exc}"[:5000]})
                self.log_text(message, "error.txt")
            # The status is the journal's last entry, shipped after everything it concludes.
            self._write(self.journal.append("status", status=status, end_time=now_ms()))
            shipped = self.flush(timeout)
        finally:
            self._close_journal()
        if shipped and self._temporary is not None:  # once nothing (the heartbeat) writes there
            shutil.rmtree(self._temporary, ignore_errors=True)
        return False

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait (up to ``timeout_s``, by default ``flush_timeout_s``) for the store to have the
        journal; True if it does. Otherwise say, on one line, where the journal is and how to
        ship it."""
        timeout_s = self.flush_timeout_s if timeout_s is None else timeout_s
        try:
            shipped = self._shipper.flush(timeout_s)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, the journal keeps everything
            shipped = False
        if shipped:
            return True
        error = self._shipper.error  # else unreachable: the cause was logged when the outage began
        reason = (
            f"did not take the journal ({_short(error)})" if error else f"unreachable for {timeout_s:g} s after the run"
        )
        log.warning(
            "tracking store %s %s; run %s is journaled in %s; ship it with: %s",
            self.uri,
            reason,
            self.run_id,
            self.journal.path,
            sync_command(self.uri, self.journal),
        )
        return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = {k: str(v)[:_MAX_PARAM] for k, v in flatten(params).items()}
        self._write(self.journal.append("params", params=items))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._write(self.journal.append("tags", tags={k: str(v) for k, v in tags.items()}))

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp: int | None = None) -> None:
        """Log one step. A metric the run logged at this step before it was resumed is left out
        (one point per step); in one process, the same ``timestamp`` adds no second point."""
        now = timestamp if timestamp is not None else now_ms()
        items = [
            {"key": k, "value": float(v), "step": int(step), "timestamp": now}
            for k, v in metrics.items()
            if not math.isnan(v) and (k, int(step)) not in self._logged
        ]
        if items:
            self._write(self.journal.append("metrics", metrics=items))

    def log_inputs(self, datasets: list[Mapping[str, str]]) -> None:
        """MLflow dataset inputs (``mtt.tracking.records.dataset_inputs``): the runs table's Dataset column."""
        self._write(self.journal.append("inputs", datasets=[dict(d) for d in datasets]))

    def log_text(self, text: str, artifact_file: str) -> None:
        folder, _, name = artifact_file.rpartition("/")
        self._write(self.journal.append_files(None, folder or None, name=name, text=text))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._write(self.journal.append_files(path, artifact_path))

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._write(self.journal.append_files(folder, artifact_path))


def download_artifacts(uri: str | None, run_id: str, artifact_path: str, dst: str | Path) -> str:
    """Download one artifact (file or folder) of ``run_id`` under ``dst``; returns its local path."""
    from mlflow.artifacts import download_artifacts as _download

    return _download(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=resolve_uri(uri))


def try_download_artifact(uri: str | None, run_id: str, artifact_path: str, dst: str | Path) -> str | None:
    """``download_artifacts``, or None when the run has no such artifact."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # many small files: noise
    client = MlflowClient(tracking_uri=resolve_uri(uri))
    folder = Path(artifact_path).parent.as_posix()
    parent = None if folder == "." else folder
    if not any(a.path == artifact_path for a in client.list_artifacts(run_id, parent)):
        return None
    return download_artifacts(uri, run_id, artifact_path, dst)


def read_runs(uri: str | None, experiment: str) -> list[dict[str, Any]]:
    """The runs of MLflow experiment ``experiment``, oldest first, as plain dicts:
    ``run_id, name, status, start_time, params, metrics`` (latest value of each), ``tags``.

    Raises ``LookupError`` naming the experiment, the store and the experiments it does hold.
    """
    client = MlflowClient(tracking_uri=resolve_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise LookupError(f"no MLflow experiment {experiment!r} in {resolve_uri(uri)}; it has: {known}")
    runs = client.search_runs([exp.experiment_id], max_results=50000, order_by=["attributes.start_time ASC"])
    return [_as_dict(r) for r in runs]


def _as_dict(r) -> dict[str, Any]:
    return {
        "run_id": r.info.run_id,
        "name": r.info.run_name,
        "status": r.info.status,
        "start_time": r.info.start_time,
        "params": dict(r.data.params),
        "metrics": dict(r.data.metrics),
        "tags": dict(r.data.tags),
    }


def metric_history(uri: str | None, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every logged value of metric ``key`` in run ``run_id``, by step."""
    client = MlflowClient(tracking_uri=resolve_uri(uri))
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
