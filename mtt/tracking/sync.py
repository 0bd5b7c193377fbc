"""Ship run journals to their MLflow store: ``python -m mtt.sync [--close-stale] [--tracking-uri URI] [PATH]``.

A run logs to its journal first (``mtt.tracking.journal``) and ships it in the background; when the store
was still unreachable at the end of the run, the run said so and left the journal in its
checkpoint folder. This ships every journal with unshipped entries under PATH (a journal, a run
folder, or a folder searched below; default ``paths.cache``) to the store it records, or to
``--tracking-uri``, in order, with the original steps and timestamps, finishing the run with
its journaled status. Running it again ships nothing twice: each journal records what the store
acknowledged. A journal that a running training is still shipping is left to it.

``--close-stale`` first ends KILLED every run under PATH that has no final status and whose
process is gone (``close_stale``): killed with SIGKILL, out of memory, on a node that died. Each
run's folder records the process that runs it (``journal.owner``: host, pid, start time) and
that process holds a lock on it for as long as it runs (``mtt.tracking.journal.Journal.claim``). A run of
this host is closed when nobody holds the lock and its process is gone (no such pid, or a pid
reused by a later process, or a reboot since). A run of another host (a shared cache) cannot be
checked from here: it is closed only with ``--stale-after SECONDS``, once its heartbeat (the
owner file, touched every 30 s while it runs) is older than that.
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
        return (
            "no final status: its process was killed or still runs (python -m mtt.sync --close-stale ends it "
            "KILLED once the process is gone); trainer.resume=true continues the run"
        )
    return f"status {status}"


def naming(path: Path, exc: BaseException) -> str:
    """``exc``'s message, led by ``path`` unless it names it first already (a ``JournalError``)."""
    text = str(exc)
    return text if text.startswith(str(path)) else f"{path}: {text}"


def stale_reason(journal, stale_after: float | None, out) -> str | None:
    """Why the run of ``journal`` has no process any more, or None (alive, or cannot tell: said
    on ``out``). Call with the journal's owner lock held (nobody runs the run now)."""
    import time

    from mtt.tracking.journal import process_alive

    owner = journal.owner()
    alive = process_alive(owner) if owner is not None else None
    who = f"process {owner['pid']} on {owner['host']}" if owner is not None else "its process (not recorded)"
    if alive is True:
        return None
    if alive is False:
        return f"{who} is gone"
    age = time.time() - (journal.heartbeat() or 0.0)
    run = f"run {journal.header['run_id']} ({journal.folder})"
    if stale_after is None:
        out(
            f"left open {run}: {who} cannot be checked from here; --stale-after SECONDS closes it (heartbeat {age:.0f} s ago)"
        )
        return None
    if age < stale_after:
        out(f"left open {run}: {who} beat {age:.0f} s ago (--stale-after {stale_after:g})")
        return None
    return f"no heartbeat from {who} for {age:.0f} s"


def close_stale(journal, stale_after: float | None, out) -> str:
    """End the run of ``journal`` KILLED if it has no final status and its process is gone
    (``stale_reason``): a ``killed_by`` tag and a KILLED status (at the last heartbeat) are
    journaled, for ``sync_one`` to ship. Returns ``closed``, ``open`` (its process runs, or
    cannot be checked), ``ended`` (it has a final status) or ``failed`` (with a line)."""
    from mtt.tracking.checkpoint import has_last, last_epoch
    from mtt.tracking.journal import JournalError

    try:
        if journal.last_status() not in (None, "RUNNING"):
            return "ended"
        with journal.owner_lock(blocking=False):  # held by a live run for its whole life
            if journal.last_status() not in (None, "RUNNING"):  # it ended since: nothing to close
                return "ended"
            why = stale_reason(journal, stale_after, out)
            if why is None:
                return "open"
            header, last_seen = journal.header, journal.heartbeat() or 0.0
            journal.open(header)
            try:
                journal.append("tags", tags={"killed_by": f"mtt.sync --close-stale: {why}"})
                journal.append("status", status="KILLED", end_time=int(1000 * last_seen))
            finally:
                journal.close()
    except BlockingIOError:
        return "open"
    except (JournalError, OSError) as exc:
        out(f"FAILED {naming(journal.path, exc)}")
        return "failed"
    folder = journal.folder
    try:
        after = (
            f"after epoch {last_epoch(folder)}; trainer.resume=true continues it"
            if has_last(folder)
            else "before its first checkpoint (nothing to resume)"
        )
    except OSError as exc:  # a damaged last.pt (CorruptFileError): closed all the same, said so
        after = f"with a last.pt that cannot be resumed ({exc})"
    out(f"closed run {header['run_id']} ({folder}): {why}; KILLED {after}")
    return "closed"


def sync_one(journal, uri: str | None, out) -> str:
    """Ship one journal; returns ``shipped``, ``current``, ``busy`` or ``failed`` (with a line)."""
    from mtt.tracking.journal import JournalError
    from mtt.tracking.runs import check_reachable, rejected, ship_to

    try:
        header, pending = journal.header, journal.pending()
    except (JournalError, OSError) as exc:
        out(f"FAILED {naming(journal.path, exc)}")
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


def sync(
    path: str | Path, uri: str | None = None, out=print, close: bool = False, stale_after: float | None = None
) -> dict[str, int]:
    """Ship every pending journal under ``path`` (to ``uri`` if given), after ending the runs
    whose process is gone KILLED with ``close`` (``close_stale``); counts by outcome."""
    from mtt.tracking.journal import find_journals

    counts = {"shipped": 0, "current": 0, "busy": 0, "failed": 0, "closed": 0}
    for journal in find_journals(path):
        if close:
            outcome = close_stale(journal, stale_after, out)
            if outcome == "failed":
                counts["failed"] += 1
                continue
            counts["closed"] += outcome == "closed"
        counts[sync_one(journal, uri, out)] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    from mtt.tracking.journal import HEARTBEAT_S

    parser = argparse.ArgumentParser(prog="python -m mtt.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "path", nargs="?", default=None, help="a journal, a run folder or a folder to search (default: paths.cache)"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="ship to this store instead of the one each journal records"
    )
    parser.add_argument(
        "--close-stale",
        action="store_true",
        help="first end KILLED the runs without a final status whose process is gone",
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --close-stale: also close runs of other hosts whose heartbeat is older than this",
    )
    args = parser.parse_args(argv)
    if args.stale_after is not None and (not args.close_stale or args.stale_after < 2 * HEARTBEAT_S):
        parser.error(f"--stale-after needs --close-stale and at least {2 * HEARTBEAT_S:g} s (two heartbeats)")
    path = Path(args.path or default_cache())
    if not path.exists():
        print(f"mtt.sync: {path} does not exist", file=sys.stderr)
        return 2
    counts = sync(path, args.tracking_uri, close=args.close_stale, stale_after=args.stale_after)
    total = sum(counts.values()) - counts["closed"]
    closed = f"{counts['closed']} closed as KILLED, " if args.close_stale else ""
    print(
        f"{total} journal(s) under {path}: {closed}{counts['shipped']} shipped, {counts['current']} already "
        f"shipped, {counts['busy']} being shipped by a running process, {counts['failed']} failed"
    )
    return 1 if counts["failed"] else 0
