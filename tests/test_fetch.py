"""mtt.core.fetch.download against a local HTTP server that can drop, ignore Range and corrupt."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest

from mtt.core.fetch import DownloadError, download, file_digest
from tests.helpers.http_server import FileServer, closed_port_url

DATA = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(DATA).hexdigest()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_plain_download_verifies_and_leaves_only_the_file(tmp_path):
    dest = tmp_path / "sub" / "blob.bin"
    with FileServer({"blob.bin": DATA}) as server:
        out = download(server.url + "blob.bin", dest, sha256=SHA, size=len(DATA), progress=False)
    assert out == dest and dest.read_bytes() == DATA
    assert _leftovers(dest.parent) == ["blob.bin"]
    assert server.count() == 1 and server.requests[0].range is None
    assert file_digest(dest) == SHA


def test_concurrent_downloads_of_one_file_fetch_it_once(tmp_path):
    """Four callers at once (threads here; tests/test_weights.py does it with processes): one
    downloads while the others wait on the lock, then find the verified file. Without the lock
    all four wrote into the same .part."""
    import threading

    dest = tmp_path / "blob.bin"
    start, errors = threading.Barrier(4), []

    def fetch():
        start.wait()
        try:
            download(server.url + "blob.bin", dest, sha256=SHA, progress=False)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with FileServer({"blob.bin": DATA}) as server:
        server.slow("blob.bin", seconds=1.0)  # the callers overlap the whole download
        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert errors == [] and dest.read_bytes() == DATA
    assert [(r.method, r.range) for r in server.requests] == [("GET", None)]
    assert _leftovers(tmp_path) == ["blob.bin"]  # neither a .part nor the lock file


def test_resumes_with_range_after_the_connection_drops(tmp_path):
    dest = tmp_path / "blob.bin"
    with FileServer({"blob.bin": DATA}) as server:
        server.drop_once("blob.bin", after=100_000)
        download(server.url + "blob.bin", dest, sha256_prefix=SHA[:8], progress=False)
    assert dest.read_bytes() == DATA
    assert [r.range for r in server.requests] == [None, "bytes=100000-"]
    assert _leftovers(tmp_path) == ["blob.bin"]


def test_resumes_a_part_file_left_by_an_earlier_run(tmp_path):
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(DATA[:123_456])
    with FileServer({"blob.bin": DATA}) as server:
        download(server.url + "blob.bin", dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == DATA
    assert [r.range for r in server.requests] == ["bytes=123456-"]


@pytest.mark.parametrize(
    "leftover, content",
    [
        ("blob.bin.part", DATA),  # killed between the last byte and os.replace: the server answers 416
        ("blob.bin", DATA[:-1] + b"x"),  # a corrupt file at dest is deleted and fetched again
    ],
    ids=["complete-part", "corrupt-dest"],
)
def test_leftovers_of_earlier_runs_cost_one_request(tmp_path, leftover, content):
    dest = tmp_path / "blob.bin"
    (tmp_path / leftover).write_bytes(content)
    with FileServer({"blob.bin": DATA}) as server:
        download(server.url + "blob.bin", dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == DATA and server.count() == 1
    assert _leftovers(tmp_path) == ["blob.bin"]


def test_server_ignoring_range_restarts_from_zero(tmp_path):
    dest = tmp_path / "blob.bin"
    with FileServer({"blob.bin": DATA}) as server:
        server.ignore_range = True
        server.drop_once("blob.bin", after=50_000)
        download(server.url + "blob.bin", dest, sha256=SHA, progress=False)
    # The second request asked for a range, got 200 and the whole file, and that was not appended.
    assert [r.range for r in server.requests] == [None, "bytes=50000-"]
    assert dest.read_bytes() == DATA


def test_wrong_sha256_raises_and_leaves_nothing(tmp_path):
    dest = tmp_path / "blob.bin"
    wrong = "0" * 64
    with FileServer({"blob.bin": DATA}) as server:
        with pytest.raises(DownloadError) as info:
            download(server.url + "blob.bin", dest, sha256=wrong, progress=False)
    message = str(info.value)
    assert server.url + "blob.bin" in message and wrong in message and SHA in message
    assert info.value.reason == "mismatch"
    assert _leftovers(tmp_path) == []


def test_corrupted_bytes_are_caught_by_the_hash(tmp_path):
    dest = tmp_path / "blob.bin"
    with FileServer({"blob.bin": DATA}) as server:
        server.corrupt("blob.bin")
        with pytest.raises(DownloadError, match="sha256 prefix mismatch"):
            download(server.url + "blob.bin", dest, sha256_prefix=SHA[:8], progress=False)
        assert _leftovers(tmp_path) == []
        download(server.url + "blob.bin", dest, sha256_prefix=SHA[:8], progress=False)
    assert dest.read_bytes() == DATA


def test_wrong_size_raises(tmp_path):
    with FileServer({"blob.bin": DATA}) as server:
        with pytest.raises(DownloadError, match="size mismatch"):
            download(server.url + "blob.bin", tmp_path / "blob.bin", size=len(DATA) + 1, progress=False)
    assert _leftovers(tmp_path) == []


def test_existing_valid_dest_makes_no_request(tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(DATA)
    with FileServer({"blob.bin": DATA}) as server:
        assert download(server.url + "blob.bin", dest, sha256=SHA, size=len(DATA)) == dest
    assert server.count() == 0


def test_gives_up_after_retries_and_keeps_the_part(tmp_path):
    dest = tmp_path / "blob.bin"
    with FileServer({"blob.bin": DATA}) as server:
        server.drop_once("blob.bin", after=1000)
        with pytest.raises(DownloadError, match="dropped") as info:
            download(server.url + "blob.bin", dest, progress=False, retries=0)
    assert info.value.reason == "incomplete"
    assert (tmp_path / "blob.bin.part").stat().st_size == 1000 and not dest.exists()


def test_http_404_names_the_url(tmp_path):
    with FileServer({}) as server:
        with pytest.raises(DownloadError, match="404") as info:
            download(server.url + "missing.bin", tmp_path / "missing.bin", progress=False)
    assert info.value.status == 404 and server.url + "missing.bin" in str(info.value)
    assert _leftovers(tmp_path) == []


def test_closed_port_fails_at_once_naming_url_and_destination(tmp_path, monkeypatch):
    """No retry and no back-off against a machine that is offline (how long it takes:
    tests/benchmarks/bench_download.py)."""
    url = closed_port_url() + "blob.bin"
    dest = tmp_path / "blob.bin"
    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    with pytest.raises(DownloadError) as info:
        download(url, dest, timeout=3.0, progress=False)
    assert waits == [], "a refused connection was retried"
    assert info.value.reason == "offline"
    assert url in str(info.value) and str(dest) in str(info.value)
    assert not os.listdir(tmp_path)


def test_file_urls_work_for_local_mirrors(tmp_path):
    src = tmp_path / "mirror" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(DATA)
    dest = tmp_path / "out" / "blob.bin"
    download(src.as_uri(), dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == DATA
