"""The run journal (mtt/tracking/journal.py) and its shipping (mtt/tracking/runs.py ``ship``/``Shipper``,
``python -m mtt.sync``) against real local sqlite stores: torn lines, idempotent replay,
order with the status last, a store that is away, sync's outcomes."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mtt.tracking import sync
from mtt.tracking.journal import JOURNAL, Journal, JournalError
from mtt.tracking.runs import MlflowTracker, Shipper, ship, ship_to
from tests.helpers.http_server import closed_port_url


def new_run(uri: str, experiment: str = "j") -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    return client.create_run(exp_id).info.run_id


def journal_for(folder, uri: str, run_id: str) -> Journal:
    journal = Journal(folder)
    journal.open({"uri": uri, "run_id": run_id, "experiment_id": "1", "experiment": "j"})
    return journal


def write_run(journal: Journal, tmp_path) -> None:
    """What a short training logs: params, tags, two epochs, a tag changed, artifacts, status."""
    journal.append("params", params={"trainer.lr": "0.001", "trainer.epochs": "2"})
    journal.append("tags", tags={"phase": "training"})
    for epoch in range(2):
        journal.append(
            "metrics",
            metrics=[{"key": "val_loss", "value": 1.0 / (epoch + 1), "step": epoch, "timestamp": 1000 + epoch}],
        )
    journal.append("tags", tags={"phase": "done"})
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "loss.png").write_bytes(b"png")
    journal.append_files(plots, "plots")
    journal.append_files(None, None, name="config.yaml", text="trainer: {epochs: 2}\n")
    journal.append("status", status="FINISHED", end_time=5000)


def snapshot(uri: str, run_id: str) -> dict:
    """Everything of a run a replay could change: status, params, tags, every metric point, files."""
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    points = {
        k: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k))
        for k in run.data.metrics
    }
    files = sorted(a.path for a in client.list_artifacts(run_id)) + sorted(
        a.path for a in client.list_artifacts(run_id, "plots")
    )
    return {
        "status": run.info.status,
        "end": run.info.end_time,
        "params": dict(run.data.params),
        "tags": tags,
        "points": points,
        "files": files,
    }


def test_torn_last_line_is_ignored_then_cut_off_when_reopened(tmp_path):
    journal = journal_for(tmp_path, "sqlite:///x.db", "r1")
    journal.append("metrics", metrics=[{"key": "a", "value": 1.0, "step": 0, "timestamp": 1}])
    with open(tmp_path / JOURNAL, "ab") as f:  # a kill -9 in the middle of the third line
        f.write(b'{"seq":2,"kind":"metrics","metr')
    assert [e["seq"] for e in Journal(tmp_path).entries()] == [0, 1]

    again = Journal(tmp_path)
    assert again.open({"uri": "sqlite:///x.db", "run_id": "r1"}) is True  # resumed, not restarted
    assert again.append("status", status="FINISHED", end_time=2) == 2
    lines = (tmp_path / JOURNAL).read_text().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [0, 1, 2]  # the torn bytes are gone

    with pytest.raises(JournalError, match="not the journal of run r2"):
        Journal(tmp_path).open({"run_id": "r2"})

    (tmp_path / JOURNAL).write_bytes(b'{"seq":0,"kind":"ru')  # killed while writing the header
    assert Journal(tmp_path).open({"run_id": "r3"}) is False
    assert [e["run_id"] for e in Journal(tmp_path).entries()] == ["r3"]


def test_damaged_middle_line_is_an_error_naming_the_file(tmp_path):
    journal = journal_for(tmp_path, "sqlite:///x.db", "r1")
    journal.append("tags", tags={"a": "1"})
    text = (tmp_path / JOURNAL).read_text().splitlines()
    (tmp_path / JOURNAL).write_text("\n".join([text[0], "{oops", text[1]]) + "\n")
    with pytest.raises(JournalError, match=rf"{JOURNAL}: line 2 is not JSON"):
        journal.entries()


def test_replay_is_idempotent_ordered_and_ends_with_the_status(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = new_run(uri)
    folder = tmp_path / "run"
    journal = journal_for(folder, uri, run_id)
    write_run(journal, tmp_path)
    before = tmp_path / "before"
    shutil.copytree(folder, before)  # the journal as a process killed before any ack left it

    seen = []  # the run's status each time the store acknowledged a group
    client = MlflowClient(uri)
    shipped = ship_to(uri, journal, lambda seq: seen.append((seq, client.get_run(run_id).info.status)))
    assert shipped == 8 and journal.pending() == []
    assert [seq for seq, _ in seen] == [5, 6, 7, 8]  # params..tags in one batch, then one by one
    assert seen[-1] == (8, "FINISHED") and all(s == "RUNNING" for _, s in seen[:-1])  # status last
    first = snapshot(uri, run_id)
    assert first["status"] == "FINISHED" and first["end"] == 5000
    assert first["params"] == {"trainer.lr": "0.001", "trainer.epochs": "2"}
    assert first["tags"]["phase"] == "done"  # the later value of a tag set twice
    assert first["points"] == {"val_loss": [(0, 1.0, 1000), (1, 0.5, 1001)]}  # steps, timestamps kept
    assert first["files"] == ["config.yaml", "plots", "plots/loss.png"]
    assert not (folder / "journal.files" / "6").exists()  # copies go once the store has them

    shutil.rmtree(folder)
    shutil.copytree(before, folder)  # every acknowledgement lost: the whole journal again
    assert ship_to(uri, Journal(folder), None) == 8
    assert snapshot(uri, run_id) == first
    assert ship_to(uri, Journal(folder), None) == 0  # and a third time: nothing to ship


def test_a_kill_between_groups_resumes_from_the_last_ack(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = new_run(uri)
    journal = journal_for(tmp_path / "run", uri, run_id)
    write_run(journal, tmp_path)

    def killed(seq):
        if seq >= 3:
            raise KeyboardInterrupt  # stands for kill -9 right after the store took a group

    with pytest.raises(KeyboardInterrupt):
        ship_to(uri, journal, killed)
    assert 3 <= journal.acked() < 8 and MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    ship_to(uri, journal)
    assert snapshot(uri, run_id)["points"] == {"val_loss": [(0, 1.0, 1000), (1, 0.5, 1001)]}


def _ship_the_sweeps_datasets(uri: str, folder: str, run_id: str, rounds: int, start, result) -> None:
    """One job of a sweep (its own process), for each round: journal the dataset inputs every
    job logs in that round, wait for the others, then ship at the same moment."""
    journal = journal_for(Path(folder), uri, run_id)
    client = MlflowClient(uri)
    client.get_run(run_id)  # connected before the start, as a job is by the time it logs
    for r in range(rounds):
        journal.append(
            "inputs",
            datasets=[
                {"name": "mtat", "digest": f"{r}-{i}", "source_type": "local", "source": "{}", "context": context}
                for i, context in enumerate(("train", "validation", "test"))
            ],
        )
        start.wait()
        try:
            ship(client, journal)
            result.put("shipped")
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result.put(str(exc).splitlines()[0])
            return


def test_jobs_shipping_the_same_dataset_at_once_all_ship_it(tmp_path):
    """MLflow looks a dataset up, then inserts it: of four jobs that log it at once, three lose
    that race (a unique-row error) and must send it again, not stop shipping and leave their
    run RUNNING (as two jobs of a submitit sweep did)."""
    uri = f"sqlite:///{tmp_path}/m.db"
    jobs, rounds = 4, 4  # without the retry, rounds after the first lose the race here
    runs = [new_run(uri) for _ in range(jobs)]
    spawn = multiprocessing.get_context("spawn")  # no sqlite connection crosses a fork
    start, result = spawn.Barrier(jobs), spawn.Queue()
    workers = [
        spawn.Process(target=_ship_the_sweeps_datasets, args=(uri, str(tmp_path / r), r, rounds, start, result))
        for r in runs
    ]
    for w in workers:
        w.start()
    outcomes = []
    while len(outcomes) < jobs * rounds:
        outcomes.append(result.get(timeout=120))
        if outcomes[-1] != "shipped":
            break
    start.abort()  # a job that failed stops; let the others out of the barrier
    for w in workers:
        w.join()
    assert outcomes == ["shipped"] * jobs * rounds
    client = MlflowClient(uri)
    for run_id in runs:
        contexts = [i.tags[0].value for i in client.get_run(run_id).inputs.dataset_inputs]
        assert sorted(contexts) == sorted(["train", "validation", "test"] * rounds)


def test_artifact_is_the_file_as_it_was_when_logged(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = new_run(uri)
    journal = journal_for(tmp_path / "run", uri, run_id)
    best = tmp_path / "best.json"
    best.write_text('{"epoch": 0}')
    journal.append_files(best, "checkpoint")
    best.write_text('{"epoch": 5}')  # a later epoch rewrites it before the store is back
    ship_to(uri, journal)
    got = MlflowClient(uri).download_artifacts(run_id, "checkpoint/best.json", str(tmp_path / "dl"))
    assert open(got).read() == '{"epoch": 0}'


def test_tracker_without_a_cache_journals_in_a_temporary_folder_gone_once_shipped(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    with MlflowTracker(uri, "j", "tmp") as tracker:
        tracker.log_metrics({"a": 1.0, "skipped": float("nan")}, step=0)
        folder = tracker.journal.folder
        assert folder.is_dir() and not str(folder).startswith(str(tmp_path))
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"a": 1.0}
    assert not folder.exists()


def test_store_away_never_raises_and_sync_ships_later(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after minutes
    away = closed_port_url()
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = new_run(uri)
    folder = tmp_path / "checkpoints" / run_id
    journal = journal_for(folder, away, run_id)
    shipper = Shipper(MlflowClient(away), journal, 0)
    shipper.start()
    write_run(journal, tmp_path)
    shipper.wrote(journal.entries()[-1]["seq"])
    assert shipper.flush(1.0) is False  # gave up waiting, raised nothing
    shipper.join(timeout=10)
    assert not shipper.is_alive() and shipper.error is None and "Connection refused" in str(shipper.failing)
    assert journal.acked() == -1

    # The journal's own store is still away: a clear failure, nothing lost.
    assert sync.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"FAILED run {run_id}" in out and "not reachable" in out and "1 failed" in out
    # The store the run lives in: everything arrives, once.
    assert sync.main(["--tracking-uri", uri, str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"shipped run {run_id}" in out and "8 entries" in out and "status FINISHED" in out
    assert snapshot(uri, run_id)["points"] == {"val_loss": [(0, 1.0, 1000), (1, 0.5, 1001)]}
    assert sync.main(["--tracking-uri", uri, str(folder)]) == 0
    assert "0 shipped, 1 already shipped" in capsys.readouterr().out


def test_sync_names_a_missing_run_a_busy_journal_and_a_missing_path(tmp_path, capsys):
    written_for = f"sqlite:///{tmp_path}/a.db"
    other = f"sqlite:///{tmp_path}/b.db"
    new_run(other)  # a store without the journal's run
    journal = journal_for(tmp_path / "run", written_for, "0123456789abcdef0123456789abcdef")
    journal.append("tags", tags={"a": "1"})
    assert sync.main(["--tracking-uri", other, str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "FAILED run 0123456789abcdef" in out and f"the journal was written for {written_for}" in out
    assert len(journal.pending()) == 1

    with journal.shipping_lock():  # a training still running holds it
        assert sync.main([str(tmp_path / "run")]) == 0
    assert "a running process is shipping it" in capsys.readouterr().out

    assert sync.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_every_line_carries_a_checksum_verified_when_read(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = new_run(uri)
    folder = tmp_path / "run"
    write_run(journal_for(folder, uri, run_id), tmp_path)
    path = folder / JOURNAL
    lines = path.read_bytes().splitlines(keepends=True)
    assert all(json.loads(x)["crc"] for x in lines) and json.loads(lines[0])["journal"] == 2
    assert [e["seq"] for e in Journal(folder).entries()] == list(range(9)) and "crc" not in Journal(folder).header

    # A number changed on disk: still JSON, still in sequence, no longer what was logged.
    changed = lines[3].replace(b'"value":1.0', b'"value":7.0')
    assert changed != lines[3]
    path.write_bytes(b"".join([*lines[:3], changed, *lines[4:]]))
    with pytest.raises(JournalError) as err:
        Journal(folder).entries()
    assert str(err.value) == (
        f"{path}: line 4 fails its checksum (changed or damaged on disk); nothing from it on can be shipped"
    )
    assert sync.main([str(folder)]) == 1  # refused, naming the file: nothing shipped
    out = capsys.readouterr().out
    assert f"FAILED {path}: line 4 fails its checksum" in out
    assert MlflowClient(uri).get_run(run_id).data.metrics == {}

    # A zeroed block (what a disk or a power cut leaves) in the middle is refused too.
    path.write_bytes(b"".join([*lines[:5], b"\0" * len(lines[5]), *lines[6:]]))
    with pytest.raises(JournalError, match=r"line 6 is not JSON"):
        Journal(folder).entries()

    # A journal of an older mtt (no crc anywhere) is read unchecked, as before.
    old = [json.loads(x) for x in lines]
    for entry in old:
        entry.pop("crc")
    old[0].pop("journal")
    path.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in old))
    assert [e["seq"] for e in Journal(folder).entries()] == list(range(9))
    # ... but in a checked journal a line without its crc is refused.
    path.write_bytes(b"".join([*lines[:2], json.dumps(old[2], separators=(",", ":")).encode() + b"\n", *lines[3:]]))
    with pytest.raises(JournalError, match=r"line 3 fails its checksum"):
        Journal(folder).entries()


def test_journal_deleted_mid_run_is_rewritten_and_the_run_ends_finished(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/m.db"
    with MlflowTracker(uri, "j", "deleted", cache=tmp_path / "cache") as tracker:
        tracker.log_metrics({"val_loss": 1.0}, step=0)
        tracker.log_metrics({"val_loss": 0.5}, step=1)
        path, before = tracker.journal.path, tracker.journal.entries()
        path.unlink()  # a cleanup script, a user, mid-run (the store is up)
        assert tracker.journal.entries() == before  # the run still reads its own copy
        tracker.log_metrics({"val_loss": 0.25}, step=2)
        assert path.is_file()
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "val_loss")) == [
        (0, 1.0),
        (1, 0.5),
        (2, 0.25),
    ]
    entries = Journal(path.parent).entries()  # whole again: header first, every line checked
    assert entries[0]["kind"] == "run" and entries[-1]["status"] == "FINISHED"
    assert [m["step"] for e in entries for m in e.get("metrics", ())] == [0, 1, 2]
    (warning,) = [r.getMessage() for r in caplog.records if "deleted or replaced" in r.getMessage()]
    assert str(path) in warning
    assert sync.main([str(path.parent)]) == 0  # and `mtt.sync` finds nothing left to ship


def test_a_run_folder_is_held_by_one_live_process(tmp_path):
    from mtt.tracking.journal import OWNER, process_alive, this_process

    journal = Journal(tmp_path / "run")
    with journal.claim():
        owner = json.loads((tmp_path / "run" / OWNER).read_text())
        assert owner == this_process() and process_alive(owner) is True
        with pytest.raises(JournalError, match=rf"held by process {owner['pid']} on "):
            with Journal(tmp_path / "run").claim():
                pass
    with Journal(tmp_path / "run").claim():  # let go at the end of the block
        pass


def dead_process() -> dict:
    """The identity of a process that ran on this host and has ended."""
    import subprocess
    import sys

    from mtt.tracking.journal import this_process

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return {**this_process(), "pid": proc.pid, "started": 1}


def open_run(tmp_path, uri: str, name: str, owner: dict | None, heartbeat_age: float = 0.0):
    """A run RUNNING in the store whose journal (epoch 0 logged) names ``owner`` as its process."""
    import os
    import time

    from mtt.tracking.journal import OWNER

    run_id = new_run(uri)
    journal = journal_for(tmp_path / "cache" / name, uri, run_id)
    journal.append("metrics", metrics=[{"key": "val_loss", "value": 1.0, "step": 0, "timestamp": 1000}])
    journal.close()
    seen = time.time() - heartbeat_age
    if owner is not None:
        (journal.folder / OWNER).write_text(json.dumps(owner))
        os.utime(journal.folder / OWNER, (seen, seen))
    os.utime(journal.path, (seen, seen))
    return run_id, journal


def test_close_stale_ends_the_runs_whose_process_is_gone(tmp_path, capsys):
    import re

    from mtt.tracking.journal import this_process

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    me = this_process()
    gone, gone_journal = open_run(tmp_path, uri, "gone", dead_process(), heartbeat_age=100)
    last_seen = gone_journal.heartbeat()
    reused, reused_journal = open_run(tmp_path, uri, "reused", {**me, "started": me["started"] - 1})  # a later pid
    (reused_journal.folder / "last.pt").write_bytes(b"\0" * 64)  # a damaged checkpoint: closed all the same
    alive, _ = open_run(tmp_path, uri, "alive", me)
    held, held_journal = open_run(tmp_path, uri, "held", dead_process())
    elsewhere, _ = open_run(tmp_path, uri, "elsewhere", {**me, "host": "node-17"}, heartbeat_age=600)
    fresh, _ = open_run(tmp_path, uri, "fresh", {**me, "host": "node-18"}, heartbeat_age=10)
    with held_journal.owner_lock():  # a live run holds its folder, whatever its owner file says
        assert sync.main(["--close-stale", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    status = {r: client.get_run(r).info.status for r in (gone, reused, alive, held, elsewhere, fresh)}
    assert status == {
        gone: "KILLED",
        reused: "KILLED",
        alive: "RUNNING",
        held: "RUNNING",
        elsewhere: "RUNNING",
        fresh: "RUNNING",
    }
    run = client.get_run(gone)
    assert (
        run.data.tags["killed_by"].startswith("mtt.sync --close-stale: process ")
        and "is gone" in run.data.tags["killed_by"]
    )
    assert run.info.end_time == int(1000 * last_seen)  # ended when it was last seen alive, 100 s ago
    assert [m.step for m in client.get_metric_history(gone, "val_loss")] == [0]  # with its last epoch
    assert f"closed run {gone} " in out and "KILLED before its first checkpoint (nothing to resume)" in out
    assert f"closed run {reused} " in out and "KILLED with a last.pt that cannot be resumed (" in out
    assert f"left open run {elsewhere} " in out and "process " in out and "node-17 cannot be checked" in out
    assert "2 closed as KILLED" in out

    # Another host's run: closed only on request, once its heartbeat is older than asked.
    assert sync.main(["--close-stale", "--stale-after", "300", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert client.get_run(elsewhere).info.status == "KILLED" and client.get_run(fresh).info.status == "RUNNING"
    assert "no heartbeat from process" in client.get_run(elsewhere).data.tags["killed_by"]
    assert f"left open run {fresh} " in out and re.search(r"node-18 beat \d+ s ago \(--stale-after 300\)", out)
    assert client.get_run(held).info.status == "KILLED"  # its folder no longer held, its process gone
    assert client.get_run(alive).info.status == "RUNNING"
    with pytest.raises(SystemExit):
        sync.main(["--stale-after", "300", str(tmp_path)])  # only with --close-stale
