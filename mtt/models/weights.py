"""Which VGGish weights a run uses: ``backbone.weights`` / ``backbone.url`` / ``backbone.hub_dir``.

``backbone.weights`` is one of
- ``none``: random initialisation;
- ``audioset``: the official torchvggish port of Google's AudioSet VGGish (``backbone.url``,
  ``vggish-10086976.pth``). Its file name carries the first characters of its SHA-256 (torch.hub's
  convention), which the download is checked against. It is fetched once into
  ``<hub_dir>/checkpoints/`` (the torch.hub cache, shared with torchvggish) and reused offline;
- any other value: the path of a local ``.pth`` / ``.safetensors`` state dict.

The resolved ``WeightsInfo`` records the full SHA-256 of the file actually used, so a tracked run
says exactly which weights it started from. There is no silent fallback to random weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import torch

from mtt.core.fetch import DownloadError, download, file_digest

# torch.hub's convention: "name-<sha256 prefix>.ext" (torch.hub.HASH_REGEX).
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")
MIN_PREFIX = 8  # shorter prefixes would verify next to nothing


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # "none" | "audioset" | "file"
    path: Path | None  # the state dict to load; None for random initialisation
    sha256: str | None  # full SHA-256 of that file
    url: str | None  # where it was downloaded from (audioset only)


def hash_prefix(url: str) -> str:
    """The SHA-256 prefix carried by the URL's file name (``vggish-10086976.pth`` -> ``10086976``)."""
    name = _file_name(url)
    m = HASH_REGEX.search(name)
    if not m or len(m.group(1)) < MIN_PREFIX:
        raise ValueError(
            f"backbone.url={url!r}: the file name {name!r} carries no SHA-256 prefix of at least "
            f"{MIN_PREFIX} hex digits (torch.hub convention name-<sha256 prefix>.pth), so a download "
            "could not be verified. Fetch the file yourself and set backbone.weights=/path/to/file."
        )
    return m.group(1)


def resolve_weights(spec: str, url: str, hub_dir: str | None = None, progress: bool = True) -> WeightsInfo:
    """Resolve ``backbone.weights`` to a file (see the module docstring).

    Raises ``DownloadError`` when the official weights are neither cached nor downloadable (the
    message names the URL, the cache path and the ``backbone.weights=`` override) or when the
    download does not match its hash (nothing is then left in the cache), and
    ``FileNotFoundError`` for a local path that does not exist.
    """
    if spec == "none":
        return WeightsInfo(source="none", path=None, sha256=None, url=None)
    if spec == "audioset":
        prefix = hash_prefix(url)
        root = Path(hub_dir).expanduser() if hub_dir else Path(torch.hub.get_dir())
        cache = root / "checkpoints" / _file_name(url)
        try:
            download(url, cache, sha256_prefix=prefix, progress=progress)
        except DownloadError as e:
            name = _file_name(url)
            if e.reason == "mismatch":
                hint = (
                    f"{url}: {e.detail}. The file at backbone.url is not the one its name "
                    f"promises; nothing was kept in {cache.parent}."
                )
            else:
                hint = (
                    f"VGGish AudioSet weights are not cached at {cache} and could not be "
                    f"downloaded from {url} ({e.detail}). Copy {name} there from a machine with "
                    f"network access, or pass it explicitly: backbone.weights=/path/to/{name}"
                )
            raise DownloadError(hint, url=url, dest=cache, reason=e.reason, status=e.status) from e
        return WeightsInfo(source="audioset", path=cache, sha256=file_digest(cache), url=url)
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone.weights={spec!r}: no such file {path}. Use none, audioset, or the path of a "
            ".pth / .safetensors state dict."
        )
    return WeightsInfo(source="file", path=path, sha256=file_digest(path), url=None)


def weights_from_config(backbone_cfg, progress: bool = True) -> WeightsInfo:
    """``resolve_weights`` for a ``mtt.config.BackboneConfig``."""
    return resolve_weights(backbone_cfg.weights, backbone_cfg.url, backbone_cfg.hub_dir, progress)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict on the CPU without unpickling code (``weights_only`` / safetensors)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a bad file
        raise ValueError(f"{path}: cannot be read as a state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}")
    return dict(state)


def _file_name(url: str) -> str:
    return unquote(Path(urlsplit(url).path).name)


__all__ = ["WeightsInfo", "hash_prefix", "load_state_dict", "resolve_weights", "weights_from_config"]
