"""`flux prune`: delete traces and mutations recorded before a cutoff (flux.store.retention)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from flux import STOP_SIGNALS
from flux.cli.common import DatabaseOption, JsonOption, connect
from flux.cli.output import console, err_console, print_json
from flux.project import parse_retention_period
from flux.store import retention


def prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Delete what was recorded longer ago than this: "
                                            "30d, 12h (hours or days).", show_default=False)],
    traces: Annotated[bool, typer.Option("--traces/--no-traces", help="Prune request traces (by start time).")] = True,
    mutations: Annotated[bool, typer.Option("--mutations/--no-mutations",
                                            help="Prune row changes (by commit time).")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")] = False,
    batch_rows: Annotated[int, typer.Option("--batch-rows", min=100, max=1_000_000,
                                            help="Rows per delete transaction.")] = retention.DEFAULT_BATCH_ROWS,
    database: DatabaseOption = None,
    json: JsonOption = False,
) -> None:
    """Delete traces and row changes recorded longer ago than --older-than, in short batches.
    Ctrl-C (or SIGTERM or SIGHUP) stops it after the batch in hand (a second one at once); running it again continues."""
    window = parse_retention_period(older_than, "--older-than")
    retention.check_arguments(older_than=window, traces=traces, mutations=mutations, batch_rows=batch_rows)
    stop = threading.Event()
    with connect(database, failing="Pruning failed") as conn, _stop_on_signals(stop):
        if json or not err_console.is_terminal:
            result = retention.prune(conn, older_than=window, traces=traces, mutations=mutations,
                                     batch_rows=batch_rows, dry_run=dry_run, stop=stop)
        else:
            result = _with_progress_bars(conn, window, traces, mutations, batch_rows, dry_run, stop)
    if json:
        print_json(result)
    else:
        verb = "Would delete" if result.dry_run else "Stopped after deleting" if result.stopped else "Deleted"
        counts = [f"{n:,} {what}{'' if n == 1 else 's'}" for what, n in (("trace", result.traces), ("mutation", result.mutations))
                  if n is not None]
        console.print(f"{verb} {' and '.join(counts)} recorded before {result.cutoff:%Y-%m-%d %H:%M:%S} UTC "
                      f"({result.seconds:.1f}s)." + (" Run it again to delete the rest." if result.stopped else ""))
    if result.stopped:
        raise typer.Exit(130)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C, SIGTERM or SIGHUP sets `stop` (the prune ends after its batch in hand and
    says what it did); a second one interrupts at once (the batch in hand rolls back). SIGTERM is
    what `timeout` and a stopping systemd unit send: it killed the prune without a word in its log."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum: int, frame: object) -> None:
        stop.set()
        for sig in STOP_SIGNALS:
            signal.signal(sig, again)

    def again(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, first) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _with_progress_bars(conn, window, traces: bool, mutations: bool, batch_rows: int,
                        dry_run: bool, stop: threading.Event) -> retention.PruneResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as bars:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bars.add_task(what, total=total)
            bars.update(tasks[what], completed=done, total=total)

        return retention.prune(conn, older_than=window, traces=traces, mutations=mutations, batch_rows=batch_rows,
                               dry_run=dry_run, progress=progress, stop=stop)


