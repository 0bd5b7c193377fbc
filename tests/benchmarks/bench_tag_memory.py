"""Peak memory of ``python -m mtt.tag`` on a short and on long files.

Run: ``python tests/benchmarks/bench_tag_memory.py``. A model folder is saved from the default
config (full-width VGGish, GAP + 2 blocks, 50 tags; random weights: memory does not depend on
them) with ``mtt.serving.pyfunc.save_tagger``, and ``mtt.tag`` runs on it in a fresh process per file,
as a user runs it. The files are what a music library holds: 44.1 kHz stereo, as WAV (decoded
by libsndfile), mp3 and, with ffmpeg on PATH, m4a (AAC, decoded through audioread's ffmpeg), of
3 s, 10 min and 30 min (noise and tones). The figure is the child
process's peak resident set (``ru_maxrss`` from ``wait4``): imports and the model take most of
it, so the ratio of a long file to the 3 s one is what decoding and tagging add. mtt.tag decodes,
front-ends and tags a long file in windows (``mtt.serving.pyfunc.ClipTagger.tag_file``), so the ratio
stays near 1; the target is at most 1.5 for 10 min.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

SR = 44100
# (format, label, seconds): the 30 min file shows the trend; as mp3 it would only add minutes.
# M4A (AAC: the ffmpeg path through audioread) only where ffmpeg is on PATH.
FILES = [
    ("WAV", "3 s", 3.0),
    ("WAV", "10 min", 600.0),
    ("WAV", "30 min", 1800.0),
    ("MP3", "3 s", 3.0),
    ("MP3", "10 min", 600.0),
    *([("M4A", "3 s", 3.0), ("M4A", "10 min", 600.0)] if shutil.which("ffmpeg") else []),
]


def write_song(path: Path, seconds: float, fmt: str) -> None:
    """Stereo noise and tones at 44.1 kHz, written in 60 s blocks (the file, not the array, is
    long); M4A: such a WAV encoded to AAC by ffmpeg."""
    if fmt == "M4A":
        wav = path.with_suffix(".wav")
        write_song(wav, seconds, "WAV")
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), "-c:a", "aac", str(path)], check=True)
        wav.unlink()
        return
    rng = np.random.default_rng(0)
    subtype = "MPEG_LAYER_III" if fmt == "MP3" else "PCM_16"
    with sf.SoundFile(path, "w", SR, 2, format=fmt, subtype=subtype) as f:
        left = int(SR * seconds)
        start = 0
        while left > 0:
            n = min(left, SR * 60)
            t = (start + np.arange(n)) / SR
            tone = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1250 * t)
            block = np.stack([tone + 0.05 * rng.standard_normal(n), tone - 0.05 * rng.standard_normal(n)], axis=1)
            f.write(block.astype(np.float32))
            start, left = start + n, left - n


def save_model(folder: Path) -> Path:
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from mtt.core.paths import CONF_DIR
    from mtt.models import build_model
    from mtt.models.pooling import reads_of
    from mtt.serving.pyfunc import save_tagger

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.cache={folder / 'cache'}"])
    tags = [f"tag{i}" for i in range(50)]
    torch.manual_seed(0)
    model = build_model(cfg, len(tags))
    weights = folder / "best.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "tags": tags, "epoch": 0}
    return save_tagger(folder / "model", weights, meta, cached_backbone=True, cache_reads=reads_of(model.pool))


def peak_mb(args: list[str]) -> tuple[float, float, int]:
    """Peak RSS (MB) and wall seconds of ``python -m mtt.tag ARGS``, and its exit status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtt.tag", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(err[-2000:], file=sys.stderr)
    return usage.ru_maxrss / 1024, seconds, code


def main() -> None:
    print(f"load average {os.getloadavg()[0]:.2f} (other work on the machine moves the timings, not the memory)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_model(tmp)
        base: dict[str, float] = {}
        for fmt, name, seconds in FILES:
            song = tmp / f"song-{int(seconds)}.{fmt.lower()}"
            write_song(song, seconds, fmt)
            mb, wall, code = peak_mb([str(song), "--model", str(model), "--top-k", "3"])
            base.setdefault(fmt, mb)
            print(
                f"{fmt} {name:>6} ({song.stat().st_size / 1e6:7.1f} MB file): peak RSS {mb:7.0f} MB, "
                f"{mb / base[fmt]:.2f}x the 3 s file, {wall:6.1f} s, exit {code}"
            )
            song.unlink()


if __name__ == "__main__":
    main()
