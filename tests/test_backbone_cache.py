"""The frozen-backbone cache: built once, reused, keyed by the weights, equal to the live backbone,
resumable after an interruption, optional, and invisible in the metrics.

Backbone work is counted with a real global forward hook on every VGGish module, not by mocking.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from mtt.data.datasets import index_from_config
from mtt.features.preprocess import build_feature_store
from mtt.features.store import MANIFEST, PatchStore, pack, params_key
from mtt.models import build_model
from mtt.models.pooling import FREQ_MEAN, MAP, reads_of, reduce_map
from mtt.models.vggish import VGGish
from mtt.models.weights import load_state_dict, resolve_weights
from mtt.tracking.runs import MlflowTracker
from mtt.training.backbone_cache import build_backbone_cache, cache_key
from mtt.training.train import prepare, train
from tests.helpers import TINY, compose_cfg, run_module


class BackboneForwards:
    """Counts VGGish forward calls and the patches they saw (a global module forward hook)."""

    def __init__(self, stop_after: int | None = None):
        self.calls = self.patches = 0
        self.stop_after = stop_after

    def _hook(self, module, args, output):
        if isinstance(module, VGGish):
            self.calls += 1
            self.patches += args[0].shape[0]
            if self.stop_after is not None and self.calls >= self.stop_after:
                raise Interrupted(f"stopped after {self.calls} backbone forwards")

    def __enter__(self) -> BackboneForwards:
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class Interrupted(Exception):
    pass


def save_weights(path, seed: int):
    """A width-1/8 VGGish state dict with seeded random values, saved like a real .pth."""
    torch.manual_seed(seed)
    torch.save(VGGish(width=0.125).state_dict(), path)
    return path


def cfg_for(tmp_path, cache_dir, *extra):
    return compose_cfg([*TINY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra], cache=cache_dir)


def store_of(cfg) -> PatchStore:
    return build_feature_store(index_from_config(cfg.data, progress=False), cfg.features, progress=False)


def model_of(cfg):
    w = resolve_weights(cfg.backbone.weights, cfg.backbone.url, progress=False)
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, 50, load_state_dict(w.path) if w.path else None).eval()
    if cfg.trainer.channels_last:  # as mtt.training.train.prepare lays it out
        model.backbone.to(memory_format=torch.channels_last)
    return model, w


def cache_dir_of(cfg, store, model, weights):
    """Where ``mtt.training.train.prepare`` keeps the cache of this config (keyed by what its pool reads)."""
    key = cache_key(store, weights.sha256, cfg.backbone, model.backbone, reads=reads_of(model.pool))
    return cfg.paths.cache + "/backbone/" + params_key(key)


def run(cfg, name: str):
    with MlflowTracker(cfg.tracking.uri, "cache", name) as tracker:
        metrics = train(cfg, tracker)
    return metrics, MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)


def test_cache_is_built_once_then_reused_without_backbone_work(tmp_path, cache_dir):
    # A weights file unique to this test: its cache cannot exist yet.
    cfg = cfg_for(tmp_path, cache_dir, f"backbone.weights={save_weights(tmp_path / 'w.pth', 1)}")
    store = store_of(cfg)
    with BackboneForwards() as first:
        m1, r1 = run(cfg, "first")
    model, weights = model_of(cfg)
    cached = PatchStore(cache_dir_of(cfg, store, model, weights))
    # One forward per stored patch (+ a one-patch probe for the output shape), none in training.
    assert first.patches == store.patches.shape[0] + 1
    assert r1.data.params["derived.backbone_cached"] == "True"
    mtime = (cached.path / "patches.npy").stat().st_mtime_ns
    with BackboneForwards() as second:
        m2, r2 = run(cfg, "second")
    assert second.calls == 0
    assert (cached.path / "patches.npy").stat().st_mtime_ns == mtime
    assert m1 == m2  # same seed, same cache: the same run


def test_other_weights_other_cache_and_cache_equals_live_backbone(tmp_path, cache_dir):
    caches = []
    for seed in (1, 2):
        cfg = cfg_for(tmp_path, cache_dir, f"backbone.weights={save_weights(tmp_path / f'w{seed}.pth', seed)}")
        store = store_of(cfg)
        model, weights = model_of(cfg)
        key = cache_key(store, weights.sha256, cfg.backbone, model.backbone)
        cache = build_backbone_cache(store, model.encode, key, tmp_path / "bb", torch.device("cpu"), progress=False)
        with torch.no_grad():
            live = model.encode(torch.from_numpy(np.asarray(store.patches, dtype=np.float32))).numpy()
        got = np.asarray(cache.patches, dtype=np.float32)
        assert got.shape == live.shape and cache.item_shape == live.shape[1:]
        np.testing.assert_allclose(got, live, rtol=2e-3, atol=1e-3 * np.abs(live).max())
        np.testing.assert_array_equal(cache.clip_ids, store.clip_ids)
        np.testing.assert_array_equal(cache.counts, store.counts)
        assert cache.manifest["params"]["weights"] == weights.sha256
        caches.append((cache, live))
    (a, live_a), (b, live_b) = caches
    assert a.path != b.path and a.fingerprint != b.fingerprint
    assert sorted(p.name for p in (tmp_path / "bb").iterdir() if not p.name.startswith(".")) == sorted(
        [a.path.name, b.path.name]
    )
    assert not np.allclose(live_a, live_b, atol=1e-3 * np.abs(live_a).max())  # really other outputs


def test_random_init_key_follows_the_backbone_values(tmp_path, cache_dir):
    cfg = cfg_for(tmp_path, cache_dir)
    store = store_of(cfg)
    keys = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        keys.append(cache_key(store, None, cfg.backbone, build_model(cfg, 50).backbone))
    assert keys[0] == keys[1] != keys[2]
    with pytest.raises(ValueError, match="random"):
        cache_key(store, None, cfg.backbone)


def test_precision_and_device_are_in_the_key(tmp_path, cache_dir):
    """A cache built under bf16 autocast is not what an fp32 run reads (nor a CUDA-built one a
    CPU run's): the two builds land in different folders with different values."""
    cfg = cfg_for(tmp_path, cache_dir)
    store = store_of(cfg)
    model, _ = model_of(cfg)
    cpu = torch.device("cpu")
    keys = {
        dtype: cache_key(store, None, cfg.backbone, model.backbone, device=cpu, autocast_dtype=dtype)
        for dtype in (None, torch.bfloat16)
    }
    assert keys[None] != keys[torch.bfloat16]
    assert cache_key(store, None, cfg.backbone, model.backbone, device=torch.device("cuda")) != keys[None]
    fp32, bf16 = (
        build_backbone_cache(
            store, model.encode, keys[dtype], tmp_path / "bb", cpu, progress=False, autocast_dtype=dtype
        )
        for dtype in (None, torch.bfloat16)
    )
    assert fp32.path != bf16.path
    assert not np.array_equal(np.asarray(fp32.patches), np.asarray(bf16.patches))
    assert (fp32.manifest["params"]["compute"]["dtype"], bf16.manifest["params"]["compute"]["dtype"]) == (
        "float32",
        "bfloat16",
    )
    with pytest.raises(ValueError, match="float32 but the build computes on cpu/bfloat16"):
        build_backbone_cache(
            store, model.encode, keys[None], tmp_path / "other", cpu, progress=False, autocast_dtype=torch.bfloat16
        )


def test_interrupted_build_resumes_to_the_same_cache(tmp_path, cache_dir):
    cfg = cfg_for(tmp_path, cache_dir)
    store = store_of(cfg)
    total = store.patches.shape[0]
    model, _ = model_of(cfg)
    key = cache_key(store, None, cfg.backbone, model.backbone)
    cpu, batch = torch.device("cpu"), 2  # chunks of 8 batches = 16 rows
    assert total >= 48, "the tiny store must span several chunks"
    with BackboneForwards(stop_after=20), pytest.raises(Interrupted):  # probe + 19 batches
        build_backbone_cache(store, model.encode, key, tmp_path / "a", cpu, batch_size=batch, progress=False)
    path = tmp_path / "a" / params_key(key)
    assert not (path / MANIFEST).exists()
    with pytest.raises(FileNotFoundError):
        PatchStore(path)  # an unfinished build is never read as a cache
    assert json.loads((path / "progress.json").read_text())["rows_done"] == 32
    with BackboneForwards() as resumed:
        a = build_backbone_cache(store, model.encode, key, tmp_path / "a", cpu, batch_size=batch, progress=False)
    assert resumed.patches == total - 32 + 1  # only the rows not yet done (+ the probe)
    assert not (path / "progress.json").exists()
    b = build_backbone_cache(store, model.encode, key, tmp_path / "b", cpu, batch_size=batch, progress=False)
    np.testing.assert_array_equal(np.asarray(a.patches), np.asarray(b.patches))
    assert a.fingerprint == b.fingerprint and a.manifest == b.manifest


def test_disabled_cache_trains_live_with_the_same_metrics(tmp_path, cache_dir):
    w = save_weights(tmp_path / "w.pth", 3)
    live_cfg = cfg_for(tmp_path, cache_dir, f"backbone.weights={w}", "backbone.cache=false", "trainer.epochs=2")
    store = store_of(live_cfg)
    model, weights = model_of(live_cfg)
    with BackboneForwards() as live_fw:
        live, live_run = run(live_cfg, "live")
    assert live_run.data.params["derived.backbone_cached"] == "False"
    assert live_fw.calls > 0
    assert not Path(cache_dir_of(live_cfg, store, model, weights)).exists()  # nothing was cached
    cached_cfg = cfg_for(tmp_path, cache_dir, f"backbone.weights={w}", "trainer.epochs=2")
    with BackboneForwards() as cached_fw:
        cached, cached_run = run(cached_cfg, "cached")
    assert cached_run.data.params["derived.backbone_cached"] == "True"
    assert cached_fw.patches == store.patches.shape[0] + 1  # the build only
    assert live.keys() == cached.keys()
    for k, v in live.items():
        if math.isnan(v):
            assert math.isnan(cached[k]), k
        else:  # the cache stores float16 conv maps; the live path keeps float32
            assert cached[k] == pytest.approx(v, abs=5e-3), k


@pytest.mark.parametrize("head", ["gap2", "autopool"])
def test_compact_and_full_caches_give_the_same_metrics(tmp_path, cache_dir, monkeypatch, head):
    """GAP and AutoPool read the frequency mean, so their cache holds ``(C, T, 1)``, a quarter of
    the ``(C, T, F)`` map. The same run on the whole map (the same pool declared as reading it)
    ends with the same metrics to float16 rounding: the inputs differ by where the rounding falls
    (after the frequency mean, or before it); measured, 3 epochs: at most 6e-7 (train loss);
    bound 1e-5."""
    # Weights of this head's own: GAP and AutoPool share a cache (they read the same).
    w = save_weights(tmp_path / "w.pth", {"gap2": 4, "autopool": 6}[head])
    cfg = cfg_for(tmp_path, cache_dir, f"backbone.weights={w}", "trainer.epochs=3", f"+head={head}")
    store = store_of(cfg)
    metrics, caches = {}, {}
    for reads in (FREQ_MEAN, MAP):
        monkeypatch.setattr(type(model_of(cfg)[0].pool), "reads", reads)
        with BackboneForwards() as built:
            metrics[reads], r = run(cfg, reads)
        assert built.patches == store.patches.shape[0] + 1  # each built (and trained on) its own
        assert r.data.params["derived.backbone_cached"] == "True"
        caches[reads] = PatchStore(cache_dir_of(cfg, store, *model_of(cfg)))
        assert caches[reads].manifest["params"]["reads"] == reads
    c, t, f = caches[MAP].item_shape
    assert f > 1 and caches[FREQ_MEAN].item_shape == (c, t, 1)
    size = {k: (v.path / "patches.npy").stat().st_size for k, v in caches.items()}
    assert size[FREQ_MEAN] < size[MAP] / (f - 0.5)  # a quarter of the bytes for VGGish's F = 4
    compact, full = metrics[FREQ_MEAN], metrics[MAP]
    assert compact.keys() == full.keys()
    for k, v in full.items():
        if math.isnan(v):
            assert math.isnan(compact[k]), k
        else:
            assert compact[k] == pytest.approx(v, abs=1e-5), k
    assert compact != full  # really two caches: not bit-identical runs


def test_a_pool_that_reads_more_or_less_never_reuses_another_pools_cache(tmp_path, cache_dir):
    """pool=max needs the whole map: a GAP run's compact cache is not reused for it (nor the
    other way round), while AutoPool, which reads what GAP reads, shares GAP's."""
    w = save_weights(tmp_path / "w.pth", 5)
    store = store_of(cfg_for(tmp_path, cache_dir))
    seen = {}
    for pool, builds in (("gap", True), ("max", True), ("autopool", False), ("gap", False), ("max", False)):
        cfg = cfg_for(tmp_path, cache_dir, f"backbone.weights={w}", f"pool={pool}")
        with BackboneForwards() as fw:
            p = prepare(cfg)
        assert fw.patches == (store.patches.shape[0] + 1 if builds else 0), pool
        seen.setdefault(reads_of(p.model.pool), set()).add(p.inputs.path)
        c, t, f = model_of(cfg)[0].backbone.out_channels, 6, 4
        assert p.inputs.item_shape == ((c, t, f) if pool == "max" else (c, t, 1)), pool
    assert {k: len(v) for k, v in seen.items()} == {MAP: 1, FREQ_MEAN: 1}
    assert seen[MAP] != seen[FREQ_MEAN]


def test_an_old_format_cache_is_named_in_one_line_and_the_compact_one_built(tmp_path, cache_dir, caplog):
    """A cache written before caches kept only what the pool reads (format 2: every pool's whole
    map) is never read again; the build of its successor names it once, with the space it holds."""
    cfg = cfg_for(tmp_path, cache_dir)
    store = store_of(cfg)
    model, _ = model_of(cfg)
    key = cache_key(store, None, cfg.backbone, model.backbone, reads=FREQ_MEAN)
    old_key = {**{k: v for k, v in key.items() if k != "reads"}, "format": 2}
    with torch.no_grad():
        full = model.encode(torch.from_numpy(np.asarray(store.patches, dtype=np.float32))).numpy()
    root = tmp_path / "bb"
    old = root / params_key(old_key)
    counts = {int(c): int(n) for c, n in zip(store.clip_ids, store.counts)}
    pack(old, counts, lambda c: full[store.rows(c)], full.shape[1:], old_key)
    before = {p.name: p.stat().st_mtime_ns for p in old.iterdir()}
    with caplog.at_level(logging.WARNING, logger="mtt.training.backbone_cache"):
        cache = build_backbone_cache(store, model.encode, key, root, torch.device("cpu"), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "mtt.training.backbone_cache"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert str(old) in lines[0] and "older format" in lines[0] and "rm -r it to free" in lines[0]
    assert cache.path != old and cache.item_shape == (*full.shape[1:3], 1)
    np.testing.assert_allclose(
        np.asarray(cache.patches, dtype=np.float32)[..., 0],
        full.mean(axis=3),
        rtol=2e-3,
        atol=1e-3 * np.abs(full).max(),
    )
    assert {p.name: p.stat().st_mtime_ns for p in old.iterdir()} == before  # left as it was
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtt.training.backbone_cache"):
        again = build_backbone_cache(store, model.encode, key, root, torch.device("cpu"), progress=False)
    assert again.path == cache.path and not [r for r in caplog.records if r.name == "mtt.training.backbone_cache"]


def test_a_cache_folder_holding_another_keys_cache_is_refused(tmp_path, cache_dir):
    """A whole-map cache copied under the compact key's name is refused in one line, not fed to a
    pool; an old-format or hand-made key is refused before any work."""
    cfg = cfg_for(tmp_path, cache_dir)
    store = store_of(cfg)
    model, _ = model_of(cfg)
    cpu = torch.device("cpu")
    keys = {reads: cache_key(store, None, cfg.backbone, model.backbone, reads=reads) for reads in (MAP, FREQ_MEAN)}
    full = build_backbone_cache(store, model.encode, keys[MAP], tmp_path / "a", cpu, progress=False)
    shutil.copytree(full.path, tmp_path / "b" / params_key(keys[FREQ_MEAN]))
    with pytest.raises(ValueError, match="built for other settings than its name says; rebuild it: rm -r") as e:
        build_backbone_cache(store, model.encode, keys[FREQ_MEAN], tmp_path / "b", cpu, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a key of this format"):
        build_backbone_cache(store, model.encode, {**keys[MAP], "format": 2}, tmp_path / "c", cpu, progress=False)
    with pytest.raises(ValueError, match="reads='time_mean'"):
        cache_key(store, None, cfg.backbone, model.backbone, reads="time_mean")
    assert not (tmp_path / "c").exists()


def test_the_default_model_caches_a_quarter_of_its_map(cache_dir):
    """The default config (full-width VGGish, GAP) reads the frequency mean of its (512, 6, 4)
    map: 512 x 6 x 1 float16 = 6,144 bytes per patch (+ a 4-byte CRC) instead of 24,576."""
    model = build_model(compose_cfg([], cache=cache_dir), 50).eval()
    with torch.no_grad():
        fmap = model.encode(torch.zeros(1, 96, 64))
    assert fmap.shape == (1, 512, 6, 4)
    assert reduce_map(fmap, reads_of(model.pool)).shape == (1, 512, 6, 1)


@pytest.mark.slow
def test_the_default_run_caches_at_most_8_kb_per_patch(tmp_path):
    """`python -m mtt.run trainer.epochs=1` (the full-width VGGish, GAP): the cache holds the
    frequency mean, 512 x 6 x 1 float16 = 6,144 bytes per patch (+ a 4-byte CRC), not 24,576.
    The embedded dataset is made small here (it does not change what a patch costs)."""
    cache = tmp_path / "cache"
    run_module(
        [
            "mtt.run",
            "trainer.epochs=1",
            "trainer.progress=false",
            "data.synth.clips_per_folder=2",
            "data.synth.seconds=2.0",
            f"paths.cache={cache}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        ]
    )
    (folder,) = [p.parent for p in (cache / "backbone").glob(f"*/{MANIFEST}")]
    built = PatchStore(folder)
    assert built.item_shape == (512, 6, 1) and built.manifest["params"]["reads"] == FREQ_MEAN
    per_patch = sum(f.stat().st_size for f in (folder / "patches.npy", folder / "checksums.npy")) / len(built.patches)
    assert per_patch <= 8_000
