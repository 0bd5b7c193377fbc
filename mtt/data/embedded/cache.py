"""``ensure_dataset``: the embedded dataset generated once per parameter set into ``data.root``,
atomically (a temporary sibling folder renamed into place) and safely under concurrency (a lock)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from mtt.data.embedded.labels import SYNTH_TAGS
from mtt.data.embedded.render import _generate
from mtt.data.mtat import ANNOTATIONS, CLIP_INFO, FOLDERS, SAMPLE_RATE
from mtt.fs import durable_replace, locked

if TYPE_CHECKING:  # the generator itself needs no Hydra
    from mtt.config import SynthConfig

# Bump when the generator changes what it writes, so that an old cache is regenerated.
SYNTH_VERSION = 1
MARKER = ".mtt-synth.json"


def _params(cfg: SynthConfig) -> dict:
    def get(key):
        try:
            return getattr(cfg, key)
        except AttributeError:
            raise ValueError(f"synth config lacks {key!r}") from None

    n, seconds, seed = get("clips_per_folder"), get("seconds"), get("seed")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"synth.clips_per_folder={n!r}: expected a positive integer")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0.1 <= seconds <= 600:
        raise ValueError(f"synth.seconds={seconds!r}: expected a number of seconds in [0.1, 600]")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"synth.seed={seed!r}: expected a non-negative integer")
    return {
        "version": SYNTH_VERSION,
        "clips_per_folder": n,
        "seconds": float(seconds),
        "seed": seed,
        "sample_rate": SAMPLE_RATE,
        "tags": list(SYNTH_TAGS),
    }


def _is_complete(root: Path, params: dict) -> bool:
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker == params and (root / ANNOTATIONS).is_file()


_OURS = {*FOLDERS, ANNOTATIONS, CLIP_INFO, MARKER}


def _check_replaceable(root: Path) -> None:
    """Refuse to replace a folder that holds anything but (a part of) a generated dataset."""
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; cannot generate the toy dataset there")
    foreign = sorted(p.name for p in root.iterdir() if p.name not in _OURS)
    if foreign:
        raise FileExistsError(
            f"{root} holds {foreign[0]!r}, which is not part of a generated dataset; "
            f"refusing to replace it: remove it or point data.root elsewhere"
        )


def ensure_dataset(root: str | Path, cfg: SynthConfig, progress: bool = True) -> Path:
    """Return ``root`` holding the generated dataset of ``cfg``, generating it first if needed.

    A dataset counts as present only when ``root/.mtt-synth.json`` (written last) records the same
    parameters and generator version. Generation writes into a temporary sibling folder and renames
    it into place, so an interrupted run never leaves a half dataset that reads as complete. A lock
    file beside ``root`` serialises concurrent callers; the second one finds the dataset made.
    An existing ``root`` is replaced only if it holds nothing but dataset files (an older or partial
    dataset); otherwise ``FileExistsError`` names what is in the way.
    """
    params = _params(cfg)
    root = Path(root).expanduser()
    if _is_complete(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with locked(root.parent / f".{root.name}.lock"):
        if _is_complete(root, params):  # another process made it while we waited for the lock
            return root
        _check_replaceable(root)
        for stale in root.parent.glob(f".{root.name}.gen-*"):  # left by a killed generator
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.parent / f".{root.name}.gen-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            _generate(tmp, params, progress, MARKER)
            if root.exists():
                old = root.parent / f".{root.name}.gen-old-{secrets.token_hex(4)}"
                os.rename(root, old)
                durable_replace(tmp, root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                durable_replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if _is_complete(root, params):  # lost a rename race to another generator (no flock)
                return root
            raise
    return root
