"""The tagger as an MLflow model: every run logs ``model/``, which MLflow loads (no pickle) and
which tags a test clip exactly as the run's own evaluation did."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from mtt.data.audio import load_audio
from mtt.data.datasets import index_from_config
from mtt.tracking.records import load_predictions
from mtt.tracking.runs import MlflowTracker, download_artifacts
from mtt.training.train import train
from tests.helpers import TINY, compose_cfg


def trained_run(tmp_path: Path, cache: Path, overrides: list[str] = ()) -> tuple[str, str, object]:
    """A tiny finished run: (tracking URI, run id, config)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose_cfg([*TINY, f"tracking.uri={uri}", *overrides], cache=cache)
    with MlflowTracker(uri, "pyfunc", "tiny") as tracker:
        train(cfg, tracker)
    return uri, tracker.run_id, cfg


def clips_of(uri: str, run_id: str, cfg, tmp_path: Path):
    """The run's test predictions and, in the same clip order, the test clips' audio files."""
    pred = load_predictions(download_artifacts(uri, run_id, "test_predictions.npz", tmp_path / "pred"))
    index = index_from_config(cfg.data, progress=False)
    row = {int(c): r for r, c in enumerate(index.clip_ids)}
    return pred, [index.audio_path(row[int(c)]) for c in pred.clip_ids]


# The default (frozen backbone read from its float16 cache of frequency means, mean over
# patches), a pool that reads the whole map (its cache holds it) and a fine-tuned backbone (no
# cache) with max aggregation: every numeric path of evaluation.
@pytest.mark.parametrize(
    "overrides",
    [[], ["pool=max"], ["backbone.freeze=false", "eval.aggregate=max"]],
    ids=["cached", "cached-whole-map", "finetuned"],
)
def test_logged_model_predicts_what_the_run_evaluated(tmp_path, cache_dir, monkeypatch, overrides):
    uri, run_id, cfg = trained_run(tmp_path, cache_dir, overrides)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    local = Path(download_artifacts(uri, run_id, "model", tmp_path / "model"))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    # Models from code: the code file and the weights as safetensors, nothing pickled.
    assert {"MLmodel", "pyfunc_code.py", "artifacts/best.safetensors", "artifacts/tagger.json"} <= set(files), files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))], files
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["model_code_path"].endswith("pyfunc_code.py")
    assert "python_model" not in mlmodel["flavors"]["python_function"]
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [(c["name"], c["type"], c["required"]) for c in inputs] == [
        ("audio", "binary", False),
        ("samples", "array", False),
    ]
    pred, paths = clips_of(uri, run_id, cfg, tmp_path)
    assert [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])] == list(pred.tags)
    # The runs table lists the model (MLflow's log-model history tag).
    (record,) = json.loads(run.data.tags["mlflow.log-model.history"])
    assert record["artifact_path"] == "model" and record["run_id"] == run_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    by_bytes = model.predict(pd.DataFrame({"audio": [Path(p).read_bytes() for p in paths]}))
    assert list(by_bytes.columns) == list(pred.tags) and len(by_bytes) == len(paths)
    np.testing.assert_allclose(by_bytes.to_numpy(), pred.probabilities, rtol=0, atol=1e-5)
    sr = cfg.features.sample_rate
    by_samples = model.predict(pd.DataFrame({"samples": [load_audio(p, sr) for p in paths]}))
    np.testing.assert_allclose(by_samples.to_numpy(), pred.probabilities, rtol=0, atol=1e-5)
    # JSON clients send the bytes base64-encoded (as `mlflow models serve` receives them).
    one = model.predict(pd.DataFrame({"audio": [base64.b64encode(Path(paths[0]).read_bytes()).decode()]}))
    np.testing.assert_allclose(one.to_numpy()[0], pred.probabilities[0], rtol=0, atol=1e-5)


def test_a_tagger_emulates_the_cache_its_run_read(cache_dir):
    """tagger.json says what the run's cache held of each map; one written before caches kept
    only what the pool reads held the whole map; a checkpoint's best.json follows its pool."""
    from omegaconf import OmegaConf

    from mtt.models import build_model
    from mtt.serving.pyfunc import build_tagger

    cfg = compose_cfg(TINY, cache=cache_dir)
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "tags": ["a", "b"]}
    state = build_model(cfg, 2).state_dict()
    assert build_tagger(meta, state).cache_reads == "freq_mean"  # best.json: GAP's
    wave = np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.1
    for extra, shape in (({"cache_reads": "freq_mean"}, (64, 6, 1)), ({}, (64, 6, 4))):  # {}: an older tagger.json
        tagger = build_tagger({**meta, "cached_backbone": True, **extra}, state)
        seen: list[torch.Tensor] = []
        tagger.model.pool.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(args[0]))
        tagger.probabilities(wave)
        (x,) = seen  # the pool reads what the run's cache held: that part of each map, in float16
        assert x.shape[1:] == shape and torch.equal(x, x.half().float()), extra


def test_a_row_needs_exactly_one_input(tmp_path, cache_dir, monkeypatch):
    from mtt.serving.pyfunc import example_wav, predict
    from mtt.serving.tag import load_run

    uri, run_id, cfg = trained_run(tmp_path, cache_dir)
    tagger = load_run(run_id, uri)
    wav = example_wav(cfg.features.sample_rate)
    for frame in (
        pd.DataFrame({"audio": [wav], "samples": [np.zeros(16000, np.float32)]}),
        pd.DataFrame({"audio": [None]}),
    ):
        with pytest.raises(ValueError, match="exactly one of 'audio'"):
            predict(tagger, frame)
    with pytest.raises(Exception, match="shorter than one 96-frame patch"):
        predict(tagger, pd.DataFrame({"samples": [np.zeros(8000, np.float32)]}))


def serve(model, body: dict) -> tuple[int, dict]:
    """What `mlflow models serve` answers ``body`` with: its request handler (``invocations``)
    inside its error handler (``_async_catch_mlflow_exception``); (HTTP status, parsed JSON)."""
    import asyncio

    from fastapi.responses import Response
    from mlflow.pyfunc.scoring_server import _async_catch_mlflow_exception, invocations

    @_async_catch_mlflow_exception
    async def handle() -> Response:
        r = invocations(json.dumps(body), "application/json", model, model.metadata.get_input_schema())
        return Response(content=r.response, status_code=r.status, media_type=r.mimetype)

    response = asyncio.run(handle())
    return response.status_code, json.loads(response.body)  # strict JSON: a bare NaN fails here


def test_served_requests_the_model_refuses_are_one_line_400s(tmp_path, cache_dir, monkeypatch):
    from mtt.serving.pyfunc import example_wav

    uri, run_id, cfg = trained_run(tmp_path, cache_dir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    wav = base64.b64encode(example_wav(cfg.features.sample_rate)).decode()
    second = [0.1] * cfg.features.sample_rate
    status, ok = serve(model, {"dataframe_split": {"columns": ["audio"], "data": [[wav]]}})
    assert status == 200 and len(ok["predictions"]) == 1
    for columns, row, message in [
        (["Audio"], [wav], "the request has no 'audio' (encoded file bytes, base64 in JSON) or 'samples' column"),
        (["samples"], [[float("nan")] * 16000], "row 0: samples: NaN or infinite samples (the first at 0.00 s)"),
        (
            ["samples"],
            [[*second[:9000], float("inf"), *second]],
            "row 0: samples: NaN or infinite samples (the first at 0.56 s)",
        ),
        (["audio", "samples"], [wav, second], "row 0: give exactly one of 'audio'"),
        (["audio"], [base64.b64encode(b"not audio at all").decode()], "row 0: audio: cannot decode audio"),
        (["samples"], [second[:8000]], "row 0: samples: shorter than one 96-frame patch (0.50 s)"),
    ]:
        status, answer = serve(model, {"dataframe_split": {"columns": columns, "data": [row]}})
        assert status == 400, (columns, answer)
        assert set(answer) == {"error_code", "message"} and answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert answer["message"].startswith(message) and "\n" not in answer["message"], answer
        assert "/tmp" not in answer["message"]  # not the server's temporary file


def test_a_long_file_is_tagged_window_by_window_as_a_whole(tmp_path, cache_dir):
    """A 44.1 kHz stereo file decoded, resampled, front-ended and tagged in blocks and windows
    (what keeps mtt.tag's memory flat) gives the probabilities of the whole clip at once."""
    import soundfile as sf
    from omegaconf import OmegaConf

    from mtt.data.audio import BLOCK_FRAMES, load_audio, stream_audio
    from mtt.features.frontend import build_front_end
    from mtt.models import build_model
    from mtt.models.pooling import reduce_map
    from mtt.serving.pyfunc import _features, build_tagger

    song = tmp_path / "song.wav"
    t = np.arange(44100 * 75) / 44100
    noise = np.random.default_rng(1).standard_normal(len(t))
    sf.write(song, np.stack([np.sin(2 * np.pi * 440 * t), noise], 1) * 0.2, 44100)
    assert BLOCK_FRAMES < len(t)  # tag_file reads it in more than one block
    for aggregate in ("mean", "max"):
        cfg = compose_cfg([*TINY, f"eval.aggregate={aggregate}"], cache=cache_dir)
        tags = [f"t{i}" for i in range(5)]
        meta = {"config": OmegaConf.to_container(cfg, resolve=True), "tags": tags}
        tagger = build_tagger(meta, build_model(cfg, len(tags)).state_dict())
        assert tagger.cached_backbone and tagger.cache_reads == "freq_mean"  # GAP's compact cache
        blocks = list(stream_audio(song, 16000, block_frames=100_000))
        assert len(blocks) > 30
        streamed = tagger.tag_blocks(blocks)
        np.testing.assert_allclose(tagger.tag_file(song), streamed, rtol=0, atol=1e-6)
        # The reference: every patch of the whole decoded clip through the model at once.
        front = build_front_end(_features(tagger.cfg))
        patches = front(torch.from_numpy(load_audio(song, 16000))[None])[0].half().float()
        assert len(patches) == 78
        with torch.no_grad():
            fmap = tagger.model.encode(patches)
            # What the run's cache holds: the pool's part of each map, in float16.
            fmap = reduce_map(fmap, tagger.cache_reads).half().float() if tagger.cached_backbone else fmap
            p = tagger.model.probabilities(tagger.model(fmap, from_backbone=True)).numpy().astype(np.float64)
        whole = p.max(axis=0) if aggregate == "max" else p.mean(axis=0)
        np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-6)
