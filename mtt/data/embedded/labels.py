"""The embedded dataset's label grammar: the components a clip is built from and the tags each one
implies. Only ``SYNTH_TAGS`` are ever positive; the other 168 MTAT columns are all zero, as most
MTAT columns are nearly so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mtt.data.tags import TAGS

# Exactly one instrument (or the ambient pad) per generated clip; render_clip also accepts none.
INSTRUMENTS: dict[str, tuple[str, ...]] = {
    "guitar": ("guitar",),
    "piano": ("piano",),
    "violin": ("violin",),
    "flute": ("flute",),
    "harpsichord": ("harpsichord",),
    "sitar": ("sitar",),
    "synth": ("synth", "electronic"),
    "ambient": ("ambient", "slow"),  # long pads without onsets are slow by construction
}
RHYTHMS: dict[str, tuple[str, ...]] = {
    "drums": ("drums", "beat"),  # acoustic kit: kick, snare on 2 and 4, hi-hat eighths
    "techno": ("techno", "electronic", "beat"),  # four-on-the-floor 808 kick, offbeat hats, bass
}
VOICES: dict[str, tuple[str, ...]] = {"female": ("female", "vocal"), "male": ("male", "vocal")}
NO_VOICE = "no vocals"
# Tempo (slow | medium | fast) and loudness (quiet | normal | loud): the middle carries no tag.

SYNTH_TAGS: tuple[str, ...] = tuple(
    t
    for t in TAGS
    if t
    in {
        *(t for tags in (*INSTRUMENTS.values(), *RHYTHMS.values(), *VOICES.values()) for t in tags),
        NO_VOICE,
        "fast",
        "slow",
        "loud",
        "quiet",
    }
)
# Which components a tag that is only ever implied needs (for error messages).
_IMPLIED_BY = {"electronic": ("synth", "techno"), "beat": ("drums", "techno"), "vocal": ("female", "male")}


@dataclass(frozen=True)
class Recipe:
    """What a clip is made of; ``tags()`` is the clip's exact label set."""

    instrument: str | None = None
    rhythm: str | None = None
    voice: str | None = None
    tempo: str = "medium"
    level: str = "normal"

    def tags(self) -> frozenset[str]:
        tags: set[str] = set()
        if self.instrument:
            tags.update(INSTRUMENTS[self.instrument])
        if self.rhythm:
            tags.update(RHYTHMS[self.rhythm])
        tags.update(VOICES[self.voice] if self.voice else (NO_VOICE,))
        if self.tempo != "medium":
            tags.add(self.tempo)
        if self.level != "normal":
            tags.add(self.level)
        return frozenset(tags)


def _recipe_from_tags(tags: Iterable[str]) -> Recipe:
    """Parse a label set into the recipe it names; ``ValueError`` if it is not renderable."""
    tags = set(tags)
    for tag in sorted(tags):
        if tag not in SYNTH_TAGS:
            where = "an MTAT tag the generator cannot render" if tag in TAGS else "not an MTAT tag"
            raise ValueError(f"tag {tag!r} is {where}; renderable tags: {', '.join(SYNTH_TAGS)}")

    def one_of(group: Iterable[str], what: str) -> str | None:
        found = [g for g in group if g in tags]
        if len(found) > 1:
            raise ValueError(f"tags {found} conflict: a clip has at most one {what}")
        return found[0] if found else None

    instrument = one_of(INSTRUMENTS, "instrument (or ambient pad)")
    rhythm = one_of(RHYTHMS, "rhythm section (drums or techno)")
    voice = one_of(VOICES, "voice (female or male)")
    tempo = one_of(("slow", "fast"), "tempo (slow or fast)") or "medium"
    level = one_of(("quiet", "loud"), "loudness (quiet or loud)") or "normal"
    if instrument == "ambient":
        if tempo == "fast" or rhythm:
            raise ValueError(
                f"'ambient' (beatless slow pads) cannot be rendered with {'fast' if tempo == 'fast' else rhythm!r}"
            )
        tempo = "slow"
    if voice and NO_VOICE in tags:
        raise ValueError(f"tags {voice!r} and {NO_VOICE!r} conflict")
    recipe = Recipe(instrument, rhythm, voice, tempo, level)
    expected = recipe.tags()
    if expected != tags:
        extra = sorted(tags - expected)
        if extra:
            needs = _IMPLIED_BY.get(extra[0], ())
            raise ValueError(f"tag {extra[0]!r} is only rendered together with one of {list(needs)}")
        raise ValueError(
            f"tags {sorted(tags)} are not a complete label set: the audio they name also "
            f"carries {sorted(expected - tags)}; pass {sorted(expected)} "
            f"(complete_tags() adds the implied tags)"
        )
    return recipe


def complete_tags(tags: Iterable[str]) -> frozenset[str]:
    """The full label set of the clip that ``tags`` describe: adds the implied tags.

    ``{"techno"}`` -> ``{"techno", "electronic", "beat", "no vocals"}``; ``{"guitar"}`` ->
    ``{"guitar", "no vocals"}``. Tags that only ever follow from others (``electronic``, ``beat``,
    ``vocal``) must come with a tag that implies them.
    """
    tags = set(tags)
    for name, group in (*INSTRUMENTS.items(), *RHYTHMS.items(), *VOICES.items()):
        if name in tags:
            tags.update(group)
    if not tags & set(VOICES):
        tags.add(NO_VOICE)
    return _recipe_from_tags(tags).tags()
