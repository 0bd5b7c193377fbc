"""A local HTTP file server for the network tests (127.0.0.1, a free port, a background thread).

The real hosts (GitHub releases, the MIREX MTAT server) cannot be reached from the test machines,
so tests serve generated files themselves and can make the server misbehave on purpose:

    with FileServer({"a.bin": data}) as server:
        server.drop_once("a.bin", after=1000)   # close the connection after 1000 body bytes, once
        server.corrupt("a.bin", times=1)        # next response has flipped bytes (same length)
        server.ignore_range = True              # answer 200 with the whole file to Range requests
        server.slow("a.bin", seconds=2.0)       # every response's body takes about 2 s to send
        download(server.url + "a.bin", dest)
        server.requests                         # [Request(method, path, range), ...]
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import urlopen

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # file name relative to the server root, without the leading "/"
    range: str | None  # the Range header as sent


class FileServer:
    """Serves ``files`` (name -> bytes) and/or the files under ``directory``; see the module doc."""

    def __init__(self, files: Mapping[str, bytes] | None = None, directory: Path | None = None):
        self.files = dict(files or {})
        self.directory = Path(directory) if directory is not None else None
        self.ignore_range = False
        self.requests: list[Request] = []
        self._drops: dict[str, int] = {}
        self._corrupt: dict[str, int] = {}
        self._slow: dict[str, float] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    # -- misbehaviour switches ------------------------------------------------------------------
    def drop_once(self, name: str, after: int) -> None:
        """Close the connection after ``after`` body bytes of the next response for ``name``."""
        self._drops[name] = after

    def corrupt(self, name: str, times: int = 1) -> None:
        """Flip bytes in the middle of the next ``times`` responses for ``name`` (-1: always)."""
        self._corrupt[name] = times

    def slow(self, name: str, seconds: float) -> None:
        """Send every body of ``name`` in 20 pieces spread over ``seconds`` (a slow link, so that
        concurrent clients really overlap)."""
        self._slow[name] = seconds

    # -- bookkeeping --------------------------------------------------------------------------
    def count(self, name: str | None = None) -> int:
        """How many requests were made (for ``name`` only, when given)."""
        with self._lock:
            return sum(1 for r in self.requests if name is None or r.path == name)

    @property
    def url(self) -> str:
        """Base URL ending in "/" (still valid after ``stop``, when it refuses connections)."""
        assert self._url is not None, "server not started"
        return self._url

    def _content(self, name: str) -> bytes | None:
        if name in self.files:
            return self.files[name]
        if self.directory is not None and name:
            path = (self.directory / name).resolve()
            if path.is_file() and path.is_relative_to(self.directory.resolve()):
                return path.read_bytes()
        return None

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> FileServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self._url = f"http://{host}:{port}/"
        # A short poll interval so that stopping the server takes milliseconds, not 0.5 s.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving; the port then refuses connections."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # keep pytest output clean
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            name = unquote(urlsplit(self.path).path).lstrip("/")
            range_header = self.headers.get("Range")
            with server._lock:
                server.requests.append(Request(self.command, name, range_header))
                drop = server._drops.pop(name, None) if body else None
                corrupt = server._corrupt.get(name, 0) != 0 and body
                if corrupt and server._corrupt[name] > 0:
                    server._corrupt[name] -= 1
            data = server._content(name)
            if data is None:
                self.send_error(404, f"no such file: {name}")
                return
            if corrupt:
                data = _flip_middle(data)
            start, end, status = 0, len(data), 200
            m = _RANGE.match(range_header or "")
            if m and not server.ignore_range:
                start = int(m.group(1))
                end = min(int(m.group(2)) + 1, len(data)) if m.group(2) else len(data)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "none" if server.ignore_range else "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            payload = data[start:end]
            if drop is not None:
                # Send part of the promised body, then cut the connection.
                self.wfile.write(payload[:drop])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            seconds = server._slow.get(name)
            if seconds:
                step = max(1, -(-len(payload) // 20))
                for i in range(0, len(payload), step):
                    self.wfile.write(payload[i : i + step])
                    self.wfile.flush()
                    time.sleep(seconds / 20)
                return
            self.wfile.write(payload)

    return Handler


def _flip_middle(data: bytes, n: int = 16) -> bytes:
    """The same bytes with ``n`` of them inverted around the middle (same length)."""
    mid = len(data) // 2
    out = bytearray(data)
    for i in range(max(0, mid - n // 2), min(len(out), mid + n // 2)):
        out[i] ^= 0xFF
    return bytes(out)


def free_port() -> int:
    """A loopback port nothing listens on right now (for a server a test starts, or to refuse)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url() -> str:
    """A URL on 127.0.0.1 at a port nothing listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}/"


__all__ = ["FileServer", "Request", "closed_port_url", "free_port"]


def wait_until_answering(
    url: str, proc: subprocess.Popen, seconds: float, output: Callable[[], str], pause: float = 0.5
) -> None:
    """Poll ``url`` until it answers, for a server ``proc`` the test started; raise
    ``RuntimeError`` with the tail of the server's ``output()`` if it exits or stays silent."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urlopen(url, timeout=5) as answer:
                answer.read()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the server for {url} exited with {proc.returncode}:\n{output()[-3000:]}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer from {url} within {seconds} s:\n{output()[-3000:]}") from None
            time.sleep(pause)


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a server started with ``start_new_session=True`` and its children (its own group,
    nothing else): SIGTERM, then SIGKILL after ``timeout`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
