"""The embedded dataset, the default: a small MagnaTagATune look-alike generated (seeded) on first
use, in exactly MTAT's on-disk format (``mtt.data.mtat``), so every command works without the real
MTAT. "The embedded dataset" is its one name; ``data=toy`` is its config option and ``data.synth``
its generator's settings (``mtt.data.datasets.ToyConfig``), kept as they are in every documented
command.

Split along the generator's seams, each importing only the ones before it:

- ``labels``: the label grammar (what a clip is made of, ``Recipe``, the tags it implies);
- ``synthesis``: DSP and instruments, ``render_clip`` (recipe -> waveform);
- ``plan``: the dataset plan (recipes per folder, songs, names, clip ids);
- ``render``: rendering the plan and writing it as MTAT files;
- ``cache``: ``ensure_dataset``, generate once, atomically, safely under concurrency.
"""

from mtt.data.embedded.cache import MARKER, SYNTH_VERSION, ensure_dataset
from mtt.data.embedded.labels import SYNTH_TAGS, Recipe, complete_tags
from mtt.data.embedded.synthesis import render_clip
from mtt.data.mtat import SAMPLE_RATE

__all__ = [
    "MARKER",
    "SAMPLE_RATE",
    "SYNTH_TAGS",
    "SYNTH_VERSION",
    "Recipe",
    "complete_tags",
    "ensure_dataset",
    "render_clip",
]
