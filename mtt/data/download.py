"""Download and unpack MagnaTagATune into ``data.root``.

    python -m mtt.data.download data=mtat data.root=/data/mtat

The official distribution (MIREX / City, University of London, ``OFFICIAL_URL``) is five files:

- ``mp3.zip.001``, ``mp3.zip.002``, ``mp3.zip.003``: one zip archive cut into three pieces by a
  plain byte split (joined, they are the zip: ``cat mp3.zip.* > mp3.zip``). It holds the 25,863
  mono 16 kHz mp3 clips (29.1 s) in 16 folders ``0``-``9``, ``a``-``f``; three clips are 0-byte
  files (clip ids 35644, 55753 and 57881; ``mtt.preprocess`` lists them as failures);
- ``annotations_final.csv``: tab-separated, quoted: clip_id, 188 tags (0/1), mp3_path;
- ``clip_info_final.csv``: tab-separated, quoted: clip_id, track_number, title, artist, album,
  url, segmentStart, segmentEnd, original_url, mp3_path.

Verification. The SHA-256 of each of the five files is pinned (``PINNED_SHA256``: the digests
public MTAT loaders pin, the audio parts' and clip_info's agreeing across two of them) and checked
after download; a file that does not match is fetched once more, then refused, naming the file,
the expected and the actual digest (nothing is kept). Every file must also arrive with exactly
the size the server announces (Content-Length), the annotations must parse (checked before
extracting), and every clip's CRC-32 in the archive is checked while it is extracted (a bad CRC
is traced to the piece(s) holding that clip, which are fetched again once).

Which digest a file must have, in this order:

1. ``checksums`` (the ``MTT_MTAT_CHECKSUMS`` environment variable on the command line): your own
   digests (hex MD5 or SHA-256) for the files they name, for a copy whose bytes differ from the
   published files on purpose. A mapping or a coreutils ``SHA256SUMS`` / ``MD5SUMS`` file, or
   ``served``: the manifest served at the base URL (a mirror you trust to say what it serves).
2. ``PINNED_SHA256``: every file ``checksums`` does not name, whatever the host. A mirror of the
   published files (``MTT_MTAT_URL=https://mirror.example/mtat/`` or ``file:///shared/mtat/``)
   needs nothing else; a manifest a server offers is never read unless asked for (``served``),
   so no server can loosen the check of the published files.

Nothing that mtt did not download is deleted or overwritten. ``data.root`` must be new, empty,
hold nothing but (some of) the five files, copied in by hand, or be a folder an earlier download
started (``STARTED``, which records the files mtt fetched). A folder that already holds audio
folders or anything else (a hand-unpacked MTAT needs no download: use it with ``data=mtat``) is
refused before any network access (``TargetError``). A file copied in by hand is checked like a
download, but one that fails is left where it is and named, not deleted, and its zip pieces are
kept after the extraction.

Every step can be interrupted: downloads resume (``mtt.core.fetch.download``), extracted clips are
written atomically and skipped when present, and a completion marker is written last, so running
the command again after an interruption finishes the job and after success does nothing (no
network). The zip pieces mtt downloaded are deleted once the marker is written, unless
``keep_archives``.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import mtt.config  # noqa: F401  (registers the schema that conf/config.yaml extends)
from mtt.core.fetch import DownloadError, download, file_digest
from mtt.core.fs import atomic_write_text, durable_replace
from mtt.data.mtat import ANNOTATIONS, CLIP_INFO, AnnotationError, read_annotations

OFFICIAL_URL = "https://mirg.city.ac.uk/datasets/magnatagatune/"
PARTS = ("mp3.zip.001", "mp3.zip.002", "mp3.zip.003")
FILES = PARTS + (ANNOTATIONS, CLIP_INFO)
# The published SHA-256 of each file (see the module docstring).
PINNED_SHA256 = {
    "mp3.zip.001": "f857fe185968773058cc71662c2ef5d8f2d4b7338e3c122cfd52f82dcb9760b9",
    "mp3.zip.002": "fc2e1ec441755556ed1398b1808f1b08b6034372f8bc27394510c0c58cdb52ce",
    "mp3.zip.003": "83a689824c17e82f6eb81cdbc4e4ca239a4cfc1fb41f1a5c80b861caec90450f",
    "annotations_final.csv": "99b94e95825d4fa576386a5367b9c96e0ec636e9f9c240aceb492f4728f68c3c",
    "clip_info_final.csv": "cb6108a10d3a91f0bfd7d2fbec2382559d15f20c8d28093f14e12162a47a3e78",
}
SERVED = "served"  # checksums=SERVED: use the manifest served at the base URL
MANIFESTS = ("SHA256SUMS", "MD5SUMS")  # looked for at the base URL (checksums=SERVED), in this order
MARKER = ".mtat-complete.json"  # written last: its presence means the dataset is complete
STARTED = ".mtt-download.json"  # written first: the folder is mtt's download; the files it fetched
CHECKSUM_STATE = ".mtat-checksums.json"  # what the manifest lookup found, so it is done once
_DIGESTS = {32: "md5", 64: "sha256"}  # hex length -> algorithm
_MANIFEST_LINE = re.compile(r"^([0-9a-fA-F]{32}|[0-9a-fA-F]{64})\s+\*?(\S.*)$")


class ArchiveError(RuntimeError):
    """The archive is readable but unsafe or unusable (e.g. an entry outside ``root``)."""


class TargetError(FileExistsError):
    """``data.root`` holds files that mtt did not download: nothing is fetched into it."""


class _CorruptParts(Exception):
    def __init__(self, parts: list[str], why: str):
        super().__init__(why)
        self.parts = parts


def download_mtat(
    root: Path,
    base_url: str = OFFICIAL_URL,
    progress: bool = True,
    checksums: Mapping[str, str] | str | None = None,
    keep_archives: bool = False,
) -> Path:
    """Download, verify and extract MTAT into ``root``; return ``root`` (see the module docstring).

    Args:
        base_url: folder URL holding the five files (``http(s)://`` or ``file://``).
        checksums: your digests, which replace the pinned published ones for the files they name:
            file name -> hex MD5 (32 digits) or SHA-256 (64), or ``"served"`` for the
            ``SHA256SUMS`` / ``MD5SUMS`` served at ``base_url``. None: the pinned digests only.
        keep_archives: keep the three zip pieces after a successful extraction.

    Raises ``DownloadError`` (network, size, a digest still wrong after one re-fetch, or a piece
    still corrupt after one re-fetch) and ``ArchiveError`` (an archive entry outside ``root``).
    """
    root = Path(root).expanduser().resolve()
    if (root / MARKER).is_file():
        return root
    fetched = _claim(root)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    sums = expected_digests(root, base_url, checksums)

    for attempt in range(2):
        for name in FILES:
            try:
                if (root / name).exists() and name not in fetched:
                    _check_yours(root / name, *sums[name])  # copied in by hand: never deleted
                else:
                    _fetch_checked(base_url + name, root / name, *sums[name], progress)
                    _record_fetched(root, fetched, name)
            except DownloadError as e:
                if e.reason != "offline":
                    raise
                raise DownloadError(
                    f"cannot reach {base_url} ({e.detail}) to fetch {name}. Either run again with "
                    f"network access (finished files are kept, partial ones resume), set "
                    f"MTT_MTAT_URL to a reachable mirror, or copy {', '.join(FILES)} into {root} "
                    "yourself and run again to verify and extract them.",
                    url=e.url,
                    dest=e.dest,
                    reason="offline",
                    detail=e.detail,
                ) from None
        _check_annotations(root / ANNOTATIONS, base_url + ANNOTATIONS, ANNOTATIONS in fetched)  # before the long part
        try:
            members = _extract(root, [root / p for p in PARTS], progress)
            break
        except _CorruptParts as e:
            yours = [name for name in e.parts if name not in fetched]
            if yours:
                raise DownloadError(
                    f"{', '.join(str(root / n) for n in yours)} (copied in, not downloaded by mtt): corrupt ({e}); "
                    "left as it is: replace it with a good copy, or delete it to have it downloaded",
                    url=base_url + yours[0],
                    dest=root / yours[0],
                    reason="mismatch",
                    detail=str(e),
                ) from None
            for name in e.parts:
                (root / name).unlink(missing_ok=True)
            if attempt:
                raise DownloadError(
                    f"{', '.join(e.parts)} from {base_url} still corrupt after downloading again "
                    f"({e}); deleted, run again later or use another mirror (MTT_MTAT_URL)",
                    url=base_url + e.parts[0],
                    dest=root / e.parts[0],
                    reason="mismatch",
                    detail=str(e),
                ) from None

    files = {
        name: {"size": (root / name).stat().st_size, "digest": sums[name][0], "digest_source": sums[name][1]}
        for name in FILES
    }
    record = {"base_url": base_url, "files": files, "clips": members}
    atomic_write_text(root / MARKER, json.dumps(record, indent=1))
    if not keep_archives:
        for name in PARTS:
            if name in fetched:  # pieces copied in by hand are the user's to delete
                (root / name).unlink(missing_ok=True)
    return root


def _claim(root: Path) -> list[str]:
    """Make ``root`` mtt's download folder (``STARTED``) and return the files mtt fetched into it
    before; ``TargetError`` (one line) when it holds anything a download would not put there."""
    state = root / STARTED
    if state.is_file():
        return list(json.loads(state.read_text(encoding="utf-8")).get("fetched", []))
    if root.exists() and not root.is_dir():
        raise TargetError(f"data.root={root} is a file, not a folder; choose an empty or new folder to download into")
    if root.is_dir():
        names = sorted(p.name for p in root.iterdir())
        foreign = [n for n in names if n not in FILES and n.removesuffix(".part") not in FILES]
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise TargetError(
                f"data.root={root} holds files mtt did not download ({shown}); refusing to download "
                "into it: if it holds MagnaTagATune already, use it as it is (data=mtat "
                f"data.root={root}), otherwise choose an empty or new folder"
            )
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state, json.dumps({"fetched": []}))
    return []


def _record_fetched(root: Path, fetched: list[str], name: str) -> None:
    """Remember that mtt downloaded ``name`` (so that it may delete it later)."""
    if name not in fetched:
        fetched.append(name)
        atomic_write_text(root / STARTED, json.dumps({"fetched": fetched}))


def _check_yours(path: Path, expected: str, source: str) -> None:
    """A file copied in by hand: its digest must match; if not it is named and left alone."""
    actual = file_digest(path, _DIGESTS[len(expected)])
    if actual != expected.lower():
        raise DownloadError(
            f"{path} (copied in, not downloaded by mtt) does not match its checksum (expected "
            f"{expected}: {source}; got {actual}); left as it is: replace it with the published "
            "file, delete it to have it downloaded, or give its digest (MTT_MTAT_CHECKSUMS)",
            url=str(path),
            dest=path,
            reason="mismatch",
            detail=f"{_DIGESTS[len(expected)]} mismatch, expected {expected}, got {actual}",
        )


def expected_digests(
    root: Path, base_url: str, checksums: Mapping[str, str] | str | None
) -> dict[str, tuple[str, str]]:
    """File name -> (hex digest it must have, where that digest comes from), for all five files:
    ``checksums`` for the files it names, the pinned published SHA-256 for the others."""
    chosen = {name: (digest, "the published one (PINNED_SHA256)") for name, digest in PINNED_SHA256.items()}
    if checksums == SERVED:
        served, source = _served_sums(root, base_url)
        chosen.update({name: (digest, source) for name, digest in served.items()})
    elif checksums is not None:
        chosen.update({name: (digest, "your checksums") for name, digest in _checked_sums(dict(checksums)).items()})  # type: ignore[arg-type]
    return chosen


def checksums_from_env(value: str | None) -> Mapping[str, str] | str | None:
    """``MTT_MTAT_CHECKSUMS``: unset -> None (pinned digests), ``served``, or a manifest file."""
    if not value:
        return None
    if value == SERVED:
        return SERVED
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MTT_MTAT_CHECKSUMS={value}: no such manifest file (or use 'served')")
    return parse_manifest(path.read_text(encoding="utf-8", errors="replace"))


def parse_manifest(text: str) -> dict[str, str]:
    """The digests of MTAT's files in a coreutils ``SHA256SUMS`` / ``MD5SUMS`` text."""
    found = {}
    for line in text.splitlines():
        m = _MANIFEST_LINE.match(line.strip())
        if m and m.group(2) in FILES:
            found[m.group(2)] = m.group(1).lower()
    return found


def _fetch_checked(url: str, dest: Path, expected: str, source: str, progress: bool) -> None:
    """``_fetch``; a digest mismatch is fetched once more, then refused naming both digests."""
    for _ in range(2):
        try:
            return _fetch(url, dest, expected, progress)
        except DownloadError as e:
            if e.reason != "mismatch":
                raise
            error = e
    raise DownloadError(
        f"{dest.name} from {url} does not match its checksum after downloading it twice "
        f"({error.detail}; expected digest: {source}); deleted. If this copy differs from the "
        "published files on purpose, give its digests (MTT_MTAT_CHECKSUMS=FILE, or =served for "
        "the mirror's own SHA256SUMS)",
        url=url,
        dest=dest,
        reason="mismatch",
        detail=error.detail,
    )


def _fetch(url: str, dest: Path, expected: str | None, progress: bool) -> None:
    """Download one file, checked against ``expected`` (hex MD5 or SHA-256) when given."""
    if expected is None or _DIGESTS[len(expected)] == "sha256":
        download(url, dest, sha256=expected, progress=progress)
        return
    download(url, dest, progress=progress)  # MD5: hub verifies SHA-256 only, so check here
    actual = file_digest(dest, "md5")
    if actual != expected.lower():
        dest.unlink()
        detail = f"md5 mismatch, expected {expected}, got {actual}"
        raise DownloadError(f"{url}: {detail}; deleted {dest}", url=url, dest=dest, reason="mismatch", detail=detail)


def _check_annotations(path: Path, url: str, downloaded: bool = True) -> None:
    """Parse the annotations; a file that is not in MTAT's format is refused, and deleted when
    mtt downloaded it (so that the next run fetches it again)."""
    try:
        read_annotations(path)
    except AnnotationError as e:
        if not downloaded:
            raise AnnotationError(f"{e} (copied in, not downloaded by mtt; left as it is)") from None
        path.unlink()
        raise AnnotationError(f"{e} (downloaded from {url}; deleted, so that the next run fetches it again)") from None


def _checked_sums(sums: dict[str, str]) -> dict[str, str]:
    for name, digest in sums.items():
        if name not in FILES:
            raise ValueError(f"checksums: unknown file {name!r}; expected one of {FILES}")
        if len(digest) not in _DIGESTS or not re.fullmatch(r"[0-9a-fA-F]+", digest):
            raise ValueError(f"checksums[{name!r}]={digest!r}: expected a hex MD5 or SHA-256")
    return sums


def _served_sums(root: Path, base_url: str) -> tuple[dict[str, str], str]:
    """Checksums from a manifest served at ``base_url`` and its URL, looked up once and
    remembered in root. Offline -> nothing (not remembered, so a run with network looks again)."""
    state = root / CHECKSUM_STATE
    if state.is_file():
        saved = json.loads(state.read_text())
        return saved["checksums"], saved["source"]
    for manifest in MANIFESTS:
        tmp = root / f".{manifest}.download"
        try:
            download(base_url + manifest, tmp, progress=False)
        except DownloadError as e:
            if e.status == 404:
                continue
            if e.reason == "offline":  # files copied in by hand can still be checked offline
                return {}, ""
            raise
        text = tmp.read_text(encoding="utf-8", errors="replace")
        tmp.unlink()
        found, source = parse_manifest(text), base_url + manifest
        atomic_write_text(state, json.dumps({"source": source, "checksums": found}, indent=1))
        return found, source
    raise DownloadError(
        f"checksums=served, but {base_url} serves neither {' nor '.join(MANIFESTS)}",
        url=base_url + MANIFESTS[0],
        dest=root,
        reason="http",
        status=404,
    )


def _extract(root: Path, parts: list[Path], progress: bool) -> int:
    """Extract the archive formed by joining ``parts`` into ``root``; return the number of files.

    Clips already present with the right size are skipped (they were written atomically).
    Raises ``_CorruptParts`` naming the piece(s) that hold a clip whose data fails its CRC.
    """
    with _JoinedFile(parts) as joined:
        try:
            zf = zipfile.ZipFile(io.BufferedReader(joined, buffer_size=1 << 20))
        except zipfile.BadZipFile as e:  # the central directory sits at the end of the last piece
            raise _CorruptParts([parts[-1].name], f"unreadable zip directory: {e}") from None
        with zf:
            infos = zf.infolist()
            targets = [_safe_target(root, info.filename) for info in infos]
            spans = _member_spans(infos, zf.start_dir)
            files = 0
            with tqdm(
                total=sum(i.file_size for i in infos),
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="extract",
                disable=not progress,
            ) as bar:
                for info, target in zip(infos, targets):
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    files += 1
                    if not (target.is_file() and target.stat().st_size == info.file_size):
                        try:
                            _extract_one(zf, info, target, bar)
                        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                            start, end = spans[info.filename]
                            raise _CorruptParts(joined.parts_between(start, end), f"{info.filename}: {e}") from None
                    else:
                        bar.update(info.file_size)
    return files


def _extract_one(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, bar: tqdm) -> None:
    """Write one member through a temporary file; zipfile checks the CRC as the data is read."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    try:
        with zf.open(info) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
                bar.update(len(block))
        durable_replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _safe_target(root: Path, name: str) -> Path:
    """Where an entry goes; refuses absolute names and ``..`` that would leave ``root``."""
    target = (root / name).resolve()
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or not target.is_relative_to(root):
        raise ArchiveError(f"refusing archive entry {name!r}: it would be written outside {root}")
    return target


def _member_spans(infos: list[zipfile.ZipInfo], directory_start: int) -> dict[str, tuple[int, int]]:
    """Byte range [start, end) of each member (header + data) in the joined archive."""
    ordered = sorted(infos, key=lambda i: i.header_offset)
    ends = [i.header_offset for i in ordered[1:]] + [directory_start]
    return {i.filename: (i.header_offset, end) for i, end in zip(ordered, ends)}


class _JoinedFile(io.RawIOBase):
    """Read-only, seekable view of files laid end to end: the pieces of a byte-split archive.

    Reading the pieces in place avoids writing a second copy of the whole archive (gigabytes for
    MTAT) just to hand zipfile one file.
    """

    def __init__(self, paths: list[Path]):
        super().__init__()
        self.paths = list(paths)
        self.sizes = [p.stat().st_size for p in self.paths]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.paths))]
        self.size = sum(self.sizes)
        self.handles = [open(p, "rb") for p in self.paths]
        self.pos = 0

    def parts_between(self, start: int, end: int) -> list[str]:
        """Names of the pieces overlapping the byte range [start, end)."""
        return [p.name for p, s, n in zip(self.paths, self.starts, self.sizes) if s < end and start < s + n]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self.pos < self.size:
            i = max(k for k, s in enumerate(self.starts) if s <= self.pos)
            handle = self.handles[i]
            handle.seek(self.pos - self.starts[i])
            want = min(len(view) - done, self.starts[i] + self.sizes[i] - self.pos)
            n = handle.readinto(view[done : done + want])
            if not n:  # the piece shrank under us; report what we have
                break
            done += n
            self.pos += n
        return done

    def close(self) -> None:
        for h in getattr(self, "handles", []):
            h.close()
        super().close()


@mtt.config.hydra_entry
def main(cfg: DictConfig) -> None:
    """Hydra entry: compose the project config and download into ``data.root`` (``data=mtat``)."""
    mtt.config.exit_if_invalid(cfg, data=False)  # it creates data.root: download_mtat checks it
    if cfg.data.name != "mtat":
        raise SystemExit(
            f"data={cfg.data.name}: this command downloads MagnaTagATune; run it with data=mtat data.root=DIR"
        )
    if OmegaConf.is_missing(cfg.data, "root"):
        raise SystemExit(
            "data.root is not set: run with data=mtat data.root=DIR (the folder that "
            "will hold annotations_final.csv and the audio folders 0-f)"
        )
    base_url = os.environ.get("MTT_MTAT_URL", OFFICIAL_URL)
    try:
        checksums = checksums_from_env(os.environ.get("MTT_MTAT_CHECKSUMS"))
        root = download_mtat(Path(cfg.data.root), base_url, progress=True, checksums=checksums)
    except TargetError as e:  # a usage error: the wrong folder, before any network access
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (DownloadError, ArchiveError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None  # the message says it all; no traceback
    print(f"MagnaTagATune is ready in {root} (use data=mtat data.root={root})")


if __name__ == "__main__":
    main()
