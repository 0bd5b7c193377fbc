"""The default recipe converges: an output bias at the tags' prior, epochs that see the data,
early stopping on the validation metric, a plateau learning-rate schedule, test metrics from the
best validation epoch. Checked on the smallest learnable data, against the baselines a model
that learned nothing would score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from mtt.core import distributed
from mtt.models import build_model
from mtt.tracking.checkpoint import TrainState
from mtt.tracking.records import load_predictions
from mtt.tracking.runs import MlflowTracker, download_artifacts
from mtt.training.train import patience_spent, prepare, start, train
from tests.helpers import LEARNABLE, TINY, compose_cfg


@pytest.fixture
def learnable(cache_dir, tmp_path):
    def make(*extra: str):
        return compose_cfg([*LEARNABLE, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra], cache=cache_dir)

    return make


def _history(uri: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_prior_bias_starts_the_loss_near_its_floor_not_at_log2():
    cfg = compose_cfg(["backbone.width=0.125"])
    rng = np.random.default_rng(0)
    labels = (rng.random((500, 20)) < np.linspace(0.01, 0.2, 20)).astype(np.uint8)  # 1-20% positive
    x = torch.randn(500, 64, 6, 4)
    y = torch.from_numpy(labels).float()
    losses = {}
    for init in ("zero", "prior"):
        torch.manual_seed(0)
        model = build_model(cfg, 20).eval()
        if init == "prior":
            model.init_output_bias(labels)
        with torch.no_grad():
            losses[init] = model.loss(model(x, from_backbone=True), y).item()
    prior = (labels.sum(0) + 0.5) / (len(labels) + 1)
    floor = float(-(prior * np.log(prior) + (1 - prior) * np.log(1 - prior)).mean())  # BCE of the prior
    assert losses["zero"] > 0.6  # every tag at probability ~0.5
    assert losses["prior"] < floor + 0.1 < 0.45, (losses, floor)


@pytest.mark.parametrize("init", ["prior", "zero", "default"])
def test_each_output_bias_init_is_what_it_says(cache_dir, init):
    """head.bias_init, as a run starts: prior = the tags' smoothed log-odds on the training clips;
    zero = 0 (Keras'); default = PyTorch's initialisation, uniform within +-1/sqrt(fan in)."""
    cfg = compose_cfg([*TINY, f"head.bias_init={init}"], cache=cache_dir)
    p = prepare(cfg)
    start(cfg, distributed.RankTracker(f"bias-{init}", resumed=False), p, distributed.Dist())  # logs nothing
    bias = p.model.head.output_layer.bias.detach().double().numpy()
    y = p.train.labels
    prior = (y.sum(0) + 0.5) / (len(y) + 1)
    expected = {"prior": np.log(prior / (1 - prior)), "zero": np.zeros_like(bias)}
    if init == "default":
        bound = 1 / np.sqrt(p.model.head.output_layer.in_features)
        assert np.all(np.abs(bias) <= bound) and np.abs(bias).min() > 0 and bias.std() > bound / 4
    else:
        assert bias == pytest.approx(expected[init], abs=1e-6)


def test_default_recipe_learns_tiny_data_well_beyond_the_baselines(learnable, learning, tmp_path):
    cfg = learnable(f"trainer.seed={learning.seed}")
    with MlflowTracker(cfg.tracking.uri, "recipe", "default") as tracker:
        m = train(cfg, tracker)
    predictions = download_artifacts(cfg.tracking.uri, tracker.run_id, "test_predictions.npz", tmp_path)
    labels = load_predictions(predictions).labels
    both = labels[:, (labels.min(0) == 0) & (labels.max(0) == 1)]  # the tags the AUCs average over
    # Chance: ROC-AUC 0.5; a PR-AUC equal to each tag's positive rate (0.197 here). Bounds: half the
    # spread of 5 seeds x 4 CPU arithmetics below the worst (docs/development.md). Binary accuracy
    # is no such figure: it beat "no tag at all" by 4-20 of 3,384 cells, less than its spread.
    learning.at_least("test_roc_auc", m["test_roc_auc"], 0.65, baseline=0.5)
    learning.at_least("test_pr_auc", m["test_pr_auc"], 0.35, baseline=round(float(both.mean()), 3))
    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.data.params["steps.policy"] == "patches"
    # The test metrics are those of the best validation epoch, which the run names.
    best = int(run.data.metrics["best_epoch"])
    val = _history(cfg.tracking.uri, tracker.run_id, "val_roc_auc")
    assert val[best] == max(val) and m["val_roc_auc"] == val[best]


def test_early_stopping_ends_patience_epochs_after_the_best(learnable, learning):
    cfg = learnable("trainer.epochs=40", "trainer.patience=3", f"trainer.seed={learning.seed}")
    with MlflowTracker(cfg.tracking.uri, "recipe", "patience") as tracker:
        train(cfg, tracker)
    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    trained, best = int(run.data.metrics["epochs_trained"]), int(run.data.metrics["best_epoch"])
    val = _history(cfg.tracking.uri, tracker.run_id, "val_roc_auc")
    assert len(val) == trained
    # 6 validation clips saturate long before 40 epochs (a model that never stops improving: 40).
    learning.at_most("epochs_trained", trained, 39, baseline=40)
    assert trained - 1 - best == 3  # stopped exactly when the patience was spent
    assert all(v <= val[best] for v in val[best + 1 :])


def test_without_patience_every_epoch_is_trained(learnable):
    cfg = learnable("trainer.epochs=4", "trainer.patience=null", "trainer.lr_schedule=none")
    with MlflowTracker(cfg.tracking.uri, "recipe", "fixed") as tracker:
        train(cfg, tracker)
    assert len(_history(cfg.tracking.uri, tracker.run_id, "val_roc_auc")) == 4
    assert _history(cfg.tracking.uri, tracker.run_id, "lr") == [1e-3] * 4


def test_plateau_schedule_cuts_the_rate_after_epochs_without_improvement(learnable, learning):
    cfg = learnable(
        "trainer.epochs=25",
        "trainer.patience=null",
        "trainer.lr_patience=1",
        "trainer.lr_factor=0.5",
        f"trainer.seed={learning.seed}",
    )
    with MlflowTracker(cfg.tracking.uri, "recipe", "plateau") as tracker:
        train(cfg, tracker)
    lr = _history(cfg.tracking.uri, tracker.run_id, "lr")
    val = _history(cfg.tracking.uri, tracker.run_id, "val_roc_auc")
    assert lr[0] == 1e-3
    # A tiny validation set plateaus within 25 epochs: the first epoch at a lower rate (25: never).
    first_cut = next((e for e, rate in enumerate(lr) if rate < 1e-3), len(lr))
    learning.at_most("first epoch at a lower lr", first_cut, 24, baseline=25)
    best = -np.inf
    bad = 0
    for e in range(1, len(lr)):  # replay the rule: halve after more than 1 epoch without a new best
        best, bad = (val[e - 1], 0) if val[e - 1] > best else (best, bad + 1)
        expected = lr[e - 1] * (0.5 if bad > 1 else 1.0)
        if bad > 1:
            bad = 0
        assert lr[e] == pytest.approx(expected), (e, lr, val)


@pytest.mark.parametrize(
    "epoch,best,patience,spent", [(5, 2, 3, True), (4, 2, 3, False), (9, 0, None, False), (0, -1, 0, False)]
)
def test_patience_rule(epoch, best, patience, spent):
    assert patience_spent(TrainState(epoch=epoch, best_epoch=best), patience) is spent
