"""`flux cdc run` and `flux cdc status`: the engine in the foreground, and its health."""

from __future__ import annotations

import logging
import signal
from datetime import UTC
from typing import Annotated

import psycopg
import typer

from flux.cdc.attach import human_bytes
from flux.cdc.status import CdcStatus, cdc_status
from flux.cli.common import (WAIT_FOR_DATABASE, DatabaseOption, JsonOption, LogFormat, LogFormatOption, WaitOption, reaching,
                              resolve_database, wait_for_database)
from flux.cli.output import console, escape, print_json
from flux.logs import setup_logging
from flux.errors import NotFoundError, from_psycopg

app = typer.Typer(help="The change-data-capture engine.", no_args_is_help=True)

SlotOption = Annotated[str, typer.Option("--slot", help="Logical replication slot name.")]


@app.command("run")
def run(
    database: DatabaseOption = None,
    slot: SlotOption = "flux",
    publication: Annotated[str | None, typer.Option("--publication", help="Publication (default: the one attach recorded).")] = None,
    batch_rows: Annotated[int, typer.Option("--batch-rows", min=1, help="Rows per sink commit under load (several source transactions share one commit); also the most rows queued for the sink.")] = 10_000,
    wait_for: WaitOption = WAIT_FOR_DATABASE,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Consume the slot and record every change into flux.state_mutations until SIGINT, SIGTERM or SIGHUP."""
    from flux.cdc.engine import Engine, EngineConfig
    from flux.signals import received

    setup_logging(verbose, log_format.value)  # first: an error in the DSN is a JSON line too with --log-format json
    db = resolve_database(database)
    # A server not up yet is waited for, within a bound (boot order under systemd or compose); a refused
    # login is said at once. Once it has started, the engine waits out any loss of the server by itself.
    if not wait_for_database(db, wait_for, stopped=lambda: received() is not None):
        logging.getLogger("flux.cdc").info("stopped: %s arrived while starting", signal.Signals(received()).name)
        return
    engine = Engine(EngineConfig(dsn=db.dsn, slot=slot, publication=publication, batch_rows=batch_rows))
    stats = engine.run()
    logging.getLogger("flux.cdc").info(
        "stopped: %d transactions, %d mutations recorded this run", stats.transactions, stats.mutations
    )


@app.command("status")
def status(database: DatabaseOption = None, slot: SlotOption = "flux", json: JsonOption = False) -> None:
    """Slot state, confirmed LSN, lag, retained WAL, mutations recorded, and whether a consumer runs."""
    db = resolve_database(database)
    with reaching(db):
        try:
            result = cdc_status(db.dsn, slot=slot)
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Could not read the CDC status") from exc
    if json:
        print_json(result)
    else:
        render_status(result)
    if not result.slot_exists or result.wal_status == "lost" or result.publication_exists is False:  # nothing is being captured
        raise typer.Exit(NotFoundError.exit_code)


def _bytes(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)


def _lag(s: CdcStatus) -> str:
    if s.lag_seconds is None:
        return _bytes(s.lag_bytes)
    text = f"{_bytes(s.lag_bytes)} · {'at most ' if s.lag_is_upper_bound else ''}{s.lag_seconds:.1f}s"
    age = s.last_commit_age_seconds
    if s.lag_bytes and not s.lag_is_upper_bound and age is not None and age > s.lag_seconds + 1:
        # Catching up, the server's seconds count from when it decoded the WAL: say how old the data is.
        text += f" (server's measure; the newest recorded commit is {age:.0f}s old)"
    return text


def render_status(s: CdcStatus) -> None:
    # A database or publication name may hold `[/]` or an ESC: rich read it as markup (a MarkupError), the terminal as a command.
    console.print(f"[bold]CDC[/]  slot [cyan]{escape(s.slot)}[/] on database [cyan]{escape(s.database)}[/]")
    if not s.consumer_running:
        consumer = "[red]not running[/]"
    elif s.consumer_pid is not None:
        consumer = f"running (pid {s.consumer_pid} on {escape(s.consumer_host or '?')})"
    else:  # not a Flux engine, or one that does not name itself
        consumer = f"running ({escape(s.consumer_application or 'unnamed')}, walsender pid {s.walsender_pid})"
    rows = [
        ("slot", ("[red]lost[/] (invalidated: nothing is captured)" if s.wal_status == "lost" else "exists")
                 if s.slot_exists else "[red]missing[/]"),
        ("consumer", consumer),
        ("standby", ", ".join(f"pid {e['pid']} on {escape(e['host'])}" for e in s.standbys) or "-"),
        ("publication", "-" if not s.publication else f"{escape(s.publication)} [red](missing)[/]" if s.publication_exists is False
         else f"{escape(s.publication)} ({s.published_tables} table{'' if s.published_tables == 1 else 's'})"),
        ("confirmed LSN", s.confirmed_lsn or "-"),
        ("server LSN", s.current_lsn or "-"),
        ("lag", _lag(s)),
        ("retained WAL", f"{_bytes(s.retained_wal_bytes)}" + (f" ({s.wal_status})" if s.wal_status else "")),
        ("mutations", f"{s.mutations_recorded:,}"),
        # psycopg gives a timestamptz in the session's TimeZone, which a server or database may set to any.
        ("last commit", f"{s.last_commit_time.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC at {s.last_commit_lsn}"
         if s.last_commit_time else "-"),
    ]
    for label, value in rows:
        console.print(f"  {label:<14} {value}")
    for warning in s.warnings:
        console.print(f"  [yellow]warning:[/] {escape(warning)}")
