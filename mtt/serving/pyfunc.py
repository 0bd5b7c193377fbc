"""The tagger as an MLflow pyfunc model: audio in, one probability per tag and clip out.

Every finished run logs ``model/`` (``save_tagger`` + ``mtt.training.train``), a pyfunc model saved "from
code": its MLmodel names ``mtt/serving/pyfunc_code.py`` (copied into the folder) as the model, so nothing
is pickled. The folder holds

    MLmodel, python_env.yaml, conda.yaml, requirements.txt   MLflow's own (YAML / text)
    pyfunc_code.py                                           the model's code file
    artifacts/best.safetensors                               the selected epoch's state dict
    artifacts/tagger.json                                    resolved config, tag names, numerics
    input_example.json, serving_input_example.json          a one-second clip (signature check)

Input (``input_schema``): a DataFrame with, per row (clip), one of
- ``audio``: the bytes of an encoded file (mp3, wav, flac, ogg through libsndfile; m4a/AAC and
  the rest through ffmpeg, ``mtt.data.audio.stream_audio``); base64 in JSON requests;
- ``samples``: mono samples at ``features.sample_rate`` (16 kHz for VGGish), an array of doubles
  in the signature (JSON numbers are float64, which MLflow will not narrow), computed in float32.
Output: a DataFrame with one float64 column per tag (the run's tag order), one row per clip.

A clip's probabilities are computed as the run's evaluation computes them (``mtt.training.train``):
every VGGish patch, rounded to float16 as the feature store keeps it (and, when the run read a
frozen backbone's cache, the backbone output rounded to float16 as the cache keeps it), the
output activation, then ``eval.aggregate`` (mean or max) over the clip's patches. So a test
clip's row equals the run's ``test_predictions.npz`` row (CPU, fp32; ``eval.patches_per_clip``
subsets are not reproduced: the model uses every patch).

Besides ``mtt.tracking.runs`` this is the module that imports mlflow: it defines the model format
(and registers versions, ``register``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mtt.models.pooling import MAP, reads_of, reduce_map

if TYPE_CHECKING:
    import pandas as pd

    from mtt.models import Tagger

META = "tagger.json"
MODEL_PATH = "model"  # the artifact path in every run
CODE_FILE = Path(__file__).with_name("pyfunc_code.py")
FORMAT = 1  # of tagger.json
# Packages the model needs at load time, pinned to what this environment runs (librosa brings
# audioread, mtt.data.audio's ffmpeg path); mtt itself must be importable too (it is in this repository's venv; `mlflow models serve --env-manager local`).
REQUIREMENTS = ("mlflow", "torch", "torchaudio", "numpy", "pandas", "omegaconf", "safetensors", "soundfile", "librosa")


@dataclass
class ClipTagger:
    """Front end + backbone + pooling + head of one run, with its clip-level aggregation.

    ``cached_backbone``: the run evaluated from a frozen backbone's float16 cache, which held
    ``cache_reads`` of each map (``mtt.models.pooling``: the frequency mean, or the whole map).
    """

    model: Tagger  # eval mode, CPU
    tags: list[str]
    cfg: Any  # the run's resolved config (OmegaConf)
    cached_backbone: bool
    cache_reads: str = MAP

    @property
    def sample_rate(self) -> int:
        return int(self.cfg.features.sample_rate)

    def probabilities(self, wave: np.ndarray) -> np.ndarray:
        """Mono samples ``(samples,)`` at ``sample_rate`` -> float64 ``(n_tags,)``."""
        x = np.asarray(wave)
        if x.ndim != 1:
            raise ValueError(f"samples: expected mono (samples,), got shape {tuple(x.shape)}")
        return self.tag_blocks([x])

    @torch.no_grad()
    def tag_blocks(self, blocks: Iterable[np.ndarray]) -> np.ndarray:
        """``probabilities`` of a clip that arrives in blocks of mono samples at ``sample_rate``
        (``mtt.data.audio.stream_audio``): patches are computed window by window
        (``PatchFrontEnd.stream``) and aggregated as they come, so memory stays that of one
        window whatever the clip's length; the result is the whole clip's (float rounding aside).

        ``AudioDecodeError`` for samples that are NaN or infinite, a clip shorter than one patch,
        and probabilities that come out non-finite (samples far outside [-1, 1]).
        """
        from mtt.data.audio import AudioDecodeError
        from mtt.features.frontend import build_front_end

        front = build_front_end(_features(self.cfg))  # the run's own (features.name: vggish, mel_db)
        n_samples = n_patches = 0
        total: np.ndarray | None = None  # the running sum (mean) or max of patch probabilities

        def finite(blocks: Iterable[np.ndarray]) -> Iterator[torch.Tensor]:
            nonlocal n_samples
            for block in blocks:
                x = torch.from_numpy(np.array(block, dtype=np.float32))  # a copy: inputs may be read-only
                bad = torch.nonzero(~torch.isfinite(x))
                if len(bad):
                    at = (n_samples + int(bad[0])) / self.sample_rate
                    raise AudioDecodeError(f"NaN or infinite samples (the first at {at:.2f} s)")
                n_samples += len(x)
                yield x

        size = int(self.cfg.eval.batch_size)
        for window in front.stream(finite(blocks)):
            patches = window.half().float()  # (n, frames, bands), as the feature store holds them
            for i in range(0, len(patches), size):
                fmap = self.model.encode(patches[i : i + size])
                if self.cached_backbone:  # what the run's cache held: reduced, then float16
                    fmap = reduce_map(fmap, self.cache_reads).half().float()
                p = self.model.probabilities(self.model(fmap, from_backbone=True)).numpy().astype(np.float64)
                if self.cfg.eval.aggregate == "max":
                    total = p.max(axis=0) if total is None else np.maximum(total, p.max(axis=0))
                else:
                    total = p.sum(axis=0) if total is None else total + p.sum(axis=0)
                n_patches += len(p)
        if total is None:
            raise AudioDecodeError(
                f"shorter than one {self.cfg.features.patch_frames}-frame patch ({n_samples / self.sample_rate:.2f} s)"
            )
        result = total if self.cfg.eval.aggregate == "max" else total / n_patches
        if not np.all(np.isfinite(result)):
            raise AudioDecodeError("the model's probabilities are not finite (samples far outside [-1, 1]?)")
        return result

    def tag_file(self, path: str | Path) -> np.ndarray:
        """``probabilities`` of an audio file, decoded block by block (libsndfile, else ffmpeg:
        ``mtt.data.audio.stream_audio``); ``AudioDecodeError`` naming the file."""
        from mtt.data.audio import AudioDecodeError, stream_audio

        try:
            return self.tag_blocks(stream_audio(path, self.sample_rate))
        except AudioDecodeError as exc:
            text = str(exc)
            raise AudioDecodeError(text if text.startswith(f"{path}: ") else f"{path}: {text}") from None

    def tag_bytes(self, data: bytes) -> np.ndarray:
        """``probabilities`` of an encoded file's bytes (decoded from a temporary file: ffmpeg
        reads paths); errors without the temporary file's name."""
        from mtt.data.audio import AudioDecodeError

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "clip"
            path.write_bytes(data)
            try:
                return self.tag_file(path)
            except AudioDecodeError as exc:
                raise AudioDecodeError(str(exc).removeprefix(f"{path}: ")) from None


def _features(cfg):
    from mtt.config import FeaturesConfig
    from mtt.features.preprocess import frontend_params

    return FeaturesConfig(**frontend_params(cfg.features))


def build_tagger(meta: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> ClipTagger:
    """The ``ClipTagger`` of a run from its ``tagger.json`` contents (or a ``best.json``: config
    and tags; ``cached_backbone`` and ``cache_reads`` then follow the config) and its state dict.
    A ``tagger.json`` without ``cache_reads`` was written when caches held every pool's whole map."""
    from omegaconf import OmegaConf

    from mtt.config import Config
    from mtt.models import build_model

    # Over the schema: a run recorded before a key existed gets its default (the old behaviour).
    cfg = OmegaConf.merge(OmegaConf.structured(Config), dict(meta["config"]))
    tags = [str(t) for t in meta["tags"]]
    cached = meta.get("cached_backbone")
    if cached is None:  # a checkpoint's best.json: what mtt.training.train.prepare decides by default
        cached = bool(cfg.backbone.freeze and cfg.backbone.finetune_last == 0 and cfg.backbone.cache)
    model = build_model(cfg, len(tags))
    model.load_state_dict(dict(state))
    reads = meta.get("cache_reads") or (MAP if "cached_backbone" in meta else reads_of(model.pool))
    return ClipTagger(model.eval(), tags, cfg, bool(cached), reads)


def load_tagger(model_uri: str, tracking_uri: str | None = None) -> ClipTagger:
    """The ``ClipTagger`` of a logged model: ``runs:/<run_id>/model``, ``models:/NAME/VERSION``
    (or ``models:/NAME/latest``) or a local folder, loaded through ``mlflow.pyfunc.load_model``
    (what serving loads). Raises ``MlflowException`` when there is no such model."""
    # MLflow 3.17 resolves models:/ URIs against the global registry URI (which follows the
    # tracking URI), whatever URI is passed down: set it for this call only.
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from mtt.tracking.runs import resolve_uri

    with _use_tracking_uri(resolve_uri(tracking_uri)), _quiet_copies():
        model = mlflow.pyfunc.load_model(str(model_uri))
    return model.unwrap_python_model().tagger


# ------------------------------------------------------------------------------------ MLflow


def input_schema():
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    return Schema(
        [ColSpec(DataType.binary, "audio", required=False), ColSpec(Array(DataType.double), "samples", required=False)]
    )


def signature(tags: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Schema

    return ModelSignature(inputs=input_schema(), outputs=Schema([ColSpec(DataType.double, t) for t in tags]))


def example_wav(sample_rate: int, seconds: float = 1.0) -> bytes:
    """A quiet two-tone clip as 16-bit WAV bytes (one patch long: the input example)."""
    import soundfile as sf

    t = np.arange(int(sample_rate * seconds)) / sample_rate
    wave = 0.1 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 1250 * t)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in REQUIREMENTS]


# MLflow asks for type hints on predict (for its own input validation); the signature below
# already says what the model takes.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method", category=UserWarning)

    class TaggerModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]  # mlflow's lazy attribute
        """The pyfunc model; ``pyfunc_code.py`` hands one to MLflow (``set_model``)."""

        def load_context(self, context) -> None:
            from safetensors.torch import load_file

            meta = json.loads(Path(context.artifacts["tagger"]).read_text())
            self.tagger = build_tagger(meta, load_file(context.artifacts["weights"]))

        def predict(self, context, model_input, params=None):
            return predict(self.tagger, model_input)


class InvalidInput(MlflowException, ValueError):
    """A request the model refuses, on one line. MLflow's scoring server answers an
    ``MlflowException`` with its ``serialize_as_json()`` and HTTP status: this one's is 400 with
    just the line (MLflow prefixes the request's data to the message of any other, and answers
    other exceptions with the server's stack trace)."""

    def __init__(self, line: str):
        super().__init__(line, error_code=INVALID_PARAMETER_VALUE)
        self.line = line

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.line})


def predict(tagger: ClipTagger, frame) -> pd.DataFrame:
    """One row of tag probabilities per input row (``audio`` bytes or ``samples``).

    ``InvalidInput`` (one line, HTTP 400 when served) naming the row and what is wrong: neither
    column (MLflow drops columns the signature does not name, so ``Audio`` arrives as nothing),
    both or neither in a row, base64 or audio that does not decode, NaN or infinite samples, a
    clip shorter than one patch.
    """
    import base64

    import pandas as pd

    from mtt.data.audio import AudioDecodeError

    if len(frame.columns) == 0 or not ({"audio", "samples"} & set(frame.columns)):
        raise InvalidInput(
            "the request has no 'audio' (encoded file bytes, base64 in JSON) or 'samples' column: column "
            "names are case-sensitive, and other columns are dropped"
        )
    rows = []
    for i in range(len(frame)):
        audio = frame["audio"].iloc[i] if "audio" in frame else None
        samples = frame["samples"].iloc[i] if "samples" in frame else None
        has_audio = audio is not None and not (isinstance(audio, float) and np.isnan(audio))
        has_samples = samples is not None and not (isinstance(samples, float) and np.isnan(samples))
        if has_audio == has_samples:
            raise InvalidInput(
                f"row {i}: give exactly one of 'audio' (encoded file bytes) or 'samples' "
                f"(mono float32 at {tagger.sample_rate} Hz)"
            )
        try:
            if has_audio:
                data = base64.b64decode(audio) if isinstance(audio, str) else bytes(audio)
                rows.append(tagger.tag_bytes(data))
            else:
                rows.append(tagger.probabilities(np.asarray(samples, dtype=np.float32)))
        except (AudioDecodeError, ValueError) as exc:  # binascii.Error (bad base64) is a ValueError
            what = "audio" if has_audio else "samples"
            raise InvalidInput(f"row {i}: {what}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    return pd.DataFrame(np.stack(rows) if rows else np.zeros((0, len(tagger.tags))), columns=tagger.tags)


def save_tagger(
    out: str | Path, weights: str | Path, meta: Mapping[str, Any], cached_backbone: bool, cache_reads: str
) -> Path:
    """Save the pyfunc model folder ``out`` (must not exist) from a best checkpoint's weights file
    and metadata (``mtt.tracking.checkpoint.save_best``: config, tags); returns ``out``. ``cache_reads``:
    what the run's backbone cache held of each map (``mtt.models.pooling.reads_of`` its pool)."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        meta_path = Path(tmp) / META
        meta_path.write_text(
            json.dumps(
                {
                    "format": FORMAT,
                    "config": meta["config"],
                    "tags": list(meta["tags"]),
                    "cached_backbone": bool(cached_backbone),
                    "cache_reads": cache_reads,
                    "epoch": meta.get("epoch"),
                    "monitor": meta.get("monitor"),
                },
                indent=1,
            )
        )
        sample_rate = int(meta["config"]["features"]["sample_rate"])
        with _quiet_copies():
            mlflow.pyfunc.save_model(
                str(out),
                python_model=str(CODE_FILE),
                artifacts={"weights": str(weights), "tagger": str(meta_path)},
                signature=signature(list(meta["tags"])),
                input_example=_example_frame(sample_rate),
                pip_requirements=_requirements(),
                metadata={
                    "mtt.input": f"one of: audio (encoded file bytes, base64 in JSON), samples (mono float32 "
                    f"at {sample_rate} Hz)",
                    "mtt.output": "one probability per tag",
                },
            )
    return out


@contextlib.contextmanager
def _quiet_copies():
    """No "Downloading artifacts" bar in a training log for copying two local files."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _example_frame(sample_rate: int):
    import pandas as pd

    return pd.DataFrame({"audio": [example_wav(sample_rate)]})


def log_tagger(tracker, checkpoint: str | Path, cached_backbone: bool, cache_reads: str) -> None:
    """Log the model of a run's best checkpoint folder (``mtt.tracking.checkpoint``) as ``model/``, and the
    ``mlflow.log-model.history`` tag through which MLflow's runs table lists it (Models column)."""
    from datetime import datetime, timezone

    from mtt.tracking.checkpoint import BEST_META, BEST_WEIGHTS

    checkpoint = Path(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tagger(
            Path(tmp) / MODEL_PATH,
            checkpoint / BEST_WEIGHTS,
            json.loads((checkpoint / BEST_META).read_text()),
            cached_backbone,
            cache_reads,
        )
        tracker.log_artifacts(folder, MODEL_PATH)
        flavors = mlflow.models.Model.load(str(folder)).flavors
    # What mlflow's log_model records (without the signature: a tag holds at most 8000 characters).
    record = {
        "run_id": tracker.run_id,
        "artifact_path": MODEL_PATH,
        "flavors": flavors,
        "utc_time_created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f"),
    }
    tracker.set_tags({"mlflow.log-model.history": json.dumps([record])})


def register(
    tracking_uri: str | None, name: str, run_id: str, description: str, tags: Mapping[str, str] | None = None
) -> int:
    """Register run ``run_id``'s ``model/`` as a new version of registered model ``name`` (created
    if missing) with ``description``; returns the version number (``models:/NAME/<n>``)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mtt.tracking.runs import resolve_uri

    uri = resolve_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if not any(a.path == f"{MODEL_PATH}/MLmodel" for a in client.list_artifacts(run_id, MODEL_PATH)):
        raise LookupError(
            f"run {run_id} has no {MODEL_PATH}/ (an MLflow model; runs log one since mtt logged "
            f"models), so it cannot be registered"
        )
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # Where the run's model/ lies (what mlflow.register_model records for runs:/ URIs).
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_PATH}"
    version = client.create_model_version(
        name, source, run_id=run_id, description=description, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    return int(version.version)
