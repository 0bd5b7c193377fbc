"""Every stored array a number depends on carries a content checksum written with it and checked
when it is read: the feature store, the frozen-backbone cache, the checkpoints. A zeroed, edited,
truncated or missing file is refused in one line naming it and how to rebuild it (or, for mtt's
own leftover shards, rebuilt with a warning), and that is what ``python -m mtt.run`` shows."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from mtt.core.fs import CorruptFileError, atomic_replace, sidecar, verify_checksummed
from mtt.data.datasets import index_from_config
from mtt.features.preprocess import _extract, build_feature_store, frontend_params, store_path
from mtt.features.store import MANIFEST, PatchStore
from mtt.models.pooling import FREQ_MEAN, MAP
from mtt.tracking.checkpoint import LAST, TrainState, last_epoch, load_best, load_last, save_best, save_last
from mtt.training.backbone_cache import build_backbone_cache, cache_key
from tests.helpers import TINY, compose_cfg, run_module

STORE_FILES = ["patches.npy", "clips.npy", "checksums.npy", MANIFEST]


def zero(path: Path, start: int = 0) -> None:
    """Overwrite ``path`` with zeros from byte ``start`` on, keeping its size (what the probes did)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(size - start))


def rows_offset(npy: Path) -> int:
    """Where the rows of a .npy file start (after its header)."""
    return int(np.load(npy, mmap_mode="r").offset)


def open_and_read_all(path: Path) -> PatchStore:
    """What a run does with a store: open it and read its rows (every one, here)."""
    store = PatchStore(path)
    store.read(slice(None))
    return store


def assert_refused(exc: pytest.ExceptionInfo, file: Path, remedy: str) -> None:
    """One line, naming the file, saying how to go on."""
    message = str(exc.value)
    assert exc.value.path == file, message
    assert message.startswith(f"{file}: ") and "\n" not in message and remedy in message, message


@pytest.fixture
def feature_store(cache_dir, tmp_path) -> PatchStore:
    """A copy of the tiny toy feature store (the session's own stays intact)."""
    cfg = compose_cfg(TINY, cache=cache_dir)
    store = build_feature_store(index_from_config(cfg.data, progress=False), cfg.features, progress=False)
    copy = tmp_path / "features" / store.path.name
    shutil.copytree(store.path, copy)
    return PatchStore(copy)


@pytest.fixture(params=[MAP, FREQ_MEAN])
def backbone_cache(feature_store, tmp_path, request) -> PatchStore:
    """The tiny VGGish's cache of that store (random weights: no download), of the whole maps
    and of their frequency means (what GAP and AutoPool read)."""
    cfg = compose_cfg(TINY)
    from mtt.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg, 50).eval()
    key = cache_key(feature_store, None, cfg.backbone, model.backbone, reads=request.param)
    return build_backbone_cache(
        feature_store, model.encode, key, tmp_path / "backbone", torch.device("cpu"), progress=False
    )


def check_zeroed_files_are_refused(store: PatchStore, name: str) -> None:
    """Zero one file of a clean store (a copy: every file in turn by parametrisation)."""
    open_and_read_all(store.path)  # clean: opens and reads
    zero(store.path / name)
    with pytest.raises(CorruptFileError) as exc:
        open_and_read_all(store.path)
    assert_refused(exc, store.path / name, f"rm -r {store.path}")


@pytest.mark.parametrize("name", STORE_FILES)
def test_feature_store_refuses_each_zeroed_file(feature_store, name):
    check_zeroed_files_are_refused(feature_store, name)


@pytest.mark.parametrize("name", STORE_FILES)
def test_backbone_cache_refuses_each_zeroed_file(backbone_cache, name):
    check_zeroed_files_are_refused(backbone_cache, name)


@pytest.mark.parametrize("kind", ["feature store", "backbone cache"])
def test_zeroed_rows_are_found_when_read_naming_the_first_bad_row(feature_store, backbone_cache, kind):
    """The rows of patches.npy (header intact: the store opens), every one or a single one."""
    store = feature_store if kind == "feature store" else backbone_cache
    patches = store.path / "patches.npy"
    row_bytes = store.patches[0].nbytes
    n = len(store.patches)
    with open(patches, "r+b") as f:  # one row in the middle
        f.seek(rows_offset(patches) + (n // 2) * row_bytes)
        f.write(bytes(row_bytes))
    reopened = PatchStore(store.path)
    reopened.read(slice(0, n // 2))  # the rows before it are fine
    with pytest.raises(CorruptFileError, match=rf"row {n // 2} differs from its CRC-32") as exc:
        reopened.read(np.array([n // 2 + 1, n // 2]))
    assert_refused(exc, patches, f"rm -r {store.path}")
    zero(patches, rows_offset(patches))  # every row
    with pytest.raises(CorruptFileError, match="row 0 differs"):
        PatchStore(store.path).get(int(store.clip_ids[0]))


@pytest.mark.parametrize("workers,mode", [(0, "with_replacement"), (2, "with_replacement"), (0, "epoch")])
def test_training_stream_and_evaluation_check_the_rows_they_read(feature_store, workers, mode):
    """The readers of mtt.features.streams (training batches through pread, in DataLoader workers too,
    whose error torch re-raises in the main process: still the one-line error; the epoch mode's
    chunk cutter; evaluation)."""
    from omegaconf import OmegaConf

    from mtt.config import StreamConfig
    from mtt.features.streams import eval_batches, train_loader

    patches = feature_store.path / "patches.npy"
    zero(patches, rows_offset(patches))
    store = PatchStore(feature_store.path)
    labels = np.zeros((len(store), 3), dtype=np.float32)
    cfg = OmegaConf.structured(StreamConfig(num_workers=workers, mode=mode))
    with pytest.raises(CorruptFileError, match="differs from its CRC-32") as exc:
        next(train_loader(store, store.clip_ids, labels, cfg, 4, seed=0))
    assert_refused(exc, patches, f"rm -r {store.path}")
    with pytest.raises(CorruptFileError, match="differs from its CRC-32"):
        next(eval_batches(store, store.clip_ids, 8))


@pytest.mark.parametrize("name", ["patches.npy", "clips.npy", "checksums.npy"])
def test_truncated_or_missing_files_are_named(feature_store, name):
    file = feature_store.path / name
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size - 7)
    with pytest.raises(CorruptFileError, match=f"truncated: {size - 7:,} bytes, {size:,} were written") as exc:
        PatchStore(feature_store.path)
    assert_refused(exc, file, f"rm -r {feature_store.path}")
    file.unlink()
    with pytest.raises(CorruptFileError, match="missing"):
        PatchStore(feature_store.path)


def test_a_patches_file_of_another_shape_is_refused(feature_store):
    """Same size, same bytes, another header (another store's file put in its place)."""
    patches = feature_store.path / "patches.npy"
    rows = np.load(patches, allow_pickle=False)
    size = patches.stat().st_size
    np.save(patches, rows.reshape(len(rows) * 2, -1, rows.shape[-1]))
    assert patches.stat().st_size == size
    with pytest.raises(CorruptFileError, match=r"header says float16\(\d+, 48, 64\), float16\(\d+, 96, 64\)") as exc:
        PatchStore(feature_store.path)
    assert_refused(exc, patches, f"rm -r {feature_store.path}")


def test_an_edited_manifest_is_refused(feature_store):
    """A value changed by hand (or by a flipped bit) still parses: its own digest catches it."""
    file = feature_store.path / MANIFEST
    manifest = json.loads(file.read_text())
    clip = next(iter(manifest["seconds"]))
    manifest["seconds"][clip] += 1.0
    file.write_text(json.dumps(manifest, indent=1))
    with pytest.raises(CorruptFileError, match="differs from the SHA-256") as exc:
        PatchStore(feature_store.path)
    assert_refused(exc, file, f"rm -r {feature_store.path}")


def test_a_store_without_checksums_is_refused_with_the_rebuild_command(feature_store):
    """A store written before stores carried checksums: the manifest of format 2."""
    file = feature_store.path / MANIFEST
    manifest = json.loads(file.read_text())
    del manifest["files"], manifest["sha256"]
    file.write_text(json.dumps(manifest, indent=1))
    with pytest.raises(CorruptFileError, match="written before stores carried checksums") as exc:
        PatchStore(feature_store.path)
    assert_refused(exc, file, f"rm -r {feature_store.path} and run the same command again")


def test_a_cache_is_never_built_from_a_corrupt_feature_store(feature_store, tmp_path):
    """One zeroed row in the middle: the build reads every row, and checks each."""
    patches = feature_store.path / "patches.npy"
    row_bytes, n = feature_store.patches[0].nbytes, len(feature_store.patches)
    with open(patches, "r+b") as f:
        f.seek(rows_offset(patches) + (n // 2) * row_bytes)
        f.write(bytes(row_bytes))
    store = PatchStore(feature_store.path)
    cfg = compose_cfg(TINY)
    from mtt.models import build_model

    model = build_model(cfg, 50).eval()
    key = cache_key(store, None, cfg.backbone, model.backbone)
    with pytest.raises(CorruptFileError, match=f"row {n // 2} differs") as exc:
        build_backbone_cache(store, model.encode, key, tmp_path / "bb", torch.device("cpu"), progress=False)
    assert exc.value.path == patches
    assert not list((tmp_path / "bb").glob(f"*/{MANIFEST}")), "no finished cache"


def test_the_fingerprint_covers_the_contents(feature_store, tmp_path):
    """Two stores share a fingerprint only if they hold the same numbers (a store rebuilt from
    other audio, or by another decoder, never reuses a cache built from the first)."""
    from mtt.features.store import pack

    store, params = feature_store, feature_store.manifest["params"]
    rows = {int(c): np.asarray(store.get(c)) for c in store.clip_ids}
    counts = {c: len(r) for c, r in rows.items()}
    assert pack(tmp_path / "same", counts, rows.__getitem__, store.item_shape, params).fingerprint == store.fingerprint
    first = int(store.clip_ids[0])
    rows[first] = rows[first] + np.float16(1)
    assert pack(tmp_path / "other", counts, rows.__getitem__, store.item_shape, params).fingerprint != store.fingerprint


def test_a_corrupt_leftover_shard_is_decoded_again(tmp_path, cache_dir, caplog):
    """Shards of an interrupted build are mtt's own temporary files: one that no longer matches the
    CRC-32s written with it is decoded again, with a warning naming it, and the store is exact."""
    cfg = compose_cfg([*TINY, f"features.store={tmp_path / 'fs'}"], cache=cache_dir)
    index = index_from_config(cfg.data, progress=False)
    shards = store_path(index, cfg.features) / "shards"
    shards.mkdir(parents=True)
    clip = int(index.clip_ids[0])
    _extract((clip, str(index.audio_path(0)), str(shards / f"{clip}.npy"), frontend_params(cfg.features)))
    zero(shards / f"{clip}.npy", rows_offset(shards / f"{clip}.npy"))
    with caplog.at_level(logging.WARNING, logger="mtt.preprocess"):
        store = build_feature_store(index, cfg.features, progress=False)
    assert f"{shards / f'{clip}.npy'}: content differs from the CRC-32s" in caplog.text
    assert f"decoding clip {clip} again" in caplog.text
    clean = build_feature_store(index, compose_cfg(TINY, cache=cache_dir).features, progress=False)
    np.testing.assert_array_equal(store.get(clip), clean.get(clip))
    assert store.fingerprint == clean.fingerprint


# --- checkpoints --------------------------------------------------------------------------------


def trained(folder: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_last(folder, model, opt, TrainState(epoch=2, best_score=0.5, best_epoch=1))
    save_best(folder, model, {"epoch": 1, "tags": ["a", "b"]})
    return model, opt


def damage(file: Path, how: str) -> None:
    if how == "zeroed":
        zero(file)
    elif how == "random bytes":
        data = bytearray(file.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = np.random.default_rng(0).bytes(64)
        file.write_bytes(bytes(data))
    elif how == "truncated":
        file.write_bytes(file.read_bytes()[:-100])
    elif how == "no sidecar":
        sidecar(file).unlink()
    elif how == "missing":
        file.unlink()


@pytest.mark.parametrize("how", ["zeroed", "random bytes", "truncated", "no sidecar", "missing"])
def test_resume_refuses_a_damaged_last_checkpoint_naming_it(tmp_path, how):
    model, opt = trained(tmp_path)
    assert load_last(tmp_path, model, opt).epoch == 2  # clean: resumes
    damage(tmp_path / LAST, how)
    for read in (lambda: last_epoch(tmp_path), lambda: load_last(tmp_path, model, opt)):
        with pytest.raises(CorruptFileError) as exc:
            read()
        assert_refused(exc, tmp_path / LAST, "run with trainer.resume=false to start over, or delete it")


@pytest.mark.parametrize("name", ["best.safetensors", "best.json"])
@pytest.mark.parametrize("how", ["zeroed", "random bytes", "truncated"])
def test_a_damaged_best_checkpoint_is_refused(tmp_path, name, how):
    model, _ = trained(tmp_path)
    state, meta = load_best(tmp_path)
    assert torch.equal(state["weight"], model.weight) and meta["epoch"] == 1
    damage(tmp_path / name, how)
    with pytest.raises(CorruptFileError) as exc:
        load_best(tmp_path)
    assert_refused(exc, tmp_path / name, "train the run again")


def test_a_best_checkpoint_of_an_older_run_loads_with_a_warning(tmp_path, caplog):
    """Runs logged before checkpoints carried sidecars: mtt.tag still reads their artifacts."""
    model, _ = trained(tmp_path)
    sidecar(tmp_path / "best.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="mtt.tracking.checkpoint"):
        state, _ = load_best(tmp_path)
    assert torch.equal(state["weight"], model.weight)
    assert f"{tmp_path / 'best.safetensors'}: no checksum (written by an older mtt): loaded unchecked" in caplog.text


def test_a_crash_between_the_two_renames_leaves_a_file_that_still_verifies(tmp_path, monkeypatch):
    """The sidecar lands first; killed before the file's rename, the old file must still verify,
    also after a second crash at the same point, and a corrupt old file must still fail."""
    import mtt.core.fs

    file = tmp_path / "x.bin"
    atomic_replace(file, lambda p: p.write_bytes(b"old"), checksum=True)
    real = mtt.core.fs.durable_replace

    def killed(src, dst):  # the process dies after the sidecar's rename, before the file's
        if Path(dst) != sidecar(file):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(mtt.core.fs, "durable_replace", killed)
    for new in (b"new one", b"newer"):
        with pytest.raises(KeyboardInterrupt):
            atomic_replace(file, lambda p, new=new: p.write_bytes(new), checksum=True)
        assert json.loads(sidecar(file).read_text())["size"] == len(new), "the sidecar landed"
        assert file.read_bytes() == b"old" and verify_checksummed(file, "-")
    monkeypatch.setattr(mtt.core.fs, "durable_replace", real)
    atomic_replace(file, lambda p: p.write_bytes(b"fresh"), checksum=True)
    assert verify_checksummed(file, "-")
    file.write_bytes(b"frash")  # same size, other content
    with pytest.raises(CorruptFileError, match="differs from the SHA-256"):
        verify_checksummed(file, "-")
    atomic_replace(file, lambda p: p.write_bytes(b"fresher"), checksum=True)
    file.write_bytes(b"old")  # accepted while its replacement was pending, not two writes later
    with pytest.raises(CorruptFileError):
        verify_checksummed(file, "-")


# --- what the user of python -m mtt.run sees ----------------------------------------------------


def one_error_line(proc) -> str:
    """The refusal: exit status 1, no traceback, and one ``error:`` line on stderr, the last."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]


def test_cli_refuses_a_zeroed_feature_store_in_one_line(feature_store, cache_dir, tmp_path):
    patches = feature_store.path / "patches.npy"
    zero(patches, rows_offset(patches))
    proc = run_module(
        [
            "mtt.run",
            *TINY,
            f"paths.cache={cache_dir}",  # the session's generated audio
            f"features.store={feature_store.path.parent}",  # the zeroed copy of its store
            f"tracking.uri=sqlite:///{tmp_path}/m.db",
        ],
        check=False,
    )
    line = one_error_line(proc)
    assert line.startswith(f"error: {patches}: row ") and f"rm -r {feature_store.path}" in line
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and str(patches) in run.data.tags["error"]  # the run says why


def test_cli_refuses_to_resume_from_a_zeroed_last_checkpoint(tmp_path):
    """Refused before the run is reopened: it keeps its status, and nothing trains."""
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("killed"))
    client.set_terminated(run.info.run_id, "KILLED")
    folder = tmp_path / "cache" / "checkpoints" / run.info.run_id
    folder.mkdir(parents=True)
    trained(folder)
    zero(folder / LAST)
    proc = run_module(
        [
            "mtt.run",
            *TINY,
            f"paths.cache={tmp_path / 'cache'}",
            f"tracking.uri={uri}",
            f"trainer.resume={run.info.run_id}",
        ],
        check=False,
    )
    line = one_error_line(proc)
    assert line == (
        f"error: {folder / LAST}: content differs from the SHA-256 written with it (corrupt); "
        "cannot resume from it: run with trainer.resume=false to start over, or delete it"
    )
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    # The clip index is read before any run is reopened (mtt.training.preflight: freqN and the batch size
    # are checked before the run), which generates the embedded dataset; nothing is computed from it.
    assert not (tmp_path / "cache" / "features").exists(), "no feature or training work"


def test_preprocess_cli_names_a_truncated_store(feature_store, cache_dir):
    """Was a bare ``mmap length is greater than file size`` traceback naming no file."""
    patches = feature_store.path / "patches.npy"
    size = patches.stat().st_size
    with open(patches, "r+b") as f:
        f.truncate(size // 2)
    proc = run_module(
        ["mtt.preprocess", *TINY, f"paths.cache={cache_dir}", f"features.store={feature_store.path.parent}"],
        check=False,
    )
    assert one_error_line(proc) == (
        f"error: {patches}: truncated: {size // 2:,} bytes, {size:,} were written; "
        f"rebuild it: rm -r {feature_store.path} and run the same command again (it recomputes the store)"
    )
