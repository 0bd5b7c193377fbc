"""Helpers shared by the tests, in one importable place (``from tests.helpers import ...``): the
tiny configs and Hydra compose, running ``python -m`` as a user would, reading a sweep back.
Servers for the tests live beside it: ``tests.helpers.http_server`` (files over HTTP on
127.0.0.1), ``tests.helpers.mlflow_server`` (a real MLflow server), ``tests.helpers.browser``
(headless chromium through Playwright)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from mtt.core.paths import CONF_DIR, REPO_ROOT
from mtt.data.mtat import ANNOTATIONS, CLIP_INFO, FOLDERS

# A tiny but complete setup: 16 folders x 2 clips x 2 s, VGGish at 1/8 width, small head.
TINY = [
    "data.synth.clips_per_folder=2",
    "data.synth.seconds=2.0",
    "backbone.width=0.125",
    "head.width=16",
    "trainer.epochs=1",
    "trainer.progress=false",
    "trainer.device=cpu",
]

# The model-only part of TINY, for tests that bring their own data (data=mtat trees).
TINY_MODEL = [o for o in TINY if not o.startswith("data.synth.")]

# The artifacts every finished training run logs (besides model/ and the test records).
RUN_ARTIFACTS = {
    "config.yaml",
    "per_tag_test.csv",
    "checkpoint/best.safetensors",
    "checkpoint/best.safetensors.sha256",  # the checksum sidecars that mtt.tag checks
    "checkpoint/best.json",
    "checkpoint/best.json.sha256",
    "plots/loss.png",
    "plots/accuracy.png",
    "plots/auc.png",
}

# The short-chunk ResNet on chunks that TINY's 2 s clips hold (80 frames x 32 bands), whose maps
# never shrink to 1 x 1 before a stride-2 block (nor do the paper's 231 x 128 chunks'): on a 1 x 1
# input PyTorch's CPU bf16 convolution returns garbage weight gradients (torch 2.11, now and then).
SHORTCHUNK_SMALL = [
    "backbone=shortchunk_res",
    "features.patch_frames=80",
    "features.patch_hop_frames=40",
    "features.n_mels=32",
]

# The smallest setup on which learning is measurable: 16 folders x 6 clips x 2 s (72 train, 6
# valid, 18 test clips), the tiny VGGish, the default head width. A run takes a few seconds.
LEARNABLE = [
    *(o for o in TINY if not o.startswith(("data.synth.clips_per_folder", "head.width", "trainer.epochs"))),
    "data.synth.clips_per_folder=6",
]


def compose_cfg(overrides: list[str] = (), cache: Path | None = None):
    """Compose conf/config.yaml with overrides (``cache`` sets paths.cache)."""
    from mtt.config import register_configs

    register_configs()
    extra = [f"paths.cache={cache}"] if cache is not None else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*extra, *overrides])


def run_module(
    args: list[str], env: dict | None = None, cwd: Path | None = None, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` as a user would, from the repo root unless ``cwd`` is given."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd or REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def sweep_children(client, experiment: str, status: str = "FINISHED") -> list:
    """The job runs of the one sweep (``-m``) in ``experiment``, after checking its parent run:
    exactly one, ended with ``status``, and every other run of the experiment is its child."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mtt.sweep") == "true"]
    assert len(parents) == 1, f"{experiment}: {len(parents)} sweep parent runs"
    (parent,) = parents
    assert parent.info.status == status, parent.info.status
    children = [r for r in runs if r is not parent]
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parent.info.run_id}
    return children


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
