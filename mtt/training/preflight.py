"""What an entry point checks before any MLflow run exists, cheapest first: the backbone's weights
(no data needed), then the clip index and the values that depend on it.

``checked_weights`` resolves ``backbone.weights`` (downloads the official ones when they are not
cached) before anything generates or reads data: an offline ``audioset`` run ends in one line
within seconds, with no dataset generated first. (The tracking store is checked before either, by
the launch hook, ``mtt.analysis.sweeps.PrepareTracking``.)

``exit_if_invalid`` (mtt/config/__init__.py) checks what the config alone decides, and ``data.root`` on
disk; some values can only be judged against the dataset itself: ``data.tags=freqN`` (at most
the tags the annotations have) and ``trainer.batch_size`` (``batch_errors``: a batch whose inputs
alone take more than the machine's memory, or under ``stream.mode=epoch`` more than the training
clips; ``100000000`` used to grow memory until the machine gave out before the first step).
``checked_index`` reads the index (generating the embedded dataset first, as training would) and
ends the process with one line and exit status 2 when one of them is out of bounds, so no FAILED
run is left behind.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from mtt.data.datasets import index_from_config
from mtt.data.index import ClipIndex

if TYPE_CHECKING:
    from mtt.models.weights import WeightsInfo  # torch: imported once the config is valid


def _exit(errors: list[str], status: int = 2) -> NoReturn:
    """``error: <errors>`` on one line, then exit ``status`` (2: a bad value)."""
    print(f"error: {'; '.join(errors)}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def checked_weights(cfg) -> WeightsInfo:
    """The backbone's weights (``mtt.models.weights.resolve_weights``), or the end of the process
    in one line: a ``backbone.weights`` path that is no file is a bad value (exit status 2);
    official weights neither cached nor downloadable (offline, a hash mismatch) exit 1, as an
    unreachable tracking server does, naming the URL, the cache path and the override to use."""
    from mtt.core.fetch import DownloadError
    from mtt.models.weights import weights_from_config

    try:
        return weights_from_config(cfg.backbone, progress=cfg.trainer.progress)
    except FileNotFoundError as e:
        _exit([str(e)])
    except DownloadError as e:
        _exit([str(e)], status=1)


def machine_memory() -> int:
    """Bytes of this machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def batch_errors(cfg, index: ClipIndex, memory: int | None = None) -> list[str]:
    """One line when ``trainer.batch_size`` is beyond what training can ever make of ``index``.

    The pescador mux draws patches with replacement, so a batch bigger than the training split's
    patches is legitimate (the report's presets keep one patch per clip; on a small dataset their
    batch of 32 repeats some); what no stream can hold is a batch whose float32 inputs alone
    (patches, or the backbone's encodings where training reads the backbone cache:
    ``mtt.models.training_input_shape``) take more than the machine's ``memory`` (by default
    ``machine_memory()``): the model's activations only add to it. ``stream.mode=epoch`` batches
    distinct clips, so there a batch holds at most the training clips.
    """
    from mtt.features.streams import EPOCH
    from mtt.models import training_input_shape  # torch: only once the config is valid

    batch, clips = cfg.trainer.batch_size, len(index.subset("train"))
    if cfg.stream.mode == EPOCH and batch > clips:
        return [
            f"trainer.batch_size={batch}: expected at most {clips}, the training clips (stream.mode=epoch "
            "batches distinct clips)"
        ]
    shape = training_input_shape(cfg)
    if shape is None:
        return []  # unknown (a backbone of one's own the meta device cannot run): no bound
    per_input = 4 * math.prod(shape)  # float32
    memory = machine_memory() if memory is None else memory
    if batch * per_input > memory:
        return [
            f"trainer.batch_size={batch}: one batch of training inputs alone takes {_gib(batch * per_input)} "
            f"({per_input} bytes each, float32 {' x '.join(map(str, shape))}), more than this machine's "
            f"{_gib(memory)} of memory"
        ]
    return []


def checked_index(cfg, batch: bool = True) -> ClipIndex:
    """The clip index of ``cfg.data``, or the end of the process (``error: <what>``, exit status
    2) when it cannot be read (``data.tags=freqN`` beyond the annotations' tags, missing or
    malformed annotations, a ``data.root`` in the way) or when ``trainer.batch_size`` is more than
    training can make of it (``batch_errors``; ``batch``: for the commands that train)."""
    try:
        index = index_from_config(cfg.data, progress=cfg.trainer.progress)
        errors = batch_errors(cfg, index) if batch else []
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        errors = [str(e).replace("\n", " ")]
    if errors:
        _exit(errors)
    return index


@dataclass(frozen=True)
class Checked:
    """What the preflight read and resolved, handed to the job so it is not done twice."""

    index: ClipIndex
    weights: WeightsInfo


def checked(cfg, batch: bool = True) -> Checked:
    """``checked_weights`` then ``checked_index`` (``batch``: for the commands that train): the
    check that needs no data first, so a failure there leaves no data work behind."""
    weights = checked_weights(cfg)
    return Checked(checked_index(cfg, batch), weights)
