"""Filesystem safety, in one place: atomic writes, durable renames and advisory file locks.

Every writer in mtt goes through these, so that a crash (Ctrl-C, kill -9, power loss) leaves
either the old file or the complete new one, never a truncated file that reads as valid:

- ``atomic_replace(path, write)``: ``write(tmp)`` to a temporary sibling, then ``durable_replace``.
- ``durable_replace(src, dst)``: fsync ``src`` (a file, or a folder's entry list), rename it onto
  ``dst``, then fsync the parent folder: without that last fsync a power loss can forget the
  rename itself (ext4, xfs), and the old file (or none) reappears after the reboot.
- ``locked(path)``: an exclusive ``flock`` held for a ``with`` block (parallel builders of one
  store, the one process shipping a journal).

And content checksums, so that a file a number depends on is never read changed without a word:

- ``file_record(path)`` / ``check_file(path, records, remedy)``: the size and SHA-256 of a file,
  and the check against what was recorded when it was written; ``CorruptFileError`` otherwise,
  one line naming the file, what is wrong and the command that rebuilds it.
- ``atomic_replace(path, write, checksum=True)``: also writes ``<path>.sha256`` (a sidecar), so a
  single file (a checkpoint) carries its record; ``verify_checksummed(path, remedy)`` checks it.
- ``exit_on_corrupt()``: how the entry points show a ``CorruptFileError`` (one line, exit 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, builders must not race
    fcntl = None


def fsync_dir(path: str | Path) -> None:
    """fsync the folder ``path`` so that entries created, renamed or removed in it survive a
    power loss. A no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    if path.is_dir():
        fsync_dir(path)
    else:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def durable_replace(src: str | Path, dst: str | Path) -> None:
    """Rename ``src`` (a complete file or folder) onto ``dst`` so that after a crash or power loss
    ``dst`` is either what it was or all of ``src``: fsync ``src``, ``os.replace``, fsync the folder."""
    src, dst = Path(src), Path(dst)
    _fsync_path(src)
    os.replace(src, dst)
    fsync_dir(dst.parent)


def atomic_replace(path: str | Path, write: Callable[[Path], object], checksum: bool = False) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then ``durable_replace`` it onto ``path``.

    Readers see the old file or the complete new one, never a partial one; the temporary file
    (``.<name>.<random>.tmp``) does not survive an error. With ``checksum`` the new file's
    ``file_record`` goes to ``<path>.sha256`` first (``write_sidecar``), which
    ``verify_checksummed`` checks when the file is read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        if checksum:
            write_sidecar(path, Path(tmp))
        durable_replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_replace(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` as UTF-8 through ``atomic_replace``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_npy_atomic(path: str | Path, array: np.ndarray) -> dict:
    """``np.save`` through ``atomic_replace``: never a partial .npy. Returns the ``file_record``
    of the bytes written, hashed in memory (not read back)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


CHUNK = 1 << 20  # bytes per read and per hash update


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks (any ``hashlib`` algorithm name)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class CorruptFileError(OSError):
    """A stored file that numbers depend on is missing, truncated, or differs from the checksum
    written with it. ``str()`` is one line: the file, what is wrong, and how to rebuild it (or
    what to do instead). An ``OSError``: callers that already report unreadable files report it."""

    def __init__(self, path: str | Path, problem: str | None = None, remedy: str = ""):
        if problem is None:  # re-raised from a DataLoader worker: torch passes its report alone
            path, problem, remedy = _parse_report(str(path))
        self.path, self.problem, self.remedy = Path(path), problem, remedy
        super().__init__(f"{path}: {problem}; {remedy}")


def _parse_report(report: str) -> tuple[str, str, str]:
    """(path, problem, remedy) from torch's report of a worker's error, whose last line is the
    original ``mtt.core.fs.CorruptFileError: <path>: <problem>; <remedy>``."""
    prefix = f"{CorruptFileError.__module__}.{CorruptFileError.__qualname__}: "
    line = next((x[len(prefix) :] for x in reversed(report.splitlines()) if x.startswith(prefix)), report)
    path, _, rest = line.partition(": ")
    problem, _, remedy = rest.partition("; ")
    return path, problem, remedy


def file_record(path: str | Path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file: what ``check_file`` compares it with later."""
    return {"size": os.stat(path).st_size, "sha256": file_digest(path)}


def check_size(path: str | Path, sizes: Sequence[int], remedy: str) -> int:
    """``path``'s size, or ``CorruptFileError`` when it is missing or none of ``sizes`` (the
    ones written): a truncated file is named as such, without being read."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(path, "missing", remedy)
    size = path.stat().st_size
    if size not in sizes:
        expected = " or ".join(f"{n:,}" for n in sorted(set(sizes)))
        what = "truncated" if size < min(sizes) else "longer than written"
        raise CorruptFileError(path, f"{what}: {size:,} bytes, {expected} were written", remedy)
    return size


def check_file(path: str | Path, records: Sequence[Mapping], remedy: str) -> None:
    """``CorruptFileError`` unless ``path`` has the size (``check_size``) and SHA-256 of one of
    ``records`` (``file_record``s)."""
    size = check_size(path, [int(r["size"]) for r in records], remedy)
    digest = file_digest(path)
    if not any(int(r["size"]) == size and r["sha256"] == digest for r in records):
        raise CorruptFileError(path, "content differs from the SHA-256 written with it (corrupt)", remedy)


SIDECAR = ".sha256"


def sidecar(path: str | Path) -> Path:
    """``<path>.sha256``: the ``file_record`` of a file written with ``checksum=True``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR)


def write_sidecar(path: Path, tmp: Path) -> None:
    """Write the ``file_record`` of ``tmp`` (about to be renamed onto ``path``) to ``path``'s
    sidecar, renamed into place BEFORE the file: a crash between the two renames leaves the old,
    complete file beside the new sidecar, so the sidecar also keeps the records of the file now
    at ``path`` (``previous``), never condemning a good file. Which record that is, the inode
    says: a rename keeps it, so the file at ``path`` is the sidecar's own record only if its
    inode is the one the sidecar names; otherwise the rename never happened and the file is one
    of the previous ones."""
    previous: list = []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        old = json.loads(sidecar(path).read_text())
        own = {"size": int(old["size"]), "sha256": str(old["sha256"])}
        landed = os.stat(path).st_ino == old.get("inode")
        previous = [own] if landed else [{"size": int(r["size"]), "sha256": str(r["sha256"])} for r in old["previous"]]
    body = {**file_record(tmp), "inode": os.stat(tmp).st_ino, "previous": previous}
    atomic_write_text(sidecar(path), json.dumps(body))


def verify_checksummed(path: str | Path, remedy: str) -> bool:
    """Check ``path`` against its sidecar (``CorruptFileError`` naming it when missing, truncated
    or changed); False when it has no sidecar (written before mtt wrote checksums): the caller
    decides whether to refuse it or say so and go on."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(path, "missing", remedy)
    side = sidecar(path)
    if not side.is_file():
        return False
    try:
        body = json.loads(side.read_text())
        records = [body, *body["previous"]]
        for r in records:
            int(r["size"]), str(r["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CorruptFileError(side, "unreadable checksum file (corrupt)", remedy) from None
    check_file(path, records, remedy)
    return True


@contextlib.contextmanager
def exit_on_corrupt() -> Iterator[None]:
    """For entry points: a ``CorruptFileError`` ends the process with its one line on stderr
    (``error: <file>: <problem>; <remedy>``) and exit status 1, without a traceback."""
    try:
        yield
    except CorruptFileError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


@contextlib.contextmanager
def locked(path: Path, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` for the ``with`` block; the lock file exists
    only while someone holds or waits for it.

    Builders of the same store (parallel sweep jobs starting together) take it, then re-check
    whether the store is finished: one process builds, the others wait and open the result.
    The lock is released by the kernel if the holder dies, so a killed build never blocks.
    With ``blocking=False`` a lock held elsewhere raises ``BlockingIOError`` instead of waiting.
    The holder deletes the file before releasing it, so a waiter may wake holding a file that is
    no longer at ``path``: it then starts over on the file now there (or a new one), which keeps
    one holder at a time and leaves no lock files behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BaseException:
            f.close()
            raise
        try:
            current: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(f.fileno())
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        f.close()  # the holder before us removed it: lock the one at path now
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
