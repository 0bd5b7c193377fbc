"""`mlflow models serve -m runs:/<id>/model --env-manager local`: a real server on a free loopback
port answers a posted clip with the probabilities `predict` gives."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mtt.data.embedded.labels import complete_tags
from mtt.data.embedded.synthesis import render_clip
from mtt.data.mtat import write_mp3
from mtt.tracking.runs import MlflowTracker
from mtt.training.train import train
from tests.helpers import TINY, compose_cfg
from tests.helpers.http_server import free_port, wait_until_answering


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_served_model_answers_a_clip_with_its_tag_probabilities(tmp_path, cache_dir, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose_cfg([*TINY, f"tracking.uri={uri}"], cache=cache_dir)
    with MlflowTracker(uri, "serve", "tiny") as tracker:
        train(cfg, tracker)
    clip = tmp_path / "flute.mp3"
    write_mp3(clip, render_clip(complete_tags({"flute"}), 3.0, 16000, np.random.default_rng(7)))

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        # The README's command; a session of its own, so the server and its workers are one group.
        proc = subprocess.Popen(
            [
                str(Path(bin_dir) / "mlflow"),
                "models",
                "serve",
                "-m",
                f"runs:/{tracker.run_id}/model",
                "--env-manager",
                "local",
                "-p",
                str(port),
                "--host",
                "127.0.0.1",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/ping", proc, 180, log.read_text)
        # The README's request: the file's bytes, base64, in a dataframe_split body.
        audio = base64.b64encode(clip.read_bytes()).decode()
        answer = post(
            f"http://127.0.0.1:{port}/invocations", {"dataframe_split": {"columns": ["audio"], "data": [[audio]]}}
        )
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        expected = mlflow.pyfunc.load_model(f"runs:/{tracker.run_id}/model").predict(
            pd.DataFrame({"audio": [clip.read_bytes()]})
        )
        (served,) = answer["predictions"]
        assert list(served) == list(expected.columns)
        np.testing.assert_allclose(
            [served[t] for t in expected.columns], expected.iloc[0].to_numpy(), rtol=0, atol=1e-6
        )
        # Decoded samples work too (a JSON array of floats at the model's 16 kHz).
        from mtt.data.audio import load_audio

        samples = load_audio(clip, 16000).tolist()
        answer = post(
            f"http://127.0.0.1:{port}/invocations", {"dataframe_split": {"columns": ["samples"], "data": [[samples]]}}
        )
        np.testing.assert_allclose(
            [answer["predictions"][0][t] for t in expected.columns], expected.iloc[0].to_numpy(), rtol=0, atol=1e-6
        )
        # An ambiguous row (both inputs) is refused with the model's message; the server lives on.
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(
                f"http://127.0.0.1:{port}/invocations",
                {"dataframe_split": {"columns": ["audio", "samples"], "data": [[audio, samples]]}},
            )
        assert refused.value.code in (400, 500) and "exactly one of 'audio'" in refused.value.read().decode()
        # A misspelt column and NaN samples: HTTP 400 with one line, no stack trace.
        for body, message in [
            ({"columns": ["Audio"], "data": [[audio]]}, "the request has no 'audio'"),
            ({"columns": ["samples"], "data": [[[float("nan")] * 16000]]}, "row 0: samples: NaN or infinite samples"),
        ]:
            with pytest.raises(urllib.error.HTTPError) as refused:
                post(f"http://127.0.0.1:{port}/invocations", {"dataframe_split": body})
            answer = json.loads(refused.value.read())
            assert refused.value.code == 400 and set(answer) == {"error_code", "message"}, answer
            assert answer["message"].startswith(message) and "\n" not in answer["message"]
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own group (start_new_session: pgid == pid)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
