"""VGGish log-mel front end in torch, numerically equal to Google's reference.

The reference is ``vggish_input.waveform_to_examples`` / ``mel_features`` (tensorflow/models,
copied into torchvggish): 16 kHz mono, 25 ms periodic Hann window, 10 ms hop, FFT size the next
power of two, magnitude spectrum, an HTK-mel filterbank with the DC bin zeroed, ``log(mel +
0.01)``, only complete windows, then 96-frame patches. Constants are built in float64 as the
reference builds them; see :class:`LogMelFrontEnd` for which steps need float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from mtt.config import FeaturesConfig
from mtt.data.audio import resample


def _periodic_hann(n: int) -> torch.Tensor:
    """``(n,)`` float64 periodic Hann window, written as mel_features.periodic_hann."""
    return 0.5 - 0.5 * torch.cos(2 * math.pi / n * torch.arange(n, dtype=torch.float64))


def _hz_to_mel(hz):
    """HTK mel scale, as mel_features.hertz_to_mel."""
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_matrix(cfg: FeaturesConfig, n_bins: int) -> torch.Tensor:
    """The reference's ``spectrogram_to_mel_matrix``: float64 ``(n_bins, n_mels)``.

    Triangles linear in HTK mel between ``cfg.fmin`` and ``cfg.fmax``; the DC bin is zeroed.
    """
    nyquist = cfg.sample_rate / 2.0
    if not 0.0 <= cfg.fmin < cfg.fmax <= nyquist:
        raise ValueError(f"need 0 <= fmin < fmax <= Nyquist ({nyquist}), got fmin={cfg.fmin}, fmax={cfg.fmax}")
    bins_mel = _hz_to_mel(np.linspace(0.0, nyquist, n_bins))[:, None]
    edges = np.linspace(_hz_to_mel(cfg.fmin), _hz_to_mel(cfg.fmax), cfg.n_mels + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel - lower) / (center - lower)
    falling = (upper - bins_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0  # HTK excludes the DC bin
    return torch.from_numpy(weights)


class PatchFrontEnd(torch.nn.Module):
    """What every front end shares: ``cfg`` (FeaturesConfig), ``frames(n_samples)`` and
    ``patches(waveforms, n_patches)`` per front end; the patch count and shape checks here.

    forward: ``(batch, samples)`` waveforms at ``cfg.sample_rate`` ->
    float32 ``(batch, n_patches, patch_frames, n_mels)`` = (batch, patch, time, mel).
    """

    cfg: FeaturesConfig
    hop: int  # samples between frames
    n_fft: int  # samples a frame's FFT reads
    # Patches at each inner edge of a window (``stream``) that can differ from the whole clip's:
    # those whose frames reach past the window (centred frames read n_fft / 2 before their centre).
    edge_patches = 0

    def frames(self, n_samples: int) -> int:
        raise NotImplementedError

    def samples_for_frames(self, frames: int) -> int:
        """The fewest samples that make ``frames`` frames (the inverse of ``frames``)."""
        raise NotImplementedError

    def patches(self, waveforms: torch.Tensor, n_patches: int) -> torch.Tensor:
        raise NotImplementedError

    def n_patches(self, n_samples: int) -> int:
        """Complete patches in a clip of ``n_samples`` (no partial patch is ever padded)."""
        frames = self.frames(n_samples)
        p, ph = self.cfg.patch_frames, self.cfg.patch_hop_frames
        return 0 if frames < p else 1 + (frames - p) // ph

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``(batch, samples)`` -> float32 ``(batch, n_patches, patch_frames, n_mels)``."""
        if waveforms.dim() != 2:
            raise ValueError(f"expected (batch, samples), got shape {tuple(waveforms.shape)}")
        batch, n = waveforms.shape
        n_patches = self.n_patches(n)
        if n_patches == 0:
            return torch.zeros(batch, 0, self.cfg.patch_frames, self.cfg.n_mels, device=waveforms.device)
        return self.patches(waveforms, n_patches)

    def stream(self, blocks: Iterable[torch.Tensor], window_patches: int = 32) -> Iterator[torch.Tensor]:
        """The patches of one clip that arrives in blocks of samples (``(k,)`` tensors at
        ``cfg.sample_rate``), about ``window_patches`` at a time: together
        ``self(whole[None])[0]``, the same frames of the same samples (float rounding aside),
        while only a window of samples and its patches are in memory.

        Each window starts on a patch boundary (frames line up with the whole clip's) with
        ``edge_patches`` patches of context on either side, computed and dropped.
        """
        step = self.cfg.patch_hop_frames * self.hop  # samples from one patch's start to the next
        edge = self.edge_patches
        window = (window_patches + 2 * edge) * step + self.cfg.patch_frames * self.hop + self.n_fft
        buf = torch.zeros(0)
        base = 0  # the sample index of buf[0]
        given = 0  # patches given out
        for block in blocks:
            buf = torch.cat([buf, block])
            while True:
                first = max(0, given - edge)  # the window's first patch, context included
                start = first * step - base
                if len(buf) - start < window:
                    break
                patches = self(buf[None, start : start + window])[0]
                keep = patches[given - first : len(patches) - edge]
                given += len(keep)
                yield keep
            drop = max(0, given - edge) * step - base
            buf, base = buf[drop:], base + drop
        first = max(0, given - edge)
        rest = self(buf[None, first * step - base :])[0]
        yield rest[given - first :]


class LogMelFrontEnd(PatchFrontEnd):
    """Batched VGGish log-mel patches; window and mel matrix are buffers, so ``.to(device)``
    moves the whole computation.

    Precision: framing and FFT run in ``fft_dtype`` (float64 by default). In float32 the FFT's
    rounding of a loud component leaks into quiet bins at ~1e-7 of its level, and ``log(mel +
    0.01)`` magnifies that to ~1e-3 for a full-scale tone. Power, mel and log run in float32:
    each is a per-bin product or a sum of positive terms, so float32 keeps their relative error
    ~1e-7. Measured against the reference: <= 1e-5 (tests/test_features.py).

    Threads: a 29 s clip takes ~3 ms with 2 torch threads and ~5.5 ms with 1 on a quiet 2-core
    CPU (the numpy reference ~9-15 ms), but torch's OpenMP threads stall when other processes
    take the cores (100x slower measured). Parallel preprocessing should run one process per
    core with ``torch.set_num_threads(1)`` (tests/benchmarks/bench_frontend.py).

    forward: ``(batch, samples)`` waveforms at ``cfg.sample_rate`` ->
    float32 ``(batch, n_patches, patch_frames, n_mels)`` = (batch, patch, time, mel).
    """

    cpu_block_frames = 1024  # frames computed at once on CPU (see forward)

    window: torch.Tensor  # buffers, registered in __init__
    mel: torch.Tensor

    def __init__(self, cfg: FeaturesConfig | None = None, fft_dtype: torch.dtype = torch.float64):
        super().__init__()
        cfg = cfg or FeaturesConfig()
        self.cfg = cfg
        # Same rounding as mel_features.log_mel_spectrogram.
        self.win = int(round(cfg.sample_rate * cfg.window_seconds))
        self.hop = int(round(cfg.sample_rate * cfg.hop_seconds))
        self.n_fft = 2 ** int(math.ceil(math.log(self.win) / math.log(2.0)))
        # The Hann window followed by n_fft - win zeros: windowing n_fft-long frames with it is
        # the reference's zero-padded FFT input, without a padding copy per frame.
        window = torch.nn.functional.pad(_periodic_hann(self.win), (0, self.n_fft - self.win))
        self.register_buffer("window", window.to(fft_dtype), persistent=False)
        mel = mel_matrix(cfg, self.n_fft // 2 + 1).float()
        self.register_buffer("mel", mel, persistent=False)

    def frames(self, n_samples: int) -> int:
        """Complete windows only (no padding anywhere, as the reference)."""
        return 0 if n_samples < self.win else 1 + (n_samples - self.win) // self.hop

    def samples_for_frames(self, frames: int) -> int:
        return self.win + (frames - 1) * self.hop

    def patches(self, waveforms: torch.Tensor, n_patches: int) -> torch.Tensor:
        batch = waveforms.shape[0]
        p, ph = self.cfg.patch_frames, self.cfg.patch_hop_frames
        # Only frames inside whole patches (the reference drops the rest too).
        n_frames = (n_patches - 1) * ph + p
        # On CPU ~1000 frames at a time: the float64 spectra of a whole 29 s clip take 12 MB,
        # which glibc hands out as fresh pages on every call (page faults cost more than the
        # FFT) and which fall out of cache. Measured with 1 thread: a batch of 32 runs 5x faster
        # per clip in blocks, a single clip 1.3x.
        block = max(1, self.cpu_block_frames // batch) if waveforms.is_cpu else n_frames
        log_mel = self.mel.new_empty(batch, n_frames, self.cfg.n_mels)
        for start in range(0, n_frames, block):
            stop = min(start + block, n_frames)
            log_mel[:, start:stop] = self._log_mel(waveforms[:, start * self.hop :], stop - start)
        # unfold puts the window last: (batch, patch, mel, time) -> (batch, patch, time, mel)
        return log_mel.unfold(1, p, ph).transpose(-1, -2).contiguous()

    def _log_mel(self, x: torch.Tensor, n_frames: int) -> torch.Tensor:
        """The first ``n_frames`` frames of ``(batch, samples)`` -> float32 (batch, frames, mel)."""
        length = (n_frames - 1) * self.hop + self.n_fft
        x = x[:, :length].to(self.window.dtype)
        if x.shape[-1] < length:  # the last frame's n_fft - win zero tail may pass the clip's end
            x = torch.nn.functional.pad(x, (0, length - x.shape[-1]))
        spectrum = torch.fft.rfft(x.unfold(-1, self.n_fft, self.hop) * self.window)
        re_im = torch.view_as_real(spectrum).float()  # per-element cast: relative error 6e-8
        # |X| = sqrt(re^2 + im^2) in place; several times faster than complex abs() on CPU.
        power = re_im.mul_(re_im)
        magnitude = power[..., 0].add(power[..., 1]).sqrt_()  # (batch, frames, n_fft/2+1)
        return torch.log(magnitude @ self.mel + self.cfg.log_offset)


class MelDbFrontEnd(PatchFrontEnd):
    """torchaudio's ``MelSpectrogram`` then ``AmplitudeToDB``, as Won et al. 2020 compute the input
    of their short-chunk CNNs (``features=shortchunk``: 16 kHz, n_fft = window = 512, hop 256,
    128 HTK mel bands 0-8000 Hz, power 2, ``10 log10(max(x, 1e-10))``), in 2-D patches.

    Frames are centred (torchaudio's default: the clip is reflect-padded by n_fft / 2 at both
    ends), so a chunk of ``s`` samples has ``1 + s // hop`` frames: 231 for their 59,049-sample
    chunk. They compute each chunk's spectrogram on its own; here the clip's is computed once and
    cut into ``patch_frames``-frame patches every ``patch_hop_frames``, so only a patch's first and
    last two frames can differ from theirs (real neighbours instead of reflected ones).

    forward: ``(batch, samples)`` waveforms at ``cfg.sample_rate`` ->
    float32 ``(batch, n_patches, patch_frames, n_mels)`` = (batch, patch, time, mel).
    """

    def __init__(self, cfg: FeaturesConfig):
        super().__init__()
        import torchaudio.transforms as T

        self.cfg = cfg
        self.n_fft = int(round(cfg.sample_rate * cfg.window_seconds))
        self.hop = int(round(cfg.sample_rate * cfg.hop_seconds))
        # Centred frames: a window's first and last patches read n_fft / 2 past its edges.
        self.edge_patches = math.ceil(self.n_fft / 2 / (cfg.patch_hop_frames * self.hop))
        self.spec = T.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=self.n_fft,
            hop_length=self.hop,
            f_min=cfg.fmin,
            f_max=cfg.fmax,
            n_mels=cfg.n_mels,
        )
        self.to_db = T.AmplitudeToDB()

    def frames(self, n_samples: int) -> int:
        """Centred frames: ``1 + n // hop`` (the reflect padding needs more than n_fft / 2 samples)."""
        return 1 + n_samples // self.hop if n_samples > self.n_fft // 2 else 0

    def samples_for_frames(self, frames: int) -> int:
        return max((frames - 1) * self.hop, self.n_fft // 2 + 1)

    def patches(self, waveforms: torch.Tensor, n_patches: int) -> torch.Tensor:
        p, ph = self.cfg.patch_frames, self.cfg.patch_hop_frames
        db = self.to_db(self.spec(waveforms.float()))  # (batch, mel, frames)
        frames = db[..., : (n_patches - 1) * ph + p]
        # unfold puts the window last: (batch, mel, patch, time) -> (batch, patch, time, mel)
        return frames.unfold(-1, p, ph).permute(0, 2, 3, 1).contiguous()


# features.name -> front end class (FeaturesConfig) with n_patches(samples) and the forward above;
# the names features.name may take (mtt.config.all_rules reads them here).
FRONT_ENDS = {"vggish": LogMelFrontEnd, "mel_db": MelDbFrontEnd}


def build_front_end(cfg: FeaturesConfig) -> PatchFrontEnd:
    """The front end ``cfg.name`` names (a config without the key is VGGish's)."""
    return FRONT_ENDS[getattr(cfg, "name", "vggish")](cfg)


def log_mel_patches(waveform, sample_rate: int, cfg: FeaturesConfig | None = None) -> torch.Tensor:
    """The patches of one mono clip under ``cfg`` (by default VGGish's log-mel, as the reference
    ``waveform_to_examples``).

    Args:
        waveform: 1-D numpy array or tensor ``(samples,)``; resampled (see :func:`resample`)
            when ``sample_rate != cfg.sample_rate``.
    Returns:
        float32 ``(n_patches, patch_frames, n_mels)`` = (patch, time, mel), on the input's
        device; ``(0, 96, 64)`` for a clip shorter than one patch.
    """
    cfg = cfg or FeaturesConfig()
    if waveform.ndim != 1:
        raise ValueError(f"expected a 1-D mono waveform (samples,), got shape {tuple(waveform.shape)}")
    x = torch.as_tensor(waveform)
    x = resample(x if x.is_floating_point() else x.float(), sample_rate, cfg.sample_rate)
    front = build_front_end(cfg).to(x.device)
    return front(x[None])[0]
