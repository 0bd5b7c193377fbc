"""What the MLflow UI and client show of a run through MLflow's own conventions: dataset inputs
(the runs table's Dataset column), the run page's note, the experiment kind; the dataset inputs
go through the run's journal like everything else, so an outage loses none of them."""

from __future__ import annotations

import numpy as np
from mlflow.tracking import MlflowClient

from mtt.tracking import sync
from mtt.tracking.journal import Journal
from mtt.tracking.records import dataset_inputs, run_note
from mtt.tracking.runs import EXPERIMENT_KIND, MlflowTracker, Shipper, prepare_store, ship_to
from mtt.training.train import train
from tests.helpers.http_server import closed_port_url


def inputs_of(uri: str, run_id: str) -> dict[str, tuple[str, str, str]]:
    """{context: (name, digest, source)} of a run's dataset inputs, each context once."""
    out = {}
    for d in MlflowClient(uri).get_run(run_id).inputs.dataset_inputs:
        (context,) = [t.value for t in d.tags if t.key == "mlflow.data.context"]
        assert context not in out, f"context {context} twice"
        out[context] = (d.dataset.name, d.dataset.digest, d.dataset.source)
    return out


def test_a_run_logs_each_split_as_a_dataset_input_and_a_note(tiny_cfg):
    with MlflowTracker(tiny_cfg.tracking.uri, "unit", "tiny") as tracker:
        metrics = train(tiny_cfg, tracker)
    inputs = inputs_of(tiny_cfg.tracking.uri, tracker.run_id)
    assert sorted(inputs) == ["test", "train", "valid"]
    assert {name for name, _, _ in inputs.values()} == {"toy-all-standard"}
    assert all(tiny_cfg.data.root in source for _, _, source in inputs.values())
    assert len({digest for _, digest, _ in inputs.values()}) == 3  # three splits, three datasets
    run = MlflowClient(tiny_cfg.tracking.uri).get_run(tracker.run_id)
    note = run.data.tags["mlflow.note.content"]
    assert "global average pooling" in note and "2-block sigmoid head" in note
    assert f"{run.data.params['derived.steps_per_epoch']} steps per epoch (steps policy patches)" in note
    assert "toy-all-standard" in note and tiny_cfg.data.root in note
    assert run.data.tags["mlflow.runName"] == "tiny" and metrics["epochs_trained"] == 1


def test_digest_follows_the_feature_store_and_the_clips(tiny_cfg):
    ids = {"train": np.arange(5), "valid": np.arange(5, 7), "test": np.arange(7, 9)}
    a = dataset_inputs(tiny_cfg.data, "f" * 16, ids)
    assert dataset_inputs(tiny_cfg.data, "f" * 16, ids) == a  # the same data, the same digests
    b = dataset_inputs(tiny_cfg.data, "e" * 16, ids)  # another feature store (other parameters)
    c = dataset_inputs(tiny_cfg.data, "f" * 16, {**ids, "train": np.arange(4)})  # other clips
    assert [x["digest"] for x in a] != [x["digest"] for x in b]
    assert a[0]["digest"] != c[0]["digest"] and a[1:] == c[1:]


def test_dataset_inputs_survive_an_outage_and_ship_once(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    run_id = client.create_run(prepare_store(uri, "j")).info.run_id
    away = closed_port_url()
    journal = Journal(tmp_path / "checkpoints" / run_id)
    journal.open({"uri": away, "run_id": run_id, "experiment_id": "1", "experiment": "j"})
    shipper = Shipper(MlflowClient(away), journal, 0)
    shipper.start()
    datasets = dataset_inputs(
        tiny_cfg.data, "0123456789abcdef", {"train": np.arange(3), "valid": np.arange(3, 4), "test": np.arange(4, 6)}
    )
    # As MlflowTracker.log_inputs writes them, while the store is away.
    shipper.wrote(journal.append("inputs", datasets=datasets))
    shipper.wrote(journal.append("status", status="FINISHED", end_time=5000))
    assert shipper.flush(1.0) is False
    shipper.join(timeout=10)
    assert client.get_run(run_id).inputs.dataset_inputs == []
    assert sync.main(["--tracking-uri", uri, str(tmp_path)]) == 0
    expected = {d["context"]: (d["name"], d["digest"], d["source"]) for d in datasets}
    assert inputs_of(uri, run_id) == expected
    journal = Journal(tmp_path / "checkpoints" / run_id)
    (tmp_path / "checkpoints" / run_id / "journal.acked").unlink()  # the acknowledgement lost: again
    assert ship_to(uri, journal) == 2
    assert inputs_of(uri, run_id) == expected  # still each split once


def test_experiments_mtt_creates_are_model_training_experiments(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    exp_id = prepare_store(uri, "fresh")
    assert MlflowClient(uri).get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert EXPERIMENT_KIND == {"mlflow.experimentKind": "custom_model_development"}


def test_note_of_an_autopool_run_and_of_the_probe(tiny_cfg):
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["+head=autopool", "pool.alpha_init=1.5"])
    derived = {"steps_per_epoch": 7, "train_clips": 10, "val_clips": 2, "test_clips": 3, "n_tags": 5}
    note = run_note(cfg, derived)
    assert "AutoPool (alpha initialised at 1.5" in note and "7 steps per epoch" in note
    assert "10 train / 2 valid / 3 test clips" in note
    assert "Linear probe" in run_note(cfg, derived, "linear probe")


def test_make_ui_prints_each_experiments_runs_table(tmp_path, capsys):
    from mtt.tracking import ui

    uri = f"sqlite:///{tmp_path}/m.db"
    assert ui.main(["--uri", uri, "--base", "http://127.0.0.1:5123"]) == 0  # no store yet: none made
    assert "no runs yet" in capsys.readouterr().out and not (tmp_path / "m.db").exists()
    exp_id = prepare_store(uri, "demo")
    prepare_store(uri, "empty")  # an experiment without runs is not listed
    MlflowClient(uri).create_run(exp_id)
    assert ui.main(["--uri", uri, "--base", "http://127.0.0.1:5123"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "MLflow UI: http://127.0.0.1:5123",
        f"  demo: http://127.0.0.1:5123/#/experiments/{exp_id}/runs?workflowType=machine_learning",
    ]
