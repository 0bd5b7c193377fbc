"""The literature anchors (experiments/anchors/): the transfer-versus-scratch sweep runs end to end
and mtt.compare groups it, although its two arms read two different feature stores."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from test_shortchunk import SMALL

from tests.helpers import TINY, run_module, sweep_children


@pytest.mark.slow
def test_transfer_vs_scratch_sweeps_two_arms_of_three_seeds_that_compare_groups(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/m.db"
    # SMALL's 32x32 patches reach both arms (2 s clips are shorter than the paper's 3.69 s chunk).
    run_module(
        [
            "mtt.run",
            "-m",
            "+experiment=anchors/transfer_vs_scratch",
            *TINY,
            *SMALL[1:],
            "trainer.epochs=2",
            f"paths.cache={cache_dir}",
            f"tracking.uri={uri}",
        ]
    )
    runs = sweep_children(MlflowClient(uri), "transfer_vs_scratch")
    arms = sorted((r.data.params["backbone.name"], r.data.params["trainer.seed"]) for r in runs)
    assert arms == [(b, s) for b in ("shortchunk_res", "vggish") for s in "012"]
    assert len({r.data.tags["feature_store"] for r in runs}) == 2  # one store per front end
    assert len({r.data.tags["test_clips_sha256"] for r in runs}) == 1  # one test set
    scratch = [r for r in runs if r.data.params["backbone.name"] == "shortchunk_res"]
    assert {r.data.params["trainer.batch_size"] for r in scratch} == {"16"}  # the paper's recipe
    assert {r.data.params["eval.patches_per_clip"] for r in runs} == {"None"}  # every chunk, both arms

    proc = run_module(
        [
            "mtt.compare",
            "transfer_vs_scratch",
            "--tracking-uri",
            uri,
            "--format",
            "json",
            "--out",
            str(tmp_path / "c.png"),
        ]
    )
    out = json.loads(proc.stdout)
    # groups are named after their overrides, the arm first
    assert sorted((g["name"].split(",")[0], g["n"]) for g in out["groups"]) == [
        ("arms=shortchunk_res", 3),
        ("arms=vggish_gap3", 3),
    ]
    assert out["mixed_protocol"] == {} and len(out["pairs"]) == 2
