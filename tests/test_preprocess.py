"""Preprocessing real-format trees: kill -9 and resume, undecodable clips, short clips."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mtt.core.paths import REPO_ROOT
from mtt.data.embedded import complete_tags, render_clip
from mtt.data.index import build_index
from mtt.data.mtat import FOLDERS, write_annotations, write_mp3
from mtt.features.preprocess import build_feature_store, store_path, summary
from mtt.features.store import MANIFEST, PatchStore
from tests.helpers import TINY_MODEL, compose_cfg, run_module

SR = 16000
# Tag sets the synthesiser renders, all within the published top 50 (data=mtat uses top50).
RECIPES = [
    {"guitar", "slow"},
    {"piano"},
    {"drums", "fast"},
    {"violin", "female"},
    {"techno"},
    {"flute", "quiet"},
    {"harpsichord"},
    {"sitar", "male"},
]


def make_tree(
    root: Path,
    n_clips: int,
    seconds: float,
    extra: dict[str, bytes] | None = None,
    short: dict[str, float] | None = None,
) -> list[tuple[int, frozenset, str]]:
    """An MTAT-format tree: ``n_clips`` distinct rendered clips spread over the 16 folders, plus
    ``extra`` files written verbatim (bad mp3s) and ``short`` clips of the given lengths."""
    rows = []
    clip_id = 2
    for k in range(n_clips):
        tags = complete_tags(RECIPES[k % len(RECIPES)])
        rel = f"{FOLDERS[k % 16]}/artist{k}-album-01-song-{k}-0-29.mp3"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_mp3(root / rel, render_clip(tags, seconds, SR, np.random.default_rng(k)))
        rows.append((clip_id, tags, rel))
        clip_id += 3  # increasing, not contiguous, as in MTAT
    for rel, data in (extra or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        rows.append((clip_id, complete_tags({"guitar"}), rel))
        clip_id += 3
    for rel, secs in (short or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_mp3(root / rel, render_clip(complete_tags({"piano"}), secs, SR, np.random.default_rng(clip_id)))
        rows.append((clip_id, complete_tags({"piano"}), rel))
        clip_id += 3
    write_annotations(root / "annotations_final.csv", rows)
    return rows


def mtat_overrides(root: Path, store: Path) -> list[str]:
    return ["data=mtat", f"data.root={root}", f"features.store={store}"]


def assert_same_store(a: PatchStore, b: PatchStore) -> None:
    """Entry by entry: the clip table, every clip's patches, failures and fingerprint."""
    np.testing.assert_array_equal(np.load(a.path / "clips.npy"), np.load(b.path / "clips.npy"))
    assert a.patches.shape == b.patches.shape and a.patches.dtype == b.patches.dtype == np.float16
    for clip_id in a.clip_ids:
        np.testing.assert_array_equal(a.get(clip_id), b.get(clip_id), err_msg=f"clip {clip_id}")
    np.testing.assert_array_equal(np.asarray(a.patches), np.asarray(b.patches))
    assert a.failed == b.failed and a.fingerprint == b.fingerprint


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(tmp_path):
    root = tmp_path / "mtat"
    n = 160  # enough that both workers are busy for a while after the first shard lands
    make_tree(root, n, seconds=4.0)
    cache = tmp_path / "cache"
    args = [*mtat_overrides(root, tmp_path / "killed"), f"paths.cache={cache}"]
    killed_path = store_path(build_index(root, tags="top50"), compose_cfg(args).features)
    shards = killed_path / "shards"

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtt.preprocess", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if shards.is_dir() and any(
                e.name.endswith(".npy") and not e.name.startswith(".") for e in os.scandir(shards)
            ):
                break  # a first clip is stored (temporaries start with a dot)
            time.sleep(0.002)
        assert proc.poll() is None, "preprocessing finished before it could be killed: make the tree bigger"
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: main process and its workers, as kill -9
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.2)  # let the killed workers' exits settle before we look
    assert not (killed_path / MANIFEST).exists(), "killed before the store was finished"
    done = sorted(shards.glob("*.npy"))
    assert 0 < len(done) < n
    # A killed writer leaves at most a temporary file: make one by hand, truncated, and check
    # that the re-run neither reads it as a shard nor keeps it.
    (shards / f".{done[0].name}.abcdefgh.tmp").write_bytes(done[0].read_bytes()[:100])

    rerun = run_module(["mtt.preprocess", *args])
    computed = re.search(r"computing (\d+) of (\d+) clips", rerun.stderr + rerun.stdout)
    assert computed, rerun.stderr[-2000:]
    assert int(computed.group(2)) == n and int(computed.group(1)) <= n - len(done), "done shards are reused"
    assert "feature store:" in rerun.stdout and f"{n} clips" in rerun.stdout
    assert not any(killed_path.rglob("*.tmp")) and not shards.exists()

    reference = compose_cfg(mtat_overrides(root, tmp_path / "reference"), cache=cache)
    ref_store = build_feature_store(build_index(root, tags="top50"), reference.features, progress=False)
    assert ref_store.path != killed_path
    assert_same_store(PatchStore(killed_path), ref_store)
    assert len(ref_store) == n and (ref_store.counts == 4).all()


def test_temporaries_and_partial_shards_are_never_read(tmp_path):
    """A shard exists whole or not at all: leftovers of a killed run are deleted, not read."""
    root = tmp_path / "mtat"
    make_tree(root, 6, seconds=2.0)
    cfg = compose_cfg(mtat_overrides(root, tmp_path / "store"))
    index = build_index(root, tags="top50")
    reference = build_feature_store(index, compose_cfg(mtat_overrides(root, tmp_path / "ref")).features, progress=False)
    path = store_path(index, cfg.features)
    (path / "shards").mkdir(parents=True)
    first = int(index.clip_ids[0])
    # What a kill in the middle of np.save / pack leaves behind: temporaries, never final names.
    (path / "shards" / f".{first}.npy.x1y2z3.tmp").write_bytes(b"\x93NUMPY truncated")
    (path / ".patches.npy.tmp").write_bytes(b"\x93NUMPY")
    store = build_feature_store(index, cfg.features, progress=False)
    assert_same_store(store, reference)
    assert not list(path.rglob("*.tmp"))


def test_undecodable_and_short_clips_are_reported_and_training_runs_on_the_rest(tmp_path, capsys):
    from mtt.tracking.runs import MlflowTracker
    from mtt.training.train import train

    root = tmp_path / "mtat"
    root.mkdir()
    good = root / "good.mp3"
    write_mp3(good, render_clip(complete_tags({"guitar"}), 3.0, SR, np.random.default_rng(99)))
    bad = {
        "6/norine_braun-now_and_zen-08-gently-117-146.mp3": b"",  # MTAT's own empty files
        "8/cut-before-the-first-frame-0-29.mp3": good.read_bytes()[:200],
        "9/not-audio-0-29.mp3": b"<html><body>404 Not Found</body></html>\n" * 20,
    }
    rows = make_tree(root, 16, seconds=2.0, extra=bad, short={"2/very-short-0-1.mp3": 0.5})
    good.unlink()
    bad_ids = {str(c) for c, _, rel in rows if rel in bad}
    short_id = next(c for c, _, rel in rows if rel.startswith("2/very-short"))

    cfg = compose_cfg(
        [
            *mtat_overrides(root, tmp_path / "store"),
            *TINY_MODEL,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        ],
        cache=tmp_path / "cache",
    )
    store = build_feature_store(build_index(root, tags="top50"), cfg.features, progress=False)
    assert set(store.failed) == bad_ids
    assert "empty file" in store.failed[next(c for c in bad_ids if int(c) == rows[16][0])]
    for reason in store.failed.values():
        assert str(root) in reason, "the reason names the file"
    assert len(store) == 17 and store.count(short_id) == 0 and store.get(short_id).shape == (0, 96, 64)

    report = summary(store)
    assert "3 failed" in report and "1 shorter than one patch" in report
    for rel in bad:
        assert rel in report

    with MlflowTracker(cfg.tracking.uri, "unit", "bad-files") as tracker:
        metrics = train(cfg, tracker)
    assert 0 <= metrics["test_roc_auc"] <= 1
    from mlflow.tracking import MlflowClient

    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.data.tags["feature_store"] == store.fingerprint
    # 16 good clips over 16 folders: 12 train (0-b), and the 0.5 s clip in folder 2 is left out.
    assert run.data.params["derived.train_clips"] == "12"
    assert run.data.params["derived.train_clips_declared"] == "16"  # + the short one and the 3 failed


def test_truncated_clips_are_reported_kept_and_counted_in_the_run(tmp_path):
    """An mp3 cut short (a broken download) decodes to what it still holds: it is stored with the
    patches it has, named in the manifest and the summary, and the run logs the count."""
    import json

    from mlflow.tracking import MlflowClient

    from mtt.data.datasets import index_from_config
    from mtt.data.mtat import write_clip_info
    from mtt.features.preprocess import truncated_clips
    from mtt.tracking.runs import MlflowTracker
    from mtt.training.train import train

    root = tmp_path / "mtat"
    rows = make_tree(root, 16, seconds=4.0)
    cut_id, _, cut_rel = rows[0]  # folder 0: a training clip
    data = (root / cut_rel).read_bytes()
    (root / cut_rel).write_bytes(data[: int(len(data) * 0.4)])  # about 1.6 of its 4 s
    # clip_info says 4 s for all clips but the last, which falls back to data.clip_seconds.
    write_clip_info(
        root / "clip_info_final.csv",
        [
            {
                "clip_id": c,
                "track_number": 1,
                "title": "t",
                "artist": "a",
                "album": "b",
                "url": "u",
                "segmentStart": 10,
                "segmentEnd": 14,
                "original_url": "o",
                "mp3_path": rel,
            }
            for c, _, rel in rows[:-1]
        ],
    )
    cfg = compose_cfg(
        [
            *mtat_overrides(root, tmp_path / "store"),
            "data.clip_seconds=4.0",
            *TINY_MODEL,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        ],
        cache=tmp_path / "cache",
    )
    index = index_from_config(cfg.data)
    assert index.expected_seconds.tolist() == [4.0] * 16
    store = build_feature_store(index, cfg.features, progress=False)

    assert list(store.truncated) == [str(cut_id)]
    entry = store.truncated[str(cut_id)]
    assert entry["file"] == cut_rel and entry["expected_seconds"] == 4.0 and 1.0 < entry["decoded_seconds"] < 2.2
    assert json.loads((store.path / MANIFEST).read_text())["truncated"] == store.truncated
    assert store.count(cut_id) >= 1 and store.count(rows[1][0]) == 4  # kept, usable; the others whole
    report = summary(store)
    assert "1 truncated" in report and f"{cut_id}: {cut_rel}: {entry['decoded_seconds']:g} s of 4 s" in report

    with MlflowTracker(cfg.tracking.uri, "unit", "truncated") as tracker:
        train(cfg, tracker)
    params = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id).data.params
    assert params["derived.truncated_clips"] == "1" and params["derived.train_clips"] == "12"  # still trained on

    # Without clip_info the nominal length decides: MTAT's 29.1 s flags all of these 4 s clips;
    # with no length known there is nothing to check.
    patch = cfg.features.patch_frames * cfg.features.hop_seconds
    assert len(truncated_clips(build_index(root, clip_info=None, clip_seconds=29.1), store.seconds, patch)) == 16
    assert truncated_clips(build_index(root, clip_info=None), store.seconds, patch) == {}


def test_cli_prints_the_report(tmp_path):
    root = tmp_path / "mtat"
    make_tree(root, 4, seconds=1.5, extra={"3/empty-0-29.mp3": b""})
    out = run_module(["mtt.preprocess", *mtat_overrides(root, tmp_path / "store"), f"paths.cache={tmp_path}"])
    assert re.search(r"5 clips?, \d+ patches", out.stdout) is None  # the failed one is not a stored clip
    assert "4 clips" in out.stdout and "1 failed" in out.stdout and "3/empty-0-29.mp3: empty file" in out.stdout
    again = run_module(["mtt.preprocess", *mtat_overrides(root, tmp_path / "store"), f"paths.cache={tmp_path}"])
    assert "4 clips" in again.stdout and "computing" not in again.stderr, "a finished store is just opened"


def _build_in_worker(root: str, cache: str) -> int:
    """What a job of a ``hydra/launcher=joblib`` sweep does first: build the feature store."""
    cfg = compose_cfg(["data=mtat", f"data.root={root}", "features.workers=2"], cache=Path(cache))
    return len(build_feature_store(build_index(root, tags="top50"), cfg.features, progress=False))


@pytest.mark.slow
def test_the_store_builds_with_worker_processes_inside_a_joblib_worker(tmp_path):
    """joblib's workers run under its own 'loky' start method, which the preprocessing pool's
    children used to try (and fail) to restore: every parallel sweep job died building a store."""
    from joblib import Parallel, delayed

    make_tree(tmp_path / "mtat", 64, 1.0)  # enough clips for the worker pool
    (n,) = Parallel(n_jobs=2, backend="loky")(
        delayed(_build_in_worker)(str(tmp_path / "mtat"), str(tmp_path / "c")) for _ in range(1)
    )
    assert n == 64


def test_a_store_folder_holding_someone_elses_files_is_refused_and_left(tmp_path):
    """A feature store replaces its own manifest and shards only: a folder at the store's path
    that holds anything else (however unlikely its name) is refused, byte for byte untouched."""
    root = tmp_path / "mtat"
    make_tree(root, 2, seconds=1.0)
    cfg = compose_cfg(mtat_overrides(root, tmp_path / "store"))
    index = build_index(root, tags="top50")
    path = store_path(index, cfg.features)
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{path} holds files that are not a feature store's"):
        build_feature_store(index, cfg.features, progress=False)
    assert [p.name for p in path.iterdir()] == ["notes.txt"] and (path / "notes.txt").read_text() == "mine"


def wav_bytes(wave: np.ndarray, subtype: str = "PCM_16") -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, SR, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_damaged_wavs_are_named_for_what_they_are(tmp_path):
    """A wav cut short of what its header declares is 'truncated' (not 'shorter than one patch
    (0.00 s)'), one holding NaN samples 'non-finite' (its NaN features used to reach training and
    be blamed on the learning rate): both are failures naming the file, for preprocessing and
    tagging alike; a streamed wav (no length in its header) and a writer's padding are neither."""
    import struct

    from mtt.data.audio import DamagedAudioError, decode_audio, load_audio

    wave = render_clip(complete_tags({"guitar"}), 3.0, SR, np.random.default_rng(5)).astype(np.float32)
    full = wav_bytes(wave)
    nan = wave.copy()
    nan[1000:1010] = np.nan
    damaged = {"3/cut-0-29.wav": full[:60], "4/nan-0-29.wav": wav_bytes(nan, "FLOAT")}
    root = tmp_path / "mtat"
    rows = make_tree(root, 4, seconds=2.0, extra=damaged)
    store = build_feature_store(
        build_index(root, tags="top50"), compose_cfg(mtat_overrides(root, tmp_path / "s")).features, progress=False
    )
    ids = {rel: str(c) for c, _, rel in rows}
    assert set(store.failed) == {ids[rel] for rel in damaged}
    assert store.failed[ids["3/cut-0-29.wav"]] == (
        f"{root / '3/cut-0-29.wav'}: truncated: its header declares 3.00 s of audio, the file holds 0.00 s "
        "(cut during a copy or a download?)"
    )
    assert (
        store.failed[ids["4/nan-0-29.wav"]]
        == f"{root / '4/nan-0-29.wav'}: 10 non-finite sample(s) (NaN or inf): damaged audio"
    )
    for rel in damaged:  # mtt.tag's decoder (libsndfile, then ffmpeg) says the same, without a fallback
        with pytest.raises(DamagedAudioError, match=str(root / rel)):
            decode_audio(root / rel)
    streamed = bytearray(full)
    at = streamed.find(b"data")
    streamed[at + 4 : at + 8] = struct.pack("<I", 0xFFFFFFFF)  # what a writer that streams puts there
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
    (tmp_path / "padded.wav").write_bytes(full[:-100])  # 50 samples (3 ms) short: padding, not a cut
    assert len(load_audio(tmp_path / "streamed.wav")) == len(wave)
    assert len(load_audio(tmp_path / "padded.wav")) == len(wave) - 50
