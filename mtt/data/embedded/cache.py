"""``ensure_dataset``: the embedded dataset generated once per parameter set into ``data.root``,
atomically (a temporary sibling folder renamed into place) and safely under concurrency (a lock)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from mtt.core.fs import durable_replace, locked
from mtt.data.embedded.labels import SYNTH_TAGS
from mtt.data.embedded.render import _generate
from mtt.data.mtat import ANNOTATIONS, CLIP_INFO, FOLDERS, SAMPLE_RATE

# ``cfg`` below is ``mtt.data.datasets.SynthConfig`` or anything with its three fields: not imported, since
# mtt.data.datasets checks data.root through this module (``write_refusal``) and the generator needs no Hydra.
SynthParams = Any

# Bump when the generator changes what it writes, so that an old cache is regenerated.
SYNTH_VERSION = 1
MARKER = ".mtt-synth.json"


def _params(cfg: SynthParams) -> dict:
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


def write_refusal(root: str | Path, cfg: SynthParams) -> str | None:
    """``replace_refusal`` for the dataset of ``cfg``: None when ``root`` already holds it (nothing
    will be written there, whatever else the folder holds) or when the parameters are invalid
    (their own check names them)."""
    try:
        if _is_complete(Path(root).expanduser(), _params(cfg)):
            return None
    except ValueError:
        return None
    return replace_refusal(root)


def replace_refusal(root: str | Path) -> str | None:
    """Why the embedded dataset may not be written at ``root`` (one line), or None when it may.

    Only a folder that is missing, empty, or one this generator wrote (it holds ``MARKER``, which
    only ``_generate`` writes, and nothing but dataset files) may be replaced. MTAT's own names
    alone prove nothing: a hand-unpacked MagnaTagATune holds exactly those, and replacing it would
    delete the user's data.
    """
    root = Path(root).expanduser()
    if not root.exists():
        return None
    what = "refusing to write the generated dataset (data=toy) there"
    todo = "for MagnaTagATune add data=mtat, otherwise point data.root at an empty or new folder"
    if not root.is_dir():
        return f"data.root={root} is a file, not a folder; {what}: {todo}"
    names = sorted(p.name for p in root.iterdir())
    foreign = [n for n in names if n not in _OURS]
    if names and (foreign or MARKER not in names):
        shown = ", ".join((foreign or names)[:3]) + (", ..." if len(foreign or names) > 3 else "")
        return f"data.root={root} holds files mtt did not generate ({shown}); {what}: {todo}"
    return None


def _check_replaceable(root: Path) -> None:
    """Raise ``FileExistsError`` (``replace_refusal``) unless ``root`` may be replaced."""
    refusal = replace_refusal(root)
    if refusal is not None:
        raise FileExistsError(refusal)


def ensure_dataset(root: str | Path, cfg: SynthParams, progress: bool = True) -> Path:
    """Return ``root`` holding the embedded dataset of ``cfg``, generating it first if needed.

    A dataset counts as present only when ``root/.mtt-synth.json`` (written last) records the same
    parameters and generator version. Generation writes into a temporary sibling folder and renames
    it into place, so an interrupted run never leaves a half dataset that reads as complete. A lock
    file beside ``root`` serialises concurrent callers; the second one finds the dataset made.
    An existing ``root`` is replaced only if this generator wrote it (an older version or another
    parameter set: ``replace_refusal``); otherwise ``FileExistsError`` names what is in the way.
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
