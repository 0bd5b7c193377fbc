"""Training throughput of each built-in backbone's whole tagger (figures only).

One optimiser step = forward, BCE, backward and Adam on a batch of patches of the backbone's own
front end (VGGish: (96, 64) log-mel, the backbone trained too, as with finetune; shortchunk_res:
(231, 128) mel-dB chunks of 3.69 s), built by ``build_model`` as a run builds it, with the run's
device policy: bf16 autocast and channels-last on CUDA, fp32 on CPU. Prints samples/s per model;
on a GPU machine with the card's name. Synthetic inputs: this measures the model, not the stream.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

from mtt.models import build_model  # noqa: E402
from mtt.training.train import autocast_dtype  # noqa: E402
from tests.helpers import compose_cfg  # noqa: E402

MODELS = {"vggish (trained, no cache)": ["backbone.freeze=false"], "shortchunk_res": ["backbone=shortchunk_res"]}


def samples_per_second(overrides: list[str], device: torch.device, batch: int, steps: int) -> float:
    cfg = compose_cfg(overrides)
    model = build_model(cfg, n_tags=50).to(device)
    amp = autocast_dtype("auto", device)
    if device.type == "cuda":
        model.backbone.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, cfg.features.patch_frames, cfg.features.n_mels, device=device)
    y = (torch.rand(batch, 50, device=device) < 0.05).float()

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        loss = model.loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (cuDNN autotuning, allocations)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch, steps = (32, 50) if cuda else (8, 3)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"training step throughput on {where}, batch {batch}, {steps} steps "
        f"({'bf16 autocast, channels-last' if cuda else 'fp32'}):"
    )
    for name, overrides in MODELS.items():
        print(f"  {name:28s} {samples_per_second(overrides, device, batch, steps):9.1f} samples/s", flush=True)


if __name__ == "__main__":
    main()
