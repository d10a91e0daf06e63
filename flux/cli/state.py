"""`flux state`: row history and blame, read from the mutation log.

Commands parse flags, call `flux.store.queries`, and render the dataclasses it returns as
rich text or `--json`. Times are shown in UTC.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

import psycopg
import typer

from flux.cli.common import DatabaseOption, JsonOption, connect
from flux.cli.output import console, escape, pad, print_json
from flux.cli.output import width as text_width
from flux.errors import ConfigError
from flux.store import names, queries, traces
from flux.store.names import key_text, shell_word
from flux.store.queries import Mutation, RecentChange, RowBlame, RowHistory, Writer

app = typer.Typer(help="Row history and blame from the mutation log.", no_args_is_help=True)

TableArg = Annotated[str, typer.Argument(metavar="TABLE", help='Table: NAME or SCHEMA.NAME; quote odd names: \'"my schema"."My Table"\'.', show_default=False)]
IdOption = Annotated[str | None, typer.Option("--id", help="Value of the table's single-column primary key.", show_default=False)]
KeyOption = Annotated[
    list[str] | None,
    typer.Option("--key", help="COL=VALUE; repeat for each primary-key column, or any columns of a table without one.", show_default=False),
]
RULE = "─" * 40
TIMES = "times UTC"  # said under each header: a commit time without its zone reads as the reader's own
SHORT_ID = 8  # characters of a request id shown, or more where another request's id starts with them
BLAME_ROWS = 20  # rows `blame TABLE` lists by default
ROW_CLIP = 80  # a keyless row in `blame TABLE` is shown by its image, clipped
VALUE_CLIP = 200  # a column value in history and blame: a long text would bury the lines around it


@app.command()
def history(
    table: TableArg,
    id_value: IdOption = None,
    key: KeyOption = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Show only the newest N changes.", show_default=False)] = None,
    json: JsonOption = False,
    database: DatabaseOption = None,
) -> None:
    """Every recorded change of one row, oldest first."""
    schema, name = names.parse_table(table)
    keys = parse_keys(key)
    with _connect(database) as conn:
        result = queries.row_history(conn, schema, name, id_value=id_value, key=keys, limit=limit)
        shown = None if json else shown_ids(conn, [m.request_id for m in result.mutations])
    if json:
        print_json(result)
    else:
        render_history(result, shown)


@app.command()
def blame(
    table: TableArg,
    id_value: IdOption = None,
    key: KeyOption = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", "-n", min=1, help=f"Without a row: how many recently changed rows to list (default {BLAME_ROWS}).",
        show_default=False)] = None,
    json: JsonOption = False,
    database: DatabaseOption = None,
) -> None:
    """Who last changed each column of a row; without a row, the most recently changed rows."""
    schema, name = names.parse_table(table)
    keys = parse_keys(key)
    if limit is not None and (id_value is not None or keys):
        raise ConfigError(
            "--limit lists recently changed rows, so it goes without --id/--key",
            hint="Blame of one row shows each of its columns once; `flux state history` with the same row and "
                 "--limit N shows its newest N changes.",
        )
    with _connect(database) as conn:
        if id_value is None and not keys:
            recent = queries.table_blame(conn, schema, name, limit=limit or BLAME_ROWS)
            if json:
                print_json({"schema": schema, "table": name, "rows": recent})
            else:
                render_table_blame(schema, name, recent, shown_ids(conn, [r.writer.request_id for r in recent]))
            return
        result = queries.row_blame(conn, schema, name, id_value=id_value, key=keys)
        shown = None if json else shown_ids(conn, [w.request_id for w in _writers(result)])
    if json:
        print_json(result)
    else:
        render_row_blame(result, shown)


def parse_keys(items: list[str] | None) -> dict[str, str] | None:
    """`["org=1", "id=a"]` -> {"org": "1", "id": "a"}; the value may contain `=`."""
    if not items:
        return None
    keys: dict[str, str] = {}
    for item in items:
        col, sep, value = item.partition("=")
        if not sep or not col.strip():
            example = f"--key {shell_word(f'{item}=VALUE')}" if not sep else f"--key {shell_word(f'COL{item}')}"
            raise ConfigError(f"--key {item!r} is not COL=VALUE", hint=f"Name the column and its value: {example}.")
        if col.strip() in keys:
            raise ConfigError(f"--key names column {col.strip()!r} twice", hint="Give each column once, with the one value to match.")
        keys[col.strip()] = value
    return keys


def _connect(database: str | None):
    return connect(database, failing="Reading the mutation log failed")


def shown_ids(conn: psycopg.Connection, request_ids: list[str | None]) -> dict[str, str]:
    """Each request id's shortest prefix that names it alone to `flux trace` and `flux why`
    (`traces.unique_prefixes`), for all of a command's ids at once: one or two statements."""
    return traces.unique_prefixes(conn, list(dict.fromkeys(i for i in request_ids if i is not None)), SHORT_ID)


# -- rendering -------------------------------------------------------------------------------


def _time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _who(w: Writer | Mutation, shown: dict[str, str] | None) -> str:
    """`req:` and the id as `shown_ids` shows it (whole without it), or the transaction of a write without one."""
    if w.request_id is None:
        problem = w.malformed_context if isinstance(w, Writer) else queries.malformed_context(w)
        if problem is not None:  # a context message was sent: say so, or its sender never learns it is broken
            return f"[dim]xid:{w.xid}[/] [yellow](malformed request context: {escape(problem)})[/]"
        return f"[dim]xid:{w.xid} (no request context)[/]"
    fn = f"  [dim]{escape(w.function)}[/]" if w.function else ""
    return f"[bold]req:{escape((shown or {}).get(w.request_id, w.request_id))}[/]{fn}"


def _recorded_as(w: Writer | Mutation, schema: str, table: str) -> str:
    """For a change recorded under another name of the table (before a rename): which."""
    if not w.recorded_as or w.recorded_as == names.format_table(schema, table):
        return ""
    return f"  [dim](recorded as {escape(w.recorded_as)})[/]"


def _earlier_names(changes: list[Writer] | list[Mutation], schema: str, table: str) -> str:
    """A line saying which earlier names of the table these changes were recorded under, or ''."""
    current = names.format_table(schema, table)
    earlier = list(dict.fromkeys(c.recorded_as for c in changes if c.recorded_as and c.recorded_as != current))
    if not earlier:
        return ""
    return (f"  [dim]with its changes recorded under its earlier name{'s' if len(earlier) > 1 else ''} "
            f"{escape(', '.join(earlier))} (the table of the same oid, renamed since)[/]")


def _row_title(schema: str, table: str, match: dict[str, str], key: dict[str, Any] | None) -> str:
    """The row: by its key as recorded (shown as everywhere else), or by the values given."""
    cols = _key(key) if key is not None else ", ".join(f"{c} = {names.given_text(v)}" for c, v in match.items())
    return escape(f"{names.format_table(schema, table)} / {cols}")


def render_history(h: RowHistory, shown: dict[str, str] | None = None) -> None:
    console.print()
    console.print(f"  [bold]Row[/]  {_row_title(h.schema, h.table, h.match, h.key)}")
    console.print(f"  [dim]{RULE}[/]")
    shown_part = f"newest {len(h.mutations)} of {h.total} changes · " if h.total > len(h.mutations) else ""
    console.print(f"  [dim]{shown_part}{TIMES}[/]")
    if h.matched_on == "images":
        console.print("  [dim]no primary key recorded: matched on row values[/]")
    if line := _earlier_names(list(h.mutations), h.schema, h.table):
        console.print(line)
    if h.renamed_to is not None and h.key is not None:
        console.print(f"  [dim]the table was renamed {escape(h.renamed_to)} since; its changes under both names: "
                      f"{escape(history_command(*names.parse_table(h.renamed_to), h.key))}[/]")
    if h.pruned_before is not None:
        console.print(f"  [dim]its changes committed before {h.pruned_before:%Y-%m-%d %H:%M:%S} UTC were deleted by retention[/]")
    elif h.key is not None and h.total == len(h.mutations) and h.mutations[0].op in ("update", "delete") \
            and h.mutations[0].key_change is None:
        console.print(f"  [dim]its first recorded change is not its insert: {escape(_earlier_changes('history', h.key))}[/]")
    width = max([8, *(text_width(c) for m in h.mutations for c in (m.new or m.old or {}))])
    alive = False  # the log's changes so far leave a row with this key in the table
    for m in h.mutations:
        console.print()
        console.print(f"  {_time(m.commit_time)}  {_who(m, shown)}{_recorded_as(m, h.schema, h.table)}")
        for line in _mutation_lines(m, width, h.schema, h.table):
            console.print(line)
        if m.op == "insert" and alive and h.matched_on == "row_key":
            console.print("    [yellow]no recorded change removed the earlier row of this key[/] [dim](removed unrecorded, "
                          "or this is another table: the one of this name was dropped or renamed)[/]")
        alive = m.op in ("insert", "update") and m.key_change != "out"
    console.print()


def _earlier_changes(command: str, key: dict[str, Any]) -> str:
    """Where a row's changes before its first recorded one are: the log keeps each change under
    the name its table had then, and a rename is DDL, which it does not record."""
    return ("the row was inserted before capture started, or, if the table was renamed since, its earlier changes "
            "are recorded under the table's former name (followed from schema v7 on, by the table's oid; not for changes "
            f"recorded before): flux state {command} OLD_NAME {_row_args(key)}")


def _mutation_lines(m: Mutation, width: int, schema: str, table: str) -> list[str]:
    def col(name: str) -> str:
        return escape(pad(name, width))

    def image(values: dict[str, Any] | None) -> list[tuple[str, Any]]:  # the header names the key already
        return [(c, v) for c, v in (values or {}).items() if c not in (m.row_key or {})]

    lines: list[str] = []
    if m.op == "insert":
        lines = [f"  [green]+[/] {col(c)} → {escape(_value(v))}" for c, v in image(m.new)] or ["  [green]+[/] inserted"]
    elif m.op == "update":
        new, old = m.new or {}, m.old or {}
        missing = set(m.missing_columns or ())
        names = m.changed_columns if m.changed_columns is not None else [c for c, _ in image(new) if c not in missing]
        for c in names:
            was = f"  [dim](was {escape(_value(old[c]))})[/]" if m.old_complete and c in old else ""
            lines.append(f"    {col(c)} → {escape(_value(new.get(c)))}{was}")
        if not names:
            lines.append("    [dim](no column changed)[/]")
    elif m.op == "delete":
        lines = ["  [red]-[/] deleted"]
        lines += [f"    [dim]{col(c)}   {escape(_value(v))}[/]" for c, v in image(m.old)]
    else:
        lines = ["  [red]-[/] truncated [dim](every row of the table)[/]"]
    if m.op in ("update", "delete") and m.old_complete is False:
        lines.append("    [dim](only key columns of the old row are known)[/]")
    if m.key_change == "out" and m.row_key is not None:
        lines.append(f"    [yellow]primary key changed to {escape(_key(m.row_key))}[/] [dim]· the row goes on in "
                     f"{escape(history_command(schema, table, m.row_key))}[/]")
    elif m.key_change == "in" and m.old_row_key is not None:
        lines.append(f"    [yellow]primary key changed from {escape(_key(m.old_row_key))}[/] [dim]· earlier changes: "
                     f"{escape(history_command(schema, table, m.old_row_key))}[/]")
    return lines


def history_command(schema: str, table: str, row_key: dict[str, Any]) -> str:
    """`flux state history` of the row with this primary key."""
    return f"flux state history {shell_word(names.format_table(schema, table))} {_row_args(row_key)}"


def _row_args(row_key: dict[str, Any]) -> str:
    """`--id VALUE`, or `--key COL=VALUE ...` for a composite key, as the shell takes them."""
    if len(row_key) == 1:
        (value,) = row_key.values()
        return f"--id {shell_word(names.key_arg(value))}"
    return " ".join(f"--key {shell_word(f'{col}={names.key_arg(v)}')}" for col, v in row_key.items())


def _value(value: Any) -> str:
    """A column value as shown: clipped past VALUE_CLIP characters, saying how long it is."""
    text = key_text(value)
    if len(text) <= VALUE_CLIP:
        return text
    return f"{text[:VALUE_CLIP - 1]}… ({len(text):,} characters; whole in --json)"


def _key(row_key: dict[str, Any]) -> str:
    return ", ".join(f"{c} = {key_text(v)}" for c, v in row_key.items())


def _writers(b: RowBlame) -> list[Writer]:
    return [w for w in (b.deleted_by, *(c.set_by for c in b.columns)) if w is not None]


def render_row_blame(b: RowBlame, shown: dict[str, str] | None = None) -> None:
    console.print()
    console.print(f"  [bold]Blame[/]  {_row_title(b.schema, b.table, b.match, b.key)}")
    console.print(f"  [dim]{RULE}[/]")
    console.print(f"  [dim]{TIMES}[/]")
    if line := _earlier_names(_writers(b), b.schema, b.table):
        console.print(line)
    if b.renamed_to is not None and b.key is not None:
        command = history_command(*names.parse_table(b.renamed_to), b.key).replace("history", "blame", 1)
        console.print(f"  [dim]the table was renamed {escape(b.renamed_to)} since; blame of the row now: {escape(command)}[/]")
    if b.deleted and b.deleted_by is not None:
        how = "truncated" if b.deleted_by.op == "truncate" else "moved" if b.moved_to is not None else "deleted"
        console.print(f"  [red]{how}[/]  {_time(b.deleted_by.commit_time)}  {_who(b.deleted_by, shown)}"
                      f"{_recorded_as(b.deleted_by, b.schema, b.table)}")
        if b.moved_to is not None:
            console.print(f"  [dim]its primary key became {escape(_key(b.moved_to))}: "
                          f"{escape(history_command(b.schema, b.table, b.moved_to).replace('history', 'blame', 1))}[/]")
        if b.columns:
            console.print("  [dim]values before it:[/]")
    width = max([8, *(text_width(c.column) for c in b.columns)])
    vwidth = min(40, max([4, *(text_width(_value(c.value)) for c in b.columns)]))
    for c in b.columns:
        value = escape(pad(_value(c.value), vwidth)) if c.known else "[dim]" + pad("?", vwidth) + "[/]"
        if c.set_by is None:
            origin = "[dim](set before the recorded history)[/]"
        else:
            maybe = "[dim]≤[/] " if not c.certain else ""
            origin = (f"{maybe}{_time(c.set_by.commit_time)}  {_who(c.set_by, shown)}  [dim]{c.set_by.op}[/]"
                      f"{_recorded_as(c.set_by, b.schema, b.table)}")
        line = f"  {escape(pad(c.column, width))}  {value}  {origin}"
        console.print(f"[dim]{line}[/]" if b.deleted else line)
    if any(not c.known for c in b.columns):
        console.print("  [dim]?: value not in the log (unchanged and TOASTed while the old row was not fully "
                      "known, or too large to record: `missing_columns`)[/]")
    if any(not c.certain for c in b.columns):
        console.print("  [dim]≤: set by this change or an earlier one (the old row was not fully known, "
                      "the column was renamed or added since, or a change this history lacks set it)[/]")
    if b.pruned_before is not None:
        console.print(f"  [dim]changes committed before {b.pruned_before:%Y-%m-%d %H:%M:%S} UTC were deleted by retention[/]")
    elif b.key is not None and any(c.set_by is None for c in b.columns):
        console.print(f"  [dim]set before the recorded history: {escape(_earlier_changes('blame', b.key))}[/]")
    console.print()


def render_table_blame(schema: str, table: str, rows: list[RecentChange], shown: dict[str, str] | None = None) -> None:
    console.print()
    console.print(f"  [bold]Recently changed[/]  {escape(names.format_table(schema, table))}")
    console.print(f"  [dim]{RULE}[/]")
    console.print(f"  [dim]{TIMES}[/]")
    if line := _earlier_names([r.writer for r in rows], schema, table):
        console.print(line)
    for r in rows:
        w = r.writer
        if w.op == "truncate":
            what = "[red]every row[/]"
        elif r.row_key is not None:
            what = escape(_key(r.row_key))
            if r.moved_from is not None:
                what += f"  [dim](moved from {escape(_key(r.moved_from))})[/]"
        else:
            row = key_text(r.row or {})
            what = escape(row if len(row) <= ROW_CLIP else row[: ROW_CLIP - 1] + "…")
        console.print(f"  {_time(w.commit_time)}  {w.op:<8}  {what}  {_who(w, shown)}{_recorded_as(w, schema, table)}")
    console.print()
