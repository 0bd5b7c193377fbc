"""Clip index: the clips of an MTAT-format folder (read by ``mtt.data.mtat``), a chosen tag set,
the train/valid/test split and each clip's expected length."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from mtt.data.mtat import ANNOTATIONS, CLIP_INFO, AnnotationError, read_annotations, read_clip_info
from mtt.data.tags import TOP50, top_by_frequency

log = logging.getLogger(__name__)

STANDARD_SPLIT = {"train": tuple("0123456789ab"), "valid": ("c",), "test": ("d", "e", "f")}
SPLITS = ("train", "valid", "test")


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


def expected_durations(
    clip_ids: np.ndarray, clip_info: dict[int, dict[str, str]] | None, clip_seconds: float | None
) -> np.ndarray:
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
            raise ValueError(
                f"data.tags={tag_set}: expected freqN with N <= {len(tags)}, the number of tags in the annotations"
            )
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


def build_index(
    root: str | Path,
    annotations: str = ANNOTATIONS,
    tags: str = "all",
    split: str = "standard",
    drop_untagged: bool = True,
    clip_info: str | None = CLIP_INFO,
    clip_seconds: float | None = None,
) -> ClipIndex:
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
        tagged = np.asarray(labels.any(axis=1))
        splits = {k: v[tagged[v]] for k, v in splits.items()}
    return ClipIndex(
        root=root,
        tags=tag_names,
        clip_ids=clip_ids,
        paths=paths,
        labels=labels,
        splits=splits,
        expected_seconds=expected_durations(clip_ids, info, clip_seconds),
    )
