"""Front-end throughput: mtt.features.frontend vs torchvggish's reference ``waveform_to_examples``.

Run: ``python tests/benchmarks/bench_frontend.py``. Clips are 29.1 s of noise and tones at 16 kHz,
encoded to mp3 and decoded once, so both front ends get the same float32 audio an MTAT clip
decodes to. Timings alternate between the contenders over several rounds (medians), because
other work on the machine makes speed drift; the load average is printed with them. Ours runs
with torch's default threads and with one thread, the setting of one preprocessing worker per
core (torch's OpenMP threads degrade badly when other processes compete for the cores). Also
prints the difference to the reference at 22.05 and 44.1 kHz.
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from torchvggish import vggish_input  # noqa: E402

from mtt.features.frontend import LogMelFrontEnd, log_mel_patches  # noqa: E402

SR, SECONDS, BATCH, ROUNDS = 16000, 29.1, 32, 5


def noise_and_tones(sr: int, seed: int) -> np.ndarray:
    t = np.arange(int(round(sr * SECONDS))) / sr
    rng = np.random.default_rng(seed)
    tones = sum(0.15 * np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 7000, size=4))
    return 0.1 * rng.standard_normal(t.size) + tones


def decoded_clips() -> np.ndarray:
    """``(BATCH, samples)`` float32, each clip through an mp3 round trip like MTAT's audio."""
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(BATCH):
            path = Path(tmp) / f"{seed}.mp3"
            sf.write(path, noise_and_tones(SR, seed).astype(np.float32), SR, format="MP3")
            clips.append(sf.read(path, dtype="float32")[0])
    n = min(len(c) for c in clips)
    return np.stack([c[:n] for c in clips])


def seconds_per_clip(fn, n_clips: int) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / n_clips


def one_thread(fn):
    """``fn`` run with a single torch thread."""

    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)

    return run


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def main() -> None:
    clips = decoded_clips()
    batch = torch.from_numpy(clips)
    front = LogMelFrontEnd()
    threads = torch.get_num_threads()
    contenders = {
        "reference waveform_to_examples": lambda: [
            vggish_input.waveform_to_examples(c, SR, return_tensor=False) for c in clips
        ],
    }
    for label, wrap in ((f"{threads} threads", lambda fn: fn), ("1 thread", one_thread)):
        contenders.update(
            {
                f"ours log_mel_patches, single clips, {label}": wrap(lambda: [log_mel_patches(c, SR) for c in clips]),
                f"ours LogMelFrontEnd, single clips, {label}": wrap(lambda: [front(x[None]) for x in batch]),
                f"ours LogMelFrontEnd, batches of {BATCH}, {label}": wrap(lambda: front(batch)),
            }
        )
    if torch.cuda.is_available():
        gpu_front, gpu_batch = LogMelFrontEnd().cuda(), batch.cuda()

        def on_gpu():
            gpu_front(gpu_batch)
            torch.cuda.synchronize()

        contenders[f"ours LogMelFrontEnd on {torch.cuda.get_device_name()}, batches of {BATCH}"] = on_gpu
    for fn in contenders.values():  # warm-up
        fn()
    load_before = load()
    times = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, fn in contenders.items():
            times[name].append(seconds_per_clip(fn, len(clips)))

    print(
        f"{len(clips)} clips of {clips.shape[1] / SR:.1f} s at {SR} Hz, {ROUNDS} rounds, "
        f"{os.cpu_count()} CPUs, load average before/after: {load_before} / {load()}"
    )
    ref = statistics.median(times["reference waveform_to_examples"])
    print(f"  {'':<55} {'median':>13} {'':>14}  {'':>16}  best of {ROUNDS}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(
            f"  {name:<55} {t * 1e3:7.2f} ms/clip {1 / t:8.1f} clips/s  "
            f"{ref / t:5.2f}x the reference  {min(ts) * 1e3:7.2f} ms/clip"
        )
    for label in (f"{threads} threads", "1 thread"):
        slowest = max(statistics.median(ts) for n, ts in times.items() if n.endswith(label))
        print(
            f"  ours on CPU with {label}: {'not slower' if slowest <= ref else 'SLOWER'} "
            "than the reference in every mode"
        )

    ours = log_mel_patches(clips[0], SR).numpy()
    diff = np.abs(ours - vggish_input.waveform_to_examples(clips[0], SR, return_tensor=False))
    print(f"log-mel max abs diff vs reference at {SR} Hz: {diff.max():.2e}")
    for sr in (22050, 44100):
        x = noise_and_tones(sr, seed=0)
        ref_patches = vggish_input.waveform_to_examples(x, sr, return_tensor=False)
        diff = np.abs(log_mel_patches(x, sr).numpy() - ref_patches)
        print(
            f"log-mel abs diff vs reference at {sr} Hz (resampy vs torchaudio kaiser_best): "
            f"max {diff.max():.4f}, mean {diff.mean():.5f}, p99 {np.percentile(diff, 99):.4f}, "
            f"max over bands 0-61 {diff[..., :62].max():.5f}"
        )


if __name__ == "__main__":
    main()
