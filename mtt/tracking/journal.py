"""A run's journal: everything a run logs, appended to a local file first, shipped to MLflow after.

Training must not depend on the tracking server being up when an epoch ends, so the tracker
(``mtt.tracking.runs.MlflowTracker``) writes each record here and a background thread ships it; if
the store stays away, ``python -m mtt.sync`` ships it later. The journal lives in the run's
checkpoint folder ``<paths.cache>/checkpoints/<run_id>/``:

    journal.jsonl        one JSON object a line, in the order logged (see below)
    journal.files/<seq>/ the files of artifact entry ``seq`` (a copy taken when it was logged),
                         deleted once the store has them
    journal.acked        ``{"seq": n}``: every entry up to ``n`` is in the store (replaced atomically)
    journal.lock         held (flock) by the one process shipping this journal
    journal.owner        ``{"host", "pid", "started", "boot"}``: the process that runs the run; its
                         mtime is the run's heartbeat (touched every ``HEARTBEAT_S`` seconds)
    journal.owner.lock   held (flock) by that process for as long as it runs the run

Every line has ``seq`` (0, 1, 2, ...) and ``kind``:

    run        the header (seq 0): ``uri``, ``run_id``, ``experiment_id``, ``experiment``
    params     ``params``: {key: value (str)}
    tags       ``tags``: {key: value (str)}
    untags     ``keys``: [key]: delete these tags (a resumed run's ``error``; none there is fine)
    metrics    ``metrics``: [{key, value, step, timestamp (ms)}]
    inputs     ``datasets``: [{name, digest, source_type, source, profile, context}] (MLflow
               dataset inputs, ``mlflow.log_input``)
    artifacts  ``dir`` (``journal.files/<seq>``), ``artifact_path`` (None: the run's root): upload
               the folder's contents
    status     ``status`` (RUNNING | FINISHED | FAILED | KILLED), ``end_time`` (ms)

plus, since format 2 (the header's ``journal`` field), ``crc``: the CRC-32 of the line's bytes
without it (``{...,"crc":"8 hex digits"}``), checked whenever the journal is read, so a line
changed on disk (a flipped bit, a zeroed block, a hand edit) is refused, naming the file and
line, instead of shipping a changed number. A journal without the field (an older mtt) is read
unchecked.

A line is written with one ``write`` + ``fsync``, so a kill -9 leaves whole lines; a torn last
line (killed mid-write) is ignored when read and cut off when the journal is reopened. An
artifact's files are in place before its line is written. Plain JSON only: nothing that cannot
be replayed exactly, no pickle. Nothing here talks to MLflow (``mtt.tracking.runs`` ships).

The process that writes a journal keeps it open: if ``journal.jsonl`` is deleted or replaced
under it (a cleanup script, a user), the next entry rewrites it whole from the open copy first,
with a warning, so the journal still holds the run from its header on and ships.

Who runs a run (``claim``): the tracker takes ``journal.owner.lock`` and writes ``journal.owner``
before it opens the journal, and touches the owner file while the run lives. With
``process_alive`` they tell a run whose process is gone (killed with SIGKILL, a node that died)
from one that still runs: ``python -m mtt.sync --close-stale`` ends the first kind KILLED.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtt.core.fs import atomic_replace, atomic_write_bytes, durable_replace, locked

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
ACKED = "journal.acked"
FILES = "journal.files"
LOCK = "journal.lock"
OWNER = "journal.owner"
OWNER_LOCK = "journal.owner.lock"
FORMAT = 2  # 2: every line carries its crc
HEARTBEAT_S = 30.0  # how often a running run touches journal.owner
_CRC = b',"crc":"'  # a checked line ends with _CRC + 8 hex digits + b'"}'
_CRC_TAIL = len(_CRC) + 8 + 2


def _with_crc(body: bytes) -> bytes:
    """``{...}`` -> ``{...,"crc":"<crc32 of body>"}``."""
    return body[:-1] + _CRC + b"%08x" % zlib.crc32(body) + b'"}'


def _crc_ok(line: bytes) -> bool | None:
    """True/False: ``line`` carries a crc that matches / does not; None: it carries none."""
    if len(line) < _CRC_TAIL or line[-_CRC_TAIL : -_CRC_TAIL + len(_CRC)] != _CRC or line[-2:] != b'"}':
        return None
    try:
        expected = int(line[-10:-2], 16)
    except ValueError:
        return False
    return zlib.crc32(line[:-_CRC_TAIL] + b"}") == expected


class JournalError(ValueError):
    """A journal that cannot be read or does not belong to the run it is opened for."""


class Journal:
    """The journal of one run in ``folder`` (see the module doc). One process appends."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL
        self._write_lock = threading.Lock()
        self._next = 0
        self._fd: int | None = None  # open by ``open`` until ``close``: the writer's own copy

    # -- writing --------------------------------------------------------------------------------
    def open(self, header: dict[str, Any]) -> bool:
        """Start the journal with ``header`` (a ``run`` entry), or reopen an existing one of the
        same run to append to it (resume); returns True when it reopened one.

        A torn last line is cut off first, so the next line starts on a line of its own.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        self.close()
        reopened = self.path.exists() and self.path.stat().st_size > 0
        if reopened:
            entries, good_bytes = self._read()
            if not entries:  # killed while writing its header: start again
                os.truncate(self.path, 0)
                reopened = False
            else:
                if entries[0]["kind"] != "run" or entries[0]["run_id"] != header["run_id"]:
                    raise JournalError(f"{self.path} is not the journal of run {header['run_id']}")
                if good_bytes < self.path.stat().st_size:
                    os.truncate(self.path, good_bytes)
                self._next = entries[-1]["seq"] + 1
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        if not reopened:
            self._next = 0
            self.append("run", **{**header, "journal": FORMAT})
        return reopened

    def close(self) -> None:
        """Let go of the open journal (the end of a run); reading and ``open`` still work."""
        with self._write_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _in_place(self) -> None:
        """Put the journal back at ``path`` if something deleted or replaced it while this
        process writes it: the open copy still holds every line (call with the write lock)."""
        if self._fd is None:
            return
        held = os.fstat(self._fd)
        try:
            there = os.stat(self.path)
            if (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
                return
        except FileNotFoundError:
            pass
        data = os.pread(self._fd, held.st_size, 0)
        atomic_write_bytes(self.path, data)  # creates the folder too, if that went as well
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        os.close(self._fd)
        self._fd = fd
        log.warning(
            "%s was deleted or replaced during the run; rewrote it from the run's open copy (%d entries)",
            self.path,
            self._next,
        )

    def append(self, kind: str, **fields: Any) -> int:
        """Write one entry durably (one write, fsync); returns its ``seq``."""
        with self._write_lock:
            return self._append(kind, fields)

    def _append(self, kind: str, fields: dict[str, Any]) -> int:
        if self._fd is None:
            raise JournalError(f"{self.path}: not open for writing (Journal.open first)")
        self._in_place()
        seq = self._next
        data = _with_crc(json.dumps({"seq": seq, "kind": kind, **fields}, separators=(",", ":")).encode()) + b"\n"
        end = os.lseek(self._fd, 0, os.SEEK_END)
        if os.write(self._fd, data) != len(data):  # a full disk: take the part back, say so
            os.ftruncate(self._fd, end)
            raise OSError(errno.ENOSPC, f"{self.path}: short write (disk full?)")
        os.fsync(self._fd)
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
    def _bytes(self) -> bytes:
        """The journal's bytes: the writer's open copy (even while the file is gone), else the file."""
        with self._write_lock:
            if self._fd is not None:
                return os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        return self.path.read_bytes()

    def _read(self) -> tuple[list[dict[str, Any]], int]:
        """The whole entries and the byte length they span (a torn last line is left out).

        ``JournalError`` naming the file and line for a line that is not JSON (but the last:
        torn), out of sequence, or that fails its crc (format 2: set by the header)."""
        data = self._bytes()
        entries: list[dict[str, Any]] = []
        checked = False  # the header says whether every line carries a crc
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:  # no newline: the last line was torn by a kill mid-write
                break
            line = data[pos:end]
            try:
                entry = json.loads(line)
            except ValueError:
                if end + 1 == len(data):
                    break  # an unparsable last line: torn as well (garbage after a power cut)
                raise JournalError(f"{self.path}: line {len(entries) + 1} is not JSON") from None
            crc = _crc_ok(line)
            if not entries:
                checked = crc is not None
            if crc is False or (checked and crc is None):
                raise JournalError(
                    f"{self.path}: line {len(entries) + 1} fails its checksum (changed or damaged on disk); "
                    "nothing from it on can be shipped"
                )
            entry.pop("crc", None)
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

    # -- who runs the run -------------------------------------------------------------------------
    def owner_lock(self, blocking: bool = True):
        """The lock the process running the run holds for its whole life (``claim``), and that
        ``mtt.sync --close-stale`` takes to end a run whose process is gone."""
        return locked(self.folder / OWNER_LOCK, blocking=blocking)

    def owner(self) -> dict[str, Any] | None:
        """``journal.owner``: the process that ran the run last (None: not recorded)."""
        try:
            return json.loads((self.folder / OWNER).read_text())
        except (OSError, ValueError):
            return None

    def heartbeat(self) -> float | None:
        """When the run's process was last seen alive (seconds since the epoch): the later of
        the owner file's mtime (touched every ``HEARTBEAT_S``) and the journal's (None: neither
        exists)."""
        times = []
        for name in (OWNER, JOURNAL):
            with contextlib.suppress(OSError):
                times.append((self.folder / name).stat().st_mtime)
        return max(times, default=None)

    @contextlib.contextmanager
    def claim(self) -> Iterator[None]:
        """Hold the run for this process (``with journal.claim(): ...``): the owner lock, the
        owner file naming this process, touched every ``HEARTBEAT_S`` seconds.

        ``JournalError`` when another process that may still be alive holds it (the same run
        resumed twice at once); waits while a short-lived tool (``mtt.sync --close-stale``) does.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.owner_lock(blocking=False))
            except BlockingIOError:
                owner = self.owner()
                if owner is not None and process_alive(owner) is not False:
                    raise JournalError(
                        f"{self.folder}: the run is held by process {owner.get('pid')} on {owner.get('host')}"
                    ) from None
                stack.enter_context(self.owner_lock())
            me = this_process()
            atomic_write_bytes(self.folder / OWNER, json.dumps(me).encode())
            beat = _Heartbeat(self.folder / OWNER, me)
            beat.start()
            stack.callback(beat.stop)
            yield


class _Heartbeat(threading.Thread):
    """Touches ``path`` (the owner file) every ``HEARTBEAT_S`` seconds until ``stop``."""

    def __init__(self, path: Path, record: dict[str, Any]):
        super().__init__(name=f"mtt-heartbeat-{path.parent.name}", daemon=True)
        self.path, self.record = path, record
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # deleted under the run: put it back
                with contextlib.suppress(OSError):
                    atomic_write_bytes(self.path, json.dumps(self.record).encode())
            except OSError:  # a full or read-only disk: the run goes on; the next beat retries
                pass

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _boot_id() -> str | None:
    """This boot of the machine (Linux), to tell a pid of the last boot from one of this boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux: /proc/<pid>/stat field 22);
    None when there is no such process or no /proc. Tells a live process from a later one that
    reuses its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # the fields after "(comm)" start at field 3


def this_process() -> dict[str, Any]:
    """``{"host", "pid", "started", "boot"}`` of this process (``process_alive``)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _process_start(pid), "boot": _boot_id()}


def process_alive(owner: dict[str, Any]) -> bool | None:
    """Whether the process ``owner`` (``this_process`` of some process) still runs: True, False,
    or None when this machine cannot tell (it ran on another host).

    On the same host: gone when the machine rebooted since (boot id), when no process has its
    pid, or when the one that has it started at another time (pid reused); elsewhere than Linux,
    only whether the pid exists.
    """
    if owner.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if owner.get("boot") and boot and owner["boot"] != boot:
        return False
    pid = int(owner["pid"])
    if owner.get("started") is not None and sys.platform.startswith("linux"):
        return _process_start(pid) == owner["started"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


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
