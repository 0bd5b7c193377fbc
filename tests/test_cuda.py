"""The CUDA paths on a CUDA device, each against the same computation in fp32 on the CPU: the
backbone cache built on the GPU (bf16 autocast, channels-last), the pinned-memory loader, a
training step of VGGish and of the short-chunk ResNet, a whole run (whose model then tags on a
CPU), SyncBatchNorm under DDP, and resuming a checkpoint on the GPU.

Marked ``cuda``: without a CUDA device they are skipped ("no CUDA device", tests/conftest.py);
``make bench-gpu`` runs them on a GPU machine (``pytest -m cuda``). The tolerances are bf16's
(8 significant bits: outputs within a few 1e-3 relative, losses within 1e-2) and TF32's for fp32
(cuDNN's convolutions use TF32 by default: 11 significant bits), both measured on the CPU's
bf16 autocast against fp32 and kept several times looser; a wrong layout, a lost autocast or a
batch fed from the wrong memory misses them by far.
"""

from __future__ import annotations

import copy

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from test_pyfunc import clips_of, trained_run

from mtt.core import distributed
from mtt.data.audio import load_audio
from mtt.features.streams import train_loader
from mtt.models import build_model
from mtt.tracking.checkpoint import TrainState, load_last, save_last
from mtt.tracking.records import load_predictions
from mtt.tracking.runs import download_artifacts
from mtt.training.train import autocast_dtype, prepare, resolve_device
from tests.helpers import SHORTCHUNK_SMALL, TINY, TINY_MODEL, compose_cfg

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
ON_CUDA = [*TINY, "trainer.device=cuda"]  # the last value of a key wins


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` over all elements (L2)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_the_device_policy_picks_the_gpu_and_bf16():
    assert resolve_device("auto") == CUDA
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert autocast_dtype("auto", resolve_device("auto")) is torch.bfloat16
    cfg = compose_cfg([*TINY, "trainer.device=auto"])
    assert resolve_device(cfg.trainer.device).type == "cuda"


@pytest.mark.parametrize("precision, dtype, tolerance", [("auto", "bfloat16", 0.03), ("fp32", "float32", 0.005)])
def test_the_backbone_cache_built_on_cuda_matches_the_cpu_one(cache_dir, precision, dtype, tolerance):
    """``prepare`` on CUDA builds the frozen backbone's cache on the GPU (keyed apart from the
    CPU's), channels-last, under the run's precision; its conv maps are the CPU's fp32 ones."""
    on_cpu = prepare(compose_cfg([*TINY, "trainer.precision=fp32"], cache=cache_dir))
    on_gpu = prepare(compose_cfg([*ON_CUDA, f"trainer.precision={precision}"], cache=cache_dir))
    assert on_gpu.device.type == "cuda" and on_gpu.from_backbone
    cpu_key, gpu_key = on_cpu.inputs.manifest["params"], on_gpu.inputs.manifest["params"]
    assert gpu_key["weights"] == cpu_key["weights"]  # the same seeded backbone on both devices
    assert {k: gpu_key["compute"][k] for k in ("device", "dtype", "channels_last")} == {
        "device": "cuda",
        "dtype": dtype,
        "channels_last": True,
    }
    assert on_gpu.inputs.path != on_cpu.inputs.path
    assert np.array_equal(on_gpu.inputs.clip_ids, on_cpu.inputs.clip_ids)
    gpu = torch.from_numpy(np.asarray(on_gpu.inputs.read(slice(None)), dtype=np.float32))
    cpu = torch.from_numpy(np.asarray(on_cpu.inputs.read(slice(None)), dtype=np.float32))
    assert gpu.shape == cpu.shape and relative(gpu, cpu) < tolerance


def test_the_pinned_loader_feeds_the_gpu_the_cpu_batches(cache_dir):
    """``pin_memory`` (what a CUDA run sets) yields page-locked batches, equal to the unpinned
    stream's, that arrive on the GPU unchanged through a non-blocking copy."""
    cfg = compose_cfg(TINY, cache=cache_dir)
    p = prepare(cfg)
    args = (p.store, p.train.clip_ids, p.train.labels, cfg.stream, 8, 0)
    pinned, plain = train_loader(*args, pin_memory=True), train_loader(*args)
    for _ in range(3):
        (x, y), (x0, y0) = next(pinned), next(plain)
        assert x.is_pinned() and y.is_pinned()
        on_gpu = x.to(CUDA, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.cpu(), x0) and torch.equal(y, y0)


@pytest.mark.parametrize(
    "overrides, precision, channels_last, tol",
    [
        ([], "auto", True, {"loss": 0.02, "probs": 0.06, "cosine": 0.9}),
        (SHORTCHUNK_SMALL, "auto", True, {"loss": 0.02, "probs": 0.06, "cosine": 0.9}),
        (SHORTCHUNK_SMALL, "fp32", False, {"loss": 1e-3, "probs": 5e-3, "cosine": 0.99}),  # the anchor's
    ],
    ids=["vggish-bf16-channels_last", "shortchunk-bf16-channels_last", "shortchunk-fp32-nchw"],
)
def test_a_training_step_on_cuda_matches_fp32_on_the_cpu(overrides, precision, channels_last, tol):
    """One step of the whole tagger, backbone trained, placed and cast as a run places it on CUDA:
    its loss, probabilities and gradients are the CPU's fp32 ones."""
    cfg = compose_cfg([*TINY_MODEL, "backbone.freeze=false", *overrides, "head.dropout=0"])
    torch.manual_seed(0)
    cpu = build_model(cfg, n_tags=10)
    gpu = copy.deepcopy(cpu).to(CUDA)
    if channels_last:
        gpu.backbone.to(memory_format=torch.channels_last)
    amp = autocast_dtype(precision, CUDA)
    x = torch.randn(8, cfg.features.patch_frames, cfg.features.n_mels)
    y = (torch.rand(8, 10) < 0.3).float()
    cpu_logits = cpu(x)
    cpu_loss = cpu.loss(cpu_logits, y)
    cpu_loss.backward()
    with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
        gpu_logits = gpu(x.to(CUDA))
    gpu_loss = gpu.loss(gpu_logits, y.to(CUDA))
    gpu_loss.backward()
    assert gpu_logits.dtype == (torch.bfloat16 if amp else torch.float32)
    assert abs(gpu_loss.item() - cpu_loss.item()) <= tol["loss"] * cpu_loss.item()
    probs = (gpu.probabilities(gpu_logits).cpu() - cpu.probabilities(cpu_logits)).abs().max().item()
    assert probs <= tol["probs"]
    grads = [
        (p.grad.flatten(), q.grad.flatten().cpu()) for p, q in zip(cpu.parameters(), gpu.parameters()) if p.dim() > 1
    ]
    g_cpu, g_gpu = (torch.cat(g).double() for g in zip(*grads))
    assert torch.nn.functional.cosine_similarity(g_cpu, g_gpu, dim=0).item() >= tol["cosine"]


def test_a_run_on_cuda_matches_the_same_run_on_the_cpu_and_its_model_tags_on_a_cpu(tmp_path, cache_dir, monkeypatch):
    """``train`` on CUDA (bf16 cache build, pinned loader, bf16 steps and evaluation) records a
    CUDA run whose test predictions are the CPU fp32 run's, and whose logged model (saved from
    GPU tensors) loads and tags the test clips on a CPU as the run evaluated them."""
    same = ["head.dropout=0", "steps=fixed", "steps.n=2"]  # no dropout: the two devices draw no masks
    (tmp_path / "cpu").mkdir()
    (tmp_path / "gpu").mkdir()
    cpu_uri, cpu_run, _ = trained_run(tmp_path / "cpu", cache_dir, [*same, "trainer.precision=fp32"])
    uri, run_id, cfg = trained_run(tmp_path / "gpu", cache_dir, [*same, "trainer.device=cuda"])
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["derived.device"] == "cuda" and run.data.tags["device"] == "cuda"
    assert run.data.params["trainer.precision"] == "auto"
    gpu, paths = clips_of(uri, run_id, cfg, tmp_path / "gpu")
    cpu = load_predictions(download_artifacts(cpu_uri, cpu_run, "test_predictions.npz", tmp_path / "cpu-pred"))
    assert np.array_equal(gpu.clip_ids, cpu.clip_ids)
    assert np.abs(gpu.probabilities - cpu.probabilities).max() < 0.05

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    frame = pd.DataFrame({"samples": [load_audio(p, cfg.features.sample_rate) for p in paths]})
    assert np.abs(model.predict(frame).to_numpy() - gpu.probabilities).max() < 0.05


def test_ddp_on_cuda_syncs_batchnorm_and_trains_in_bf16_channels_last(tmp_path):
    """``distributed.wrap`` on CUDA: every BatchNorm of the short-chunk ResNet and its head becomes
    a SyncBatchNorm and the DDP model trains in bf16 autocast on channels-last maps as the plain
    model does. One GPU holds one rank: the process group has one member while the ``Dist`` says
    two, which is what makes ``wrap`` convert (it is a no-op for one process); with one member
    SyncBatchNorm normalises as BatchNorm does, so the statistics across GPUs need two GPUs."""
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        cfg = compose_cfg([*TINY_MODEL, *SHORTCHUNK_SMALL, "head.dropout=0"])
        torch.manual_seed(0)
        plain = build_model(cfg, n_tags=10).to(CUDA)
        plain.backbone.to(memory_format=torch.channels_last)
        synced = copy.deepcopy(plain)
        batchnorms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in plain.modules())
        ddp = distributed.wrap(distributed.Dist(rank=0, world=2, local_rank=0), synced, torch.device("cuda", 0))
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == batchnorms > 0
        x = torch.randn(8, cfg.features.patch_frames, cfg.features.n_mels, device=CUDA)
        y = (torch.rand(8, 10, device=CUDA) < 0.3).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a, b = plain(x), ddp(x)
        plain.loss(a, y).backward()
        synced.loss(b, y).backward()
        assert relative(b.float(), a.float()) < 0.02
        assert all(torch.isfinite(q.grad).all() for q in synced.parameters())
        pairs = [
            (p.grad.flatten(), q.grad.flatten()) for p, q in zip(plain.parameters(), synced.parameters()) if p.dim() > 1
        ]
        g_plain, g_synced = (torch.cat(g).double() for g in zip(*pairs))
        assert torch.nn.functional.cosine_similarity(g_plain, g_synced, dim=0).item() >= 0.99
    finally:
        dist.destroy_process_group()


def test_the_last_checkpoint_resumes_on_cuda(tmp_path):
    """``save_last``/``load_last`` with a model and Adam on the GPU: the restored optimiser state
    lives on the GPU, the CUDA RNG continues where it was saved, and the next step is the same."""
    cfg = compose_cfg([*TINY_MODEL, "backbone.freeze=false", "head.dropout=0"])
    x = torch.randn(8, cfg.features.patch_frames, cfg.features.n_mels, device=CUDA)
    y = (torch.rand(8, 10, device=CUDA) < 0.3).float()

    def step(model, opt) -> None:
        opt.zero_grad(set_to_none=True)
        model.loss(model(x), y).backward()
        opt.step()

    torch.manual_seed(0)
    model = build_model(cfg, n_tags=10).to(CUDA)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step(model, opt)
    save_last(tmp_path, model, opt, TrainState(epoch=0))
    after_save = torch.rand(4, device=CUDA)
    step(model, opt)

    fresh = build_model(cfg, n_tags=10).to(CUDA)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    assert load_last(tmp_path, fresh, fresh_opt).epoch == 0
    assert torch.equal(torch.rand(4, device=CUDA), after_save)
    states = [s for s in fresh_opt.state.values()]
    assert states and all(s["exp_avg"].device.type == "cuda" for s in states)
    step(fresh, fresh_opt)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
