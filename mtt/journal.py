"""A run's journal: everything a run logs, appended to a local file first, shipped to MLflow after.

Training must not depend on the tracking server being up when an epoch ends, so the tracker
(``mtt.tracking.MlflowTracker``) writes each record here and a background thread ships it; if
the store stays away, ``python -m mtt.sync`` ships it later. The journal lives in the run's
checkpoint folder ``<paths.cache>/checkpoints/<run_id>/``:

    journal.jsonl        one JSON object a line, in the order logged (see below)
    journal.files/<seq>/ the files of artifact entry ``seq`` (a copy taken when it was logged),
                         deleted once the store has them
    journal.acked        ``{"seq": n}``: every entry up to ``n`` is in the store (replaced atomically)
    journal.lock         held (flock) by the one process shipping this journal

Every line has ``seq`` (0, 1, 2, ...) and ``kind``:

    run        the header (seq 0): ``uri``, ``run_id``, ``experiment_id``, ``experiment``
    params     ``params``: {key: value (str)}
    tags       ``tags``: {key: value (str)}
    metrics    ``metrics``: [{key, value, step, timestamp (ms)}]
    inputs     ``datasets``: [{name, digest, source_type, source, profile, context}] (MLflow
               dataset inputs, ``mlflow.log_input``)
    artifacts  ``dir`` (``journal.files/<seq>``), ``artifact_path`` (None: the run's root): upload
               the folder's contents
    status     ``status`` (RUNNING | FINISHED | FAILED | KILLED), ``end_time`` (ms)

A line is written with one ``write`` + ``fsync``, so a kill -9 leaves whole lines; a torn last
line (killed mid-write) is ignored when read and cut off when the journal is reopened. An
artifact's files are in place before its line is written. Plain JSON only: nothing that cannot
be replayed exactly, no pickle. Nothing here talks to MLflow (``mtt.tracking`` ships).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtt.fs import atomic_replace, durable_replace, locked

JOURNAL = "journal.jsonl"
ACKED = "journal.acked"
FILES = "journal.files"
LOCK = "journal.lock"


class JournalError(ValueError):
    """A journal that cannot be read or does not belong to the run it is opened for."""


class Journal:
    """The journal of one run in ``folder`` (see the module doc). One process appends."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL
        self._write_lock = threading.Lock()
        self._next = 0

    # -- writing --------------------------------------------------------------------------------
    def open(self, header: dict[str, Any]) -> bool:
        """Start the journal with ``header`` (a ``run`` entry), or reopen an existing one of the
        same run to append to it (resume); returns True when it reopened one.

        A torn last line is cut off first, so the next line starts on a line of its own.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._next = 0
            self.append("run", **header)
            return False
        entries, good_bytes = self._read()
        if not entries:  # killed while writing its header: start again
            os.truncate(self.path, 0)
            self._next = 0
            self.append("run", **header)
            return False
        if entries[0]["kind"] != "run" or entries[0]["run_id"] != header["run_id"]:
            raise JournalError(f"{self.path} is not the journal of run {header['run_id']}")
        if good_bytes < self.path.stat().st_size:
            os.truncate(self.path, good_bytes)
        self._next = entries[-1]["seq"] + 1
        return True

    def append(self, kind: str, **fields: Any) -> int:
        """Write one entry durably (one write, fsync); returns its ``seq``."""
        with self._write_lock:
            return self._append(kind, fields)

    def _append(self, kind: str, fields: dict[str, Any]) -> int:
        seq = self._next
        line = json.dumps({"seq": seq, "kind": kind, **fields}, separators=(",", ":")) + "\n"
        data = line.encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if os.write(fd, data) != len(data):  # a full disk: take the part back, say so
                os.ftruncate(fd, end)
                raise OSError(errno.ENOSPC, f"{self.path}: short write (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)
        self._next = seq + 1
        return seq

    def append_files(
        self, source: str | Path, artifact_path: str | None, name: str | None = None, text: str | None = None
    ) -> int:
        """An ``artifacts`` entry: a copy of file or folder ``source`` (or ``text`` written to a
        file ``name``), taken now, to be uploaded under ``artifact_path``; returns its ``seq``.

        A copy, because the caller may delete or rewrite the original (plots in a temporary
        folder, the best checkpoint of a later epoch) before the store is back.
        """
        with self._write_lock:
            rel = f"{FILES}/{self._next}"
            target = self.folder / rel
            shutil.rmtree(target, ignore_errors=True)  # staged by a process killed before its line
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if text is not None:
                tmp.mkdir(parents=True)
                (tmp / str(name)).write_text(text)
            elif Path(source).is_dir():
                shutil.copytree(source, tmp)
            else:
                tmp.mkdir(parents=True)
                shutil.copy2(source, tmp / Path(source).name)
            durable_replace(tmp, target)
            return self._append("artifacts", {"dir": rel, "artifact_path": artifact_path})

    # -- reading --------------------------------------------------------------------------------
    def _read(self) -> tuple[list[dict[str, Any]], int]:
        """The whole entries and the byte length they span (a torn last line is left out)."""
        data = self.path.read_bytes()
        entries: list[dict[str, Any]] = []
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:  # no newline: the last line was torn by a kill mid-write
                break
            try:
                entry = json.loads(data[pos:end])
            except ValueError:
                if end + 1 == len(data):
                    break  # an unparsable last line: torn as well (garbage after a power cut)
                raise JournalError(f"{self.path}: line {len(entries) + 1} is not JSON") from None
            if entry.get("seq") != len(entries):
                raise JournalError(
                    f"{self.path}: line {len(entries) + 1} has seq {entry.get('seq')}, expected {len(entries)}"
                )
            entries.append(entry)
            pos = end + 1
        return entries, pos

    def entries(self) -> list[dict[str, Any]]:
        """Every whole entry, in order; ``JournalError`` naming the file for a damaged one."""
        return self._read()[0]

    @property
    def header(self) -> dict[str, Any]:
        entries = self.entries()
        if not entries or entries[0]["kind"] != "run":
            raise JournalError(f"{self.path}: no run header")
        return entries[0]

    def acked(self) -> int:
        """The last ``seq`` the store acknowledged (-1: none)."""
        try:
            return int(json.loads((self.folder / ACKED).read_text())["seq"])
        except FileNotFoundError:
            return -1

    def ack(self, seq: int) -> None:
        """Record that the store has every entry up to ``seq``; drop their copied files."""
        atomic_replace(self.folder / ACKED, lambda p: p.write_text(json.dumps({"seq": seq})))
        for staged in (self.folder / FILES).glob("*"):
            if staged.name.isdigit() and int(staged.name) <= seq:
                shutil.rmtree(staged, ignore_errors=True)

    def pending(self) -> list[dict[str, Any]]:
        """The entries the store has not acknowledged yet, in order (the header is not one: the
        run exists in the store before its journal does)."""
        acked = self.acked()
        return [e for e in self.entries() if e["seq"] > acked and e["kind"] != "run"]

    def last_status(self) -> str | None:
        """The run's status as journaled last (None: the process died before it wrote one)."""
        statuses = [e["status"] for e in self.entries() if e["kind"] == "status"]
        return statuses[-1] if statuses else None

    def shipping_lock(self, blocking: bool = True):
        """The lock the one process shipping this journal holds (``fs.locked``)."""
        return locked(self.folder / LOCK, blocking=blocking)


def find_journals(path: str | Path) -> Iterator[Journal]:
    """The journals at ``path``: a journal file, a run folder, or every one below a folder."""
    path = Path(path)
    if path.is_file() and path.name == JOURNAL:
        yield Journal(path.parent)
    elif (path / JOURNAL).is_file():
        yield Journal(path)
    else:
        for p in sorted(path.glob(f"**/{JOURNAL}")):
            yield Journal(p.parent)
