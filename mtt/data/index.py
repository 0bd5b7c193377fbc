"""Clip index: parse MTAT's annotations_final.csv, choose a tag set, split the clips.

``annotations_final.csv`` is tab-separated with every field in double quotes: ``clip_id``, the
188 tag columns (0/1), ``mp3_path`` (e.g. ``f/artist-album-01-title-30-59.mp3``).
``clip_info_final.csv`` has the same quoting and the columns of ``CLIP_INFO_COLUMNS``.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np

from mtt.data.tags import TAGS, TOP50, top_by_frequency

log = logging.getLogger(__name__)

FOLDERS = tuple("0123456789abcdef")
STANDARD_SPLIT = {"train": tuple("0123456789ab"), "valid": ("c",), "test": ("d", "e", "f")}
SPLITS = ("train", "valid", "test")
CLIP_INFO_COLUMNS = ("clip_id", "track_number", "title", "artist", "album", "url", "segmentStart",
                     "segmentEnd", "original_url", "mp3_path")


class AnnotationError(ValueError):
    """Malformed annotations: the message names the file and the line."""


@dataclass(frozen=True)
class ClipIndex:
    """All clips of a dataset with their labels over the chosen tag set, and the split.

    ``labels`` is a ``(n_clips, n_tags)`` uint8 array; ``splits`` maps train/valid/test to arrays
    of row numbers into ``clip_ids`` / ``paths`` / ``labels``; ``expected_seconds`` is how long
    each clip should be (``expected_durations``), NaN where nothing says.
    """

    root: Path
    tags: tuple[str, ...]
    clip_ids: np.ndarray  # (n_clips,) int64
    paths: tuple[str, ...]  # mp3 paths relative to root
    labels: np.ndarray  # (n_clips, n_tags) uint8
    splits: dict[str, np.ndarray]
    expected_seconds: np.ndarray | None = None  # (n_clips,) float64, NaN = unknown

    def audio_path(self, row: int) -> Path:
        return self.root / self.paths[row]

    def subset(self, split: str) -> np.ndarray:
        return self.splits[split]


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
    ids, rows, paths, seen = [], [], [], {}
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


def expected_durations(clip_ids: np.ndarray, clip_info: dict[int, dict[str, str]] | None,
                       clip_seconds: float | None) -> np.ndarray:
    """How long each clip should be ``(n_clips,)``: ``segmentEnd - segmentStart`` where the clip
    info has a positive one, else ``clip_seconds`` (MTAT: 29.1 s), else NaN (nothing to check)."""
    fallback = math.nan if clip_seconds is None else float(clip_seconds)
    out = np.full(len(clip_ids), fallback)
    for i, clip_id in enumerate(clip_ids):
        row = (clip_info or {}).get(int(clip_id))
        try:
            length = float(row["segmentEnd"]) - float(row["segmentStart"]) if row else math.nan
        except ValueError:
            length = math.nan
        if length > 0:
            out[i] = length
    return out


def select_tags(tags: tuple[str, ...], labels: np.ndarray, tag_set: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Restrict labels to a tag set.

    ``all``: every column. ``top50``: the published standard subset (``mtt.data.tags.TOP50``).
    ``freqN`` (e.g. ``freq50``): the N most frequent tags of these annotations, computed here
    (most frequent first, ties in header order); on the full MTAT this is close to, but not
    guaranteed equal to, the published list, which is why ``top50`` stays the published one.
    """
    if tag_set == "all":
        return tags, labels
    if tag_set.startswith("freq") and tag_set[4:].isdigit():
        n = int(tag_set[4:])
        if not 1 <= n <= len(tags):
            raise ValueError(f"data.tags={tag_set!r}: N must be between 1 and {len(tags)}")
        chosen = top_by_frequency(tags, labels, n)
        return chosen, labels[:, [tags.index(t) for t in chosen]]
    if tag_set == "top50":
        missing = [t for t in TOP50 if t not in tags]
        if missing:
            raise AnnotationError(f"tag set top50: annotations lack the tags {missing[:5]}")
        cols = [tags.index(t) for t in TOP50]
        return TOP50, labels[:, cols]
    raise ValueError(f"data.tags={tag_set!r}: expected 'all', 'top50' or 'freqN' (e.g. freq50)")


def split_rows(paths: tuple[str, ...], rule: str) -> dict[str, np.ndarray]:
    """Row numbers per split.

    ``standard``: folders 0-b train, c valid, d-f test (Dieleman & Schrauwen 2014).
    ``report``: the source report's: the first quarter of the rows is test, the rest train, and
    there is no validation split (validation metrics are then computed on the test rows, as the
    report did).
    """
    n = len(paths)
    if rule == "standard":
        folder = np.array([PurePosixPath(p).parts[0] for p in paths])
        return {name: np.flatnonzero(np.isin(folder, dirs)) for name, dirs in STANDARD_SPLIT.items()}
    if rule == "report":
        cut = n // 4
        test = np.arange(cut)
        return {"train": np.arange(cut, n), "valid": test, "test": test}
    raise ValueError(f"data.split={rule!r}: expected 'standard' or 'report'")


def build_index(root: str | Path, annotations: str = "annotations_final.csv", tags: str = "all",
                split: str = "standard", drop_untagged: bool = True,
                clip_info: str | None = "clip_info_final.csv", clip_seconds: float | None = None) -> ClipIndex:
    """Parse ``root/annotations`` and return the clips, labels and splits (see ``ClipIndex``); the
    expected clip lengths come from ``root/clip_info`` when it exists, else ``clip_seconds``."""
    root = Path(root).expanduser()
    clip_ids, all_tags, labels, paths = read_annotations(root / annotations)
    info = None
    if clip_info is not None and (root / clip_info).is_file():
        try:
            info = read_clip_info(root / clip_info)
        except AnnotationError as e:  # only the length check needs it: say so and go on
            log.warning("%s; clip lengths are checked against data.clip_seconds=%s instead", e, clip_seconds)
    tag_names, labels = select_tags(all_tags, labels, tags)
    splits = split_rows(paths, split)
    if drop_untagged:
        tagged = labels.any(axis=1)
        splits = {k: v[tagged[v]] for k, v in splits.items()}
    return ClipIndex(root=root, tags=tag_names, clip_ids=clip_ids, paths=paths, labels=labels,
                     splits=splits, expected_seconds=expected_durations(clip_ids, info, clip_seconds))


def index_from_config(data_cfg, progress: bool = True) -> ClipIndex:
    """The index of ``cfg.data``; the embedded dataset (``data.synth`` set) is generated first."""
    if data_cfg.synth is not None:
        from mtt.data.synth import ensure_dataset

        ensure_dataset(data_cfg.root, data_cfg.synth, progress=progress)
    return build_index(data_cfg.root, data_cfg.annotations, data_cfg.tags, data_cfg.split,
                       data_cfg.drop_untagged, data_cfg.clip_info, data_cfg.clip_seconds)


__all__ = ["TAGS", "TOP50", "FOLDERS", "CLIP_INFO_COLUMNS", "ClipIndex", "AnnotationError", "build_index",
           "expected_durations",
           "index_from_config", "read_annotations", "read_clip_info", "select_tags", "split_rows"]
