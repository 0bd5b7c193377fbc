"""One resumable, verifying HTTP downloader for everything mtt fetches (VGGish weights, MTAT files).

``download(url, dest)`` streams into ``dest.part`` next to ``dest`` and moves it into place with
``os.replace`` only once its size and hash check out, so a file at ``dest`` is always complete.
A ``.part`` left by an interrupted run is resumed with an HTTP ``Range`` request. Only the standard
library's urllib is used.
"""

from __future__ import annotations

import http.client
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from mtt.core.fs import durable_replace, file_digest, locked

CHUNK = 1 << 20  # bytes per read and per hash update
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


class DownloadError(RuntimeError):
    """A download that could not be completed or verified.

    ``reason`` says which: ``offline`` (no connection: refused, DNS, timeout), ``http`` (an error
    status, in ``status``), ``incomplete`` (the connection kept dropping), ``mismatch`` (size or
    hash differ from what was expected; nothing is left on disk). ``detail`` is the cause alone,
    without the URL and destination, for callers that phrase their own message.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        dest: Path | None = None,
        reason: str,
        status: int | None = None,
        detail: str | None = None,
    ):
        super().__init__(message)
        self.url = url
        self.dest = dest
        self.reason = reason
        self.status = status
        self.detail = detail or message


def _check_hash(path: Path, sha256: str | None, sha256_prefix: str | None) -> tuple[bool, str, str]:
    """-> (ok, expected, actual); ok when no hash is expected."""
    if sha256 is None and sha256_prefix is None:
        return True, "", ""
    actual = file_digest(path)
    expected = (sha256 or sha256_prefix or "").lower()
    ok = actual == expected if sha256 else actual.startswith(expected)
    return ok, expected, actual


def _verifies(path: Path, size: int | None, sha256: str | None, sha256_prefix: str | None) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    return _check_hash(path, sha256, sha256_prefix)[0]


def _total_from_headers(resp, status: int, offset: int) -> int | None:
    """Full size of the remote file as the response states it, or None when it does not say."""
    if status == 206:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if m and m.group(3) != "*":
            return int(m.group(3))
    length = resp.headers.get("Content-Length")
    if length is None:
        return None
    return int(length) + (offset if status == 206 else 0)


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest`` (resuming, verified, atomic) and return ``dest``.

    Args:
        sha256 / sha256_prefix: expected hex SHA-256 of the whole file, or its first characters
            (torch.hub's file-name convention).
        size: expected size in bytes; the server's Content-Length is always checked as well.
        timeout: seconds for connecting and for each read; an unreachable host fails within it.
        retries: how many times a dropped connection is resumed before giving up.

    If ``dest`` exists and passes the given checks it is returned without any network access; if
    it fails them it is deleted and downloaded again. Concurrent callers for the same ``dest``
    (parallel sweep jobs, torchrun ranks) serialise on a lock file beside it (``.<name>.lock``):
    one downloads, the others then find the verified file. Raises ``DownloadError``.
    """
    dest = Path(dest)
    if dest.exists() and _verifies(dest, size, sha256, sha256_prefix):
        return dest
    with locked(dest.with_name(f".{dest.name}.lock")):  # one writer of dest.part at a time
        return _download_locked(
            url,
            dest,
            sha256=sha256,
            sha256_prefix=sha256_prefix,
            size=size,
            progress=progress,
            timeout=timeout,
            retries=retries,
        )


def _download_locked(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    sha256_prefix: str | None,
    size: int | None,
    progress: bool,
    timeout: float,
    retries: int,
) -> Path:
    """``download`` under its lock: look again (another process may have finished it), fetch."""
    if dest.exists():
        if _verifies(dest, size, sha256, sha256_prefix):
            return dest
        dest.unlink()  # corrupt or stale: never leave it where it could be read as valid
    part = dest.with_suffix(dest.suffix + ".part")
    total = _fetch(url, dest, part, size=size, progress=progress, timeout=timeout, retries=retries)

    def reject(what: str, expected, actual) -> DownloadError:
        part.unlink(missing_ok=True)
        detail = f"{what} mismatch, expected {expected}, got {actual}"
        return DownloadError(
            f"{url}: {detail}; deleted the download (destination {dest})",
            url=url,
            dest=dest,
            reason="mismatch",
            detail=detail,
        )

    got = part.stat().st_size
    if total is not None and got != total:
        raise reject("size", f"{total} bytes (server)", f"{got} bytes")
    if size is not None and got != size:
        raise reject("size", f"{size} bytes", f"{got} bytes")
    ok, expected, actual = _check_hash(part, sha256, sha256_prefix)
    if not ok:
        kind = "sha256" if sha256 else "sha256 prefix"
        raise reject(kind, expected, actual)
    durable_replace(part, dest)
    return dest


def _fetch(
    url: str, dest: Path, part: Path, *, size: int | None, progress: bool, timeout: float, retries: int
) -> int | None:
    """Fill ``part`` with the remote file; return its full size when the server stated one."""
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset > size:  # a .part longer than the file cannot be resumed
            part.unlink()
            offset = 0
        try:
            done, total, received, error = _attempt(url, part, offset, progress=progress, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset > 0:  # our Range starts at or past the end
                m = _UNSATISFIED_RANGE.match(e.headers.get("Content-Range", "") if e.headers else "")
                if m and int(m.group(1)) == offset:
                    return offset  # the .part is already complete (killed before os.replace)
                part.unlink()
                continue
            if e.code >= 500 and attempt < retries:
                attempt += 1
                time.sleep(min(0.5 * 2**attempt, 8.0))
                continue
            raise DownloadError(
                f"{url}: HTTP {e.code} {e.reason} (destination {dest})",
                url=url,
                dest=dest,
                reason="http",
                status=e.code,
                detail=f"HTTP {e.code} {e.reason}",
            ) from None
        except urllib.error.URLError as e:
            # Failed to connect at all (refused, DNS, timeout): retrying would only make an
            # offline machine wait longer, so say so at once.
            raise DownloadError(
                f"cannot reach {url} ({e.reason}); destination {dest}",
                url=url,
                dest=dest,
                reason="offline",
                detail=str(e.reason),
            ) from None
        except (OSError, http.client.HTTPException) as e:
            # Connected, then the server closed or reset before answering.
            done, total, received, error = False, None, 0, e
        if done:
            return total
        if attempt >= retries:
            detail = f"connection dropped {attempt + 1} times (last: {error})"
            raise DownloadError(
                f"{url}: {detail}; kept {part} to resume later", url=url, dest=dest, reason="incomplete", detail=detail
            )
        attempt += 1
        if received == 0:  # no progress at all: back off before hammering the server again
            time.sleep(min(0.5 * 2**attempt, 8.0))


def _attempt(
    url: str, part: Path, offset: int, *, progress: bool, timeout: float
) -> tuple[bool, int | None, int, Exception | str | None]:
    """One request, appending to ``part`` from ``offset``.

    -> (complete, full size or None, bytes received in this attempt, why it stopped early).
    Errors before a response (no connection, HTTP error status) are raised.
    """
    headers = {"Accept-Encoding": "identity", "User-Agent": "mtt-downloader"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        status = getattr(resp, "status", None) or 200  # file:// responses carry no status
        if status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                part.unlink()  # a range we did not ask for: start over rather than splice it in
                return False, None, 0, f"unexpected Content-Range {resp.headers.get('Content-Range')!r}"
        else:  # 200: the server ignored our Range, so the body starts at byte 0
            offset = 0
        total = _total_from_headers(resp, status, offset)
        received, error = 0, None
        with (
            open(part, "ab" if offset else "wb") as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:  # reset or timeout mid-body
                error = e
        complete = error is None and (total is None or offset + received >= total)
        if not complete and error is None:
            error = OSError(f"response ended after {offset + received} of {total} bytes")
        return complete, total, received, error


__all__ = ["DownloadError", "download", "file_digest"]
