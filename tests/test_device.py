"""Device selection and mixed precision, exercised on CPU (the CUDA path shares the code)."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import compose_cfg, TINY
from mtt.tracking import MlflowTracker
from mtt.train import autocast_dtype, resolve_device, train


def test_auto_picks_cuda_only_when_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


def test_asking_for_cuda_gets_cuda_or_a_clear_error():
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="trainer.device='cuda'"):
            resolve_device("cuda")


def test_precision_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None
    with pytest.raises(ValueError, match="fp8"):
        autocast_dtype("fp8", cpu)


def test_bf16_autocast_and_channels_last_train_end_to_end(cache_dir, tmp_path):
    """The mixed-precision path (as on CUDA) runs for real under CPU autocast."""
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = compose_cfg([*TINY, "trainer.precision=bf16", "trainer.channels_last=true", "backbone.cache=false",
                       f"tracking.uri={uri}"], cache=cache_dir)
    with MlflowTracker(uri, "device", "bf16") as tracker:
        metrics = train(cfg, tracker)
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert MlflowClient(uri).get_run(tracker.run_id).data.params["derived.device"] == "cpu"
