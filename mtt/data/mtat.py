"""MagnaTagATune's on-disk format, read and write, in one place.

A dataset folder holds audio folders ``0``-``9``, ``a``-``f`` (``FOLDERS``) of mono 16 kHz mp3
clips named ``<artist>-<album>-<NN>-<title>-<start>-<end>.mp3``, and two tab-separated files with
every field in double quotes:

- ``annotations_final.csv``: ``clip_id``, the 188 tag columns (0/1, ``mtt.data.tags.TAGS``),
  ``mp3_path`` (e.g. ``f/artist-album-01-title-30-59.mp3``, relative to the folder);
- ``clip_info_final.csv``: the columns of ``CLIP_INFO_COLUMNS``.

The real MTAT (``mtt.data.download``) and the embedded dataset (``mtt.data.embedded``) are both
read by these readers, and the embedded one is written by these writers.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import soundfile as sf

from mtt.core.fs import atomic_replace, atomic_write_text
from mtt.data.tags import TAGS

SAMPLE_RATE = 16000  # MTAT's clips
FOLDERS = tuple("0123456789abcdef")
ANNOTATIONS = "annotations_final.csv"
CLIP_INFO = "clip_info_final.csv"
CLIP_INFO_COLUMNS = (
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
)


class AnnotationError(ValueError):
    """Malformed annotations: the message names the file and the line."""


def _tsv_lines(path: Path, what: str) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` of an MTAT TSV file (tab-separated, quoted): the header as
    line 1, then every non-empty line, checked to have as many fields as the header."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quotechar='"')
        try:
            header = next(reader)
        except StopIteration:
            raise AnnotationError(f"{path}: empty file, expected a header line") from None
        yield 1, header
        for line, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != len(header):
                raise AnnotationError(f"{path}:{line}: {len(fields)} fields, header has {len(header)}")
            yield line, fields


def _clip_id(value: str, first_line: dict[int, int], path: Path, line: int) -> int:
    """Parse a clip id, rejecting non-integers and ids already seen (``first_line`` records them)."""
    try:
        clip_id = int(value)
    except ValueError:
        raise AnnotationError(f"{path}:{line}: clip_id {value!r} is not an integer") from None
    if clip_id in first_line:
        raise AnnotationError(f"{path}:{line}: duplicate clip_id {clip_id} (first on line {first_line[clip_id]})")
    first_line[clip_id] = line
    return clip_id


def _check_mp3_path(mp3: str, path: Path, line: int) -> None:
    rel = PurePosixPath(mp3)
    if not mp3 or rel.is_absolute() or ".." in rel.parts:
        raise AnnotationError(f"{path}:{line}: mp3_path {mp3!r} escapes the audio root")


def read_annotations(path: Path) -> tuple[np.ndarray, tuple[str, ...], np.ndarray, tuple[str, ...]]:
    """Read annotations_final.csv -> (clip_ids (n,), tag names, labels (n, n_tags) uint8, paths).

    Raises ``AnnotationError`` naming the file and line for missing columns, values other than 0/1,
    duplicate clip ids and paths that escape the audio root.
    """
    path = Path(path)
    lines = _tsv_lines(path, "annotations")
    _, header = next(lines)
    for column in ("clip_id", "mp3_path"):
        if column not in header:
            raise AnnotationError(f"{path}:1: missing column {column!r} in the header")
    if header[0] != "clip_id" or header[-1] != "mp3_path":
        raise AnnotationError(f"{path}:1: expected clip_id first and mp3_path last")
    tags = tuple(header[1:-1])
    ids, rows, paths = [], [], []
    seen: dict[int, int] = {}
    for line, fields in lines:
        clip_id = _clip_id(fields[0], seen, path, line)
        values = fields[1:-1]
        bad = [(tags[i], v) for i, v in enumerate(values) if v not in ("0", "1")]
        if bad:
            raise AnnotationError(f"{path}:{line}: tag {bad[0][0]!r} has value {bad[0][1]!r}, expected 0 or 1")
        mp3 = fields[-1]
        _check_mp3_path(mp3, path, line)
        ids.append(clip_id)
        rows.append([v == "1" for v in values])
        paths.append(mp3)
    labels = np.asarray(rows, dtype=np.uint8).reshape(len(rows), len(tags))
    return np.asarray(ids, dtype=np.int64), tags, labels, tuple(paths)


def read_clip_info(path: str | Path) -> dict[int, dict[str, str]]:
    """Read clip_info_final.csv -> {clip_id: {column: value}} over ``CLIP_INFO_COLUMNS``
    (``clip_id`` excluded from the inner dict; values kept as the file's strings).

    Raises ``AnnotationError`` naming the file and line for missing columns, a wrong field count,
    a non-integer or duplicate clip id and an ``mp3_path`` that escapes the audio root.
    """
    path = Path(path)
    lines = _tsv_lines(path, "clip info")
    _, header = next(lines)
    missing = [c for c in CLIP_INFO_COLUMNS if c not in header]
    if missing:
        raise AnnotationError(f"{path}:1: missing column(s) {missing} in the header")
    info: dict[int, dict[str, str]] = {}
    seen: dict[int, int] = {}
    for line, fields in lines:
        row = dict(zip(header, fields))
        clip_id = _clip_id(row["clip_id"], seen, path, line)
        _check_mp3_path(row["mp3_path"], path, line)
        info[clip_id] = {c: row[c] for c in CLIP_INFO_COLUMNS if c != "clip_id"}
    return info


def _tsv(rows: Iterable[Sequence[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", quotechar='"', quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()


def write_annotations(path: str | Path, rows: Sequence[tuple[int, Collection[str], str]]) -> None:
    """Write ``annotations_final.csv`` exactly as MTAT's: tab-separated, every field quoted,
    ``"clip_id"``, the 188 ``TAGS`` in order, ``"mp3_path"``; tag values ``"0"``/``"1"``.

    ``rows`` are ``(clip_id, tag names, mp3_path)``. Raises ``ValueError`` naming the clip for an
    unknown tag or a duplicate clip id.
    """
    column = {t: i for i, t in enumerate(TAGS)}
    lines: list[tuple[str, ...]] = [("clip_id", *TAGS, "mp3_path")]
    seen = set()
    for clip_id, tags, mp3_path in rows:
        if clip_id in seen:
            raise ValueError(f"{path}: duplicate clip_id {clip_id}")
        seen.add(clip_id)
        values = ["0"] * len(TAGS)
        for tag in tags:
            if tag not in column:
                raise ValueError(f"{path}: clip {clip_id} has tag {tag!r}, which is not one of MTAT's 188")
            values[column[tag]] = "1"
        lines.append((str(int(clip_id)), *values, str(mp3_path)))
    atomic_write_text(path, _tsv(lines))


def write_clip_info(path: str | Path, rows: Sequence[dict]) -> None:
    """Write ``clip_info_final.csv`` as MTAT's: tab-separated, every field quoted, the columns of
    ``CLIP_INFO_COLUMNS``. Raises ``ValueError`` naming the row for missing or unknown keys."""
    lines: list[tuple[str, ...]] = [CLIP_INFO_COLUMNS]
    for i, row in enumerate(rows):
        missing = [c for c in CLIP_INFO_COLUMNS if c not in row]
        unknown = [k for k in row if k not in CLIP_INFO_COLUMNS]
        if missing or unknown:
            raise ValueError(
                f"{path}: row {i} (clip_id {row.get('clip_id')!r}) "
                f"{'lacks ' + str(missing) if missing else 'has unknown keys ' + str(unknown)}"
            )
        lines.append(tuple(str(row[c]) for c in CLIP_INFO_COLUMNS))
    atomic_write_text(path, _tsv(lines))


def write_mp3(path: str | Path, waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Encode a ``(n,)`` mono waveform in [-1, 1] as mp3 (LAME's default VBR, ~32 kbps at 16 kHz,
    like MTAT's clips; decodes to exactly ``n`` samples). Atomic (``mtt.core.fs.atomic_replace``)."""
    path = Path(path)
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise ValueError(f"{path}: expected a mono (n,) waveform, got shape {waveform.shape}")
    if waveform.size == 0 or not np.all(np.isfinite(waveform)) or np.max(np.abs(waveform)) > 1.0:
        raise ValueError(f"{path}: waveform must be non-empty, finite and within [-1, 1]")
    atomic_replace(
        path,
        lambda tmp: sf.write(tmp, waveform.astype(np.float32), sample_rate, format="MP3", subtype="MPEG_LAYER_III"),
    )
