"""Filesystem safety, in one place: atomic writes, durable renames and advisory file locks.

Every writer in mtt goes through these, so that a crash (Ctrl-C, kill -9, power loss) leaves
either the old file or the complete new one, never a truncated file that reads as valid:

- ``atomic_replace(path, write)``: ``write(tmp)`` to a temporary sibling, then ``durable_replace``.
- ``durable_replace(src, dst)``: fsync ``src`` (a file, or a folder's entry list), rename it onto
  ``dst``, then fsync the parent folder: without that last fsync a power loss can forget the
  rename itself (ext4, xfs), and the old file (or none) reappears after the reboot.
- ``locked(path)``: an exclusive ``flock`` held for a ``with`` block (parallel builders of one
  store, the one process shipping a journal).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
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


def atomic_replace(path: str | Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then ``durable_replace`` it onto ``path``.

    Readers see the old file or the complete new one, never a partial one; the temporary file
    (``.<name>.<random>.tmp``) does not survive an error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        durable_replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_replace(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` as UTF-8 through ``atomic_replace``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` through ``atomic_replace``: never a partial .npy."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the name
            np.save(f, array, allow_pickle=False)

    atomic_replace(path, write)


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
