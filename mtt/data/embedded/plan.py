"""The embedded dataset's plan: recipes per folder, songs, artist/album/title names, clip ids and
paths, all a pure function of the seed (rendering draws its own streams, ``mtt.data.embedded.render``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from mtt.data.embedded.labels import INSTRUMENTS, Recipe
from mtt.data.mtat import FOLDERS


@dataclass(frozen=True)
class _Clip:
    folder: int
    index: int  # within the folder: seeds the clip's audio
    clip_id: int
    recipe: Recipe
    mp3_path: str
    info: dict


# Share of clips with each factor. Counts per folder are n * p stochastically rounded, so that the
# default 20 clips per folder give every factor's tag at least 3 positives in every folder (and
# every instrument at least 2), hence both classes of every tag in the valid folder c alone.
_P = {
    "techno": 0.15,
    "drums": 0.15,
    "female": 0.15,
    "male": 0.15,
    "fast": 0.15,
    "slow": 0.15,
    "loud": 0.15,
    "quiet": 0.15,
}

_WORDS_A = (
    "amber",
    "silver",
    "northern",
    "hollow",
    "velvet",
    "crimson",
    "little",
    "distant",
    "paper",
    "golden",
    "winter",
    "evening",
    "open",
    "burning",
    "lantern",
    "iron",
    "blue",
    "early",
)
_WORDS_B = (
    "lake",
    "field",
    "garden",
    "river",
    "orchard",
    "harbour",
    "mirror",
    "station",
    "forest",
    "bridge",
    "lantern",
    "meadow",
    "tower",
    "valley",
    "island",
    "window",
    "shore",
    "road",
)
_SUFFIX = ("", "", "ensemble", "trio", "quartet", "collective", "band", "consort")
_TITLE = (
    "rondo",
    "air",
    "nocturne",
    "dance",
    "song",
    "prelude",
    "lament",
    "reel",
    "etude",
    "theme",
    "march",
    "lullaby",
    "toccata",
    "ballad",
    "study",
    "interlude",
    "suite",
    "waltz",
)


def _display(slug: str) -> str:
    return " ".join(w.capitalize() for w in slug.split("_") if w)


def _slug(name: str) -> str:
    """MTAT's file-name form: lowercase, every non-alphanumeric character an underscore."""
    return re.sub(r"[^a-z0-9]", "_", name.lower())


def _pick(rng: np.random.Generator, eligible: np.ndarray, share: float, n: int) -> np.ndarray:
    k = min(int(math.floor(share * n + rng.random())), eligible.size)
    return rng.choice(eligible, size=k, replace=False) if k else np.zeros(0, dtype=int)


def _folder_recipes(n: int, rng: np.random.Generator) -> list[Recipe]:
    """``n`` recipes with every instrument ~n/8 times and every factor ~15 % of the clips."""
    names = list(INSTRUMENTS)
    order = np.concatenate([rng.permutation(len(names)) for _ in range(-(-n // len(names)))])[:n]
    instrument = np.array([names[i] for i in np.sort(order)])  # sorted: songs group one instrument
    idx = np.arange(n)
    beaty = idx[instrument != "ambient"]  # pads are beatless and slow
    rhythm = np.full(n, None, dtype=object)
    techno = _pick(rng, beaty, _P["techno"], n)
    rhythm[techno] = "techno"
    rhythm[_pick(rng, np.setdiff1d(beaty, techno), _P["drums"], n)] = "drums"
    voice = np.full(n, None, dtype=object)
    female = _pick(rng, idx, _P["female"], n)
    voice[female] = "female"
    voice[_pick(rng, np.setdiff1d(idx, female), _P["male"], n)] = "male"
    tempo = np.full(n, "medium", dtype=object)
    tempo[instrument == "ambient"] = "slow"
    fast = _pick(rng, beaty, _P["fast"], n)
    tempo[fast] = "fast"
    tempo[_pick(rng, np.setdiff1d(beaty, fast), _P["slow"], n)] = "slow"
    level = np.full(n, "normal", dtype=object)
    loud = _pick(rng, idx, _P["loud"], n)
    level[loud] = "loud"
    level[_pick(rng, np.setdiff1d(idx, loud), _P["quiet"], n)] = "quiet"
    return [Recipe(str(instrument[i]), rhythm[i], voice[i], str(tempo[i]), str(level[i])) for i in range(n)]


def _plan(clips_per_folder: int, seconds: float, seed: int) -> list[_Clip]:
    """Every clip of the dataset in row order: folders 0..f, ids increasing with gaps."""
    names_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    artists = []
    for _ in range(12):
        artist = f"{names_rng.choice(_WORDS_A)}_{names_rng.choice(_WORDS_B)}"
        suffix = names_rng.choice(_SUFFIX)
        artist = f"{artist}_{suffix}" if suffix else artist
        albums = [
            f"{names_rng.choice(_WORDS_B)}_{names_rng.choice(('songs', 'pieces', 'works', 'sessions'))}"
            for _ in range(2)
        ]
        artists.append((artist, albums))
    tracks: dict[tuple[str, str], int] = {}
    step = max(1, int(seconds))  # MTAT's 29.1 s clips are named 0-29, 29-58, ...
    clip_id = int(names_rng.integers(2, 10))
    clips = []
    for fi, folder in enumerate(FOLDERS):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, fi)))
        recipes = _folder_recipes(clips_per_folder, rng)
        i = 0
        while i < clips_per_folder:
            # A song: 1-3 consecutive segments that share the instrument (the rest may change,
            # as a song's verse and bridge do).
            length = 1
            while (
                length < 3
                and i + length < clips_per_folder
                and recipes[i + length].instrument == recipes[i].instrument
                and rng.random() < 0.6
            ):
                length += 1
            artist, albums = artists[int(rng.integers(len(artists)))]
            album = albums[int(rng.integers(len(albums)))]
            track = tracks[(artist, album)] = tracks.get((artist, album), 0) + 1
            title = (
                f"{rng.choice(_TITLE)} no. {track}"
                if rng.random() < 0.4
                else f"{rng.choice(_WORDS_A)} {rng.choice(_TITLE)}"
            )
            title_slug = _slug(title)
            first = int(rng.integers(0, 4))
            clip_id += int(rng.integers(1, 12))  # MTAT's ids are increasing with gaps
            for s in range(length):
                start, end = (first + s) * step, (first + s + 1) * step
                path = f"{folder}/{artist}-{album}-{track:02d}-{title_slug}-{start}-{end}.mp3"
                info = {
                    "clip_id": clip_id,
                    "track_number": track,
                    "title": title.title(),
                    "artist": _display(artist),
                    "album": _display(album),
                    "url": f"https://mtt.invalid/artists/{artist}/{album}",
                    "segmentStart": start,
                    "segmentEnd": end,
                    "original_url": f"https://mtt.invalid/audio/{artist}/{album}/{track:02d}-{title_slug}.mp3",
                    "mp3_path": path,
                }
                clips.append(_Clip(fi, i + s, clip_id, recipes[i + s], path, info))
                clip_id += 1
            i += length
    return clips
