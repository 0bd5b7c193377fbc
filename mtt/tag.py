"""Tag audio files with a trained run: ``python -m mtt.tag AUDIO_FILE... --run RUN_ID [--top-k 5]``.

Loads the run's ``config.yaml`` and best checkpoint from MLflow, decodes each file, computes all
its VGGish log-mel patches and prints the ``top-k`` tags of the clip-level probabilities (mean
over patches, as evaluation does by default):

    song.mp3
      techno      0.912
      drums       0.771

Errors (missing run, run without checkpoint, undecodable file) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mtt.audio import AudioDecodeError, load_audio
from mtt.checkpoint import BEST_META, BEST_WEIGHTS, load_best
from mtt.features import log_mel_patches
from mtt.models import Tagger, build_model


class TagError(RuntimeError):
    """A user-facing error: one line, exit code 1."""


def load_run_model(run_id: str, tracking_uri: str | None = None) -> tuple[Tagger, list[str], object]:
    """The best model of MLflow run ``run_id`` (eval mode, CPU), its tag names and its config."""
    from mlflow.exceptions import MlflowException

    from mtt.tracking import download_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        try:
            config_path = download_artifacts(tracking_uri, run_id, "config.yaml", tmp)
        except MlflowException as exc:
            raise TagError(f"run {run_id}: not found or has no config.yaml ({_first_line(exc)})") from None
        try:
            folder = download_artifacts(tracking_uri, run_id, "checkpoint", Path(tmp) / "ckpt")
            state, meta = load_best(folder)
        except (MlflowException, OSError) as exc:
            raise TagError(f"run {run_id}: has no best checkpoint (checkpoint/{BEST_WEIGHTS}, "
                           f"checkpoint/{BEST_META}); did it finish an epoch? ({_first_line(exc)})") from None
        # Over the schema: a run recorded before a key existed gets its default (the old behaviour).
        from mtt.config import Config

        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_path))
    tags = list(meta["tags"])
    model = build_model(cfg, len(tags))
    model.load_state_dict(state)
    return model.eval(), tags, cfg


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@torch.no_grad()
def clip_probabilities(model: Tagger, cfg, path: str | Path, batch_size: int = 128) -> np.ndarray:
    """Clip-level tag probabilities ``(n_tags,)`` of one audio file: the mean over all its patches."""
    wave = load_audio(path, cfg.features.sample_rate)
    patches = log_mel_patches(wave, cfg.features.sample_rate, cfg.features)  # (n, 96, 64)
    if len(patches) == 0:
        raise AudioDecodeError(f"{path}: shorter than one {cfg.features.patch_frames}-frame patch")
    probs = [model.probabilities(model(patches[i:i + batch_size])) for i in range(0, len(patches), batch_size)]
    return torch.cat(probs).mean(dim=0).numpy()


def top_k(probs: np.ndarray, tags: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(tags[i], float(probs[i])) for i in order]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtt.tag", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="AUDIO_FILE")
    parser.add_argument("--run", required=True, help="MLflow run id of a trained run")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else the repo's mlflow.db")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stdout is the tag list
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    try:
        model, tags, cfg = load_run_model(args.run, args.tracking_uri)
        for path in args.files:
            probs = clip_probabilities(model, cfg, path)
            print(path)
            for tag, p in top_k(probs, tags, args.top_k):
                print(f"  {tag:<20} {p:.3f}")
    except (TagError, AudioDecodeError, FileNotFoundError) as exc:
        print(f"error: {_first_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
