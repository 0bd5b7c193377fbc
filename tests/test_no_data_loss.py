"""No mtt command deletes or overwrites a file it did not create (issue 25, item 1).

The embedded dataset (the default ``data=toy``) is generated into ``data.root``; pointed at a
hand-unpacked MagnaTagATune (folders 0-f and the two CSVs: MTAT's own names, nothing else) it
must refuse, in one line, with exit status 2, before any MLflow run, and leave every byte."""

from __future__ import annotations

import pytest

from tests.helpers import TINY, mtat_tree, run_module, snapshot
from tests.helpers.http_server import closed_port_url


@pytest.mark.parametrize("command", ["mtt.run", "mtt.preprocess"])
def test_default_data_on_a_hand_unpacked_mtat_touches_nothing(tmp_path, command):
    root = mtat_tree(tmp_path / "mtat")
    before = snapshot(root)
    assert len(before) == 16 + 32 + 2
    cache, store = tmp_path / "cache", tmp_path / "m.db"
    proc = run_module(
        [command, *TINY, f"data.root={root}", f"paths.cache={cache}", f"tracking.uri=sqlite:///{store}"], check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: data.root={root} holds files mtt did not generate (0, 1, 2, ...)")
    assert "data=mtat" in lines[0] and "empty or new folder" in lines[0]
    assert snapshot(root) == before  # every file, byte for byte, and no new one
    assert not store.exists(), "the MLflow store (so a run) was created"
    assert not cache.exists(), "data work started"


def test_download_into_a_hand_unpacked_mtat_is_refused_before_any_request(tmp_path):
    root = mtat_tree(tmp_path / "mtat")
    before = snapshot(root)
    proc = run_module(
        ["mtt.data.download", "data=mtat", f"data.root={root}", f"paths.cache={tmp_path / 'cache'}"],
        env={"MTT_MTAT_URL": closed_port_url()},
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: data.root={root} holds files mtt did not download (0, 1, 2, ...); refusing to download "
        f"into it: if it holds MagnaTagATune already, use it as it is (data=mtat data.root={root}), "
        "otherwise choose an empty or new folder"
    ]
    assert snapshot(root) == before


def test_download_into_a_new_folder_is_not_refused_for_not_existing_yet(tmp_path):
    """data=mtat reads data.root, so elsewhere a missing one is refused; the download creates it:
    it gets past every check (here to the network, which is closed)."""
    root = tmp_path / "new" / "mtat"
    proc = run_module(
        ["mtt.data.download", "data=mtat", f"data.root={root}", f"paths.cache={tmp_path / 'cache'}"],
        env={"MTT_MTAT_URL": closed_port_url()},
        check=False,
    )
    assert proc.returncode == 1 and "error: cannot reach" in proc.stderr, proc.stderr[-2000:]
    assert "no such folder" not in proc.stderr
