"""Device selection and mixed precision, exercised on CPU (the CUDA path shares the code)."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from mtt.tracking.runs import MlflowTracker
from mtt.training.train import autocast_dtype, resolve_device, train
from tests.helpers import TINY, compose_cfg


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


class ConvCalls:
    """What every Conv2d forward saw: (output dtype, input in channels-last layout), by a real
    global forward hook."""

    def __init__(self):
        self.seen: list[tuple[torch.dtype, bool]] = []

    def _hook(self, module, args, output):
        if isinstance(module, torch.nn.Conv2d) and args[0].shape[1] > 1:  # layouts coincide at 1 channel
            self.seen.append((output.dtype, args[0].is_contiguous(memory_format=torch.channels_last)))

    def __enter__(self) -> ConvCalls:
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


@pytest.mark.parametrize(
    "precision, channels_last, dtype", [("bf16", "true", torch.bfloat16), ("fp32", "false", torch.float32)]
)
def test_precision_and_layout_are_what_the_backbone_computes_in(cache_dir, tmp_path, precision, channels_last, dtype):
    """The mixed-precision path (as on CUDA) runs for real under CPU autocast: every convolution
    of the live backbone computes in the configured dtype and memory layout."""
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = compose_cfg(
        [
            *TINY,
            f"trainer.precision={precision}",
            f"trainer.channels_last={channels_last}",
            "backbone.cache=false",
            "steps=fixed",
            "steps.n=2",
            f"tracking.uri={uri}",
        ],
        cache=cache_dir,
    )
    with MlflowTracker(uri, "device", precision) as tracker, ConvCalls() as convs:
        metrics = train(cfg, tracker)
    assert convs.seen and set(convs.seen) == {(dtype, channels_last == "true")}
    assert metrics["train_loss"] == MlflowClient(uri).get_metric_history(tracker.run_id, "train_loss")[0].value
    assert MlflowClient(uri).get_run(tracker.run_id).data.params["derived.device"] == "cpu"


@pytest.mark.parametrize(
    "precision, channels_last, dtype", [("bf16", "true", torch.bfloat16), ("fp32", "false", torch.float32)]
)
def test_the_short_chunk_resnet_computes_in_the_same_precision_and_layout(
    cache_dir, tmp_path, precision, channels_last, dtype
):
    """The same CUDA path for the from-scratch backbone: every convolution of its 7 residual
    blocks (shortcuts included) runs in the configured dtype and layout, through its transposes."""
    from test_shortchunk import SMALL

    class SpatialConvCalls(ConvCalls):  # its late blocks are 1 x 1 or 1 wide, where the layouts coincide
        def _hook(self, module, args, output):
            if isinstance(module, torch.nn.Conv2d) and min(args[0].shape[2:]) > 1:
                super()._hook(module, args, output)

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = compose_cfg(
        [
            *TINY,
            *SMALL,
            f"trainer.precision={precision}",
            f"trainer.channels_last={channels_last}",
            "steps=fixed",
            "steps.n=2",
            f"tracking.uri={uri}",
        ],
        cache=cache_dir,
    )
    with MlflowTracker(uri, "device", precision) as tracker, SpatialConvCalls() as convs:
        metrics = train(cfg, tracker)
    assert len(convs.seen) >= 20 and set(convs.seen) == {(dtype, channels_last == "true")}
    assert metrics["train_loss"] == MlflowClient(uri).get_metric_history(tracker.run_id, "train_loss")[0].value
