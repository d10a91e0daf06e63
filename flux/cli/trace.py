"""`flux trace`, `flux why` and `flux requests`: what a request did, and why it failed.

Commands parse flags, call `flux.store.traces` and `flux.store.why`, and render the dataclasses
they return as rich text or `--json`. Times are shown in UTC; durations are each span's own
(inclusive) duration.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Annotated, Any

import typer
from rich.cells import cell_len

from flux.cli.common import DatabaseOption, JsonOption, connect
from flux.cli.output import console, escape, print_json
from flux.cli.state import history_command, shown_ids
from flux.project import DEFAULT_TENANT, parse_duration
from flux.store import traces
from flux.store.retention import pruned_before
from flux.store.names import format_table, key_text, shell_word, visible
from flux.store.traces import TraceRecord, TraceSummary
from flux.store.why import (MAX_ROWS, RowChange, Why, error_label, explain, mutations_pruned, record_cuts,
                            unlogged_writes)

IdArg = Annotated[str, typer.Argument(metavar="ID", help="Request id, or a unique prefix of it (at least 4 characters).", show_default=False)]
ERROR_CLIP = 60
NAME_CELLS = 80  # of a span's name in the tree; --json has it whole
REQUEST_CELLS = 80  # of a method and path in `flux requests`: one client's long path widened every line
RUN_SHOWN = 5  # like sibling calls shown one by one; a longer run is shown as its ends and one line for the rest
_SQLSTATE = re.compile(r"\(SQLSTATE [0-9A-Z]{5}\)")  # how the runtime ends a database error's message
_DURATION_KINDS = ("function",)  # show their duration even when they failed: the status line says how


def trace(id_or_prefix: IdArg, database: DatabaseOption = None, json: JsonOption = False) -> None:
    """The span tree of one request: every call it made, how long each took, which failed."""
    with _connect(database) as conn:
        record = traces.get_trace(conn, id_or_prefix)
        writes = traces.count_mutations(conn, record.id)
        pruned = pruned_before(conn)
        shown = None if json else shown_ids(conn, [record.id])[record.id]
    # None of its row changes left, and it ended before the log's cutoff: how many it made is unknown.
    writes_pruned = writes == 0 and mutations_pruned(record, pruned)
    unlogged = unlogged_writes(record, writes, pruned)
    notes = [*([unlogged] if unlogged else []), *record_cuts(record)]
    if json:
        print_json({**dataclasses.asdict(record), "db_writes": writes, "db_writes_pruned": writes_pruned, "notes": notes})
    else:
        render_trace(record, writes, pruned.mutations if writes_pruned else None, notes, shown=shown)


def why(
    id_or_prefix: IdArg,
    rows: Annotated[int, typer.Option("--rows", min=1, help="Show at most N changed rows (also in --json); all are counted.")] = MAX_ROWS,
    database: DatabaseOption = None,
    json: JsonOption = False,
) -> None:
    """Why a request ended as it did: its spans, the root cause of a failure, and the rows it changed."""
    with _connect(database) as conn:
        result = explain(conn, id_or_prefix, rows=rows)
        shown = None if json else shown_ids(conn, [result.request_id])[result.request_id]
    if json:
        print_json(result)
    else:
        render_why(result, shown=shown)


def requests(
    function: Annotated[str | None, typer.Option("--function", "-f", help="Only requests to this function.", show_default=False)] = None,
    status: Annotated[str | None, typer.Option("--status", "-s", help="2xx, 4xx, 5xx, an exact code (500), or `error` (a 4xx, a 5xx or an error recorded).", show_default=False)] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only requests this recent: 30s, 10m, 2h, 1d.", show_default=False)] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only requests of this tenant.", show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N requests.")] = 50,
    database: DatabaseOption = None,
    json: JsonOption = False,
) -> None:
    """Recent requests, newest first."""
    window = parse_since(since) if since is not None else None
    with _connect(database) as conn:
        rows = traces.list_traces(conn, function=function, status=status, since=window, tenant=tenant, limit=limit)
        shown = None if json else shown_ids(conn, [r.id for r in rows])
    if json:
        print_json(rows)
    else:
        render_requests(rows, filtered=any(v is not None for v in (function, status, since, tenant)), shown=shown)


def parse_since(text: str) -> timedelta:
    """`30s`, `10m`, `2h`, `1d` (or `1.5h`) -> a timedelta."""
    return parse_duration(text, "--since")


def _connect(database: str | None):
    return connect(database, failing="Reading traces failed")


# -- rendering -------------------------------------------------------------------------------


def duration(ms: float) -> str:
    if ms < 1:
        return f"{ms:.1f}ms"
    if ms < 1000:
        return f"{round(ms)}ms"
    return f"{ms / 1000:.2f}s"


def status_text(code: int) -> str:
    """`200 OK`, `504 Gateway Timeout`; the bare number for a code without a phrase."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return "499 Client Closed Request" if code == 499 else str(code)  # the gateway's record of a client gone first


def _status_color(code: int) -> str:
    return "red" if code >= 500 else "yellow" if code >= 400 else "green"


def _time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _children(spans: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Roots and each span's children, in start order; a span whose parent is unknown is a root."""
    ids = {s["id"] for s in spans}
    roots: list[dict[str, Any]] = []
    children: dict[str, list[dict[str, Any]]] = {}
    for s in sorted(spans, key=lambda s: s.get("start") or 0):
        parent = s.get("parent")
        (children.setdefault(parent, []) if parent in ids else roots).append(s)
    return roots, children


def _failed_here(span: dict[str, Any], children: dict[str, list[dict[str, Any]]]) -> bool:
    """The span failed, and not only because a call inside it did."""
    return span.get("status") == "error" and not any(c.get("status") == "error" for c in children.get(span["id"], ()))


def _label(span: dict[str, Any], children: dict[str, list[dict[str, Any]]]) -> tuple[str, str | None]:
    """What the right-hand column shows, and its colour: the failure where it started, else the duration."""
    if "collapsed" in span:
        return span["collapsed"], None
    if (span.get("attributes") or {}).get("flux.abandoned"):  # the request ended before it did: no answer came
        return "abandoned", "yellow"
    if _failed_here(span, children) and (span.get("attributes") or {}).get("flux.kind") not in _DURATION_KINDS:
        return error_label(span), "red"
    return duration(span.get("duration_ms") or 0), "red" if span.get("status") == "error" else None


def _walk(roots: list[dict[str, Any]], children: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(tree prefix drawn with ├─ └─ │, depth, span), depth first."""

    def visit(span: dict[str, Any], lead: str, last: bool, depth: int) -> Iterator[tuple[str, int, dict[str, Any]]]:
        yield (lead + ("└─ " if last else "├─ ") if depth else ""), depth, span
        below = lead + ("   " if last else "│  ") if depth else ""
        kids = _collapse_runs(children.get(span.get("id"), []), children)
        for i, child in enumerate(kids):
            yield from visit(child, below, i == len(kids) - 1, depth + 1)

    for root in roots:
        yield from visit(root, "", True, 0)


def _collapse_runs(kids: list[dict[str, Any]], children: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Siblings with a run of more than RUN_SHOWN like calls (of one kind, succeeded, nothing under
    them: a query in a loop) shown as the run's first two, one line for the rest with their
    durations' range, and its last: a thousand of them would bury the rest of the tree. A failed
    call is never hidden."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(kids):
        j = i
        while j < len(kids) and _alike(kids[i], kids[j], children):
            j += 1
        if j - i > RUN_SHOWN:
            hidden = kids[i + 2:j - 1]
            times = [s.get("duration_ms") or 0 for s in hidden]
            names = [s.get("name") or "?" for s in hidden]
            what = names[0] if len(set(names)) == 1 else f"{_KIND_NAMES.get(_kind(hidden[0]), 'calls')} ({names[0]} to {names[-1]})"
            out += [*kids[i:i + 2], {
                "name": f"… {len(hidden):,} more {what}, --json has each",
                "collapsed": f"{duration(min(times))} to {duration(max(times))}" if min(times) != max(times)
                else duration(times[0])}, kids[j - 1]]
        else:
            out += kids[i:max(j, i + 1)]
        i = max(j, i + 1)
    return out


def _alike(first: dict[str, Any], span: dict[str, Any], children: dict[str, list[dict[str, Any]]]) -> bool:
    """Of one kind (db, fetch, step), succeeded (not failed, nor cut short), with nothing under them."""
    return (_kind(span) == _kind(first) and _plain(first) and _plain(span) and not children.get(span["id"]))


def _plain(span: dict[str, Any]) -> bool:
    return span.get("status") != "error" and not (span.get("attributes") or {}).get("flux.abandoned")


def _kind(span: dict[str, Any]) -> str | None:
    return (span.get("attributes") or {}).get("flux.kind")


_KIND_NAMES = {"db": "queries", "fetch": "fetches", "step": "steps"}


def _span_lines(rows: list[tuple[str, dict[str, Any]]], children: dict[str, list[dict[str, Any]]]) -> list[str]:
    """`  <prefix><name>   <label>` with the labels right-aligned in one column."""
    labels = [_label(span, children) for _, span in rows]
    names = [_fit(visible(span.get("name") or "?"), NAME_CELLS) for _, span in rows]
    # Widths in terminal cells: a CJK character or an emoji takes two.
    width = max(cell_len(lead) + cell_len(name) for (lead, _), name in zip(rows, names)) + 3
    lwidth = max(cell_len(text) for text, _ in labels)
    lines = []
    for (lead, span), name, (text, color) in zip(rows, names, labels):
        pad = " " * (width - cell_len(lead) - cell_len(name))
        shown = escape(" " * (lwidth - cell_len(text)) + text)
        lines.append(f"  {lead}{escape(name)}{pad}{f'[{color}]{shown}[/]' if color else shown}")
    return lines


def _fit(text: str, cells: int) -> str:
    """`text` cut to at most `cells` terminal cells, ending in "…" when cut: one long span name
    would push every line's duration that far right."""
    if cell_len(text) <= cells:
        return text
    used = 0
    for i, char in enumerate(text):
        used += cell_len(char)
        if used > cells - 1:
            return text[:i] + "…"
    return text


def _origin_failures(spans: list[dict[str, Any]]) -> int:
    _, children = _children(spans)
    return sum(1 for s in spans if _failed_here(s, children))


def render_trace(t: TraceRecord, db_writes: int, writes_pruned_before: datetime | None = None,
                 notes: list[str] | tuple[str, ...] = (), *, shown: str | None = None) -> None:
    """`shown`: the id to show (`shown_ids`), else the whole id."""
    roots, children = _children(t.spans)
    color = _status_color(t.status)
    console.print()
    console.print(f"  [bold]Trace Graph[/]  {escape(shown or t.id)}")
    console.print(f"  {escape(t.method)} {escape(t.path)} · [{color}]{escape(status_text(t.status))}[/] · {duration(t.duration_ms)}")
    if t.spans:
        for line in _span_lines([(lead, span) for lead, _, span in _walk(roots, children)], children):
            console.print(line)
    # Errors counts failures where they started, not the spans that failed because of them.
    writes = (f"{db_writes}" if writes_pruned_before is None else
              f"unknown (row changes committed before {writes_pruned_before:%Y-%m-%d %H:%M:%S} UTC were pruned)")
    console.print(f"  [dim]── Spans: {len(t.spans)}  ·  Errors: {_origin_failures(t.spans)}  ·  DB writes: {writes}[/]")
    for note in notes:
        console.print(f"  [yellow]note:[/] {escape(note)}")
    console.print()


def render_why(w: Why, *, shown: str | None = None) -> None:
    """`shown`: the id to show (`shown_ids`), else the whole id."""
    t = w.trace
    console.print()
    console.print(f"  [bold]Execution[/]  {escape(shown or w.request_id)}")
    if t is None:
        fn = f"function: {escape(w.function)}  " if w.function else ""
        console.print(f"  {fn}[dim](no trace recorded)[/]")
    else:
        console.print(f"  {escape(t.method)} {escape(t.path)}  →  {_target(w)}")
        console.print(f"  {_time(t.started_at)} UTC  ·  {duration(t.duration_ms)}")
        _why_spans(t)
        color = _status_color(t.status)
        outcome = f"{t.status} — {escape(t.error)}" if t.error else escape(status_text(t.status))
        console.print(f"  [bold]Status[/]  [{color}]{outcome}[/]")
    if w.cause is not None and t is not None:
        _why_cause(w, t)
    _why_failures(w)
    _why_logged(w)
    if w.mutations:
        _why_rows(w)
    for note in w.notes:
        console.print(f"  [yellow]note:[/] {escape(note)}")
    console.print()


def _target(w: Why) -> str:
    """Where the request went: its function, or why the gateway answered without running one."""
    t = w.trace
    assert t is not None
    if not t.function:
        return f"[dim]not routed: {escape(w.not_run or 'no function')}[/]"
    if w.not_run:
        return f"function: {escape(t.function)}  [dim](not run: {escape(w.not_run)})[/]"
    return f"function: {escape(t.function)}"


def _why_spans(t: TraceRecord) -> None:
    roots, children = _children(t.spans)
    # The function's own tree when it ran; the gateway is its frame, shown in `flux trace`.
    fn = [s for s in t.spans if (s.get("attributes") or {}).get("flux.kind") == "function"]
    start = fn[:1] or roots
    rows = [("  " * depth, span) for _, depth, span in _walk(start, children)]
    if rows:
        console.print("  [bold]Spans[/]")
        for line in _span_lines(rows, children):
            console.print(line)


def _why_cause(w: Why, t: TraceRecord) -> None:
    c = w.cause
    assert c is not None
    if c.link == "failed_before":
        how = "threw" if c.exception else f"returned {t.status}"
        qualifier = f"the last call that failed before the function {how}"
    elif c.link == "aborted":
        qualifier = "it aborted the transaction; the function went on, and threw a later statement's refusal"
    elif c.link == "own" and c.exception is None and t.status < 500:
        qualifier = "the function's own answer"
    else:
        qualifier = None
    console.print("  [bold]Root cause[/]" + (f"  [dim]({escape(qualifier)})[/]" if qualifier else ""))
    if c.link == "own" and c.exception:  # thrown in the function or a step: the error is the exception
        console.print(f"    {escape(c.span)}  [red]{escape(c.exception)}[/]")
    else:
        console.print(f"    {escape(c.span)}  {_failure(c.label, c.error)}")
    if c.link in ("failed_before", "aborted"):
        if c.call_site:
            console.print(f"    [dim]call made at {escape(c.call_site)}[/]")
        if c.exception:
            console.print(f"    then the function threw  [red]{escape(c.exception)}[/]")
        if c.thrown_at:
            console.print(f"    thrown at {escape(c.thrown_at)}")
        return
    if c.link == "same_error" and c.exception and c.error and not c.exception.endswith(c.error):
        console.print(f"    {escape(c.exception)}")  # the function's own message, wrapping the call's
    if c.thrown_at:
        console.print(f"    thrown at {escape(c.thrown_at)}")
    if c.call_site and c.call_site != c.thrown_at:
        console.print(f"    [dim]call made at {escape(c.call_site)}[/]")
    if c.in_flight:
        console.print("    calls in flight when it was stopped, cut short:")
    for f in c.in_flight:
        site = f"  [dim]at {escape(f.call_site)}[/]" if f.call_site else ""
        console.print(f"      {escape(f.span)}  [yellow]{duration(f.duration_ms or 0)}[/]{site}")


def _why_failures(w: Why) -> None:
    if not w.failures:
        return
    if w.cause is None:
        console.print("  [bold]Failed calls[/]  [dim](handled: the request succeeded)[/]")
    else:
        console.print("  [bold]Other failed calls[/]")
    for f in w.failures:
        site = f"  [dim]at {escape(f.call_site)}[/]" if f.call_site else ""
        console.print(f"    {escape(f.span)}  {_failure(f.label, f.error)}{site}")
    if w.failure_count > len(w.failures):
        console.print(f"    [dim]… and {w.failure_count - len(w.failures):,} more (flux trace shows them all)[/]")


def _why_logged(w: Why) -> None:
    if not w.logged_errors:
        return
    console.print("  [bold]Errors logged[/]")
    for e in w.logged_errors:
        # An Error logged whole has its stack below its first newline. Not splitlines(): a \r, a form feed
        # or a U+2028 in the message is no line of the stack, and what follows it vanished.
        message = e.message.split("\n", 1)[0] if e.message else ""
        at = f"  [dim]at {escape(e.at)}[/]" if e.at else ""
        console.print(f"    {escape(e.span)}  [red]{escape(message)}[/]{at}")
    if w.logged_error_count > len(w.logged_errors):
        console.print(f"    [dim]… and {w.logged_error_count - len(w.logged_errors):,} more (flux trace --json has them)[/]")


def _failure(label: str, error: str | None) -> str:
    """A failure's short label and its error, once: "timeout after 3000 ms", "23505  duplicate key ..."."""
    if error and label.lower() in error.lower():
        return f"[red]{escape(error)}[/]"
    return f"[red]{escape(label)}[/]" + (f"  {escape(error)}" if error else "")


def _why_rows(w: Why) -> None:
    """Each row with its history hint; when there are more than were fetched, how many more, and
    the counts by table and operation with one `flux state blame` hint per table."""
    if w.mutations_truncated:
        tables = f"{len(w.tables)} table" + ("s" if len(w.tables) != 1 else "")
        console.print(f"  [bold]Rows changed[/]  {w.mutation_count:,} in {tables}; the first {len(w.mutations):,} shown")
    else:
        console.print("  [bold]Rows changed[/]")
    for m in w.mutations:
        console.print(f"    {escape(format_table(m.schema, m.table))}  {m.op}  {escape(_key_text(m))}")
        hint = history_hint(m)
        if hint:
            console.print(f"      [dim]{escape(hint)}[/]")
    if not w.mutations_truncated:
        return
    console.print(f"    [dim]… and {w.mutation_count - len(w.mutations):,} more[/]")
    console.print("  [bold]Rows changed by table[/]")
    for t in w.tables:
        ops = ", ".join(f"{n:,} {op}" for op, n in t.ops.items())
        console.print(f"    {escape(format_table(t.schema, t.table))}  {t.rows:,} rows: {ops}")
        console.print(f"      [dim]flux state blame {escape(shell_word(format_table(t.schema, t.table)))}[/]")


def _key_text(m: RowChange) -> str:
    if m.op == "truncate":
        return "every row"
    if not m.row_key:
        return "(no primary key)"
    return ", ".join(f"{col} = {key_text(v)}" for col, v in m.row_key.items())


def history_hint(m: RowChange) -> str | None:
    """The `flux state` command that shows the row's whole history."""
    if m.op == "truncate" or not m.row_key:
        return f"flux state blame {shell_word(format_table(m.schema, m.table))}"
    return history_command(m.schema, m.table, m.row_key)


def render_requests(rows: list[TraceSummary], *, filtered: bool = False, shown: dict[str, str] | None = None) -> None:
    """One line per request, columns sized to their contents (lines wrap rather than clip; a request
    is cut at REQUEST_CELLS cells, an error at ERROR_CLIP characters: `flux why` and --json have
    them whole); `shown`: the id to show for each (`shown_ids`), else the whole id."""
    if not rows:
        console.print("[dim]No recorded request matches these filters.[/]" if filtered else "[dim]No requests recorded yet.[/]")
        return
    # A project of one tenant (flux dev's "default") needs no tenant column; one of several does.
    tenants = any(r.tenant != DEFAULT_TENANT for r in rows)
    cells = [tuple(map(visible, (
        (shown or {}).get(r.id, r.id), _time(r.started_at), *((r.tenant or "—",) if tenants else ()),
        _fit(visible(f"{r.method} {r.path}"), REQUEST_CELLS),
        r.function or "—", str(r.status), duration(r.duration_ms), _clip(r.error or ""))))
        for r in rows
    ]
    header = ("ID", "TIME (UTC)", *(("TENANT",) if tenants else ()), "REQUEST", "FUNCTION", "STATUS", "DURATION", "ERROR")
    widths = [max(cell_len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    status_at = header.index("STATUS")
    right = {status_at, status_at + 1}

    def line(values: tuple[str, ...], styles: tuple[str | None, ...]) -> str:
        out = []
        for i, (value, width, style) in enumerate(zip(values, widths, styles)):
            pad = " " * (width - cell_len(value))  # in terminal cells, as the widths are
            text = escape(pad + value if i in right else value if i == len(values) - 1 else value + pad)
            out.append(f"[{style}]{text}[/]" if style and value else text)
        return "  " + "  ".join(out).rstrip()

    console.print(f"[dim]{line(header, (None,) * len(header))}[/]")
    for r, c in zip(rows, cells):
        styles = ["bold", *[None] * (len(header) - 2), "red"]
        styles[status_at] = _status_color(r.status)
        console.print(line(c, tuple(styles)))


def _clip(text: str) -> str:
    """At most ERROR_CLIP characters. A SQLSTATE the cut would lose is kept: it says what kind of
    database error this is, which the start of the message alone often does not."""
    if len(text) <= ERROR_CLIP:
        return text
    code = _SQLSTATE.search(text)
    if code is None or code.end() < ERROR_CLIP:
        return text[: ERROR_CLIP - 1] + "…"
    tail = f" {code.group(0)}" + ("…" if code.end() < len(text) else "")
    return text[: ERROR_CLIP - 1 - len(tail)].rstrip() + "…" + tail
