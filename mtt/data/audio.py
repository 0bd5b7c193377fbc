"""Audio decoding: any file soundfile (libsndfile: mp3, wav, flac, ogg) reads -> mono float32.

MTAT's mp3s are 16 kHz already, so they are decoded at their native rate; only other rates are
resampled (``resample``, the resampler of the VGGish reference front end). ``load_audio`` is
libsndfile only (MTAT preprocessing: fast, in-process); ``stream_audio`` (tagging and serving)
decodes block by block, so a long file never sits in memory whole, and falls back to audioread,
whose ffmpeg backend reads what libsndfile does not (AAC/m4a, the usual format of music
libraries, wma, ...); ``decode_audio`` is its blocks joined.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

# resampy's "kaiser_best" filter as resampy >= 0.3 ships it (resampy/data/kaiser_best.npz: 50
# zero crossings, roll-off 0.917347, Kaiser beta 12.9846), rebuilt by torchaudio. torchaudio's docs
# quote an older resampy (64 zeros, roll-off 0.9476); that filter keeps ~2 dB more energy at
# 7.2 kHz and moves the top mel bands by up to 0.5 against the reference.
_ZERO_CROSSINGS, _ROLLOFF = 50, 0.9173473712608761
_RESAMPY_KAISER_BEST = dict(
    lowpass_filter_width=_ZERO_CROSSINGS,
    rolloff=_ROLLOFF,
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


class StreamResampler:
    """``resample`` of a waveform that arrives in blocks: ``push(block)`` returns the output
    samples no later input changes, ``finish()`` the rest, and together they are
    ``resample(whole, orig_sr, target_sr)`` (the same filter on the same samples; float
    rounding aside: tests/test_tag.py).

    torchaudio computes the output ``new`` samples at a time, each group from the input samples
    within ``width`` of the ``orig`` ones it stands for (``orig``/``new``: the rates over their
    gcd; ``width`` as its ``_get_sinc_resample_kernel`` computes it). So each push resamples the
    inputs that arrived plus ``context`` (a multiple of ``orig``, more than ``width``) before
    them, and keeps the groups whose inputs are all in.
    """

    def __init__(self, orig_sr: int, target_sr: int):
        if orig_sr <= 0 or target_sr <= 0:
            raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
        self.orig_sr, self.target_sr = orig_sr, target_sr
        g = math.gcd(orig_sr, target_sr)
        self.o, self.n = orig_sr // g, target_sr // g
        width = math.ceil(_ZERO_CROSSINGS * self.o / (min(self.o, self.n) * _ROLLOFF))
        self.context = self.o * (width // self.o + 2)
        self._buf = np.zeros(0, np.float32)
        self._base = 0  # the input index of _buf[0]
        self._done = 0  # output groups given out
        self._seen = 0  # input samples pushed
        self._given = 0  # output samples given out

    def push(self, block: np.ndarray) -> np.ndarray:
        """Take the next input samples (float32 ``(k,)``); the output samples now final."""
        if self.orig_sr == self.target_sr:
            self._seen += len(block)
            return block
        self._buf = np.concatenate([self._buf, block.astype(np.float32, copy=False)])
        self._seen += len(block)
        ready = (self._seen - self.o - self.context) // self.o + 1  # groups whose inputs all arrived
        return self._groups(ready) if ready > self._done else np.zeros(0, np.float32)

    def finish(self) -> np.ndarray:
        """The output samples left; the total is ``floor(inputs * target_sr / orig_sr)``, as
        ``resample`` gives."""
        if self.orig_sr == self.target_sr:
            return np.zeros(0, np.float32)
        left = self._seen * self.target_sr // self.orig_sr - self._given
        out = self._groups(None) if self._seen > self._done * self.o else np.zeros(0, np.float32)
        return out[:left]

    def _groups(self, until: int | None) -> np.ndarray:
        """Output groups ``_done`` to ``until`` (None: to the end, the input's end padded with
        zeros as ``resample`` pads it)."""
        first = self._done * self.o
        lo = max(0, first - self.context)  # a multiple of o: the groups line up with the whole's
        part = torch.from_numpy(np.ascontiguousarray(self._buf[lo - self._base :]))
        y = AF.resample(part, self.orig_sr, self.target_sr, **_RESAMPY_KAISER_BEST).numpy()
        skip = (first - lo) // self.o * self.n
        out = y[skip:] if until is None else y[skip : skip + (until - self._done) * self.n]
        if until is not None:
            self._done = until
            keep = max(0, self._done * self.o - self.context)
            self._buf, self._base = self._buf[keep - self._base :], keep
        self._given += len(out)
        return out


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


def _not_decodable(path: Path, exc: BaseException) -> AudioDecodeError:
    # libsndfile says "File does not exist or is not a regular file" for any file it cannot
    # parse, so the message says what it usually means here before quoting it.
    return AudioDecodeError(
        f"{path}: cannot decode audio: not an audio file, or truncated before its first complete frame (libsndfile: {exc})"
    )


_SNDFILE_ERRORS = (sf.LibsndfileError, RuntimeError, OSError, ValueError)


def _open_sndfile(path: Path) -> sf.SoundFile:
    """``path`` opened by libsndfile; ``AudioDecodeError`` for a missing, empty or undecodable
    file, ``DamagedAudioError`` for one cut short of what its header declares."""
    try:
        if path.stat().st_size == 0:
            raise AudioDecodeError(f"{path}: empty file (0 bytes)")
        f = sf.SoundFile(str(path))
    except AudioDecodeError:
        raise
    except FileNotFoundError:
        if path.is_symlink():
            raise AudioDecodeError(f"{path}: a dangling symbolic link (to {os.readlink(path)})") from None
        raise AudioDecodeError(f"{path}: no such file") from None
    except _SNDFILE_ERRORS as exc:
        raise _not_decodable(path, exc) from exc
    cut = _truncation(path, f)
    if cut:
        f.close()
        raise DamagedAudioError(cut)
    return f


def _mono(data: np.ndarray) -> np.ndarray:
    """``(samples, channels)`` -> ``(samples,)``: channels averaged (as VGGish's reference does)."""
    return data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode ``path`` to a mono float32 waveform ``(samples,)`` at ``sample_rate``.

    Channels are averaged (as VGGish's reference does). Raises ``AudioDecodeError`` for an empty or
    non-audio file and for an mp3 cut before its first complete frame; an mp3 cut later decodes to
    the frames it still holds (a shorter clip), as every mp3 decoder does. A file whose header says
    how long it is (WAV, AIFF) and that holds less is refused as truncated, and one holding NaN or
    infinite samples as damaged (``DamagedAudioError``), naming the file.
    """
    path = Path(path)
    with _open_sndfile(path) as f:
        try:
            data, sr = f.read(dtype="float32", always_2d=True), f.samplerate
        except _SNDFILE_ERRORS as exc:
            raise _not_decodable(path, exc) from exc
    if data.shape[0] == 0:
        raise AudioDecodeError(f"{path}: no audio samples")
    _check_finite(path, data)
    wave = _mono(data)
    if sr != sample_rate:
        wave = resample(wave, sr, sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


# What to install when no audioread backend can read a file (audioread finds ffmpeg on PATH).
INSTALL_FFMPEG = (
    "install ffmpeg (Debian/Ubuntu: apt-get install ffmpeg; macOS: brew install ffmpeg; conda: conda install ffmpeg)"
)


def decode_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """``stream_audio``'s blocks joined: the whole file, mono float32 ``(samples,)`` at
    ``sample_rate``."""
    return np.concatenate(list(stream_audio(path, sample_rate)))


# Input frames decoded at once by ``stream_audio``: 20 s at 44.1 kHz (7 MB of float32 stereo).
BLOCK_FRAMES = 1 << 20


def stream_audio(path: str | Path, sample_rate: int = 16000, block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Decode ``path`` block by block: mono float32 ``(k,)`` blocks at ``sample_rate`` (channels
    averaged, resampled by ``StreamResampler``) whose concatenation is the whole file, so that
    memory does not grow with the file's length. libsndfile first, else audioread (ffmpeg).

    Raises ``AudioDecodeError`` on one line: an empty file, a file neither decoder reads (naming
    ffmpeg as what to install when no audioread backend is there), no samples at all; its
    ``DamagedAudioError`` (no fallback to ffmpeg) for a file cut short of its header's length or
    holding NaN or infinite samples.
    """
    path = Path(path)
    try:
        f = _open_sndfile(path)
    except DamagedAudioError:  # ffmpeg would read the same damage
        raise
    except AudioDecodeError as first:
        if not path.is_file() or path.stat().st_size == 0:
            raise
        blocks, sr = _audioread_blocks(path, first, block_frames)
    else:
        blocks, sr = _sndfile_blocks(path, f, block_frames), f.samplerate
    resampler = StreamResampler(sr, sample_rate)
    total = 0
    for block in blocks:
        total += len(block)
        out = resampler.push(block)
        if len(out):
            yield out
    if total == 0:
        raise AudioDecodeError(f"{path}: no audio samples")
    tail = resampler.finish()
    if len(tail):
        yield tail


def _sndfile_blocks(path: Path, f: sf.SoundFile, block_frames: int) -> Iterator[np.ndarray]:
    with f:
        while True:
            try:
                data = f.read(block_frames, dtype="float32", always_2d=True)
            except _SNDFILE_ERRORS as exc:
                raise _not_decodable(path, exc) from exc
            if data.shape[0] == 0:
                return
            _check_finite(path, data)
            yield _mono(data)


def _audioread_blocks(
    path: Path, sndfile_error: AudioDecodeError, block_frames: int
) -> tuple[Iterator[np.ndarray], int]:
    """The 16-bit samples audioread (ffmpeg) decodes ``path`` to, as mono float32 blocks of
    ``block_frames`` frames, and their sample rate: what ``librosa.load`` computes from them,
    without joining them.

    audioread's ffmpeg reader queues everything ffmpeg writes, without bound, while the caller
    tags: a long file would end up decoded whole in memory. So audioread only opens the file (it
    reads ffmpeg's description of the stream: rate, channels) and its own command,
    ``ffmpeg -i FILE -f s16le -``, is run here through a pipe read ``block_frames`` at a time:
    ffmpeg waits while a block is tagged.
    """
    import audioread
    import audioread.ffdec

    backends = audioread.available_backends()  # the stdlib wav/aiff reader, and ffmpeg if on PATH
    ffmpeg = audioread.ffdec.FFmpegAudioFile
    if ffmpeg not in backends:
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
    channels, sr = reader.channels, int(reader.samplerate)
    frame = 2 * channels  # bytes per frame of 16-bit samples

    def to_mono(data: bytes) -> np.ndarray:
        # librosa.util.buf_to_float: int16 -> float32 / 32768
        samples = np.frombuffer(data[: len(data) - len(data) % frame], "<i2").astype(np.float32) * (1 / 32768)
        return _mono(samples.reshape(-1, channels))

    def piped() -> Iterator[np.ndarray]:
        reader.close()  # its description is all that was needed
        command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "s16le", "-"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            assert proc.stdout is not None
            while data := proc.stdout.read(block_frames * frame):  # whole blocks until the end
                yield to_mono(data)
        finally:
            proc.kill()
            proc.wait()

    def read() -> Iterator[np.ndarray]:  # another backend (the stdlib wav/aiff reader): it reads as asked
        with reader:
            for buf in reader:
                yield to_mono(buf)

    return (piped() if isinstance(reader, ffmpeg) else read()), sr
