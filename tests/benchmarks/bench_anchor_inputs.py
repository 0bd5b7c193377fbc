"""How far the short-chunk anchor's inputs are from Won et al.'s (docs/recipe-and-report.md).

Run: ``python tests/benchmarks/bench_anchor_inputs.py [--clips 40]``. On the embedded data's
clips (6 s, decoded as training decodes them) it compares, in dB, a 59,049-sample chunk's
spectrogram as their model computes it (torchaudio's MelSpectrogram on the chunk alone: centred
frames, reflect-padded at the chunk's edges) with the same frames cut from the whole clip's
spectrogram (mtt's feature store), at chunk offsets that are whole frames (mtt's offsets): the
first and last frame, then the 229 between. It also prints the float16 rounding of the stored
values, and how far their sample offsets fall from mtt's nearest frame.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from hydra import compose, initialize_config_dir  # noqa: E402

from mtt.config import CONF_DIR  # noqa: E402
from mtt.data.audio import load_audio  # noqa: E402
from mtt.data.datasets import index_from_config  # noqa: E402
from mtt.features.frontend import MelDbFrontEnd  # noqa: E402

CHUNK = 59049


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=40)
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["backbone=shortchunk_res"])
    index = index_from_config(cfg.data, progress=False)
    front = MelDbFrontEnd(cfg.features)
    rng = np.random.default_rng(0)
    edge, edge_mean, inner, fp16 = [], [], [], []
    for row in rng.choice(len(index.clip_ids), size=args.clips, replace=False):
        wave = torch.from_numpy(load_audio(index.audio_path(int(row)), 16000))
        with torch.no_grad():
            whole = front.to_db(front.spec(wave))  # (mel, frames) of the whole clip
            for f in rng.integers(0, (len(wave) - CHUNK) // 256 + 1, size=3):
                alone = front.to_db(front.spec(wave[f * 256 : f * 256 + CHUNK]))  # their chunk: 231 frames
                cut = whole[:, f : f + alone.shape[1]]
                diff = (alone - cut).abs()
                edge += [diff[:, 0].max().item(), diff[:, -1].max().item()]
                edge_mean += [diff[:, 0].mean().item(), diff[:, -1].mean().item()]
                inner.append(diff[:, 1:-1].max().item())
                fp16.append((cut - cut.half().float()).abs().max().item())
    print(f"{args.clips} embedded clips x 3 chunk offsets (whole frames), |their chunk - cut from the clip| in dB:")
    print(
        f"  first and last frame: the largest band's median {np.median(edge):.1f}, max {np.max(edge):.1f} "
        f"(near-silent bands, where dB magnify); mean over the 128 bands median {np.median(edge_mean):.1f}, "
        f"max {np.max(edge_mean):.1f}"
    )
    print(f"  the 229 frames between: max {np.max(inner):.2g}")
    print(f"  float16 storage of the cut frames: max rounding {np.max(fp16):.3f} dB")
    print("  their offsets fall anywhere between two frames: at most 128 samples (8 ms) from mtt's nearest frame")


if __name__ == "__main__":
    main()
