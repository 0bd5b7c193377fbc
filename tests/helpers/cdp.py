"""Drive a headless Chromium through the Chrome DevTools protocol with the standard library only.

The MLflow 3 UI is a React single-page app: a static ``--dump-dom`` cannot click its menus, so the
browser test opens the page, clicks like a user (real mouse events at element coordinates, which
is what Radix menus listen to) and reads ``innerText``. The websocket client below is the minimal
RFC 6455 subset the DevTools endpoint needs: masked text frames out, unmasked frames in.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

# Flags that work as root in a container; the resolver rule makes every host other than
# 127.0.0.1 unresolvable, so the page cannot reach the internet even if it tries (fonts,
# telemetry): the test then shows what the UI does offline, as on a CI machine.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]

INSTALL_HINT = (
    "run `.ci/run` (it provisions the browser) or "
    "`apt-get update && apt-get install -y --no-install-recommends chromium`"
)


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and its children (its own group,
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


def find_chromium() -> str:
    """Path of Debian's ``chromium``; raises with the install command when it is missing."""
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError(f"chromium is not installed: {INSTALL_HINT}")
    return path


class WebSocket:
    """A blocking websocket client for one ``ws://127.0.0.1:PORT/...`` URL."""

    def __init__(self, url: str, timeout: float = 30.0):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        # No Origin header: Chromium only checks --remote-allow-origins when one is sent.
        self.sock.sendall(
            (
                f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"websocket handshake with {url} closed early")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"websocket handshake with {url} refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("websocket closed by the browser")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)  # clients must mask (RFC 6455 5.3)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        """The next complete text message (answers pings, joins fragments)."""
        parts = []
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class JavaScriptError(RuntimeError):
    """An expression evaluated in the page threw."""


class Page:
    """One browser tab: navigate, evaluate JavaScript, click, screenshot."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:  # anything else is an event we did not ask for
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def eval(self, expression: str):
        """Value of a JavaScript expression in the page (JSON-serialisable)."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise JavaScriptError(f"JavaScript error in {expression[:80]!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, expression: str, timeout: float, what: str):
        """Poll a JavaScript expression until it is truthy; its value, or an error naming ``what``."""
        deadline = time.monotonic() + timeout
        error = None
        while True:
            try:  # a page still loading may have no body yet: keep polling
                value = self.eval(expression)
                if value:
                    return value
            except JavaScriptError as e:
                error = e
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout:.0f} s waiting for {what} (last error: {error}); "
                    f"page text:\n{self.text()[:3000]}"
                )
            time.sleep(0.25)

    def click(self, selector: str, timeout: float = 30.0) -> None:
        """Press and release the left mouse button at the centre of the first match of ``selector``."""
        js = f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            if (!e) return null; e.scrollIntoView({{block: 'center'}});
            const r = e.getBoundingClientRect();
            return r.width > 0 ? [r.x + r.width / 2, r.y + r.height / 2] : null; }})()"""
        x, y = self.wait_for(js, timeout, f"a visible {selector}")
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=1, clickCount=1)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])


@contextmanager
def chromium_page(profile_dir: Path, width: int = 1600, height: int = 1000, timeout: float = 60.0):
    """A headless Chromium (fresh profile in ``profile_dir``) and its first tab; stopped on exit."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            find_chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile_dir}",
            f"--window-size={width},{height}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(profile_dir / "chromium.log", "wb"),
        start_new_session=True,
    )
    ws = None
    try:
        port_file = profile_dir / "DevToolsActivePort"  # Chromium writes the port it picked here
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (profile_dir / "chromium.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"chromium did not start (exit code {proc.poll()}):\n{log}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
            targets = json.load(r)
        page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        ws = WebSocket(page_url, timeout=timeout)
        page = Page(ws)
        page.call("Page.enable")
        page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        yield page
    finally:
        if ws is not None:
            ws.close()
        stop_process_group(proc)  # the browser and its renderers
