"""End to end on the tiny generated dataset: train, evaluate, and read the MLflow run back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from mtt.core import distributed
from mtt.features.streams import simulate_coverage
from mtt.tracking.runs import MlflowTracker, download_artifacts
from mtt.training.evaluate import chunk_bce, clip_scores
from mtt.training.train import clip_metrics, clip_probabilities, prepare, start, train
from tests.helpers import TINY, compose_cfg, run_module, sweep_children

EPOCH_METRICS = ["train_loss", "train_accuracy", "train_clip_coverage", "train_draws_per_clip"]
EPOCH_METRICS += ["val_loss", "val_chunk_loss", "val_accuracy", "val_roc_auc", "val_pr_auc"]
FINAL_METRICS = ["test_loss", "test_accuracy", "test_roc_auc", "test_pr_auc"]


def test_one_epoch_run_is_recorded(tiny_cfg, tmp_path):
    with MlflowTracker(tiny_cfg.tracking.uri, "unit", "tiny") as tracker:
        metrics = train(tiny_cfg, tracker)
    client = MlflowClient(tiny_cfg.tracking.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0], key
    # The logged test metrics are what train() returns and what the logged checkpoint scores on
    # the test clips, evaluated here on its own (whether a 1-epoch run learns: tests/test_recipe.py).
    assert {k: run.data.metrics[k] for k in FINAL_METRICS} == {k: metrics[k] for k in FINAL_METRICS}
    p = prepare(tiny_cfg)
    best = download_artifacts(tiny_cfg.tracking.uri, tracker.run_id, "checkpoint/best.safetensors", tmp_path)
    p.model.load_state_dict(load_file(best))
    probs = clip_probabilities(p.model, p.inputs, p.test, tiny_cfg, p.device, p.from_backbone, p.amp)
    for key, value in clip_metrics(p.test.labels, probs).items():
        if not math.isnan(value):
            assert run.data.metrics[f"test_{key}"] == pytest.approx(value, abs=1e-6), key
    assert run.data.metrics["test_accuracy_all_negative"] == pytest.approx(1 - p.test.labels.mean())
    assert run.data.params["head.blocks"] == "2" and run.data.params["pool.name"] == "gap"
    assert run.data.tags["backbone_pretrained"] == "False"
    assert int(run.data.params["derived.steps_per_epoch"]) >= 1
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts


def test_exception_marks_the_run_failed(tiny_cfg, tmp_path):
    cfg = compose_cfg(
        [*TINY, f"tracking.uri={tiny_cfg.tracking.uri}", "steps.policy=fixed", "steps.n=0"], cache=tiny_cfg.paths.cache
    )
    with pytest.raises(ValueError, match="steps.n"):
        with MlflowTracker(cfg.tracking.uri, "unit", "bad") as tracker:
            train(cfg, tracker)
    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and "steps.n" in run.data.tags["error"]


@pytest.mark.slow
def test_cli_autopool_two_epochs(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/x.db"
    run_module(
        ["mtt.run", "+head=autopool", *TINY, "trainer.epochs=2", f"paths.cache={cache_dir}"],
        env={"MLFLOW_TRACKING_URI": uri},
    )
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("val_roc_auc", "train_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1]
    assert run.data.params["pool.name"] == "autopool"
    assert run.data.tags["choice.head"] == "autopool"


@pytest.mark.slow
def test_cli_multirun_three_heads(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/x.db"
    run_module(
        ["mtt.run", "-m", "+head=gap2,gap3,autopool", *TINY, f"paths.cache={cache_dir}", "tracking.experiment=sweep"],
        env={"MLFLOW_TRACKING_URI": uri},
    )
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep")
    runs = sweep_children(client, "sweep")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.info.run_name.split(",")[0] for r in runs) == ["head=autopool", "head=gap2", "head=gap3"]
    assert sorted((r.data.params["head.blocks"], r.data.params["pool.name"]) for r in runs) == [
        ("2", "autopool"),
        ("2", "gap"),
        ("3", "gap"),
    ]
    assert len({r.info.run_name for r in runs}) == 3
    # One `-m` call, one sweep id: the runs of this sweep can be filtered together.
    (sweep,) = {r.data.tags["sweep_id"] for r in runs}
    # (the parent run carries the sweep id too)
    assert "multirun" in sweep and len(client.search_runs([exp.experiment_id], f"tags.sweep_id = '{sweep}'")) == 4


def test_finetuning_the_last_conv_trains_through_the_backbone(tiny_cfg):
    cfg = compose_cfg(
        [*TINY, f"tracking.uri={tiny_cfg.tracking.uri}", "backbone.finetune_last=1"], cache=tiny_cfg.paths.cache
    )
    with MlflowTracker(cfg.tracking.uri, "unit", "finetune") as tracker:
        train(cfg, tracker)
    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["derived.backbone_cached"] == "False"  # conv maps change while training


def test_artifacts_live_beside_the_sqlite_store_not_in_the_working_directory(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with MlflowTracker(tiny_cfg.tracking.uri, "where", "a") as tracker:
        tracker.log_text("hello", "note.txt")
    assert not (tmp_path / "mlruns").exists()
    db_dir = tiny_cfg.tracking.uri[len("sqlite:///") :].rsplit("/", 1)[0]
    assert list((Path(db_dir) / "mlartifacts" / "where").rglob("note.txt"))


def epoch_history(uri: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_every_run_logs_the_share_of_training_clips_each_epoch_saw(tiny_cfg, cache_dir, tmp_path):
    """train_clip_coverage and train_draws_per_clip, per epoch: 1.0 and 1.0 under stream.mode=epoch
    with steps=epoch (every clip once); under the default mux what that stream really drew (the
    same figures as simulate_coverage), short of every clip here; and trainer.monitor=val_chunk_loss
    selects the epoch of the lowest chunk-level validation loss."""
    uri = tiny_cfg.tracking.uri
    runs = {}
    for name, extra in {
        "epoch": ["stream.mode=epoch", "steps=epoch", "trainer.monitor=val_chunk_loss"],
        "mux": ["steps=cached"],
    }.items():
        cfg = compose_cfg(
            [*TINY, "trainer.epochs=2", "trainer.patience=null", f"tracking.uri={uri}", *extra], cache=cache_dir
        )
        with MlflowTracker(uri, "coverage", name) as tracker:
            runs[name] = (cfg, tracker.run_id, train(cfg, tracker))
    cfg, run_id, metrics = runs["epoch"]
    assert epoch_history(uri, run_id, "train_clip_coverage") == [1.0, 1.0]
    assert epoch_history(uri, run_id, "train_draws_per_clip") == [1.0, 1.0]
    chunk_losses = epoch_history(uri, run_id, "val_chunk_loss")
    assert metrics["best_epoch"] == int(np.argmin(chunk_losses))
    # The logged value is the chunk loss of the selected checkpoint on the validation clips.
    p = prepare(cfg)
    p.model.load_state_dict(load_file(download_artifacts(uri, run_id, "checkpoint/best.safetensors", tmp_path)))
    _, losses = clip_scores(p.model, p.inputs, p.valid, cfg, p.device, p.from_backbone, p.amp, p.grid)
    assert chunk_losses[metrics["best_epoch"]] == pytest.approx(float(np.mean(losses)), rel=1e-6)
    cfg, run_id, _ = runs["mux"]
    p = prepare(cfg)
    steps = int(MlflowClient(uri).get_run(run_id).data.params["derived.steps_per_epoch"])
    sizes = np.array([p.store.count(c) for c in p.train.clip_ids])
    expected = simulate_coverage(sizes, cfg.stream, cfg.trainer.batch_size, steps, epochs=2, seed=cfg.trainer.seed)
    coverage = epoch_history(uri, run_id, "train_clip_coverage")
    assert coverage == pytest.approx([e["train_clip_coverage"] for e in expected])
    assert epoch_history(uri, run_id, "train_draws_per_clip") == pytest.approx(
        [e["train_draws_per_clip"] for e in expected]
    )
    assert max(coverage) < 1


def test_val_chunk_loss_is_the_mean_over_clips_of_their_chunks_bce(tiny_cfg):
    """Won et al.'s validation loss: per clip, nn.BCELoss of every evaluated chunk's probabilities
    against the clip's tags, then the mean over the clips (Run.validate's chunk_loss), which is
    not the BCE of the clip-level probabilities (val_loss) once a clip's chunks disagree."""
    p = prepare(tiny_cfg)
    run = start(tiny_cfg, distributed.RankTracker("chunk-loss", resumed=False), p, distributed.Dist())  # logs nothing
    with torch.no_grad():  # tags decided by small differences between chunks: a clip's chunks disagree
        p.model.head.output_layer.weight.normal_(0, 300)
        p.model.head.output_layer.bias.zero_()
    theirs = []
    p.model.eval()
    with torch.no_grad():
        for clip, labels in zip(p.valid.clip_ids, p.valid.labels):
            x = torch.from_numpy(np.asarray(p.inputs.get(clip), dtype=np.float32))
            out = p.model.probabilities(p.model(x, from_backbone=p.from_backbone))
            y = torch.tensor(labels, dtype=torch.float32).expand_as(out)
            theirs.append(torch.nn.BCELoss()(out, y).item())
    val = run.validate()
    assert val["chunk_loss"] == pytest.approx(float(np.mean(theirs)), rel=1e-5)
    assert abs(val["chunk_loss"] - val["loss"]) > 0.01, val


def test_chunk_bce_is_torchs_bce_loss_with_its_clamp():
    """A saturated probability costs what nn.BCELoss charges (its logs clamped at -100), not
    infinity, and each chunk's loss is the mean over its tags."""
    probs = np.array([[1.0, 0.5, 0.0], [0.9, 0.2, 1e-30]])
    labels = np.array([[0, 1, 0], [1, 0, 1]], dtype=np.uint8)
    theirs = [
        torch.nn.BCELoss()(torch.tensor(p), torch.tensor(y, dtype=torch.float64)).item() for p, y in zip(probs, labels)
    ]
    assert chunk_bce(probs, labels) == pytest.approx(theirs, rel=1e-12)
    assert chunk_bce(probs, labels)[0] == pytest.approx((100 + np.log(2)) / 3)
