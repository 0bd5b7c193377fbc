"""The torch front end against Google's reference (torchvggish.vggish_input), on generated audio."""

import numpy as np
import pytest
import torch
from torchvggish import vggish_input

from mtt.config import FeaturesConfig
from mtt.data.audio import resample
from mtt.features.frontend import LogMelFrontEnd, log_mel_patches

SR = 16000


def noise_and_tones(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    """float64 (samples,): white noise plus tones spread over the mel range."""
    t = np.arange(int(round(sr * seconds))) / sr
    noise = 0.1 * np.random.default_rng(seed).standard_normal(t.size)
    return noise + sum(0.2 * np.sin(2 * np.pi * f * t) for f in (220.0, 1000.0, 3500.0, 7000.0))


def sweep(seconds: float) -> np.ndarray:
    """Linear sine sweep 50 Hz -> 7.95 kHz at 16 kHz."""
    t = np.arange(int(SR * seconds)) / SR
    f0, f1 = 50.0, 7950.0
    return 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2))


def reference(x: np.ndarray, sr: int) -> np.ndarray:
    return vggish_input.waveform_to_examples(x, sr, return_tensor=False)


SIGNALS_16K = {
    "white_noise": lambda: 0.3 * np.random.default_rng(1).standard_normal(3 * SR),
    "sweep": lambda: sweep(4.0),
    "silence": lambda: np.zeros(2 * SR),
    # Full-scale tones: with a float32 FFT their rounding leaks into quiet bins (8e-4 here).
    "full_scale_tones": lambda: np.sin(2 * np.pi * 1234.5 * np.arange(3 * SR) / SR),
    "square_wave": lambda: np.sign(np.sin(2 * np.pi * 440.0 * np.arange(3 * SR) / SR)),
    "clip_29.1s": lambda: noise_and_tones(SR, 29.1),
}


@pytest.mark.parametrize("name", SIGNALS_16K)
def test_matches_reference_at_16k(name):
    x = SIGNALS_16K[name]()
    ours, ref = log_mel_patches(x, SR), reference(x, SR)
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape and ours.shape[1:] == (96, 64)
    # Measured: <= 5e-7 for every signal (float32 output of a float64 FFT).
    assert np.abs(ours.numpy() - ref).max() <= 1e-5


def test_29_1_seconds_give_30_patches():
    assert log_mel_patches(np.zeros(int(29.1 * SR)), SR).shape == (30, 96, 64)


@pytest.mark.parametrize("n", [100, 399, 15599, 15600, 30959, 30960])
def test_patch_count_at_boundaries(n):
    # 400 + 95 * 160 = 15600 samples make 96 frames (windows 400, hop 160) = exactly one patch;
    # 400 + 191 * 160 = 30960 make two. Only whole windows and whole patches count.
    x = noise_and_tones(SR, n / SR)
    ours = log_mel_patches(x, SR)
    expected = 0 if n < 15600 else (1 if n < 30960 else 2)
    assert ours.shape == (expected, 96, 64)
    if n >= 240:  # the reference itself fails on clips shorter than 1.5 windows
        assert ours.shape == reference(x, SR).shape


def test_batched_front_end_equals_per_clip():
    clips = [noise_and_tones(SR, 3.0, seed) for seed in range(3)]
    batch = torch.from_numpy(np.stack(clips)).float()
    front = LogMelFrontEnd()
    out = front(batch)
    assert out.shape == (3, 3, 96, 64)
    front.cpu_block_frames = 100  # 33-frame blocks, which split patches: results must not change
    torch.testing.assert_close(front(batch), out, rtol=0, atol=1e-6)
    for clip, patches in zip(clips, out):
        torch.testing.assert_close(patches, log_mel_patches(clip, SR), rtol=0, atol=1e-5)


def test_custom_patch_hop_from_config():
    cfg = FeaturesConfig(patch_hop_frames=48)  # half-overlapping patches
    x = noise_and_tones(SR, 3.0)
    full, half = log_mel_patches(x, SR), log_mel_patches(x, SR, cfg)
    assert half.shape == (5, 96, 64)
    torch.testing.assert_close(half[::2], full)
    torch.testing.assert_close(half[1, :48], full[0, 48:])


@pytest.mark.parametrize("sr", [22050, 44100])
def test_resampled_input_close_to_reference(sr):
    # The reference resamples with resampy, we with torchaudio's rebuild of the same filter. The
    # filters differ slightly in the transition band, which only the two top mel bands (up to
    # 7.5 kHz) see. Measured on these signals: max 0.016, mean 4e-4, p99 0.012, bands 0-61 max 8e-4.
    x = noise_and_tones(sr, 3.0)
    ours, ref = log_mel_patches(x, sr).numpy(), reference(x, sr)
    assert ours.shape == ref.shape == (3, 96, 64)
    diff = np.abs(ours - ref)
    assert diff.max() <= 0.03
    assert diff.mean() <= 1e-3
    assert np.percentile(diff, 99) <= 0.02
    assert diff[..., :62].max() <= 3e-3


def test_resample_keeps_type_and_reference_length():
    x = np.random.default_rng(0).standard_normal(22050 + 7)
    y = resample(x, 22050, 16000)
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    assert y.shape == (16005,)  # floor(22057 * 16000 / 22050), as resampy
    t = resample(torch.from_numpy(x).float()[None], 22050, 16000)
    assert isinstance(t, torch.Tensor) and t.shape == (1, 16005) and t.dtype == torch.float32
    assert resample(x, 16000, 16000) is x
    with pytest.raises(ValueError, match="int16"):
        resample(np.zeros(100, dtype=np.int16), 22050, 16000)


def test_bad_shapes_name_the_shape():
    with pytest.raises(ValueError, match=r"\(2, 16000\)"):
        log_mel_patches(np.zeros((2, SR)), SR)
    with pytest.raises(ValueError, match=r"\(16000,\)"):
        LogMelFrontEnd()(torch.zeros(SR))


def test_float32_fft_option_is_close_on_noise():
    # The faster float32 FFT (e.g. for GPUs) is fine on noise; full-scale tones reach ~1e-3.
    x = SIGNALS_16K["white_noise"]()
    ours = LogMelFrontEnd(fft_dtype=torch.float32)(torch.from_numpy(x).float()[None])[0]
    assert np.abs(ours.numpy() - reference(x, SR)).max() <= 1e-4


@pytest.mark.parametrize("features", ["vggish", "shortchunk"])
def test_a_clip_streamed_in_windows_has_the_whole_clips_patches(features):
    """mtt.tag and serving compute a long clip's patches window by window (PatchFrontEnd.stream):
    the same frames of the same samples as the whole clip at once, for both front ends (the
    centred mel_db frames need context at the windows' edges)."""
    from mtt.features.frontend import build_front_end
    from mtt.serving.pyfunc import _features
    from tests.helpers import compose_cfg

    extra = ["backbone=shortchunk"] if features == "shortchunk" else []
    front = build_front_end(_features(compose_cfg([f"features={features}", *extra])))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(16000 * 23 + 777).astype(np.float32) * 0.1)
    whole = front(x[None])[0]
    assert len(whole) >= 10
    for block, window in [(1000, 1), (16000, 3), (100000, 8), (len(x), 32)]:
        got = torch.cat(list(front.stream((x[i : i + block] for i in range(0, len(x), block)), window_patches=window)))
        assert got.shape == whole.shape and torch.equal(got, whole), (block, window)


def test_a_waveform_resampled_in_blocks_is_resampled_as_a_whole():
    from mtt.data.audio import StreamResampler, resample

    rng = np.random.default_rng(0)
    for orig in (44100, 48000, 22050, 11025, 8000, 16000):
        x = rng.standard_normal(orig * 3 + 123).astype(np.float32)
        whole = resample(x, orig, 16000)
        for block in (997, 4096, 100000):
            r = StreamResampler(orig, 16000)
            got = np.concatenate([*(r.push(x[i : i + block]) for i in range(0, len(x), block)), r.finish()])
            assert got.shape == whole.shape, (orig, block)
            np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5, err_msg=f"{orig} Hz in blocks of {block}")
