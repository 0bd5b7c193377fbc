"""What needs the data before an entry point starts: read the clip index and check the values that
depend on it, before any MLflow run exists.

``exit_if_invalid`` (mtt/config.py) checks what the config alone decides, and ``data.root`` on
disk; some values can only be judged against the dataset itself: ``data.tags=freqN`` (at most
the tags the annotations have) and ``trainer.batch_size`` (at most the patches of the training
split: a bigger batch only repeats them, and ``100000000`` would grow memory until the machine
gives out before the first step). ``checked_index`` reads the index (generating the embedded
dataset first, as training would) and ends the process with one line and exit status 2 when one
of them is out of bounds, so no FAILED run is left behind.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from mtt.data.datasets import index_from_config
from mtt.data.index import ClipIndex


def training_patches(cfg, index: ClipIndex) -> int | None:
    """The patches the training split will hold: each clip's expected length cut by the front
    end (at most ``stream.patches_per_clip`` each); None when a clip's length is unknown."""
    from mtt.features import build_front_end  # torch: only once the config is valid

    rows = index.subset("train")
    if index.expected_seconds is None or not len(rows):
        return None
    seconds = index.expected_seconds[rows]
    if not all(math.isfinite(s) for s in seconds):
        return None
    front: Any = build_front_end(cfg.features)  # a PatchFrontEnd: n_patches(samples)
    sr, cap = cfg.features.sample_rate, cfg.stream.patches_per_clip
    per_clip = [front.n_patches(int(round(s * sr))) for s in seconds]
    return sum(min(n, cap) if cap else n for n in per_clip)


def index_errors(cfg, index: ClipIndex) -> list[str]:
    """One line per value that ``index`` cannot support (see the module docstring)."""
    errors = []
    bound, batch = training_patches(cfg, index), cfg.trainer.batch_size
    if bound is not None and batch > bound:
        errors.append(
            f"trainer.batch_size={batch}: expected at most {bound}, the patches of the "
            f"{len(index.subset('train'))} training clips (a bigger batch only repeats them, and "
            "a huge one exhausts memory before the first step)"
        )
    return errors


def checked_index(cfg, batch: bool = True) -> ClipIndex:
    """The clip index of ``cfg.data``, or the end of the process (``error: <what>``, exit status
    2) when it cannot be read (``data.tags=freqN`` beyond the annotations' tags, missing or
    malformed annotations, a ``data.root`` in the way) or when ``trainer.batch_size`` is more than
    its training split holds (``batch``: for the commands that train)."""
    try:
        index = index_from_config(cfg.data, progress=cfg.trainer.progress)
        errors = index_errors(cfg, index) if batch else []
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        errors = [str(e).replace("\n", " ")]
    if errors:
        print(f"error: {'; '.join(errors)}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return index
