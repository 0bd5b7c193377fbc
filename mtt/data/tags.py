"""MagnaTagATune's tag vocabulary: the 188 columns of annotations_final.csv, in header order, and
the standard top-50 subset (Dieleman & Schrauwen 2014 and later work), in frequency order."""

from __future__ import annotations

import numpy as np

TAGS = (
    'no voice', 'singer', 'duet', 'plucking', 'hard rock', 'world', 'bongos', 'harpsichord',
    'female singing', 'clasical', 'sitar', 'chorus', 'female opera', 'male vocal', 'vocals',
    'clarinet', 'heavy', 'silence', 'beats', 'men', 'woodwind', 'funky', 'no strings', 'chimes',
    'foreign', 'no piano', 'horns', 'classical', 'female', 'no voices', 'soft rock', 'eerie',
    'spacey', 'jazz', 'guitar', 'quiet', 'no beat', 'banjo', 'electric', 'solo', 'violins',
    'folk', 'female voice', 'wind', 'happy', 'ambient', 'new age', 'synth', 'funk', 'no singing',
    'middle eastern', 'trumpet', 'percussion', 'drum', 'airy', 'voice', 'repetitive', 'birds',
    'space', 'strings', 'bass', 'harpsicord', 'medieval', 'male voice', 'girl', 'keyboard',
    'acoustic', 'loud', 'classic', 'string', 'drums', 'electronic', 'not classical', 'chanting',
    'no violin', 'not rock', 'no guitar', 'organ', 'no vocal', 'talking', 'choral', 'weird',
    'opera', 'soprano', 'fast', 'acoustic guitar', 'electric guitar', 'male singer',
    'man singing', 'classical guitar', 'country', 'violin', 'electro', 'reggae', 'tribal', 'dark',
    'male opera', 'no vocals', 'irish', 'electronica', 'horn', 'operatic', 'arabic', 'lol', 'low',
    'instrumental', 'trance', 'chant', 'strange', 'drone', 'synthesizer', 'heavy metal', 'modern',
    'disco', 'bells', 'man', 'deep', 'fast beat', 'industrial', 'hard', 'harp', 'no flute',
    'jungle', 'pop', 'lute', 'female vocal', 'oboe', 'mellow', 'orchestral', 'viola', 'light',
    'echo', 'piano', 'celtic', 'male vocals', 'orchestra', 'eastern', 'old', 'flutes', 'punk',
    'spanish', 'sad', 'sax', 'slow', 'male', 'blues', 'vocal', 'indian', 'no singer', 'scary',
    'india', 'woman', 'woman singing', 'rock', 'dance', 'piano solo', 'guitars', 'no drums',
    'jazzy', 'singing', 'cello', 'calm', 'female vocals', 'voices', 'different', 'techno',
    'clapping', 'house', 'monks', 'flute', 'not opera', 'not english', 'oriental', 'beat',
    'upbeat', 'soft', 'noise', 'choir', 'female singer', 'rap', 'metal', 'hip hop', 'quick',
    'water', 'baroque', 'women', 'fiddle', 'english',
)

TOP50 = (
    'guitar', 'classical', 'slow', 'techno', 'strings', 'drums', 'electronic', 'rock', 'fast',
    'piano', 'ambient', 'beat', 'violin', 'vocal', 'synth', 'female', 'indian', 'opera', 'male',
    'singing', 'vocals', 'no vocals', 'harpsichord', 'loud', 'quiet', 'flute', 'woman',
    'male vocal', 'no vocal', 'pop', 'soft', 'sitar', 'solo', 'man', 'classic', 'choir', 'voice',
    'new age', 'dance', 'male voice', 'female vocal', 'beats', 'harp', 'cello', 'no voice',
    'weird', 'country', 'metal', 'female voice', 'choral',
)


def top_by_frequency(tags: tuple[str, ...], labels: np.ndarray, n: int) -> tuple[str, ...]:
    """The ``n`` most frequent tags of ``labels`` ``(n_clips, len(tags))``, most frequent first;
    ties keep header order (a stable sort), so the result is a pure function of the annotations."""
    counts = np.asarray(labels).sum(axis=0, dtype=np.int64)  # signed: uint8 labels sum to uint64, whose negation wraps
    order = np.argsort(-counts, kind="stable")[:n]
    return tuple(tags[i] for i in order)
