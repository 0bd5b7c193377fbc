"""Synthesis for the embedded dataset: DSP building blocks, instruments, ``render_clip``.

The audio *carries* its labels: each clip is rendered from a small recipe (one instrument or an
ambient pad, optionally a drum kit or a techno groove, optionally a female or male voice, a tempo
and a loudness), and its tags are a deterministic function of that recipe, so a model can learn
them. The tags differ in spectral and temporal texture (timbre, onset rate, level, pitch range),
not in fine detail, because the downstream model is a random-init frozen VGGish with a small head.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.signal import butter, fftconvolve, lfilter

from mtt.data.embedded.labels import _recipe_from_tags

# ---------------------------------------------------------------------------------------------
# DSP building blocks (numpy/scipy, vectorised; a clip renders in tens of milliseconds).
# ---------------------------------------------------------------------------------------------


def _reverb(x: np.ndarray, sr: int, rng: np.random.Generator, decay: float, wet: float) -> np.ndarray:
    """A hall: ``x`` plus its convolution with exponentially decaying noise (``decay`` s)."""
    t = np.arange(int(min(4 * decay, 2.0) * sr)) / sr
    ir = rng.normal(0, 1, t.size) * np.exp(-t / decay)
    return x + wet * fftconvolve(x, ir / np.sqrt(np.sum(ir**2)))[: x.size]


def _midi_hz(m):
    return 440.0 * 2.0 ** ((np.asarray(m, dtype=np.float64) - 69.0) / 12.0)


def _blep(t: np.ndarray, dt: np.ndarray) -> np.ndarray:
    """PolyBLEP correction that band-limits the jump of a naive sawtooth at phase wrap."""
    out = np.zeros_like(t)
    m = t < dt
    x = t[m] / dt[m]
    out[m] = x + x - x * x - 1.0
    m = t > 1.0 - dt
    x = (t[m] - 1.0) / dt[m]
    out[m] = x * x + x + x + 1.0
    return out


def _saw(cycles: np.ndarray, dt: np.ndarray) -> np.ndarray:
    t = cycles % 1.0
    return 2.0 * t - 1.0 - _blep(t, dt)


def _square(cycles: np.ndarray, dt: np.ndarray) -> np.ndarray:
    return _saw(cycles, dt) - _saw(cycles + 0.5, dt)


def _filt(x: np.ndarray, sr: int, kind: str, cutoff, order: int = 2) -> np.ndarray:
    b, a = butter(order, cutoff, btype=kind, fs=sr)
    return lfilter(b, a, x)


def _resonator(x: np.ndarray, sr: int, freq: float, q: float) -> np.ndarray:
    """Constant-peak band-pass biquad (RBJ): a formant or body resonance."""
    w0 = 2.0 * math.pi * min(freq, 0.45 * sr) / sr
    alpha = math.sin(w0) / (2.0 * q)
    return lfilter([alpha, 0.0, -alpha], [1.0 + alpha, -2.0 * math.cos(w0), 1.0 - alpha], x)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


def _unit(x: np.ndarray) -> np.ndarray:
    r = _rms(x)
    return x / r if r > 1e-9 else x


def _add(out: np.ndarray, start: int, sound: np.ndarray) -> None:
    """Mix ``sound`` into ``out`` from sample ``start``, cropping at the end."""
    if start >= out.size:
        return
    n = min(sound.size, out.size - start)
    out[start : start + n] += sound[:n]


@dataclass(frozen=True)
class _Notes:
    """A monophonic line: onsets and durations in seconds, pitches in MIDI numbers."""

    onsets: np.ndarray
    durations: np.ndarray
    midis: np.ndarray


_SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "pentatonic": (0, 2, 4, 7, 9),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
}
_RAGA = (0, 1, 4, 5, 7, 8, 11)  # Bhairav, for the sitar


def _melody(
    rng: np.random.Generator,
    seconds: float,
    period: float,
    lo: int,
    hi: int,
    scale: Sequence[int] | None = None,
    legato: float = 0.95,
) -> _Notes:
    """A random walk over a scale between MIDI ``lo`` and ``hi``, one note every ``period`` s."""
    scale = scale if scale is not None else _SCALES[rng.choice(list(_SCALES))]
    root = int(rng.integers(lo, lo + 12))
    pitches = np.array([root + 12 * o + s for o in range(-1, 5) for s in scale])
    pitches = pitches[(pitches >= lo) & (pitches <= hi)]
    n = int(seconds / period) + 2
    onsets = rng.uniform(0.0, min(0.15, period / 3)) + np.arange(n) * period
    onsets = np.maximum(onsets + rng.normal(0.0, 0.01 * period, n), 0.0)  # a human, not a sequencer
    onsets[0] = min(onsets[0], seconds / 2)  # at least one note, however short the clip
    steps = rng.choice([-2, -1, -1, 1, 1, 2, 3, -3, 0], size=n)
    idx = np.clip(int(rng.integers(0, pitches.size)) + np.cumsum(steps), 0, pitches.size - 1)
    keep = onsets < seconds
    return _Notes(onsets[keep], np.full(keep.sum(), period * legato), pitches[idx[keep]].astype(float))


def _note_envelope(t: np.ndarray, notes: _Notes, attack: float, release: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample gate envelope of a legato line and the time since the current note began."""
    idx = np.searchsorted(notes.onsets, t, side="right") - 1
    valid = idx >= 0
    idx_c = np.clip(idx, 0, None)
    since = np.where(valid, t - notes.onsets[idx_c], 0.0)
    until = notes.onsets[idx_c] + notes.durations[idx_c] - t
    env = np.clip(since / attack, 0, 1) * np.clip(until / release, 0, 1) * valid
    return env, since


def _f0_track(
    t: np.ndarray, notes: _Notes, sr: int, glide: float, vib_rate: float, vib_depth: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample fundamental (Hz) of a legato line with portamento and delayed vibrato."""
    idx = np.clip(np.searchsorted(notes.onsets, t, side="right") - 1, 0, None)
    midi = notes.midis[idx] if notes.midis.size else np.full(t.size, 60.0)
    if glide > 0:
        a = math.exp(-1.0 / (glide * sr))
        midi, _ = lfilter([1 - a], [1, -a], midi, zi=[midi[0] * a])
    _, since = _note_envelope(t, notes, 1.0, 1.0) if notes.onsets.size else (None, t)
    ramp = np.clip((since - 0.12) / 0.25, 0, 1)  # vibrato grows after the attack, as played
    midi = midi + vib_depth * ramp * np.sin(2 * math.pi * vib_rate * t + rng.uniform(0, 2 * math.pi))
    return _midi_hz(midi), since


def _partials(
    f0: float, n: int, sr: int, amps: np.ndarray, taus: np.ndarray, rng: np.random.Generator, stretch: float = 0.0
) -> np.ndarray:
    """Sum of exponentially decaying (optionally inharmonic) partials: struck and plucked strings.

    float32 on purpose: this is the generator's inner loop and its precision is plenty for audio.
    """
    k = np.arange(1, amps.size + 1)
    freqs = k * f0 * np.sqrt(1.0 + stretch * k * k)
    keep = freqs < min(7800.0, 0.45 * sr)
    freqs, amps, taus = freqs[keep], amps[keep], taus[keep]
    t = (np.arange(n) / sr).astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, freqs.size).astype(np.float32)[:, None]
    w = (2 * math.pi * freqs).astype(np.float32)[:, None]
    decay = np.exp(-t[None] / taus.astype(np.float32)[:, None])
    return (amps.astype(np.float32) @ (decay * np.sin(w * t[None] + phase))).astype(np.float64)


class _Tones(dict):
    """Per-clip cache of one note's sound per pitch: a melody repeats few pitches many times."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, midi):
        self[midi] = tone = self.make(midi)
        return tone


def _damped(sound: np.ndarray, sr: int, stop: float, fade: float = 0.06) -> np.ndarray:
    """Damp a ringing note ``stop`` seconds after its onset (a damper or a finger)."""
    i = int(stop * sr)
    if i >= sound.size:
        return sound
    f = max(1, int(fade * sr))
    sound = sound[: i + f].copy()
    sound[i:] *= np.linspace(1.0, 0.0, sound.size - i)
    return sound


def _beat_period(tempo: str, rng: np.random.Generator) -> float:
    lo, hi = {"slow": (0.8, 1.0), "medium": (0.5, 0.6), "fast": (0.3, 0.36)}[tempo]
    return float(rng.uniform(lo, hi))


def _note_period(tempo: str, beat: float) -> float:
    # Notes per second differ ~3x between neighbouring tempos (slow ~0.55, medium ~1.8, fast ~6).
    return beat * {"slow": 2.0, "medium": 1.0, "fast": 0.5}[tempo]


# ---------------------------------------------------------------------------------------------
# Instruments: each returns a (n,) float64 waveform of unspecified level.
# ---------------------------------------------------------------------------------------------


def _guitar(n: int, sr: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """Karplus-Strong plucked string: a noise burst circulating in a lossy delay line."""
    out = np.zeros(n)
    notes = _melody(rng, n / sr, period, 48, 76)
    brightness = rng.uniform(0.3, 0.6)
    for onset, midi in zip(notes.onsets, notes.midis):
        f0 = float(_midi_hz(midi))
        d = max(2, int(round(sr / f0 - 0.5)))  # the two-tap average adds half a sample of delay
        ring = min(n - int(onset * sr), int(min(2.5, max(period * 2.5, 0.4)) * sr))
        if ring <= 0:
            continue
        burst = lfilter([1 - brightness], [1, -brightness], rng.uniform(-1, 1, d))
        g = 10 ** (-3.0 / (f0 * rng.uniform(2.0, 4.0)))  # per-period loss: T60 of 2-4 s
        y = np.zeros(ring + d + 1)
        y[1 : d + 1] = burst
        for s in range(d + 1, y.size, d):
            e = min(s + d, y.size)
            y[s:e] = 0.5 * g * (y[s - d : e - d] + y[s - d - 1 : e - d - 1])
        _add(out, int(onset * sr), y[d + 1 :] * rng.uniform(0.7, 1.0))
    return out


def _piano(n: int, sr: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """Hammered strings: stretched partials with a two-stage decay, melody over bass notes."""
    out = np.zeros(n)
    notes = _melody(rng, n / sr, period, 55, 84)
    bass = _melody(rng, n / sr, period * 4, 36, 52)
    k = np.arange(1, 21)
    amps = np.abs(np.sin(math.pi * k / 7.3)) / k**1.3  # the hammer strikes 1/7 along the string
    hold = min(2.0, period * 3.5)  # the key is held for a few notes, then the damper falls

    def make(midi):
        f0, ring = float(_midi_hz(midi)), int((hold + 0.06) * sr)
        # Two decay stages from two slightly detuned strings: a bright prompt sound that is gone
        # within a second (all partials) and a long after-sound (the lower partials only).
        tone = 0.4 * _partials(f0 * 1.0007, ring, sr, amps[:8], 2.2 / (1 + 0.12 * k[:8]), rng, 4e-4)
        prompt = 0.6 * _partials(f0, min(ring, sr), sr, amps, 0.25 / (1 + 0.15 * k), rng, 4e-4)
        tone[: prompt.size] += prompt
        thump = _filt(rng.normal(0, 1, int(0.01 * sr)), sr, "lowpass", 1500)
        tone[: thump.size] += 0.3 * thump
        return _damped(tone, sr, hold)

    tones = _Tones(make)
    for line, vel in ((notes, 1.0), (bass, 0.6)):
        for onset, midi in zip(line.onsets, line.midis):
            _add(out, int(onset * sr), tones[midi] * vel * rng.uniform(0.7, 1.0))
    # The left hand comps: a triad on every bass note, the texture no monophonic instrument has.
    for onset, midi in zip(bass.onsets, bass.midis):
        for interval in (12, 16, 19) if rng.random() < 0.5 else (12, 15, 19):
            _add(out, int(onset * sr), tones[midi + interval] * 0.45 * rng.uniform(0.8, 1.0))
    return out


def _harpsichord(n: int, sr: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """Quilled plucks: a bright flat spectrum, 8' and 4' registers together, a click at the pluck."""
    out = np.zeros(n)
    notes = _melody(rng, n / sr, period / 2, 53, 86)  # harpsichordists ornament: twice the notes
    k = np.arange(1, 41)
    amps = (0.3 + np.abs(np.sin(math.pi * k * 0.11))) / k**0.45
    taus = 0.9 / (1 + 0.05 * k)
    hold = min(1.5, period * 0.9)

    def make(midi):
        f0, ring = float(_midi_hz(midi)), int((hold + 0.03) * sr)
        tone = _partials(f0, ring, sr, amps, taus, rng) + 0.5 * _partials(2 * f0, ring, sr, amps[:20], taus[:20], rng)
        click = _filt(rng.normal(0, 1, int(0.004 * sr)), sr, "highpass", 3000)
        tone[: click.size] += 2.0 * click
        return _damped(tone, sr, hold, 0.03)

    tones = _Tones(make)
    for onset, midi in zip(notes.onsets, notes.midis):
        _add(out, int(onset * sr), tones[midi] * rng.uniform(0.8, 1.0))
    return out


def _sitar(n: int, sr: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """Buzzing plucked melody with glides (meend) over a tanpura-like drone on Sa and Pa."""
    out = np.zeros(n)
    notes = _melody(rng, n / sr, period, 55, 79, _RAGA)
    ring = int(min(2.0, period * 2 + 0.4) * sr)
    tt = np.arange(ring) / sr
    buzz = rng.uniform(2200, 3200)

    def make(key):
        midi, glide = key
        f0 = _midi_hz(midi - glide * np.exp(-tt / 0.08))  # meend: slide up into the note
        tone = _saw(np.cumsum(f0 / sr), f0 / sr) * np.exp(-tt / 1.2)
        # The jawari bridge gives the sitar its buzz: a strong band around 2-4 kHz.
        tone = 0.4 * tone + _resonator(tone, sr, buzz, 2.0) * 1.6
        return _damped(tone, sr, period * 2.0)

    plucks = _Tones(make)
    for onset, midi in zip(notes.onsets, notes.midis):
        _add(out, int(onset * sr), plucks[(midi, int(rng.choice([0, 0, 1, 2])))] * rng.uniform(0.7, 1.0))
    sa = float(notes.midis.min()) - 12 if notes.midis.size else 43.0
    k = np.arange(1, 31)

    def make(midi):  # type: ignore[no-redef]  # a tanpura string: soft attack, long buzzing (2-4 kHz rich) decay
        amps = (0.2 + (np.abs(k * _midi_hz(midi) - 2500) < 900)) / k**0.3
        amps = amps[k * _midi_hz(midi) < 4000]
        tone = _partials(float(_midi_hz(midi)), int(2.0 * sr), sr, amps, np.full(amps.size, 1.2), rng)
        return tone * np.minimum(1.0, np.arange(tone.size) / (0.05 * sr))

    tanpura = _Tones(make)
    drone = np.zeros(n)
    cycle = rng.uniform(0.9, 1.3)
    for i, onset in enumerate(np.arange(rng.uniform(0, 0.3), n / sr, cycle / 4)):
        _add(drone, int(onset * sr), tanpura[(sa + 7, sa + 12, sa + 12, sa)[i % 4]])
    return out + 0.5 * _unit(drone) * _rms(out)


def _violin(n: int, sr: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """Bowed string: a band-limited sawtooth with vibrato, slow bow attacks and body resonances."""
    t = np.arange(n) / sr
    notes = _melody(rng, n / sr, period, 55, 88, legato=0.97)
    f0, _ = _f0_track(t, notes, sr, 0.03, rng.uniform(5.5, 6.8), rng.uniform(0.25, 0.45), rng)
    env, _ = _note_envelope(t, notes, rng.uniform(0.06, 0.12), 0.05)
    src = _saw(np.cumsum(f0 / sr), f0 / sr) * env
    src += 0.02 * env * rng.normal(0, 1, n)  # bow noise
    body = (
        0.5 * _resonator(src, sr, 290, 3.0)
        + 0.6 * _resonator(src, sr, 480, 3.0)
        + 0.8 * _resonator(src, sr, rng.uniform(2600, 3200), 1.5)
        + 0.25 * src
    )
    return _filt(body, sr, "highpass", 180)


def _flute(n: int, sr: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """Near-sine tone with weak overtones, breath noise, vibrato and a chiff at each attack."""
    t = np.arange(n) / sr
    notes = _melody(rng, n / sr, period, 60, 93, legato=0.9)
    f0, since = _f0_track(t, notes, sr, 0.02, rng.uniform(4.2, 5.2), rng.uniform(0.12, 0.25), rng)
    env, _ = _note_envelope(t, notes, rng.uniform(0.04, 0.08), 0.05)
    ph = 2 * math.pi * np.cumsum(f0 / sr)
    tone = np.sin(ph) + 0.15 * np.sin(2 * ph) + 0.04 * np.sin(3 * ph)
    breath = _filt(rng.normal(0, 1, n), sr, "bandpass", (1500, 6000))
    chiff = np.exp(-since / 0.03)
    tone = tone * env * (1 + 0.05 * np.sin(2 * math.pi * 4.7 * t)) + (0.06 + 0.6 * chiff) * env * breath
    return tone


def _synth(n: int, sr: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """Analog-style lead: two detuned square/saw oscillators, gated with a flat sustain, a sub."""
    t = np.arange(n) / sr
    notes = _melody(rng, n / sr, period, 48, 79, legato=0.85)
    idx = np.clip(np.searchsorted(notes.onsets, t, side="right") - 1, 0, None)
    f0 = _midi_hz(notes.midis[idx])
    osc = _square if rng.random() < 0.5 else _saw
    detune = 2 ** (rng.uniform(5, 12) / 1200)
    sig = (
        osc(np.cumsum(f0 * detune / sr), f0 * detune / sr)
        + osc(np.cumsum(f0 / detune / sr), f0 / detune / sr)
        + 0.6 * np.sin(math.pi * np.cumsum(f0 / sr))
    )  # sine sub-oscillator an octave down
    env, since = _note_envelope(t, notes, 0.005, 0.02)
    env = env * (0.75 + 0.25 * np.exp(-since / 0.08))
    return _filt(sig * env, sr, "lowpass", rng.uniform(2500, 4500))


def _ambient(n: int, sr: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """Slow pads: detuned soft chords that swell over seconds, drenched in a long reverb."""
    t = np.arange(n) / sr
    chord_len = rng.uniform(2.5, 4.0)
    root = int(rng.integers(45, 57))
    scale = _SCALES[rng.choice(["major", "minor"])]
    out = np.zeros(n)
    for start in np.arange(-rng.uniform(0, chord_len), n / sr, chord_len):
        degree = int(rng.integers(0, len(scale)))
        chord = [root + scale[(degree + j) % len(scale)] + 12 * ((degree + j) // len(scale)) for j in (0, 2, 4, 7)]
        # Raised-cosine swell over the chord and half of each neighbour: no audible onsets.
        a, b = max(0, int(start * sr)), min(n, int((start + 2 * chord_len) * sr))
        if b <= a:
            continue
        tt = t[a:b]
        env = np.sin(math.pi * (tt - start) / (chord_len * 2)) ** 2
        for midi in chord:
            for cents in (-7, 7):  # two detuned voices per note beat slowly against each other
                f = float(_midi_hz(midi)) * 2 ** (cents / 1200)
                out[a:b] += env * (
                    np.sin(2 * math.pi * f * tt + rng.uniform(0, 2 * math.pi))
                    + 0.15 * np.sin(4 * math.pi * f * tt + rng.uniform(0, 2 * math.pi))
                )
    air = _filt(rng.normal(0, 1, n), sr, "bandpass", (3000, 7000)) * 0.02 * _rms(out)
    return _reverb(out, sr, rng, rng.uniform(0.4, 0.7), 0.8) + air


_INSTRUMENT_RENDER = {
    "guitar": _guitar,
    "piano": _piano,
    "violin": _violin,
    "flute": _flute,
    "harpsichord": _harpsichord,
    "sitar": _sitar,
    "synth": _synth,
    "ambient": _ambient,
}


# ---------------------------------------------------------------------------------------------
# Rhythm sections and voices.
# ---------------------------------------------------------------------------------------------


def _kick(sr: int, rng: np.random.Generator, f_end: float, decay: float, drive: float) -> np.ndarray:
    """Pitch-swept sine, overdriven so that its harmonics reach above 125 Hz (VGGish's fmin),
    plus a beater click."""
    t = np.arange(int((decay * 4 + 0.05) * sr)) / sr
    f = f_end + rng.uniform(100, 160) * np.exp(-t / 0.03)
    body = np.tanh(drive * np.sin(2 * math.pi * np.cumsum(f) / sr)) * np.exp(-t / decay)
    click = _noise_hit(sr, rng, 0.004, "bandpass", (1500, 5000))
    body[: click.size] += 0.5 * click
    return body


def _noise_hit(sr: int, rng: np.random.Generator, decay: float, kind: str, cutoff) -> np.ndarray:
    t = np.arange(int((decay * 5 + 0.01) * sr)) / sr
    return _unit(_filt(rng.normal(0, 1, t.size), sr, kind, cutoff)) * np.exp(-t / decay)


def _drums(n: int, sr: int, beat: float, rng: np.random.Generator) -> np.ndarray:
    """Acoustic kit: kick on 1 and 3 (and a pickup), a cracking snare on 2 and 4, closed hi-hat
    eighths and a crash at the top of some bars."""
    out = np.zeros(n)
    kick = _kick(sr, rng, rng.uniform(55, 70), 0.1, 1.5)
    t = np.arange(int(0.3 * sr)) / sr
    snare = _noise_hit(sr, rng, 0.09, "bandpass", (900, 7000))[: t.size] + 0.7 * np.sin(
        2 * math.pi * rng.uniform(180, 240) * t
    ) * np.exp(-t / 0.06)
    hat = _noise_hit(sr, rng, 0.03, "highpass", 5000)
    crash = _noise_hit(sr, rng, 0.7, "highpass", 3000)
    start = rng.uniform(0, 0.1)
    # Slow songs are played half-time: the hi-hat only on the beats, so onsets stay sparse.
    half_time = beat > 0.7
    for i, onset in enumerate(np.arange(start, n / sr, beat / 2)):
        s = int(onset * sr)
        if not (half_time and i % 2):
            _add(out, s, hat * rng.uniform(0.4, 0.6))
        pos = i % 8  # eighth notes of a 4/4 bar
        if pos in (0, 4) or (pos == 5 and rng.random() < 0.4):
            _add(out, s, kick * rng.uniform(0.8, 1.0))
        if pos in (2, 6):
            _add(out, s, snare * rng.uniform(0.8, 1.0))
        if pos == 0 and rng.random() < 0.5:
            _add(out, s, 0.25 * crash)
    return out


def _techno(n: int, sr: int, beat: float, rng: np.random.Generator) -> np.ndarray:
    """Four-on-the-floor: a booming kick on every beat, offbeat open hats, 16th closed hats, a
    clap on 2 and 4, and a rolling 16th-note acid bassline."""
    out = np.zeros(n)
    kick = _kick(sr, rng, rng.uniform(45, 55), 0.2, 3.0)
    open_hat = _noise_hit(sr, rng, 0.08, "highpass", 4500)
    closed_hat = _noise_hit(sr, rng, 0.015, "highpass", 6000)
    clap = np.zeros(int(0.25 * sr))
    for d in (0.0, 0.011, 0.023):  # a clap is a few hand hits a few ms apart
        _add(clap, int(d * sr), _noise_hit(sr, rng, 0.04, "bandpass", (900, 3000)))
    root = int(rng.integers(40, 48))
    riff = rng.choice([0, 0, 0, 12, 7, 3, 10], size=16)  # one bar of 16ths, repeated
    cutoffs = rng.uniform(500, 2000, size=16)
    step = beat / 4
    tb = np.arange(int(step * 0.9 * sr)) / sr

    def acid(i):
        f0 = float(_midi_hz(root + riff[i]))
        tone = _saw(np.cumsum(np.full(tb.size, f0 / sr)), np.full(tb.size, f0 / sr)) * np.exp(-tb / (step * 0.5))
        # A resonant filter whose cutoff moves from note to note: the "acid" squelch.
        return 0.4 * tone + _resonator(tone, sr, cutoffs[i], 5.0) * 2.0

    bass = _Tones(acid)
    start = rng.uniform(0, 0.1)
    for i, onset in enumerate(np.arange(start, n / sr, step)):
        s = int(onset * sr)
        _add(out, s, 0.2 * closed_hat)
        _add(out, s, 0.8 * bass[i % 16])
        if i % 4 == 0:
            _add(out, s, kick)
            if (i // 4) % 2 == 1:
                _add(out, s, 0.5 * clap)
        elif i % 4 == 2:
            _add(out, s, 0.5 * open_hat)
    return out


_RHYTHM_RENDER = {"drums": _drums, "techno": _techno}

# Vowel formants (Hz) of an adult male (Peterson & Barney); a female's are ~20 % higher.
_VOWELS = (
    (730, 1090, 2440),
    (530, 1840, 2480),
    (270, 2290, 3010),
    (570, 840, 2410),
    (300, 870, 2240),
    (660, 1720, 2410),
)


def _voice(n: int, sr: int, period: float, voice: str, rng: np.random.Generator) -> np.ndarray:
    """Sung phrases: a glottal sawtooth through vowel formant filters, vibrato, consonants at
    note starts and breaths between phrases. Female: soprano range; male: baritone range."""
    female = voice == "female"
    lo, hi = (64, 81) if female else (40, 57)
    scale_f = 1.2 if female else 1.0
    t = np.arange(n) / sr
    note_period = max(period * 2, 0.35)
    notes = _melody(rng, n / sr, note_period, lo, hi, legato=1.0)
    # Phrases of a few notes separated by breaths: cut every few notes short.
    durs = notes.durations.copy()
    breath_every = int(rng.integers(3, 6))
    durs[breath_every - 1 :: breath_every] *= rng.uniform(0.4, 0.6)
    notes = _Notes(notes.onsets, durs, notes.midis)
    # Singers' vibrato is wider and slower than a violinist's.
    f0, _ = _f0_track(t, notes, sr, 0.04, rng.uniform(4.8, 5.8), rng.uniform(0.5, 0.8), rng)
    src = _saw(np.cumsum(f0 / sr), f0 / sr)
    src = lfilter([0.7], [1, -0.3], src)  # glottal spectral tilt
    src += (0.08 if female else 0.04) * _filt(rng.normal(0, 1, n), sr, "bandpass", (1500, 6000))  # breath
    out = np.zeros(n)
    fade = int(0.03 * sr)
    singer_formant = rng.uniform(2800, 3200) * (1.1 if female else 1.0)  # trained singers' ~3 kHz ring
    for onset, dur in zip(notes.onsets, notes.durations):
        a, b = int(onset * sr), min(n, int((onset + dur) * sr) + fade)
        if b - a < 2 * fade:
            continue
        formants = np.array(_VOWELS[int(rng.integers(0, len(_VOWELS)))]) * scale_f
        seg = src[a:b]
        sung = (
            _resonator(seg, sr, formants[0], 5.0)
            + 0.7 * _resonator(seg, sr, formants[1], 6.0)
            + 0.5 * _resonator(seg, sr, formants[2], 7.0)
            + 0.1 * seg
            + 0.6 * _resonator(seg, sr, singer_formant, 6.0)
        )
        w = np.ones(b - a)
        w[:fade] = np.linspace(0, 1, fade)
        w[-fade:] = np.linspace(1, 0, fade)
        out[a:b] += _unit(sung) * w
        if rng.random() < 0.5:  # a consonant (sh, ch) before the vowel
            _add(
                out,
                max(0, a - int(0.04 * sr)),
                0.3 * _noise_hit(sr, rng, rng.uniform(0.02, 0.05), "bandpass", (2000, 5000)),
            )
    return out


# ---------------------------------------------------------------------------------------------
# render_clip: recipe -> waveform.
# ---------------------------------------------------------------------------------------------

# RMS level of the final mix in dBFS: 14 dB between quiet and normal, 8 dB (and saturation)
# between normal and loud, so that loudness is a property of the clip, not of a mix detail.
_LEVEL_DB = {"quiet": (-40.0, -35.0), "normal": (-24.0, -19.0), "loud": (-11.0, -9.0)}


def render_clip(tags: Iterable[str], seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Render a clip that carries exactly ``tags``.

    ``tags`` must be a complete label set over ``SYNTH_TAGS`` (see ``complete_tags``): at most one
    instrument (or ``ambient``), one rhythm section (``drums`` / ``techno``), one voice
    (``female`` / ``male``, else ``no vocals``), one tempo (``slow`` / ``fast``, else medium) and
    one loudness (``quiet`` / ``loud``, else normal). Everything else (key, melody, tempo within
    its range, mix, noise) is drawn from ``rng``.

    Returns a ``(round(seconds * sample_rate),)`` float32 mono waveform in [-1, 1].
    Raises ``ValueError`` naming the tag for an unknown or non-renderable tag or an inconsistent set.
    """
    if isinstance(tags, str):
        raise TypeError(f"tags must be a collection of tag names, not the string {tags!r}")
    recipe = _recipe_from_tags(tags)
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds!r}")
    if sample_rate < 16000:  # the instruments reach up to 7.5 kHz, VGGish's (and MTAT's) band
        raise ValueError(f"sample_rate must be at least 16000 Hz, got {sample_rate!r}")
    n = int(round(seconds * sample_rate))
    beat = _beat_period(recipe.tempo, rng)
    period = _note_period(recipe.tempo, beat)
    # Each part is rendered, brought to unit RMS, then mixed at a random balance.
    mix = np.zeros(n)
    if recipe.instrument:
        mix += _unit(_INSTRUMENT_RENDER[recipe.instrument](n, sample_rate, period, rng))
    if recipe.rhythm:
        gain = 10 ** (rng.uniform(-6.0, -2.0) / 20) if recipe.instrument else 1.0
        mix += gain * _unit(_RHYTHM_RENDER[recipe.rhythm](n, sample_rate, beat, rng))
    if recipe.voice:
        # Vocals lead the mix, as in most produced music.
        gain = 10 ** (rng.uniform(0.0, 3.0) / 20) if recipe.instrument or recipe.rhythm else 1.0
        mix += gain * _unit(_voice(n, sample_rate, period, recipe.voice, rng))
    if recipe.tempo == "slow" and recipe.instrument != "ambient":
        # Slow songs are produced as ballads: soft and drenched in a long hall reverb.
        mix = _reverb(mix, sample_rate, rng, rng.uniform(0.5, 0.8), rng.uniform(0.6, 0.9))
    # A little coloured noise (tape hiss and room) so that no two clips are exactly clean.
    noise = lfilter([1.0], [1.0, -0.9], rng.normal(0, 1, n))
    mix = _unit(mix) if _rms(mix) > 1e-9 else mix
    mix += 10 ** (-rng.uniform(30, 40) / 20) * _unit(noise)
    lo, hi = _LEVEL_DB[recipe.level]
    mix = _unit(mix) * 10 ** (rng.uniform(lo, hi) / 20)
    if recipe.level == "loud" or np.max(np.abs(mix)) > 0.95:
        mix = 0.95 * np.tanh(mix / 0.95)  # loud masters are saturated; the others rarely touch it
    return np.clip(mix, -1.0, 1.0).astype(np.float32)
