"""`make bench-gpu` (tests/benchmarks/bench_gpu.py) cannot rot on a machine without a GPU: its
CPU mode runs every measurement's code path at tiny sizes and writes the record and page that a
GPU run writes, the suite's CUDA tests run through it (skipped here, with their reason), and
without ``--cpu`` a machine with no CUDA device is told so, with exit status 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mtt.core.paths import REPO_ROOT
from tests.helpers import compose_cfg

SCRIPT = REPO_ROOT / "tests" / "benchmarks" / "bench_gpu.py"
FIGURES = {
    "vggish_forward_fp32_nchw": ("forward", "patches/s"),
    "vggish_forward_fp32_channels_last": ("forward", "patches/s"),
    "vggish_forward_bf16_nchw": ("forward", "patches/s"),
    "vggish_forward_bf16_channels_last": ("forward", "patches/s"),
    "cache_build": ("cache", "patches/s"),
    "head_train_cached": ("train", "steps/s"),
    "head_eval_cached": ("eval", "patches/s"),
    "finetune_train": ("train", "steps/s"),
    "finetune_eval": ("eval", "patches/s"),
    "shortchunk_train_fp32_nchw": ("train", "chunks/s"),
    "shortchunk_eval_fp32_nchw": ("eval", "chunks/s"),
    "shortchunk_train_bf16_channels_last": ("train", "chunks/s"),
    "shortchunk_eval_bf16_channels_last": ("eval", "chunks/s"),
}
PRESETS = [
    "report/prelim",
    "report/revised_steps",
    "report/three_blocks",
    "report/autopool",
    "modern",
    "modern + backbone.finetune_last=2 (not a preset)",
    "anchors/shortchunk_res",
    "anchors/transfer_vs_scratch",
]


def bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def cpu_record(tmp_path_factory):
    """One CPU-mode run with a 2-second budget, its CUDA tests those of tests/test_cuda.py."""
    out = tmp_path_factory.mktemp("bench-gpu")
    proc = bench("--cpu", "--budget", "2", "--tests-path", "tests/test_cuda.py", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text(), proc.stdout


def test_the_cpu_mode_measures_every_figure_through_mtts_code(cpu_record):
    record, _, stdout = cpu_record
    assert record["schema"] == 1 and record["mode"] == "cpu" and record["device"]["type"] == "cpu"
    assert record["versions"]["torch"] and record["settings"]["width"] == 0.125
    assert {name: (f["kind"], f["unit"]) for name, f in record["figures"].items()} == FIGURES
    for name, f in record["figures"].items():
        assert 0 < f["low"] <= f["value"] <= f["high"], name
        assert f["work"] > 0 and f["seconds"] > 0, name
        assert f["peak_memory_bytes"] is None, name  # no GPU memory on a CPU
        assert f"{name} " in stdout
    settings = {name: f["settings"] for name, f in record["figures"].items()}
    # each figure ran the configuration its name says, as prepare placed it
    assert settings["vggish_forward_bf16_channels_last"] == {"batch": 16, "precision": "bf16", "channels_last": True}
    assert settings["cache_build"]["cached"] and settings["cache_build"]["patches"] > 0
    assert settings["head_train_cached"]["cached"] and settings["head_train_cached"]["batch"] == 32
    assert not settings["finetune_train"]["cached"] and settings["finetune_train"]["trained_layers"] == 2
    fp32 = settings["shortchunk_train_fp32_nchw"]
    assert (fp32["backbone"], fp32["batch"], fp32["stream"], fp32["precision"]) == (
        "shortchunk_res",
        16,
        "epoch",
        "fp32",
    )
    assert settings["shortchunk_train_bf16_channels_last"]["precision"] == "bf16"
    assert settings["shortchunk_eval_fp32_nchw"]["chunks"] == 16 * settings["shortchunk_eval_fp32_nchw"]["clips"]


def test_the_cuda_tests_run_through_it_and_are_skipped_without_a_gpu(cpu_record):
    record, page, _ = cpu_record
    tests = record["tests"]
    assert tests["returncode"] == 0 and not tests["timed_out"]
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 8
    assert {c["outcome"] for c in tests["cases"]} == {"skipped"}
    assert {c["message"] for c in tests["cases"]} == {"no CUDA device"}
    assert "0 passed, 0 failed, 0 errors" in page and "no CUDA device" in page


def test_the_full_mtat_time_of_each_preset_is_its_epochs_steps_and_chunks_at_the_measured_rates(
    cpu_record, monkeypatch
):
    record, page, _ = cpu_record
    mtat, rate = record["mtat"], {name: f["value"] for name, f in record["figures"].items()}
    assert list(mtat) == PRESETS
    # report/prelim: a cache of every patch of the 25,860 clips (30 per 29.1 s clip); 12 epochs of
    # 19,398 // 32 = 606 steps; valid = test = 6,465 clips, one patch each, every epoch and once more.
    prelim = mtat["report/prelim"]
    assert prelim["runs"][0]["steps_per_epoch"] == 606 and prelim["runs"][0]["epochs"] == 12
    assert prelim["cache_build_s"] == pytest.approx(25_860 * 30 / rate["cache_build"])
    assert prelim["train_s"] == pytest.approx(12 * 606 / rate["head_train_cached"])
    assert prelim["eval_s"] == pytest.approx((12 + 1) * 6_465 / rate["head_eval_cached"])
    assert prelim["hours"] == pytest.approx((prelim["cache_build_s"] + prelim["train_s"] + prelim["eval_s"]) / 3600)
    assert mtat["report/three_blocks"]["train_s"] == pytest.approx(5 * 606 / rate["head_train_cached"])
    # anchors/shortchunk_res in its own fp32 NCHW: 200 epochs of ceil(15,247 / 16) = 953 steps of
    # 16 chunks; 16 chunks of each of 1,529 valid clips per epoch and of 4,332 test clips.
    anchor = mtat["anchors/shortchunk_res"]
    assert anchor["cache_build_s"] == 0 and anchor["runs"][0]["steps_per_epoch"] == 953
    assert anchor["train_s"] == pytest.approx(200 * 953 * 16 / rate["shortchunk_train_fp32_nchw"])
    assert anchor["eval_s"] == pytest.approx((200 * 1_529 + 4_332) * 16 / rate["shortchunk_eval_fp32_nchw"])
    # the sweep: 3 seeds of each arm; one cache (21,108 top-50 clips x 30) for the VGGish arm,
    # whose 60 epochs of 15,247 x 30 // 32 = 14,294 steps are the most early stopping allows.
    sweep = mtat["anchors/transfer_vs_scratch"]
    vggish, scratch = sweep["runs"]
    assert (vggish["runs"], vggish["steps_per_epoch"], vggish["epochs"], scratch["runs"]) == (3, 14_294, 60, 3)
    assert sweep["cache_build_s"] == pytest.approx(21_108 * 30 / rate["cache_build"])
    assert sweep["train_s"] == pytest.approx(
        3 * 60 * 14_294 / rate["head_train_cached"] + 3 * 200 * 953 * 16 / rate["shortchunk_train_fp32_nchw"]
    )
    # a preset's time uses the figure of its own settings, and none measured otherwise
    from mtt.core.components import DATASETS

    # importing the script registers its `bench` dataset: keep it out of the other tests' registry
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))
    from tests.benchmarks.bench_gpu import rate_for

    figures, cpu, anchor_cfg = record["figures"], torch.device("cpu"), ["+experiment=anchors/shortchunk_res"]
    bf16 = compose_cfg([*anchor_cfg, "trainer.precision=bf16", "trainer.channels_last=true"])
    assert rate_for(figures, "train", bf16, cpu) == (
        "shortchunk_train_bf16_channels_last",
        rate["shortchunk_train_bf16_channels_last"] / 16,
    )
    with pytest.raises(KeyError, match="precision=bf16, channels_last=False"):
        rate_for(figures, "eval", compose_cfg([*anchor_cfg, "trainer.precision=bf16"]), cpu)
    with pytest.raises(KeyError, match="batch=32"):
        rate_for(figures, "train", compose_cfg([*anchor_cfg, "trainer.batch_size=32"]), cpu)
    finetune = mtat["modern + backbone.finetune_last=2 (not a preset)"]
    assert finetune["cache_build_s"] == 0 and finetune["runs"][0]["figures"]["eval"] == "finetune_eval"
    for preset in PRESETS:
        assert f"`{preset}`" in page
    assert "not an MTAT figure" in page and "GPU h" not in page


def test_without_cuda_it_says_so_and_exits_0_writing_nothing(tmp_path):
    proc = bench("--out", str(tmp_path), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("no CUDA device: torch ") and "--cpu" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_failing_measurement_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """On a device machine one run must bring back every figure that works: a group of figures
    that raises is recorded with its error (first line), the next groups still run (the head
    figures on the small store when the cache build failed), and the exit status is 1."""
    from tests.benchmarks import bench_gpu

    calls = []

    def fails(message):
        def measure(self, *args):
            raise RuntimeError(message)

        return measure

    monkeypatch.setattr(bench_gpu.Bench, "forward", fails("CUDA error: an illegal memory access\nmore"))
    monkeypatch.setattr(bench_gpu.Bench, "cache_build", fails("out of memory"))
    monkeypatch.setattr(bench_gpu.Bench, "heads_and_finetuning", lambda self, per_folder: calls.append(per_folder))
    monkeypatch.setattr(bench_gpu.Bench, "shortchunk", lambda self: calls.append("shortchunk"))
    threads = torch.get_num_threads()
    try:
        status = bench_gpu.main(["--cpu", "--no-tests", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # --cpu sets 1 for this process
    assert status == 1
    assert calls == [bench_gpu.CPU_SIZES.pilot_per_folder, "shortchunk"]
    record = json.loads((tmp_path / "gpu.json").read_text())
    assert record["errors"] == {
        "vggish_forward": "RuntimeError: CUDA error: an illegal memory access",
        "cache_build": "RuntimeError: out of memory",
    }
    assert record["figures"] == {} and all("not_measured" in m for m in record["mtat"].values())
    assert "- cache_build: `RuntimeError: out of memory`" in (tmp_path / "gpu.md").read_text()


def test_a_failing_cuda_test_makes_the_exit_status_1(tmp_path, monkeypatch):
    """The CUDA tests' outcome reaches the record, the page and the exit status (here a marked
    test outside the suite, which the suite's skip does not reach, fails on the CPU)."""
    from tests.benchmarks import bench_gpu

    for group in ("forward", "shortchunk"):
        monkeypatch.setattr(bench_gpu.Bench, group, lambda self: None)
    monkeypatch.setattr(bench_gpu.Bench, "cache_build", lambda self: {"per_folder": 1})
    monkeypatch.setattr(bench_gpu.Bench, "heads_and_finetuning", lambda self, per_folder: None)
    failing = tmp_path / "test_gpu_only.py"
    failing.write_text(
        "import pytest\n\n\n@pytest.mark.cuda\ndef test_on_the_gpu():\n    assert False, 'wrong on CUDA'\n\n\n"
        "@pytest.mark.cuda\ndef test_fine():\n    pass\n\n\ndef test_unmarked():\n    assert False\n"
    )
    threads = torch.get_num_threads()
    try:
        status = bench_gpu.main(["--cpu", "--tests-path", str(failing), "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    assert status == 1
    tests = json.loads((tmp_path / "out" / "gpu.json").read_text())["tests"]
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 1, 0)  # the unmarked test is not run
    assert [c["outcome"] for c in tests["cases"]] == ["failure", "passed"]
    assert "wrong on CUDA" in tests["cases"][0]["message"]
    assert "1 passed, 1 failed, 0 errors" in (tmp_path / "out" / "gpu.md").read_text()
