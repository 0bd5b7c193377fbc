"""Pooling and heads: shapes for every combination, AutoPool's behaviour and its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtt.core.components import POOLS
from mtt.models import build_model
from mtt.models.head import Head
from mtt.models.pooling import (
    FREQ_MEAN,
    MAP,
    READS,
    AutoPool,
    GapConfig,
    GlobalAveragePool,
    PoolSpec,
    build_pool,
    reads_of,
    reduce_map,
)
from tests.helpers import TINY, compose_cfg


def autopool_numpy(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """McFee et al. 2018, eq. (4)-(5), written independently: x (B, C, T, F), alpha (C,)."""
    x = x.mean(axis=3)
    z = alpha[None, :, None] * x
    w = np.exp(z - z.max(axis=2, keepdims=True))
    w /= w.sum(axis=2, keepdims=True)
    return (x * w).sum(axis=2)


def test_autopool_alpha_zero_is_mean_and_large_alpha_is_max():
    x = torch.randn(3, 5, 6, 4)
    pool = AutoPool(5, alpha_init=0.0)
    assert torch.allclose(pool(x), x.mean(dim=(2, 3)), atol=1e-6)
    big = AutoPool(5, alpha_init=1e4)
    assert torch.allclose(big(x), x.mean(dim=3).amax(dim=2), atol=1e-4)
    small = AutoPool(5, alpha_init=-1e4)
    assert torch.allclose(small(x), x.mean(dim=3).amin(dim=2), atol=1e-4)


def test_autopool_matches_the_papers_formula():
    rng = np.random.default_rng(0)
    x, alpha = rng.normal(size=(4, 7, 6, 4)), rng.normal(scale=3, size=7)
    pool = AutoPool(7)
    with torch.no_grad():
        pool.alpha.copy_(torch.from_numpy(alpha))
    out = pool(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out, autopool_numpy(x, alpha), rtol=1e-6, atol=1e-9)


def test_gradients_reach_alpha_and_l2_applies():
    pool = AutoPool(5, alpha_init=0.5, constraint="cap", alpha_max=1.0, alpha_l2=0.1)
    x = torch.randn(2, 5, 6, 4)
    (pool(x).sum() + pool.regularization()).backward()
    assert pool.alpha.grad is not None and pool.alpha.grad.abs().sum() > 0
    with torch.no_grad():
        pool.alpha.fill_(50.0)
    assert pool.regularization().item() == pytest.approx(0.1 * 5 * 2500)


def test_cap_projects_after_the_step_and_an_alpha_past_it_still_learns():
    """CAP is a projection, not a clamp in the forward pass: an alpha past the cap gets a
    gradient (a clamp would give it none, so it would stick), and the step that the training
    loop ends with (the pool's after_step hook) puts it back on the interval's edge."""
    from mtt.models.pooling import call_hook

    torch.manual_seed(0)
    pool = AutoPool(3, constraint="cap", alpha_max=1.0)
    with torch.no_grad():
        pool.alpha.copy_(torch.tensor([3.0, -0.5, -4.0]))  # two of them past the cap
    x = torch.randn(4, 3, 6, 2)
    pool(x).sum().backward()
    assert (pool.alpha.grad != 0).all(), "every alpha, also those past the cap, gets a gradient"
    opt = torch.optim.SGD(pool.parameters(), lr=0.1)
    opt.step()
    assert pool.alpha[0] != 3.0 and pool.alpha[2] != -4.0  # the step moved them
    call_hook(pool, "after_step")
    assert pool.alpha.tolist() == [1.0, pytest.approx(-0.5 - 0.1 * pool.alpha.grad[1].item()), -1.0]
    assert AutoPool(2, alpha_init=5.0, constraint="cap", alpha_max=2.0).alpha.tolist() == [2.0, 2.0]
    free = AutoPool(1, alpha_init=5.0)  # no constraint: projection leaves it alone
    call_hook(free, "after_step")
    assert free.alpha.item() == 5.0


def test_training_keeps_capped_alphas_within_the_cap(tiny_cfg):
    """Through train(): a cap of 0.01 under lr 0.5 is hit at once; every logged alpha is within it."""
    from mlflow.tracking import MlflowClient

    from mtt.tracking.runs import MlflowTracker
    from mtt.training.train import train

    cfg = compose_cfg(
        [
            *TINY,
            "+head=autopool",
            "pool.constraint=cap",
            "pool.alpha_max=0.01",
            "trainer.lr=0.5",
            "steps=fixed",
            "steps.n=3",
            f"tracking.uri={tiny_cfg.tracking.uri}",
        ],
        cache=tiny_cfg.paths.cache,
    )
    with MlflowTracker(cfg.tracking.uri, "cap", "cap") as tracker:
        train(cfg, tracker)
    metrics = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id).data.metrics
    assert -0.01 <= metrics["alpha_min"] and metrics["alpha_max"] <= 0.01
    assert max(abs(metrics["alpha_min"]), abs(metrics["alpha_max"])) == pytest.approx(0.01)  # it hit the cap


def test_gap_shape():
    assert GlobalAveragePool()(torch.randn(2, 8, 6, 4)).shape == (2, 8)


@pytest.mark.parametrize("name", POOLS.names())
def test_every_pool_gives_the_same_output_on_what_it_declares_it_reads(name):
    """The backbone cache stores only what a pool declares it reads (mtt.training.backbone_cache): a pool
    declaring the frequency mean must give on it what it gives on the whole map, and a pool that
    does not (max) must declare the whole map."""
    cfg = compose_cfg([f"pool={name}", *(["pool.alpha_init=2.0"] if name == "autopool" else [])]).pool
    pool = build_pool(cfg, 8)  # a non-trivial alpha for AutoPool
    torch.manual_seed(0)
    x = torch.randn(3, 8, 6, 4)
    reads = reads_of(pool)
    assert reads in READS
    assert reduce_map(x, reads).shape == ((3, 8, 6, 1) if reads == FREQ_MEAN else x.shape)
    with torch.no_grad():
        whole, reduced = pool(x), pool(reduce_map(x, reads))
    torch.testing.assert_close(reduced, whole, rtol=1e-6, atol=1e-6)
    if reads == FREQ_MEAN:  # not by accident: the frequency axis matters to none of these pools
        assert not torch.allclose(whole, pool(x[..., :1]))
    assert reads_of(torch.nn.Identity()) == MAP  # a pool that declares nothing gets the whole map


def test_the_trainer_calls_the_hooks_a_pool_defines_whatever_its_name(tiny_cfg, monkeypatch):
    """A new pool is one class and its registry entry: the training loop calls its hooks (after
    each optimiser step, once at the end, its regularisation in the loss) without knowing its name."""
    from mtt.tracking.runs import MlflowTracker
    from mtt.training.train import train

    calls: dict[str, list] = {"after_step": [], "log_end": [], "regularization": []}

    class Hooked(GlobalAveragePool):
        def after_step(self):
            calls["after_step"].append(self.training)

        def log_end(self, tracker, step):
            calls["log_end"].append((tracker.run_id, step))

        def regularization(self):
            calls["regularization"].append(1)
            return torch.tensor(100.0)  # a loss the run must report

    monkeypatch.setattr(POOLS, "_entries", dict(POOLS._entries))  # leave the registry as found
    POOLS.register(PoolSpec("gap", config=GapConfig, build=lambda cfg, channels: Hooked()), option=False)
    cfg = compose_cfg(
        [*TINY, "steps=fixed", "steps.n=3", "trainer.epochs=2", f"tracking.uri={tiny_cfg.tracking.uri}"],
        cache=tiny_cfg.paths.cache,
    )
    with MlflowTracker(cfg.tracking.uri, "hooks", "hooks") as tracker:
        metrics = train(cfg, tracker)
    assert calls["after_step"] == [True] * 6  # 2 epochs x 3 steps, in training mode
    assert calls["log_end"] == [(tracker.run_id, 2)]  # once, at the end (epochs_trained), to the run
    assert len(calls["regularization"]) >= 6 and metrics["train_loss"] > 100


def bn(n):  # BatchNorm1d: weight and bias
    return 2 * n


def dense(a, b):
    return a * b + b


@pytest.mark.parametrize(
    "blocks, expected",
    [
        (2, bn(512) + dense(512, 256) + bn(256) + dense(256, 50)),
        (3, bn(512) + dense(512, 256) + bn(256) + dense(256, 256) + bn(256) + dense(256, 50)),
    ],
)
def test_head_parameter_counts(blocks, expected):
    head = Head(512, 50, blocks=blocks, width=256)
    assert sum(p.numel() for p in head.parameters()) == expected
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()) == blocks
    assert sum(isinstance(m, torch.nn.ReLU) for m in head.modules()) == blocks - 1


def test_head_defaults_are_the_configs():
    """Building a Head without arguments gives the head a default run builds (dropout 0.2...)."""
    cfg = compose_cfg([]).head
    head = Head(32, 5)
    assert [m.p for m in head.modules() if isinstance(m, torch.nn.Dropout)] == [cfg.dropout] * cfg.blocks
    assert head.net[2].out_features == cfg.width


@pytest.mark.parametrize("head", ["gap2", "gap3", "autopool", "autopool3"])
@pytest.mark.parametrize("output", ["sigmoid", "softmax"])
def test_every_head_pool_combination_shapes(head, output):
    cfg = compose_cfg([f"+head={head}", f"head.output={output}", "backbone.width=0.125", "head.width=16"])
    model = build_model(cfg, n_tags=11).eval()
    x = torch.randn(3, 96, 64)
    logits = model(x)
    assert logits.shape == (3, 11)
    probs = model.probabilities(logits)
    assert ((probs >= 0) & (probs <= 1)).all()
    if output == "softmax":
        assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-5)
    fmap = model.encode(x)
    assert fmap.shape == (3, model.backbone.out_channels, 6, 4)
    assert torch.allclose(model(fmap, from_backbone=True), logits, atol=1e-5)
    assert model.loss(logits, torch.zeros(3, 11)).ndim == 0


def test_frozen_backbone_trains_only_pool_and_head():
    cfg = compose_cfg(["+head=autopool", "backbone.width=0.125", "head.width=16"])
    model = build_model(cfg, n_tags=5)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"pool", "head"}
