"""Values that used to fail late, after the MLflow run existed (a FAILED run and a traceback), or
never (a batch that grows memory forever), are refused before any run: one line, exit status 2
(issue 25, item 5). ``data.root`` is checked with the config (``exit_if_invalid``), what depends
on the data once its index is read (``mtt.training.preflight``)."""

from __future__ import annotations

import os

import pytest
import torch
from mlflow import MlflowClient

from mtt.config import MAX_RUN_NAME
from mtt.data.datasets import index_from_config
from mtt.models import training_input_shape
from mtt.models.registry import BackboneSpec, register_backbone
from mtt.run import clipped_run_name
from mtt.training.preflight import batch_errors, checked
from tests.helpers import TINY, TINY_MODEL, compose_cfg, run_module


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data=mtat", "data.root=/nonexistent/mtat"],
            "data.root=/nonexistent/mtat: no such folder (download MTAT "
            "into it first: python -m mtt.data.download data=mtat data.root=/nonexistent/mtat)",
        ),
        (
            ["data=mtat", "data.root=/etc/hostname"],
            "data.root=/etc/hostname: a file, not a folder (expected the folder holding annotations_final.csv)",
        ),
        (
            ["data=mtat"],
            "data.root is not set: data=mtat needs data.root=DIR, the folder holding annotations_final.csv and 0-f",
        ),
        (
            [f"tracking.experiment={'x' * 600}"],
            f"tracking.experiment={'x' * 40}... (600 characters): expected a non-empty name of at most 256 characters",
        ),
    ],
)
def test_a_bad_data_root_or_name_is_refused_before_the_store_exists(tmp_path, overrides, message):
    cache, store = tmp_path / "cache", tmp_path / "m.db"
    proc = run_module(
        ["mtt.run", *TINY_MODEL, *overrides, f"paths.cache={cache}", f"tracking.uri=sqlite:///{store}"], check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert not store.exists() and not cache.exists()


@pytest.mark.parametrize("command", ["mtt.probe"])  # mtt.run: tests/test_weights.py (offline, slow)
def test_weights_that_are_no_file_are_refused_before_any_data_work(tmp_path, command):
    """The weights need no data: they are resolved before the dataset is generated or read."""
    cache, store, missing = tmp_path / "cache", tmp_path / "m.db", tmp_path / "nope.pth"
    proc = run_module(
        [command, *TINY, f"backbone.weights={missing}", f"paths.cache={cache}", f"tracking.uri=sqlite:///{store}"],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: backbone.weights='{missing}': no such file {missing}. Use none, audioset, or the path of a "
        ".pth / .safetensors state dict."
    )
    assert not (cache / "toy-v1").exists()
    client = MlflowClient(f"sqlite:///{store}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One generated TINY dataset for the module's commands."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize(
    "command, override, message",
    [
        (
            "mtt.run",
            "data.tags=freq999",
            "data.tags=freq999: expected freqN with N <= 188, the number of tags in the annotations",
        ),
        (
            "mtt.preprocess",
            "data.tags=freq999",
            "data.tags=freq999: expected freqN with N <= 188, the number of tags in the annotations",
        ),
        (
            "mtt.run",
            "trainer.batch_size=100000000",
            # TINY trains on the backbone cache: VGGish at 1/8 width encodes a patch as 64 x 6 x 4.
            "trainer.batch_size=100000000: one batch of training inputs alone takes "
            f"{100000000 * 6144 / 2**30:.1f} GiB (6144 bytes each, float32 64 x 6 x 4), more than this "
            f"machine's {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB of memory",
        ),
    ],
)
def test_what_the_data_cannot_support_is_refused_before_any_run(tmp_path, tiny_cache, command, override, message):
    store = tmp_path / "m.db"
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.create_experiment("mtt")  # a store that exists: MLflow prints nothing
    proc = run_module(
        [command, *TINY, override, f"paths.cache={tiny_cache}", f"tracking.uri=sqlite:///{store}"], check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert client.search_runs([experiment]) == []


@pytest.mark.parametrize("preset", ["prelim", "revised_steps", "three_blocks", "autopool"])
def test_the_report_presets_pass_the_preflight_on_tiny_data(tiny_cache, preset):
    """The report keeps one patch per clip and the mux draws with replacement: its batch of 32
    on the 24 training clips of the tiny data repeats some, which is no reason to refuse it (the
    report sweep of tests/test_experiments.py runs so)."""
    cfg = compose_cfg([*TINY, f"+experiment=report/{preset}"], cache=tiny_cache)
    done = checked(cfg)
    assert cfg.stream.patches_per_clip == 1 and cfg.trainer.batch_size == 32 > len(done.index.subset("train")) == 24


@pytest.mark.parametrize(
    "overrides, per_input, shape",
    [
        ([], 4 * 64 * 6 * 4, "64 x 6 x 4"),  # frozen and cached: VGGish's conv map at 1/8 width
        (["backbone.freeze=false"], 4 * 96 * 64, "96 x 64"),  # trained: the patches themselves
        (["backbone.cache=false"], 4 * 96 * 64, "96 x 64"),
    ],
)
def test_the_batch_bound_is_the_memory_its_inputs_alone_take(tiny_cache, overrides, per_input, shape):
    """A batch whose float32 inputs take more than the machine's memory is refused; the inputs
    are what training reads: the backbone cache's encodings, else the patches."""
    batch = 1000
    cfg = compose_cfg([*TINY, *overrides, f"trainer.batch_size={batch}"], cache=tiny_cache)
    index = index_from_config(cfg.data, progress=False)
    assert batch_errors(cfg, index, memory=batch * per_input) == []
    assert batch_errors(cfg, index, memory=batch * per_input - 1) == [
        f"trainer.batch_size={batch}: one batch of training inputs alone takes {batch * per_input / 2**30:.1f} GiB "
        f"({per_input} bytes each, float32 {shape}), more than this machine's "
        f"{(batch * per_input - 1) / 2**30:.1f} GiB of memory"
    ]


def test_epoch_mode_batches_at_most_the_training_clips(tiny_cache):
    """stream.mode=epoch batches distinct clips: a bigger batch would silently be all of them."""
    cfg = compose_cfg([*TINY, "stream.mode=epoch", "steps=epoch", "trainer.batch_size=24"], cache=tiny_cache)
    index = index_from_config(cfg.data, progress=False)
    assert batch_errors(cfg, index) == []
    assert batch_errors(compose_cfg([*TINY, "stream.mode=epoch", "steps=epoch", "trainer.batch_size=25"]), index) == [
        "trainer.batch_size=25: expected at most 24, the training clips (stream.mode=epoch batches distinct clips)"
    ]
    # The mux draws with replacement: the same batch is fine there.
    assert batch_errors(compose_cfg([*TINY, "trainer.batch_size=25"]), index) == []


def test_a_backbone_the_meta_device_cannot_run_gets_no_memory_bound(tiny_cache):
    """A backbone of one's own whose forward reads a value (``.item()``) has no shape on the meta
    device: the preflight then sets no bound rather than failing a run that would work."""

    class ReadsAValue(torch.nn.Module):
        def forward(self, x):
            return x[:, None, :2, :2] * float(x.sum().item() >= 0)

    register_backbone(BackboneSpec(name="reads_a_value", front_end="vggish", build=lambda b, item: ReadsAValue()))
    cfg = compose_cfg([*TINY, "backbone.name=reads_a_value", "trainer.batch_size=100000000"], cache=tiny_cache)
    assert training_input_shape(cfg) is None
    assert batch_errors(cfg, index_from_config(cfg.data, progress=False), memory=1) == []


def test_a_run_name_built_from_many_overrides_fits_mlflow():
    long = ",".join(f"key{i}=value{i}" for i in range(40))
    assert len(long) > MAX_RUN_NAME
    name = clipped_run_name(long)
    assert len(name) == MAX_RUN_NAME and name.endswith("...") and long.startswith(name[:-3])
    assert clipped_run_name("head=autopool") == "head=autopool"
