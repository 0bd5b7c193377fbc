"""Audio decoding: any file soundfile (libsndfile: mp3, wav, flac, ogg) reads -> mono float32.

MTAT's mp3s are 16 kHz already, so they are decoded at their native rate; only other rates are
resampled (see ``mtt.features.resample``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


class AudioDecodeError(RuntimeError):
    """A file that cannot be decoded; the message names the file and the reason."""


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode ``path`` to a mono float32 waveform ``(samples,)`` at ``sample_rate``.

    Channels are averaged (as VGGish's reference does). Raises ``AudioDecodeError`` for an empty or
    non-audio file and for an mp3 cut before its first complete frame; an mp3 cut later decodes to
    the frames it still holds (a shorter clip), as every mp3 decoder does.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise AudioDecodeError(f"{path}: empty file (0 bytes)")
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except AudioDecodeError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as exc:
        # libsndfile says "File does not exist or is not a regular file" for any file it cannot
        # parse, so the message says what it usually means here before quoting it.
        raise AudioDecodeError(f"{path}: cannot decode audio: not an audio file, or truncated before "
                               f"its first complete frame (libsndfile: {exc})") from exc
    if data.shape[0] == 0:
        raise AudioDecodeError(f"{path}: no audio samples")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != sample_rate:
        from mtt.features import resample

        wave = resample(wave, sr, sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)
