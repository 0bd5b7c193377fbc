"""Extracting a byte-split zip: reading the pieces in place (mtt.data.download) vs `cat` first;
and how long a download takes to fail on a machine that is offline.

    python tests/benchmarks/bench_download.py [total MB, default 300]

Prints wall time and extra disk for both ways on a generated archive of ~3 MB mp3-sized clips
(stored, like mp3s in MTAT's zip). The baseline joins the pieces into one file (what the usual
`cat mp3.zip.* > mp3.zip && unzip` does) and extracts that. Then the time `mtt.core.fetch.download`
takes to give up on a refused connection (no retries: it should be milliseconds, not the
seconds of a back-off).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mtt.core.fetch import DownloadError, download  # noqa: E402
from mtt.data.download import PARTS, _extract  # noqa: E402
from tests.helpers.http_server import closed_port_url  # noqa: E402


def offline_failure(tries: int = 5) -> None:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(tries):
            start = time.perf_counter()
            try:
                download(closed_port_url() + "blob.bin", Path(tmp) / "blob.bin", progress=False)
            except DownloadError:
                times.append(time.perf_counter() - start)
    print(
        f"refused connection -> DownloadError in {1000 * min(times):.1f} ms (best of {tries}), "
        f"{1000 * max(times):.1f} ms worst"
    )


def main(total_mb: int = 300) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = tmp / "all.zip"
        clip = 300_000
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
            for i in range(total_mb * 1_000_000 // clip):
                zf.writestr(f"{'0123456789abcdef'[i % 16]}/clip-{i}.mp3", os.urandom(clip))
        data = archive.read_bytes()
        archive.unlink()
        cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
        parts = []
        for i, name in enumerate(PARTS):
            (tmp / name).write_bytes(data[cut[i] : cut[i + 1]])
            parts.append(tmp / name)
        del data

        start = time.perf_counter()
        joined = tmp / "joined.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(tmp / "baseline")
        baseline = time.perf_counter() - start
        extra = joined.stat().st_size
        joined.unlink()

        start = time.perf_counter()
        n = _extract((tmp / "inplace").resolve(), parts, progress=False)
        inplace = time.perf_counter() - start
        size = sum(p.stat().st_size for p in parts) / 1e6
        print(f"archive {size:.0f} MB in 3 pieces, {n} clips")
        print(f"cat + ZipFile.extractall : {baseline:6.2f} s, extra disk {extra / 1e6:.0f} MB")
        print(f"pieces read in place     : {inplace:6.2f} s, extra disk 0 MB (CRC-checked, atomic per clip)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
    offline_failure()
