"""Rendering the embedded dataset's plan and writing it in MTAT's on-disk format: every clip's
mp3, then ``annotations_final.csv`` and ``clip_info_final.csv`` (``mtt.data.mtat``), then the
marker that makes the folder count as complete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mtt.core.fs import atomic_write_text
from mtt.data.embedded.plan import _plan
from mtt.data.embedded.synthesis import render_clip
from mtt.data.mtat import ANNOTATIONS, CLIP_INFO, FOLDERS, SAMPLE_RATE, write_annotations, write_clip_info, write_mp3


def _generate(out: Path, params: dict, progress: bool, marker: str) -> None:
    """Write the dataset of ``params`` (see ``cache._params``) into the new folder ``out``."""
    n, seconds, seed = params["clips_per_folder"], params["seconds"], params["seed"]
    clips = _plan(n, seconds, seed)
    for folder in FOLDERS:
        (out / folder).mkdir(parents=True)
    bar = tqdm(clips, desc=f"generating toy dataset in {out.parent}", unit="clip", disable=not progress)
    for clip in bar:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, clip.folder, clip.index)))
        wave = render_clip(sorted(clip.recipe.tags()), seconds, SAMPLE_RATE, rng)
        write_mp3(out / clip.mp3_path, wave, SAMPLE_RATE)
    write_annotations(out / ANNOTATIONS, [(c.clip_id, c.recipe.tags(), c.mp3_path) for c in clips])
    write_clip_info(out / CLIP_INFO, [c.info for c in clips])
    # Written last: its presence is what makes the folder count as complete.
    atomic_write_text(out / marker, json.dumps(params, indent=1, sort_keys=True) + "\n")
