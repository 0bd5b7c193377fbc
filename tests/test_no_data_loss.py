"""No mtt command deletes or overwrites a file it did not create (issue 25, item 1).

The embedded dataset (the default ``data=toy``) is generated into ``data.root``; pointed at a
hand-unpacked MagnaTagATune (folders 0-f and the two CSVs: MTAT's own names, nothing else) it
must refuse, in one line, with exit status 2, before any MLflow run, and leave every byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtt.data.mtat import ANNOTATIONS, CLIP_INFO, FOLDERS
from tests.helpers import TINY, run_module


def mtat_tree(root: Path) -> Path:
    """A MagnaTagATune unpacked by hand: two clips in each of the folders 0-f and both CSVs."""
    rng = np.random.default_rng(7)
    rows = []
    for folder in FOLDERS:
        for i in range(2):
            mp3 = f"{folder}/artist_{folder}-album-0{i}-title-{30 * i}-{30 * i + 29}.mp3"
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / mp3).write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
            rows.append(mp3)
    (root / ANNOTATIONS).write_text(
        '"clip_id"\t"guitar"\t"mp3_path"\n' + "".join(f'"{i}"\t"1"\t"{p}"\n' for i, p in enumerate(rows, 2))
    )
    (root / CLIP_INFO).write_text('"clip_id"\t"mp3_path"\n' + "".join(f'"{i}"\t"{p}"\n' for i, p in enumerate(rows, 2)))
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: a file's bytes, None for a folder."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command", ["mtt.run", "mtt.preprocess"])
def test_default_data_on_a_hand_unpacked_mtat_touches_nothing(tmp_path, command):
    root = mtat_tree(tmp_path / "mtat")
    before = snapshot(root)
    assert len(before) == 16 + 32 + 2
    cache, store = tmp_path / "cache", tmp_path / "m.db"
    proc = run_module(
        [command, *TINY, f"data.root={root}", f"paths.cache={cache}", f"tracking.uri=sqlite:///{store}"], check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: data.root={root} holds files mtt did not generate (0, 1, 2, ...)")
    assert "data=mtat" in lines[0] and "empty or new folder" in lines[0]
    assert snapshot(root) == before  # every file, byte for byte, and no new one
    assert not store.exists(), "the MLflow store (so a run) was created"
    assert not cache.exists(), "data work started"
