"""``python -m mtt.ui --uri URI --base http://127.0.0.1:5000``: print where the MLflow UI shows
each experiment's runs table (``make ui`` prints it before starting the UI).

The address carries ``workflowType=machine_learning``: MLflow's UI (3.17.2 and 3.18.0, the
newest release) keeps its GenAI / Model training sidebar toggle in the browser's local storage,
GenAI by default, and does not reconcile it with the experiment's ``mlflow.experimentKind``
(MLflow issue #24498), but it reads this parameter of the address first.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def runs_table_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def experiment_links(uri: str, base: str) -> list[tuple[str, str]]:
    """``(experiment name, runs-table address)`` of every experiment in the store with a run,
    newest first; none for a sqlite store that does not exist yet (reading would create it)."""
    from mtt.tracking.runs import resolve_uri

    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = sorted(client.search_experiments(), key=lambda e: -(e.last_update_time or 0))
    return [
        (e.name, runs_table_url(base, e.experiment_id))
        for e in experiments
        if client.search_runs([e.experiment_id], max_results=1)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtt.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", default=None, help="the tracking store (default: tracking.uri's default)")
    parser.add_argument("--base", default="http://127.0.0.1:5000", help="where the UI listens")
    args = parser.parse_args(argv)
    links = experiment_links(args.uri, args.base)
    print(f"MLflow UI: {args.base}")
    for name, url in links:
        print(f"  {name}: {url}")
    if not links:
        print("  (no runs yet: make demo, or python -m mtt.run)")
    return 0
