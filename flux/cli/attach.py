"""`flux attach` and `flux detach`: connect Flux to a database it did not create, and undo that."""

from __future__ import annotations

from typing import Annotated

import typer

from flux.cdc import attach as lib
from flux.cli.common import DatabaseOption, JsonOption, reaching, resolve_database
from flux.cli.output import console, err_console, escape, print_json

SlotOption = Annotated[str, typer.Option("--slot", help="Logical replication slot name.")]
PublicationOption = Annotated[str | None, typer.Option("--publication", help="Publication name (default: the one attach recorded for the slot, else flux).")]
LockTimeoutOption = Annotated[float, typer.Option(
    "--lock-timeout", min=0.1, max=3600, metavar="SECONDS",
    help="Longest wait for the tables' locks in one try, in all (with more than one table, 80% of the shortest "
         "deadlock_timeout of the database's sessions at most); 5 tries, the pause between them doubling from this. "
         "The tables' other queries wait as long meanwhile.")]


def attach(
    database: DatabaseOption = None,
    tables: Annotated[str | None, typer.Option("--tables", help="Comma-separated tables to capture (SCHEMA.TABLE allowed).")] = None,
    all_tables: Annotated[bool, typer.Option("--all-tables", help="Capture every table outside system schemas and `flux` (and, unless a superuser attaches, an extension's own), including tables created later.")] = False,
    slot: SlotOption = "flux",
    publication: PublicationOption = None,
    lock_timeout: LockTimeoutOption = lib.DEFAULT_LOCK_TIMEOUT_S,
    json: JsonOption = False,
) -> None:
    """Check the server, then create the flux schema, publication, REPLICA IDENTITY FULL and slot. Idempotent."""
    names = split_table_list(tables) if tables else None
    db = resolve_database(database)
    if not json:
        err_console.print("[dim]Checking the server and setting up capture (creating the slot waits for open transactions to end) …[/]")
    with reaching(db):
        result = lib.attach(db.dsn, tables=names, all_tables=all_tables, slot=slot, publication=publication,
                            lock_timeout=lock_timeout, on_wait=_say_slot_waits)
    if json:
        print_json(result)
        return
    scope = "all tables" if result.all_tables else f"{len(result.tables)} table(s)"
    console.print(f"[bold]Attached[/]  slot [cyan]{escape(slot)}[/] · publication [cyan]{escape(result.publication)}[/] · {scope}")
    print_some([f"  captures {escape(table)}" for table in result.tables])
    if not result.changed_anything:
        console.print("  Nothing changed: already attached this way.")
    print_some([f"  [green]+[/] {escape(item)}" for item in result.created])
    print_some([f"  [yellow]~[/] {escape(change['table'])}: REPLICA IDENTITY {change['previous']} → FULL"
                f"  [dim](`flux detach` restores {change['previous']})[/]" for change in result.replica_identity_changed])
    print_some([f"  [yellow]~[/] {escape(item['table'])}: REPLICA IDENTITY {item['restored']} again  [dim](no longer captured)[/]"
                for item in result.replica_identity_restored])
    for warning in result.warnings:
        console.print(f"  [yellow]warning:[/] {escape(warning)}")


LINES_SHOWN = 20  # of a list that has a line per table; a database may have thousands


def print_some(lines: list[str]) -> None:
    """The first LINES_SHOWN of `lines`, then how many more: `--json` has them all."""
    for line in lines[:LINES_SHOWN]:
        console.print(line)
    if len(lines) > LINES_SHOWN:
        console.print(f"  [dim]… and {len(lines) - LINES_SHOWN} more like these (`--json` lists every one)[/]")


def _say_slot_waits(sessions: list[str]) -> None:
    # On stderr, also with --json: what attach waits for, since it can be a long time.
    err_console.print("[yellow]Creating the slot waits for these transactions to end[/] (those that began before it; Ctrl-C "
                      "stops here, and `flux attach` again finishes the job):")
    for line in sessions:
        err_console.print(f"  {escape(line)}")


def split_table_list(text: str) -> list[str]:
    """`a, "my schema"."b,c"` -> ['a', '"my schema"."b,c"']: commas inside double quotes are part of a name."""
    names: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted  # a doubled "" inside a name toggles twice: still quoted
        if char == "," and not quoted:
            names.append("".join(current))
            current = []
        else:
            current.append(char)
    names.append("".join(current))
    return [name.strip() for name in names if name.strip()]


def detach(
    database: DatabaseOption = None,
    slot: SlotOption = "flux",
    publication: Annotated[str | None, typer.Option("--publication", help="Publication name (default: the one attach recorded).")] = None,
    drop_data: Annotated[bool, typer.Option("--drop-data", help="Also drop the flux schema: every recorded mutation and trace.")] = False,
    lock_timeout: LockTimeoutOption = lib.DEFAULT_LOCK_TIMEOUT_S,
    json: JsonOption = False,
) -> None:
    """Drop the slot and publication and restore replica identities. Keeps recorded data unless --drop-data."""
    db = resolve_database(database)
    with reaching(db):
        result = lib.detach(db.dsn, slot=slot, publication=publication, drop_data=drop_data, lock_timeout=lock_timeout)
    if json:
        print_json(result)
        return
    console.print(f"[bold]Detached[/]  slot [cyan]{escape(slot)}[/]")
    for item in result.dropped:
        console.print(f"  [red]-[/] {escape(item)}")
    print_some([f"  [yellow]~[/] {escape(item['table'])}: REPLICA IDENTITY {item['restored']}" for item in result.restored])
    if not result.data_dropped:
        console.print("  Recorded mutations kept in schema flux (use --drop-data to remove them).")
    for warning in result.warnings:
        console.print(f"  [yellow]warning:[/] {escape(warning)}")
