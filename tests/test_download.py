"""mtt.data.download: a fake MTAT (split zip + CSVs) served locally, downloaded, verified, extracted."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mtt.core.fetch import DownloadError
from mtt.core.paths import REPO_ROOT
from mtt.data.download import (
    ANNOTATIONS,
    CLIP_INFO,
    FILES,
    MARKER,
    PARTS,
    PINNED_SHA256,
    ArchiveError,
    TargetError,
    checksums_from_env,
    download_mtat,
)
from mtt.data.index import build_index
from mtt.data.mtat import AnnotationError
from mtt.data.tags import TAGS, TOP50
from tests.helpers import mtat_tree, snapshot
from tests.helpers.http_server import FileServer, _flip_middle, closed_port_url

FOLDERS = ("0", "1", "f")


def _csv(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, delimiter="\t", quotechar='"', quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def _fake_mtat(entries: dict[str, bytes] | None = None) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """-> (served files: 3 zip pieces + 2 CSVs, the clips by path).

    Clips are random bytes stored uncompressed, so any flipped byte in their data fails the CRC.
    """
    rng = np.random.default_rng(0)
    clips = (
        entries
        if entries is not None
        else {
            f"{folder}/artist_{folder}-album-0{i}-title-{30 * i}-{30 * i + 29}.mp3": rng.integers(
                0, 256, int(rng.integers(4000, 9000)), dtype=np.uint8
            ).tobytes()
            for folder in FOLDERS
            for i in range(4)
        }
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for folder in sorted({p.split("/")[0] for p in clips} & set("0123456789abcdef")):
            zf.writestr(f"{folder}/", b"")  # the real archive lists its folders too
        for path, data in clips.items():
            zf.writestr(path, data)
    archive = buf.getvalue()
    cut = [0, len(archive) // 3, 2 * len(archive) // 3, len(archive)]
    served = {name: archive[cut[i] : cut[i + 1]] for i, name in enumerate(PARTS)}
    rows = [["clip_id", *TAGS, "mp3_path"]]
    info = [
        [
            "clip_id",
            "track_number",
            "title",
            "artist",
            "album",
            "url",
            "segmentStart",
            "segmentEnd",
            "original_url",
            "mp3_path",
        ]
    ]
    for clip_id, path in enumerate(clips, start=2):
        labels = ["0"] * len(TAGS)
        labels[TAGS.index(TOP50[clip_id % len(TOP50)])] = "1"
        rows.append([str(clip_id), *labels, path])
        info.append([str(clip_id), "1", "title", "artist", "album", "http://x", "30", "59", "http://y", path])
    served[ANNOTATIONS] = _csv(rows)
    served[CLIP_INFO] = _csv(info)
    return served, clips


@pytest.fixture(scope="module")
def mtat():
    return _fake_mtat()


def sums(served: dict[str, bytes]) -> dict[str, str]:
    """The SHA-256 of each of the five files as served: what a test's (generated) copy must pass
    instead of the published digests, which only the real files have."""
    return {n: hashlib.sha256(served[n]).hexdigest() for n in FILES}


def with_manifest(served: dict[str, bytes]) -> dict[str, bytes]:
    """A mirror that serves its own SHA256SUMS beside the files."""
    return {**served, "SHA256SUMS": "".join(f"{d}  {n}\n" for n, d in sums(served).items()).encode()}


def _assert_extracted(root: Path, served: dict[str, bytes], clips: dict[str, bytes]) -> None:
    for path, data in clips.items():
        assert (root / path).read_bytes() == data, path
    assert (root / ANNOTATIONS).read_bytes() == served[ANNOTATIONS]
    assert (root / CLIP_INFO).read_bytes() == served[CLIP_INFO]
    assert (root / MARKER).is_file()
    assert not list(root.rglob("*.part"))
    index = build_index(root, tags="top50")
    assert len(index.paths) == len(clips)
    assert all(index.audio_path(i).is_file() for i in range(len(index.paths)))


def test_downloads_verifies_and_extracts_the_tree(tmp_path, mtat):
    """The mirror path: a copy whose files are not the published ones, trusted (checksums="served")
    to say what it serves in its own SHA256SUMS."""
    served, clips = mtat
    with FileServer(with_manifest(served)) as server:
        assert download_mtat(tmp_path / "mtat", server.url, progress=False, checksums="served") == tmp_path / "mtat"
    root = tmp_path / "mtat"
    _assert_extracted(root, served, clips)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == list(FOLDERS)
    assert not any((root / p).exists() for p in PARTS)  # pieces removed after success
    assert all(server.count(name) == 1 for name in FILES)
    assert server.count("SHA256SUMS") == 1 and server.count("MD5SUMS") == 0
    record = json.loads((root / MARKER).read_text())["files"]
    assert {n: (f["digest"], f["digest_source"]) for n, f in record.items()} == {
        n: (d, server.url + "SHA256SUMS") for n, d in sums(served).items()
    }


def test_rerun_after_success_makes_no_request(tmp_path, mtat):
    served, _ = mtat
    with FileServer(served) as server:
        download_mtat(tmp_path, server.url, progress=False, checksums=sums(served))
        before = server.count()
        download_mtat(tmp_path, server.url, progress=False, checksums=sums(served))
        assert server.count() == before


def test_resumes_a_piece_after_a_dropped_connection(tmp_path, mtat):
    served, clips = mtat
    with FileServer(served) as server:
        server.drop_once("mp3.zip.002", after=5000)
        download_mtat(tmp_path, server.url, progress=False, checksums=sums(served))
    _assert_extracted(tmp_path, served, clips)
    assert [r.range for r in server.requests if r.path == "mp3.zip.002"] == [None, "bytes=5000-"]


def test_corrupted_piece_is_caught_by_its_digest_and_fetched_again(tmp_path, mtat):
    served, clips = mtat
    with FileServer(served) as server:
        server.corrupt("mp3.zip.002", times=1)
        download_mtat(tmp_path, server.url, progress=False, checksums=sums(served))
    _assert_extracted(tmp_path, served, clips)
    assert server.count("mp3.zip.002") == 2
    assert server.count("mp3.zip.001") == server.count("mp3.zip.003") == 1


def test_piece_that_stays_corrupt_is_refused_by_the_crc_check(tmp_path, mtat):
    """A copy whose own digests were taken of a corrupt piece passes the digest check; the
    archive's per-entry CRC still catches it (fetched once more, then refused)."""
    served, _ = mtat
    corrupt_sums = {**sums(served), "mp3.zip.002": hashlib.sha256(_flip_middle(served["mp3.zip.002"])).hexdigest()}
    with FileServer(served) as server:
        server.corrupt("mp3.zip.002", times=-1)
        with pytest.raises(DownloadError, match=r"mp3\.zip\.002 .*still corrupt.*CRC") as info:
            download_mtat(tmp_path, server.url, progress=False, checksums=corrupt_sums)
    assert server.count("mp3.zip.002") == 2
    assert info.value.url == server.url + "mp3.zip.002"
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "mp3.zip.002").exists()


def test_rerun_after_interrupted_download_fetches_only_what_is_missing(tmp_path, mtat):
    served, clips = mtat
    partial = {k: v for k, v in with_manifest(served).items() if k != CLIP_INFO}
    with FileServer(partial) as server:
        with pytest.raises(DownloadError, match="404"):
            download_mtat(tmp_path, server.url, progress=False, checksums="served")
    assert not (tmp_path / MARKER).exists()
    with FileServer(with_manifest(served)) as server:
        download_mtat(tmp_path, server.url, progress=False, checksums="served")
    _assert_extracted(tmp_path, served, clips)
    assert [r.path for r in server.requests] == [CLIP_INFO]  # manifest lookup was remembered too


def test_rerun_after_interrupted_extraction_finishes_it(tmp_path, mtat):
    served, clips = mtat
    with FileServer(served) as server:
        download_mtat(tmp_path, server.url, progress=False, keep_archives=True, checksums=sums(served))
        # Simulate a crash mid-extraction: no marker, some clips missing, one half-written temp.
        (tmp_path / MARKER).unlink()
        victims = list(clips)[::3]
        for path in victims:
            (tmp_path / path).unlink()
        (tmp_path / (victims[0] + ".part")).write_bytes(b"half")
        before = server.count()
        download_mtat(tmp_path, server.url, progress=False, checksums=sums(served))
        assert server.count() == before  # everything needed was on disk
    _assert_extracted(tmp_path, served, clips)


def test_files_copied_in_by_hand_are_extracted_offline(tmp_path, mtat):
    served, clips = mtat
    for name, data in served.items():
        (tmp_path / name).write_bytes(data)
    download_mtat(tmp_path, closed_port_url(), progress=False, checksums=sums(served))
    _assert_extracted(tmp_path, served, clips)
    assert all((tmp_path / p).read_bytes() == served[p] for p in PARTS)  # yours: kept, not deleted


def test_a_file_copied_in_by_hand_that_fails_its_check_is_named_and_left(tmp_path, mtat):
    served, _ = mtat
    for name, data in served.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / ANNOTATIONS).write_bytes(b"my own edit\n" + served[ANNOTATIONS])
    with pytest.raises(DownloadError, match=f"{tmp_path / ANNOTATIONS} \\(copied in, not downloaded by mtt\\)"):
        download_mtat(tmp_path, closed_port_url(), progress=False, checksums=sums(served))
    assert (tmp_path / ANNOTATIONS).read_bytes() == b"my own edit\n" + served[ANNOTATIONS]
    # and one that matches its digest but is no MTAT annotations file is refused, not deleted
    moved = {**served, ANNOTATIONS: b"<html>moved</html>"}
    (tmp_path / ANNOTATIONS).write_bytes(moved[ANNOTATIONS])
    with pytest.raises(AnnotationError, match="left as it is"):
        download_mtat(tmp_path, closed_port_url(), progress=False, checksums=sums(moved))
    assert (tmp_path / ANNOTATIONS).read_bytes() == moved[ANNOTATIONS]
    # and a piece whose digest you gave but whose clips fail their CRC is named and kept too
    (tmp_path / ANNOTATIONS).write_bytes(served[ANNOTATIONS])
    (tmp_path / "mp3.zip.002").write_bytes(_flip_middle(served["mp3.zip.002"]))
    corrupt_sums = {**sums(served), "mp3.zip.002": hashlib.sha256(_flip_middle(served["mp3.zip.002"])).hexdigest()}
    with pytest.raises(DownloadError, match=r"mp3\.zip\.002 \(copied in, not downloaded by mtt\): corrupt .*CRC"):
        download_mtat(tmp_path, closed_port_url(), progress=False, checksums=corrupt_sums)
    assert (tmp_path / "mp3.zip.002").read_bytes() == _flip_middle(served["mp3.zip.002"])


def test_a_folder_holding_anything_else_is_refused_before_any_request(tmp_path, mtat):
    served, _ = mtat
    root = mtat_tree(tmp_path / "mtat")  # a hand-unpacked MagnaTagATune needs no download
    before = snapshot(root)
    with FileServer(served) as server:
        with pytest.raises(TargetError, match=f"data.root={root} holds files mtt did not download"):
            download_mtat(root, server.url, progress=False, checksums=sums(served))
        assert server.count() == 0
    assert snapshot(root) == before
    (tmp_path / "file").write_text("mine")
    with pytest.raises(TargetError, match="is a file, not a folder"):
        download_mtat(tmp_path / "file", closed_port_url(), progress=False)
    assert (tmp_path / "file").read_text() == "mine"


def test_offline_with_files_missing_says_what_to_do(tmp_path):
    url = closed_port_url()
    with pytest.raises(DownloadError) as info:
        download_mtat(tmp_path / "mtat", url, progress=False)
    message = str(info.value)
    assert url in message and "MTT_MTAT_URL" in message and str(tmp_path / "mtat") in message
    assert info.value.reason == "offline"


def test_served_sha256sums_reject_a_corrupt_piece_before_extraction(tmp_path, mtat):
    served, _ = mtat
    with FileServer(with_manifest(served)) as server:
        server.corrupt("mp3.zip.001", times=-1)
        with pytest.raises(DownloadError, match="sha256 mismatch") as info:
            download_mtat(tmp_path, server.url, progress=False, checksums="served")
    assert info.value.url == server.url + "mp3.zip.001" and server.count("mp3.zip.001") == 2
    assert not (tmp_path / "mp3.zip.001").exists() and not (tmp_path / "0").exists()
    assert server.count("MD5SUMS") == 0


def test_md5_checksums_argument_is_checked(tmp_path, mtat):
    served, clips = mtat
    good = {n: hashlib.md5(served[n]).hexdigest() for n in FILES}
    with FileServer(served) as server:
        bad = {**good, ANNOTATIONS: "0" * 32}
        with pytest.raises(DownloadError, match="md5 mismatch"):
            download_mtat(tmp_path, server.url, progress=False, checksums=bad)
        assert not (tmp_path / ANNOTATIONS).exists()
        download_mtat(tmp_path, server.url, progress=False, checksums=good)
        assert server.count("SHA256SUMS") == 0  # explicit checksums: no manifest lookup
    _assert_extracted(tmp_path, served, clips)


def test_annotations_not_in_mtat_format_are_refused_before_extraction(tmp_path, mtat):
    served, _ = mtat
    moved = {**served, ANNOTATIONS: b"<html>moved</html>"}
    with FileServer(moved) as server:
        with pytest.raises(AnnotationError, match=ANNOTATIONS):
            download_mtat(tmp_path, server.url, progress=False, checksums=sums(moved))
    assert not (tmp_path / ANNOTATIONS).exists() and not (tmp_path / "0").exists()


def test_archive_entry_escaping_root_is_refused(tmp_path):
    served, _ = _fake_mtat({"0/ok.mp3": b"fine", "../evil.mp3": b"owned"})
    # Annotations that only list the good clip, so that the archive itself is what is refused.
    served[ANNOTATIONS] = _fake_mtat({"0/ok.mp3": b"fine"})[0][ANNOTATIONS]
    root = tmp_path / "root"
    with FileServer(served) as server:
        with pytest.raises(ArchiveError, match=r"\.\./evil\.mp3"):
            download_mtat(root, server.url, progress=False, checksums=sums(served))
    assert not (tmp_path / "evil.mp3").exists() and not (root / "0" / "ok.mp3").exists()


def test_published_digests_are_the_default_and_a_file_that_differs_is_refused(tmp_path, mtat):
    """The pinned path: without checksums every file must have its published SHA-256. A served
    file that differs is fetched twice, then refused naming the file and both digests."""
    served, _ = mtat
    with FileServer(with_manifest(served)) as server:  # the server's own manifest is not asked for
        with pytest.raises(DownloadError) as info:
            download_mtat(tmp_path, server.url, progress=False)
    message, actual = str(info.value), hashlib.sha256(served["mp3.zip.001"]).hexdigest()
    assert "mp3.zip.001" in message and PINNED_SHA256["mp3.zip.001"] in message and actual in message
    assert "published" in message and "MTT_MTAT_CHECKSUMS" in message and info.value.reason == "mismatch"
    assert server.count("mp3.zip.001") == 2 and server.count("SHA256SUMS") == 0
    assert not (tmp_path / "mp3.zip.001").exists() and not list(tmp_path.glob("*.part"))


def test_checksums_replace_the_pins_only_for_the_files_they_name(tmp_path, mtat):
    served, _ = mtat
    some = {n: d for n, d in sums(served).items() if n != CLIP_INFO}
    with FileServer(served) as server:
        with pytest.raises(DownloadError, match=f"{CLIP_INFO} .*{PINNED_SHA256[CLIP_INFO]}"):
            download_mtat(tmp_path, server.url, progress=False, checksums=some)
    assert all((tmp_path / n).is_file() for n in some)  # those passed your digests


def test_checksums_from_the_environment(tmp_path, mtat):
    served, _ = mtat
    assert checksums_from_env(None) is None and checksums_from_env("served") == "served"
    (tmp_path / "SHA256SUMS").write_bytes(with_manifest(served)["SHA256SUMS"] + b"0" * 64 + b"  other.txt\n")
    assert checksums_from_env(str(tmp_path / "SHA256SUMS")) == sums(served)
    with pytest.raises(FileNotFoundError, match="MTT_MTAT_CHECKSUMS"):
        checksums_from_env(str(tmp_path / "nope"))


@pytest.mark.slow
def test_command_line_downloads_into_data_root(tmp_path, mtat):
    served, clips = mtat
    cache, root = tmp_path / "cache", tmp_path / "mtat"
    (tmp_path / "SHA256SUMS").write_bytes(with_manifest(served)["SHA256SUMS"])
    with FileServer(served) as server:
        env = {
            **os.environ,
            "MTT_MTAT_URL": server.url,
            "MTT_CACHE": str(cache),
            "MTT_MTAT_CHECKSUMS": str(tmp_path / "SHA256SUMS"),
        }
        cmd = [sys.executable, "-m", "mtt.data.download", "data=mtat"]
        done = subprocess.run(
            cmd + [f"data.root={root}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert str(root) in done.stdout
        _assert_extracted(root, served, clips)
        # data.root is mandatory for data=mtat, and data=toy is refused rather than generated.
        missing = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
        toy = subprocess.run(
            cmd[:-1] + ["data=toy"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    assert missing.returncode != 0 and "data.root" in missing.stderr
    assert toy.returncode != 0 and "data=mtat" in toy.stderr
    assert not list(cache.glob("toy*"))
