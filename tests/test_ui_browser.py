"""The MLflow UI comparison, checked like a user would: a real 3-run sweep, `mlflow ui` on
127.0.0.1, headless Chromium (Debian's, driven by Playwright: tests/helpers/browser.py) opening
the experiment's runs table, expanding the sweep's parent run, sorting by test_roc_auc.

Provisioned by `.ci/run` (Debian's chromium); the test installs nothing and FAILS without it.
``MTT_UI_SCREENSHOT=docs/mlflow-ui.png`` also writes the README's screenshot there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mtt.core.paths import REPO_ROOT
from tests.helpers import TINY, run_module, sweep_children
from tests.helpers.browser import INSTALL_HINT, chromium_page, wait_for
from tests.helpers.http_server import free_port, stop_process_group

METRIC = "test_roc_auc"
# The expand toggle in a parent run's name cell.
EXPAND = '[data-component-id$="runnamecellrenderer.tsx_46"]'
HEADS = ["gap2", "gap3", "autopool"]


@contextmanager
def mlflow_ui(uri: str, workdir: Path, timeout: float = 180.0):
    """``mlflow ui`` (as `make ui` runs it) on a free 127.0.0.1 port; yields its base URL."""
    port = free_port()
    log = open(workdir / "mlflow-ui.log", "wb")
    # Telemetry off: nothing but 127.0.0.1 traffic.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"mlflow ui did not answer on {base} (exit code {proc.poll()}):\n"
                    f"{(workdir / 'mlflow-ui.log').read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.5)
        yield base
    finally:
        stop_process_group(proc)  # the server and its workers
        log.close()


# Rows of the runs table (ag-grid splits each row into a pinned and a scrolling part that share
# a row-index): the visible order, each row's text and its METRIC cell.
ROWS_JS = """(() => {
  const rows = {};
  for (const r of document.querySelectorAll('[role=row][row-index]')) {
    const i = Number(r.getAttribute('row-index'));
    rows[i] = rows[i] || {text: '', metric: null};
    rows[i].text += ' ' + r.innerText;
    const c = r.querySelector('[col-id="metrics.`%s`"]');
    if (c) rows[i].metric = c.innerText.trim();
  }
  return Object.keys(rows).sort((a, b) => a - b).map(k => rows[k]);
})()""".replace("%s", METRIC)  # %-formatting would need every JavaScript brace doubled


def sorted_runs_table(uri: str, experiment: str, workdir: Path, n_runs: int) -> tuple[bytes, list[dict]]:
    """Open ``experiment``'s runs table as `make ui` prints it (``mtt.tracking.ui.runs_table_url``) in a fresh
    browser, close the assistant panel, Sort -> METRIC; check that the n_runs runs with METRIC
    are shown sorted, descending, and that the browser opened on Model training (not GenAI).
    Returns the screenshot and the sorted rows (``text``, ``metric``)."""
    from mtt.tracking.ui import runs_table_url

    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    with mlflow_ui(uri, workdir) as base, chromium_page() as page:
        page.goto(runs_table_url(base, exp.experiment_id))
        wait_for(page, f"!!document.querySelector('{EXPAND}')", 90, "the runs table with a parent run")
        # The sidebar is Model training's (Runs, Models, Model registry), not GenAI's (Sessions,
        # Judges, ...): the address's workflowType beats the fresh browser's GenAI default (MLflow
        # issue #24498, mtt/tracking/ui.py).
        sidebar = wait_for(
            page, "Array.from(document.querySelectorAll('aside')).map(a => a.innerText).join(' ')", 30, "the sidebar"
        )
        assert "Model registry" in sidebar and "Sessions" not in sidebar, sidebar
        # As a user: close the assistant panel (it hides half the table), then Sort -> METRIC,
        # which sorts descending and adds the metric as a column.
        if page.evaluate("!!document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')"):
            page.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
        page.click('[data-testid="sort-select-dropdown"]')
        page.click(f'[data-testid="sort-select-{METRIC}"]')
        wait_for(page, f"!!document.querySelector('[data-testid=\"sort-header-{METRIC}\"]')", 30, f"a {METRIC} column")
        # The table re-renders after the sort: wait until the runs show it, sorted (a table that
        # never sorts times out here).
        rows = wait_for(
            page,
            f"(r => (r = r.filter(x => x.metric && x.metric !== '-')).length === {n_runs} && "
            f"r.every((x, i) => i === 0 || parseFloat(r[i - 1].metric) >= parseFloat(x.metric))"
            f" ? r : null)({ROWS_JS})",
            60,
            f"{n_runs} rows sorted by {METRIC}",
        )
        png = page.screenshot()
    (workdir / f"mlflow-ui-{experiment}.png").write_bytes(png)
    if os.environ.get("MTT_UI_SCREENSHOT"):
        Path(os.environ["MTT_UI_SCREENSHOT"]).write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    return png, rows


def check_rows(rows: list[dict], logged: dict[str, float]) -> None:
    """Each run of ``logged`` ({name: METRIC}) shown once, with its value, in descending order."""
    shown = []
    for row in rows:
        names = [n for n in logged if re.search(rf"(^|\s){re.escape(n)}(\s|$)", row["text"])]
        assert len(names) == 1, f"row {row['text']!r} should name exactly one run of {sorted(logged)}"
        shown.append((names[0], float(row["metric"].rstrip(".…"))))
    assert sorted(n for n, _ in shown) == sorted(logged)  # each run once
    for name, value in shown:  # the table shows what the runs logged (the UI may round)
        assert value == pytest.approx(logged[name], abs=1e-3), (name, value, logged[name])
    values = [v for _, v in shown]
    assert values == sorted(values, reverse=True), f"not sorted by {METRIC} descending: {shown}"


@pytest.mark.slow
def test_mlflow_ui_shows_the_sweep_sorted_by_a_metric(tmp_path, cache_dir):
    if shutil.which("chromium") is None:
        pytest.fail(f"chromium is not installed: {INSTALL_HINT}")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # cwd=tmp_path: the sqlite store's default artifact root is ./mlruns.
    # The run name comes from the head choice so that the table reads head-gap2, ... (the tiny
    # overrides would otherwise all be in it).
    run_module(
        [
            "mtt.run",
            "-m",
            f"+head={','.join(HEADS)}",
            *TINY,
            f"paths.cache={cache_dir}",
            "tracking.experiment=ui-sweep",
            "tracking.run_name=head-${hydra:runtime.choices.head}",
        ],
        env={"MLFLOW_TRACKING_URI": uri},
        cwd=tmp_path,
    )
    runs = sweep_children(MlflowClient(uri), "ui-sweep")
    logged = {r.info.run_name: r.data.metrics[METRIC] for r in runs}
    assert sorted(logged) == sorted(f"head-{h}" for h in HEADS)
    _, rows = sorted_runs_table(uri, "ui-sweep", tmp_path, len(HEADS))
    check_rows(rows, logged)
    for row in rows:  # the Dataset and Source columns: what each run trained on, what ran
        assert "toy-all-standard (" in row["text"] and "mtt.run" in row["text"], row["text"]


@pytest.mark.slow
def test_the_demo_in_the_ui(tmp_path):
    """The README's picture: the store of a real `make demo` (3 heads x 3 seeds and 3 seeds of the
    linear probe under two sweep parent runs, on the embedded data), sorted by METRIC, with the
    Dataset and Source columns filled. ``MTT_DEMO_STORE=<path of its mlflow.db>`` checks a store
    that `make demo` already made instead of making one (about 4 minutes on a quiet 2-core machine, docs/comparing.md)."""
    if shutil.which("chromium") is None:
        pytest.fail(f"chromium is not installed: {INSTALL_HINT}")
    store = os.environ.get("MTT_DEMO_STORE")
    if store is None:
        store = str(tmp_path / "mlflow.db")
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "MTT_CACHE": str(tmp_path / "cache")}
        proc = subprocess.run(["make", "demo"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uri = f"sqlite:///{store}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("demo")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mtt.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 2 and len(children) == 12 and len(runs) == 14
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {p.info.run_id for p in parents}
    logged = {r.info.run_name: r.data.metrics[METRIC] for r in children}
    _, rows = sorted_runs_table(uri, "demo", tmp_path, len(children))
    check_rows(rows, logged)
    for row in rows:
        assert "toy-all-standard (" in row["text"] and ("mtt.run" in row["text"] or "mtt.pr" in row["text"])
        if "mtt.run" in row["text"]:  # a trained tagger's model/ (mtt.serving.pyfunc) fills the Models column
            assert "pyfunc" in row["text"], row["text"]
