"""`flux prune`: delete traces and mutations recorded before a cutoff (flux.store.retention)."""

from __future__ import annotations

from typing import Annotated

import typer

from flux.cli.common import DatabaseOption, JsonOption, connect
from flux.cli.output import console, err_console, print_json
from flux.project import parse_duration
from flux.store import retention


def prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Delete what was recorded longer ago than this: "
                                            "30d, 12h, 90m.", show_default=False)],
    traces: Annotated[bool, typer.Option("--traces/--no-traces", help="Prune request traces (by start time).")] = True,
    mutations: Annotated[bool, typer.Option("--mutations/--no-mutations",
                                            help="Prune row changes (by commit time).")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")] = False,
    batch_rows: Annotated[int, typer.Option("--batch-rows", min=100, max=1_000_000,
                                            help="Rows per delete transaction.")] = retention.DEFAULT_BATCH_ROWS,
    database: DatabaseOption = None,
    json: JsonOption = False,
) -> None:
    """Delete traces and row changes recorded longer ago than --older-than, in short batches."""
    window = parse_duration(older_than, "--older-than")
    with connect(database, failing="Pruning failed") as conn:
        if json or not err_console.is_terminal:
            result = retention.prune(conn, older_than=window, traces=traces, mutations=mutations,
                                     batch_rows=batch_rows, dry_run=dry_run)
        else:
            result = _with_progress_bars(conn, window, traces, mutations, batch_rows, dry_run)
    if json:
        print_json(result)
        return
    verb = "Would delete" if result.dry_run else "Deleted"
    counts = [f"{n:,} {what}" for what, n in (("traces", result.traces), ("mutations", result.mutations)) if n is not None]
    console.print(f"{verb} {' and '.join(counts)} recorded before {result.cutoff:%Y-%m-%d %H:%M:%S} UTC "
                  f"({result.seconds:.1f}s).")


def _with_progress_bars(conn, window, traces: bool, mutations: bool, batch_rows: int,
                        dry_run: bool) -> retention.PruneResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as bars:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bars.add_task(what, total=total)
            bars.update(tasks[what], completed=done, total=total)

        return retention.prune(conn, older_than=window, traces=traces, mutations=mutations, batch_rows=batch_rows,
                               dry_run=dry_run, progress=progress)


