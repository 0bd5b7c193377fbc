"""Ship run journals to their MLflow store: ``python -m mtt.sync [--tracking-uri URI] [PATH]``.

A run logs to its journal first (``mtt.journal``) and ships it in the background; when the store
was still unreachable at the end of the run, the run said so and left the journal in its
checkpoint folder. This ships every journal with unshipped entries under PATH (a journal, a run
folder, or a folder searched below; default ``paths.cache``) to the store it records, or to
``--tracking-uri``, in order, with the original steps and timestamps, finishing the run with
its journaled status. Running it again ships nothing twice: each journal records what the store
acknowledged. A journal that a running training is still shipping is left to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm


def default_cache() -> str:
    """``paths.cache`` as a run resolves it by default ($MTT_CACHE, else ~/.cache/mtt)."""
    from omegaconf import OmegaConf

    from mtt.config import PathsConfig

    return str(OmegaConf.structured(PathsConfig).cache)


def status_note(status: str | None) -> str:
    if status is None:
        return "no final status: the process was killed; trainer.resume=true continues the run"
    return f"status {status}"


def sync_one(journal, uri: str | None, out) -> str:
    """Ship one journal; returns ``shipped``, ``current``, ``busy`` or ``failed`` (with a line)."""
    from mtt.journal import JournalError
    from mtt.tracking import check_reachable, rejected, ship_to

    try:
        header, pending = journal.header, journal.pending()
    except (JournalError, OSError) as exc:
        out(f"FAILED {journal.path}: {exc}")
        return "failed"
    if not pending:
        return "current"
    target = uri or header["uri"]
    run = f"run {header['run_id']} ({journal.folder})"
    try:
        with journal.shipping_lock(blocking=False):
            check_reachable(target)
            with tqdm(
                total=len(pending), unit="entry", desc=f"run {header['run_id'][:8]}", leave=False, disable=None
            ) as bar:
                first = pending[0]["seq"]
                shipped = ship_to(target, journal, lambda seq: bar.update(seq - first + 1 - bar.n))
    except BlockingIOError:
        out(f"skipped {run}: a running process is shipping it")
        return "busy"
    except Exception as exc:  # noqa: BLE001 - one journal's failure must not stop the others
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if rejected(exc) and uri and uri != header["uri"]:
            why += f" (the journal was written for {header['uri']})"
        out(f"FAILED {run} -> {target}: {why}; what was not shipped stays in the journal")
        return "failed"
    out(f"shipped {run}: {shipped} entries -> {target}, {status_note(journal.last_status())}")
    return "shipped"


def sync(path: str | Path, uri: str | None = None, out=print) -> dict[str, int]:
    """Ship every pending journal under ``path`` (to ``uri`` if given); counts by outcome."""
    from mtt.journal import find_journals

    counts = {"shipped": 0, "current": 0, "busy": 0, "failed": 0}
    for journal in find_journals(path):
        counts[sync_one(journal, uri, out)] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtt.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "path", nargs="?", default=None, help="a journal, a run folder or a folder to search (default: paths.cache)"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="ship to this store instead of the one each journal records"
    )
    args = parser.parse_args(argv)
    path = Path(args.path or default_cache())
    if not path.exists():
        print(f"mtt.sync: {path} does not exist", file=sys.stderr)
        return 2
    counts = sync(path, args.tracking_uri)
    total = sum(counts.values())
    print(
        f"{total} journal(s) under {path}: {counts['shipped']} shipped, {counts['current']} already "
        f"shipped, {counts['busy']} being shipped by a running process, {counts['failed']} failed"
    )
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
