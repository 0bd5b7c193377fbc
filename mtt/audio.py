"""Audio decoding: any file soundfile (libsndfile: mp3, wav, flac, ogg) reads -> mono float32.

MTAT's mp3s are 16 kHz already, so they are decoded at their native rate; only other rates are
resampled (``resample``, the resampler of the VGGish reference front end). ``load_audio`` is
libsndfile only (MTAT preprocessing: fast, in-process); ``decode_audio`` (tagging and serving)
falls back to librosa over audioread, whose ffmpeg backend reads what libsndfile does not
(AAC/m4a, the usual format of music libraries, wma, ...).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

# resampy's "kaiser_best" filter as resampy >= 0.3 ships it (resampy/data/kaiser_best.npz: 50
# zero crossings, roll-off 0.917347, Kaiser beta 12.9846), rebuilt by torchaudio. torchaudio's docs
# quote an older resampy (64 zeros, roll-off 0.9476); that filter keeps ~2 dB more energy at
# 7.2 kHz and moves the top mel bands by up to 0.5 against the reference.
_RESAMPY_KAISER_BEST = dict(
    lowpass_filter_width=50,
    rolloff=0.9173473712608761,
    resampling_method="sinc_interp_kaiser",
    beta=12.9846,
)


def resample(waveform, orig_sr: int, target_sr: int):
    """Resample a mono or batched waveform along its last axis.

    Uses ``torchaudio.functional.resample`` with the Kaiser-windowed sinc of resampy's
    ``kaiser_best``, the resampler of the reference front end: it matches the reference closely
    (tests/test_features.py bounds the difference), runs in torch (batched, on any device) and
    adds no dependency beyond torchaudio. soxr would be faster but has another transition band.
    The output keeps ``floor(n * target_sr / orig_sr)`` samples, resampy's length, so a clip
    yields the same number of frames as in the reference (torchaudio alone rounds up).

    Args:
        waveform: floating numpy array or tensor ``(..., samples)``.
    Returns:
        Same type and dtype as the input, ``(..., floor(samples * target_sr / orig_sr))``.
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    is_numpy = isinstance(waveform, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(waveform)) if is_numpy else waveform
    if not x.is_floating_point():
        raise ValueError(f"resample needs a floating waveform, got dtype {x.dtype}")
    if orig_sr == target_sr:
        return waveform
    n_out = x.shape[-1] * target_sr // orig_sr
    x = AF.resample(x, orig_sr, target_sr, **_RESAMPY_KAISER_BEST)[..., :n_out]
    return x.numpy() if is_numpy else x


class AudioDecodeError(RuntimeError):
    """A file that cannot be decoded; the message names the file and the reason."""


class DamagedAudioError(AudioDecodeError):
    """A file that decodes but is damaged (cut short of what its header declares, or holding NaN
    or infinite samples): another decoder would read the same damage, so none is tried."""


# Bytes per sample of the uncompressed subtypes whose length a header declares (WAV, AIFF, ...).
_SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}
# libsndfile's header log: "data : 96000 (should be 16)" when the file ends before the chunk does.
_SHORT_CHUNK = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be \d+\)", re.MULTILINE)
_STREAMED = 0x7FFFFFFF  # the data size a writer that streams puts in the header: length unknown


def _truncation(path: Path, f: sf.SoundFile) -> str | None:
    """Why ``f`` is truncated (its header declares more audio than the file holds, by more than
    10 ms: a writer's padding is not a cut), or None; only where a header says how long it is."""
    m = _SHORT_CHUNK.search(f.extra_info)
    width = _SAMPLE_BYTES.get(f.subtype)
    if m is None or width is None or int(m.group(1)) >= _STREAMED:
        return None
    declared = int(m.group(1)) // (width * f.channels)
    if declared - f.frames <= f.samplerate // 100:
        return None
    return (
        f"{path}: truncated: its header declares {declared / f.samplerate:.2f} s of audio, the file "
        f"holds {f.frames / f.samplerate:.2f} s (cut during a copy or a download?)"
    )


def _check_finite(path: str | Path, data: np.ndarray) -> None:
    """NaN or infinite samples (a damaged float file) would reach the model as NaN features."""
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DamagedAudioError(f"{path}: {bad} non-finite sample(s) (NaN or inf): damaged audio")


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode ``path`` to a mono float32 waveform ``(samples,)`` at ``sample_rate``.

    Channels are averaged (as VGGish's reference does). Raises ``AudioDecodeError`` for an empty or
    non-audio file and for an mp3 cut before its first complete frame; an mp3 cut later decodes to
    the frames it still holds (a shorter clip), as every mp3 decoder does. A file whose header says
    how long it is (WAV, AIFF) and that holds less is refused as truncated, and one holding NaN or
    infinite samples as damaged (``DamagedAudioError``), naming the file.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise AudioDecodeError(f"{path}: empty file (0 bytes)")
        with sf.SoundFile(str(path)) as f:
            cut = _truncation(path, f)
            if cut:
                raise DamagedAudioError(cut)
            data, sr = f.read(dtype="float32", always_2d=True), f.samplerate
    except AudioDecodeError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as exc:
        # libsndfile says "File does not exist or is not a regular file" for any file it cannot
        # parse, so the message says what it usually means here before quoting it.
        raise AudioDecodeError(
            f"{path}: cannot decode audio: not an audio file, or truncated before "
            f"its first complete frame (libsndfile: {exc})"
        ) from exc
    if data.shape[0] == 0:
        raise AudioDecodeError(f"{path}: no audio samples")
    _check_finite(path, data)
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != sample_rate:
        wave = resample(wave, sr, sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


# What to install when no audioread backend can read a file (audioread finds ffmpeg on PATH).
INSTALL_FFMPEG = (
    "install ffmpeg (Debian/Ubuntu: apt-get install ffmpeg; macOS: brew install ffmpeg; conda: conda install ffmpeg)"
)


def decode_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """``load_audio``, falling back to librosa (audioread: ffmpeg) for a file libsndfile cannot
    read; mono float32 ``(samples,)`` at ``sample_rate`` either way, resampled by the same
    ``resample``.

    Raises ``AudioDecodeError`` on one line: naming ffmpeg as what to install when no audioread
    backend is there, else saying that neither decoder reads the file.
    """
    try:
        return load_audio(path, sample_rate)
    except DamagedAudioError:
        raise
    except AudioDecodeError as first:
        if not Path(path).is_file() or Path(path).stat().st_size == 0:
            raise
        sndfile_error = first
    import audioread
    import audioread.ffdec
    import librosa

    backends = audioread.available_backends()  # the stdlib wav/aiff reader, and ffmpeg if on PATH
    if audioread.ffdec.FFmpegAudioFile not in backends:
        raise AudioDecodeError(
            f"{path}: cannot decode audio: libsndfile does not read it and ffmpeg, "
            f"which would, is not on PATH; {INSTALL_FFMPEG}"
        ) from sndfile_error
    try:
        reader = audioread.audio_open(str(path), backends)
    except (audioread.DecodeError, OSError, EOFError) as exc:  # NoBackendError: every backend refused
        raise AudioDecodeError(
            f"{path}: cannot decode audio: neither libsndfile nor ffmpeg reads it (not an audio file, or truncated)"
        ) from exc
    with reader, warnings.catch_warnings():
        # librosa deprecates its audioread path for 1.0 (FutureWarning); pinned to 0.11 here.
        warnings.simplefilter("ignore", FutureWarning)
        data, sr = librosa.load(reader, sr=None, mono=False, dtype=np.float32)
    data = np.atleast_2d(data)  # (channels, samples)
    if data.shape[1] == 0:
        raise AudioDecodeError(f"{path}: no audio samples")
    wave = data.mean(axis=0) if data.shape[0] > 1 else data[0]
    if sr != sample_rate:
        wave = resample(wave, int(sr), sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)
