"""mtt.models.weights: VGGish weights from config, downloaded from a local server, cached, verified."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
from safetensors.torch import save_file

from mtt.core.fetch import DownloadError
from mtt.models.weights import WeightsInfo, hash_prefix, load_state_dict, resolve_weights
from tests.helpers.http_server import FileServer, closed_port_url


def _vggish_like_state_dict(width: int = 4) -> dict[str, torch.Tensor]:
    """torchvggish's key layout (conv layers at features.0/3/6/8/11/13), tiny shapes."""
    g = torch.Generator().manual_seed(0)
    state, c_in = {}, 1
    for i in (0, 3, 6, 8, 11, 13):
        state[f"features.{i}.weight"] = torch.randn(width, c_in, 3, 3, generator=g)
        state[f"features.{i}.bias"] = torch.randn(width, generator=g)
        c_in = width
    for i, (n_out, n_in) in zip((0, 2, 4), ((8, width * 24), (8, 8), (4, 8))):
        state[f"embeddings.{i}.weight"] = torch.randn(n_out, n_in, generator=g)
        state[f"embeddings.{i}.bias"] = torch.randn(n_out, generator=g)
    return state


@pytest.fixture(scope="module")
def served_weights():
    """(bytes, sha256, file name whose hash prefix is true) of a saved state dict."""
    buf = io.BytesIO()
    torch.save(_vggish_like_state_dict(), buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    return data, sha, f"vggish-{sha[:8]}.pth"


def test_none_is_random_init():
    assert resolve_weights("none", url="unused") == WeightsInfo("none", None, None, None)


def test_audioset_downloads_once_then_loads_from_cache(tmp_path, served_weights):
    data, sha, name = served_weights
    with FileServer({name: data}) as server:
        url = server.url + name
        info = resolve_weights("audioset", url=url, hub_dir=str(tmp_path), progress=False)
        assert server.count() == 1
    cache = tmp_path / "checkpoints" / name
    assert info == WeightsInfo("audioset", cache, sha, url)
    assert cache.read_bytes() == data
    # The server is gone: the second resolution must come from the cache, with the same hash.
    again = resolve_weights("audioset", url=url, hub_dir=str(tmp_path), progress=False)
    assert again == info
    state = load_state_dict(again.path)
    expected = _vggish_like_state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


# One process resolving the official weights: it signals that it is ready (torch imported), waits
# for the go, resolves, prints the SHA-256 it got.
_RESOLVE = """
import pathlib, sys, time
from mtt.models.weights import resolve_weights
url, hub, ready, go = sys.argv[1:]
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.005)
print(resolve_weights("audioset", url=url, hub_dir=hub, progress=False).sha256)
"""


@pytest.mark.slow
def test_four_processes_resolving_at_once_download_once(tmp_path, served_weights):
    """Parallel sweep jobs or torchrun ranks with the weights not yet cached: all four succeed,
    the file is fetched once, and nothing but the file is left in the cache."""
    import os
    import subprocess
    import sys
    import time

    from mtt.core.paths import REPO_ROOT

    data, sha, name = served_weights
    go = tmp_path / "go"
    with FileServer({name: data}) as server:
        server.slow(name, seconds=2.0)  # the download spans the other processes' start
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _RESOLVE,
                    server.url + name,
                    str(tmp_path / "hub"),
                    str(tmp_path / f"ready{i}"),
                    str(go),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(4)
        ]
        try:
            deadline = time.monotonic() + 120
            while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
                time.sleep(0.01)
            go.touch()
            results = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in results]
    assert [out.strip() for out, _ in results] == [sha] * 4
    assert [(r.method, r.path) for r in server.requests] == [("GET", name)]
    assert sorted(p.name for p in (tmp_path / "hub" / "checkpoints").iterdir()) == [name]


def test_audioset_refuses_a_file_whose_name_promises_another_hash(tmp_path, served_weights):
    data, sha, _ = served_weights
    wrong = "vggish-10086976.pth"
    assert not sha.startswith("10086976")
    with FileServer({wrong: data}) as server:
        with pytest.raises(DownloadError) as info:
            resolve_weights("audioset", url=server.url + wrong, hub_dir=str(tmp_path), progress=False)
    message = str(info.value)
    assert server.url + wrong in message and "10086976" in message and sha in message
    checkpoints = tmp_path / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_audioset_offline_with_empty_cache_says_what_to_do(tmp_path):
    url = closed_port_url() + "vggish-10086976.pth"
    with pytest.raises(DownloadError) as info:
        resolve_weights("audioset", url=url, hub_dir=str(tmp_path), progress=False)
    message = str(info.value)
    assert url in message
    assert str(tmp_path / "checkpoints" / "vggish-10086976.pth") in message
    assert "backbone.weights=/path/to/vggish-10086976.pth" in message


def test_url_without_hash_prefix_is_refused():
    with pytest.raises(ValueError, match="no SHA-256 prefix"):
        hash_prefix("http://127.0.0.1:1/vggish.pth")
    assert hash_prefix("https://x/releases/download/v0.1/vggish-10086976.pth") == "10086976"


def test_local_file_records_its_full_hash(tmp_path, served_weights, monkeypatch):
    data, sha, _ = served_weights
    (tmp_path / "mine.pth").write_bytes(data)
    monkeypatch.setenv("HOME", str(tmp_path))
    info = resolve_weights("~/mine.pth", url="unused")
    assert info == WeightsInfo("file", tmp_path.resolve() / "mine.pth", sha, None)


def test_missing_local_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="backbone.weights=") as info:
        resolve_weights(str(missing), url="unused")
    assert str(missing) in str(info.value)


def test_load_state_dict_reads_safetensors_and_refuses_other_objects(tmp_path):
    state = _vggish_like_state_dict()
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = load_state_dict(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_state_dict(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_state_dict(tmp_path / "junk.pth")


@pytest.mark.slow
def test_cli_with_audioset_offline_fails_fast_before_data_work(tmp_path):
    """No retries against a refused connection (tests/test_fetch.py) and no data work first."""
    from tests.helpers import run_module

    url = closed_port_url() + "vggish-10086976.pth"
    proc = run_module(
        [
            "mtt.run",
            "backbone.weights=audioset",
            f"backbone.url={url}",
            f"backbone.hub_dir={tmp_path / 'hub'}",
            f"paths.cache={tmp_path / 'cache'}",
            f"tracking.uri=sqlite:///{tmp_path}/m.db",
        ],
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    for needle in (url, str(tmp_path / "hub" / "checkpoints" / "vggish-10086976.pth"), "backbone.weights="):
        assert needle in proc.stderr
    assert not (tmp_path / "cache" / "toy-v1").exists(), "no data work before the weights are resolved"
    # Resolved before the run is created (mtt.training.preflight): one line, exit 1 as an offline server, no run.
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: VGGish AudioSet weights")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
