"""Tag audio files and folders with a trained model:
``python -m mtt.tag PATH... (--run RUN_ID | --model URI) [--top-k 5] [--format text|csv|json]``.

The model is the run's MLflow model (``model/``, ``mtt.serving.pyfunc``): ``--run ID`` is short for
``--model runs:/ID/model``; ``--model`` also takes ``models:/NAME/VERSION`` and
``models:/NAME/latest`` (registered with ``mtt.compare --register``). A run logged before runs
carried a model is built from its ``config.yaml`` and best checkpoint, by the same code.

A folder is tagged recursively (files with an audio extension, ``AUDIO_EXTENSIONS``, sorted);
files named on the command line are tagged whatever their name. Decoding: libsndfile (mp3, wav,
flac, ogg), else audioread over ffmpeg (m4a/AAC, ...). Each clip's probabilities are those of the
run's evaluation (every patch, ``eval.aggregate``). Output (stdout, or ``--output FILE``,
written atomically): ``text`` prints the ``top-k`` tags of each file,

    song.mp3
      techno      0.912
      drums       0.771

``csv`` one row per file with every tag's probability (``file,<tag>,...``), ``json``
``{"model", "tags", "files": [{"file", "top": [[tag, p], ...], "probabilities": {tag: p}}],
"errors": [{"file", "error"}]}``. A progress bar on stderr counts the files.

Errors print one line each (``error: ...``) and exit status 1: a missing path or model before
any work; a file that cannot be decoded (a dangling symbolic link, NaN or infinite samples, a
clip shorter than one patch) is skipped, named, and the others are still tagged. A long file is
decoded and tagged window by window (``mtt.serving.pyfunc.ClipTagger.tag_blocks``): memory does not grow
with its length (tests/benchmarks/bench_tag_memory.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from mtt.data.audio import AudioDecodeError

# What a folder walk picks up (case-insensitive): what libsndfile or ffmpeg decode.
AUDIO_EXTENSIONS = (
    ".mp3",
    ".wav",
    ".flac",
    ".ogg",
    ".oga",
    ".opus",
    ".m4a",
    ".mp4",
    ".aac",
    ".alac",
    ".aif",
    ".aiff",
    ".wma",
    ".au",
    ".caf",
    ".webm",
    ".mka",
)


class TagError(RuntimeError):
    """A user-facing error: one line, exit code 1."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_model(model_uri: str, tracking_uri: str | None = None):
    """The ``mtt.serving.pyfunc.ClipTagger`` of ``model_uri``; ``TagError`` when there is none."""
    from mlflow.exceptions import MlflowException

    from mtt.serving.pyfunc import load_tagger

    try:
        return load_tagger(model_uri, tracking_uri)
    except (MlflowException, OSError) as exc:
        raise TagError(f"model {model_uri}: not found ({_first_line(exc)})") from None


def load_run(run_id: str, tracking_uri: str | None = None):
    """The ``ClipTagger`` of run ``run_id``: its ``model/``, else (a run logged before runs carried
    a model) built from its ``config.yaml`` and best checkpoint."""
    from mlflow.exceptions import MlflowException
    from omegaconf import OmegaConf

    from mtt.serving.pyfunc import MODEL_PATH, build_tagger
    from mtt.tracking.checkpoint import BEST_META, BEST_WEIGHTS, load_best
    from mtt.tracking.runs import download_artifacts, try_download_artifact

    with tempfile.TemporaryDirectory() as tmp:
        try:
            if try_download_artifact(tracking_uri, run_id, f"{MODEL_PATH}/MLmodel", tmp) is not None:
                return load_model(f"runs:/{run_id}/{MODEL_PATH}", tracking_uri)
            config_path = download_artifacts(tracking_uri, run_id, "config.yaml", tmp)
        except MlflowException as exc:
            raise TagError(f"run {run_id}: not found or has no config.yaml ({_first_line(exc)})") from None
        try:
            folder = download_artifacts(tracking_uri, run_id, "checkpoint", Path(tmp) / "ckpt")
            state, meta = load_best(folder)
        except (MlflowException, OSError) as exc:
            raise TagError(
                f"run {run_id}: has no {MODEL_PATH}/ and no best checkpoint (checkpoint/{BEST_WEIGHTS}, "
                f"checkpoint/{BEST_META}); did it finish an epoch? ({_first_line(exc)})"
            ) from None
        cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    return build_tagger({"config": cfg, "tags": meta["tags"]}, state)


def dangling(path: Path) -> bool:
    """A symbolic link to nothing."""
    return path.is_symlink() and not path.exists()


def audio_files(paths: list[str]) -> list[Path]:
    """Files named, and the audio files under folders named (recursively, sorted); ``TagError``
    for a path that does not exist or a folder without audio. A dangling symbolic link with an
    audio extension in a folder is listed: tagging it fails, naming it, as for any file that
    cannot be read, instead of leaving it out unsaid."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if (f.is_file() or dangling(f)) and f.suffix.lower() in AUDIO_EXTENSIONS
            )
            if not found:
                raise TagError(f"{p}: no audio files in this folder (looked for {' '.join(AUDIO_EXTENSIONS)})")
            out += found
        elif p.is_file():
            out.append(p)
        elif dangling(p):
            raise TagError(f"{p}: a dangling symbolic link (to {os.readlink(p)})")
        else:
            raise TagError(f"{p}: no such file or folder")
    return out


def top_k(probs: np.ndarray, tags: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(tags[i], float(probs[i])) for i in order]


def render(
    results: list[tuple[str, np.ndarray]], errors: list[tuple[str, str]], tags: list[str], k: int, fmt: str, model: str
) -> str:
    """The output document of ``results`` ``[(file, probabilities (n_tags,))]`` in ``fmt``."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["file", *tags])
        writer.writerows([f, *(f"{p:.6f}" for p in probs)] for f, probs in results)
        return buf.getvalue()
    if fmt == "json":
        doc = {
            "model": model,
            "tags": tags,
            "files": [
                {
                    "file": f,
                    "top": [[t, p] for t, p in top_k(probs, tags, k)],
                    "probabilities": dict(zip(tags, map(float, probs))),
                }
                for f, probs in results
            ],
            "errors": [{"file": f, "error": e} for f, e in errors],
        }
        return json.dumps(doc, indent=1) + "\n"
    lines = []
    for f, probs in results:
        lines.append(f)
        lines += [f"  {t:<20} {p:.3f}" for t, p in top_k(probs, tags, k)]
    return "\n".join(lines) + ("\n" if lines else "")


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="python -m mtt.tag", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="audio files and folders (searched recursively)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="MLflow run id of a trained run (its model/)")
    which.add_argument("--model", help="model URI: runs:/<run_id>/model, models:/NAME/VERSION, models:/NAME/latest")
    parser.add_argument("--top-k", type=int, default=5, help="tags per file in text and json (default %(default)s)")
    parser.add_argument("--format", choices=("text", "csv", "json"), default="text")
    parser.add_argument("--output", help="write here (atomically) instead of stdout")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else the repo's mlflow.db")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stdout is the tag list
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    try:
        files = audio_files(args.paths)
        tagger = load_run(args.run, args.tracking_uri) if args.run else load_model(args.model, args.tracking_uri)
    except TagError as exc:
        print(f"error: {_first_line(exc)}", file=sys.stderr)
        return 1
    results, errors = [], []
    for path in tqdm(files, desc="tagging", unit="file", file=sys.stderr, disable=len(files) < 2, leave=False):
        try:
            results.append((str(path), tagger.tag_file(path)))
        except (AudioDecodeError, OSError) as exc:
            errors.append((str(path), _first_line(exc)))
            tqdm.write(f"error: {_first_line(exc)}", file=sys.stderr)
    model = args.model or f"runs:/{args.run}/model"
    text = render(results, errors, tagger.tags, args.top_k, args.format, model)
    if args.output:
        from mtt.core.fs import atomic_write_bytes

        atomic_write_bytes(Path(args.output), text.encode())
    else:
        sys.stdout.write(text)
    if errors and len(files) > 1:
        print(f"error: {len(errors)} of {len(files)} files could not be tagged (listed above)", file=sys.stderr)
    return 1 if errors else 0
