"""`flux why`: what one request did and why it ended as it did.

`explain` joins the two records Flux keeps of a request, its trace (`flux.store.traces`) and its
row changes in the mutation log, and picks the root cause of a failure out of the spans. It does
not guarantee that both exist: a request served with tracing off has only row changes, and a
request whose transaction rolled back, or whose tables are not captured, has only a trace. It
says which. Every function here takes a psycopg connection and returns frozen dataclasses;
rendering is the CLI's job.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from flux.errors import INTERNAL_ERROR, ConfigError
from flux.store import names, queries, traces
from flux.store.retention import Pruned, pruned_before
from flux.store.traces import TraceRecord

MAX_ROWS = 20  # row changes `explain` gives by default; Why.mutation_count and Why.tables count them all
MAX_FAILURES = 10  # failed calls listed besides the root cause; Why.failure_count counts them all
_OPS = ("insert", "update", "delete", "truncate")
_FRAME_LOCATION = re.compile(r"(functions/[^\s():]+:\d+(?::\d+)?)")
_DB_WRITE = re.compile(r"^db\.(insert|update|delete|merge)\b")
_IN_FAILED_TRANSACTION = "25P02"  # "current transaction is aborted, commands ignored until end of transaction block"
# The error the runtime gives a step still open when Flux ended the request (flux.runtime.executor).
_STEP_CUT = "the request ended before this step did"
# The answers the gateway gives without running a function, by status (README, "The gateway").
_GATEWAY_ANSWERS = {
    401: "no valid API key",
    404: "no route",
    400: "the request body is not valid JSON",
    405: "no route for this method",
    408: "the request body did not arrive in time",
    413: "the request body is over max_body_bytes",
    415: "the request body's content-encoding is not one Flux decodes",
    499: "the client disconnected before its body arrived",
    503: "the server was at capacity, or stopping",
}


# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowChange:
    """One row a request changed, from the mutation log."""

    schema: str
    table: str
    op: str  # insert | update | delete | truncate
    row_key: dict[str, Any] | None
    changed_columns: tuple[str, ...] | None
    commit_time: datetime
    function: str | None  # context->>'function'


@dataclass(frozen=True, slots=True)
class TableChanges:
    """How many rows of one table a request changed, by operation."""

    schema: str
    table: str
    rows: int
    ops: dict[str, int]  # {"insert": 19990, "update": 5}: insert, update, delete, truncate, those it did


@dataclass(frozen=True, slots=True)
class FailedCall:
    """A call or step that failed where it started (not only because a call inside it failed); or,
    in `RootCause.in_flight`, a call cut short."""

    span_id: str
    span: str  # its name
    kind: str | None  # attributes["flux.kind"]: db | fetch | step
    error: str | None  # the span's own error, e.g. "HTTP 429 Too Many Requests"
    label: str  # short form shown in the span tree: "timeout", "429", "23505", "error"
    call_site: str | None  # where in the function the call was made: the span's code.location
    duration_ms: float | None = None  # how long it ran


@dataclass(frozen=True, slots=True)
class LoggedError:
    """A log event at level error, or carrying an Error (`console.error`, `ctx.log("...", err)`, an
    unhandled rejection Flux logged): what a request that succeeded may still have hit."""

    span: str  # the span it was logged on: the function or a step
    message: str
    at: str | None  # the logged Error's first frame in the function's source


@dataclass(frozen=True, slots=True)
class RootCause:
    """What ended the request: the span named as its cause, how it is tied to that end, and what the
    function threw and where. `link` says how sure that is:

    - "same_error": the function threw this call's own error (the same message, the message wrapped
      in its own, or thrown where the call was made).
    - "failed_before": the function threw an error of its own, or returned a 5xx, after this call
      failed; the last call that failed before that. Likely the cause, not certainly.
    - "aborted": this statement failed and aborted the transaction; the function went on, and
      threw the error of a later statement refused for that (SQLSTATE 25P02).
    - "own": the function's own doing, with no call to blame: it threw (in the function, or in
      the step named), Flux stopped it (time limit, memory), or it returned the status itself (a
      4xx always counts as its answer, whatever failed before it).
    - "gateway": the gateway answered without running the function.
    """

    span_id: str
    span: str  # its name
    kind: str | None  # attributes["flux.kind"]: gateway | function | step | db | fetch
    error: str | None  # the span's own error ("timeout after 3000 ms"; "returned 404: no such widget 7")
    label: str  # short form shown in the span tree: "timeout", "429", "23505", "error"; the status returned
    link: str  # same_error | aborted | failed_before | own | gateway
    exception: str | None  # what the function threw ("Error: Stripe API timeout"); None when it returned
    thrown_at: str | None  # first frame in the function's source: "functions/signup.js:7:11"
    call_site: str | None  # where the failing call was made: the span's code.location
    # Calls still running when Flux stopped the function (time limit, memory), cut short: at a time
    # limit, most often what it was waiting on. `label` "abandoned", `error` None.
    in_flight: tuple[FailedCall, ...] = ()


@dataclass(frozen=True, slots=True)
class Why:
    """Everything `flux why` knows about one request."""

    request_id: str
    function: str | None
    trace: TraceRecord | None  # None: no trace was recorded
    mutations: tuple[RowChange, ...]  # the first ones, in commit order (explain's `rows`)
    mutation_count: int  # all the request's row changes
    mutations_truncated: bool  # mutations holds fewer than mutation_count
    tables: tuple[TableChanges, ...]  # all the row changes by table, in the order of each table's first change
    cause: RootCause | None  # None when the request succeeded (or no trace was recorded)
    failures: tuple[FailedCall, ...]  # the other calls and steps that failed, in order; at most MAX_FAILURES
    failure_count: int  # how many failed besides the cause, listed or not
    notes: tuple[str, ...]  # what is missing and what that may mean
    not_run: str | None = None  # why the gateway answered without running a function; None when one ran
    logged_errors: tuple[LoggedError, ...] = ()  # in the order they were logged; at most MAX_FAILURES
    logged_error_count: int = 0  # listed or not


# -- the request's row changes -----------------------------------------------------------------


def request_mutations(conn: psycopg.Connection, request_id: str, *, limit: int | None = None) -> list[RowChange]:
    """The rows one request changed, in commit order; with `limit`, the first `limit` of them."""
    rows = conn.execute(
        "SELECT schema_name, table_name, op, row_key::text, changed_columns, commit_time, context->>'function'"
        " FROM flux.state_mutations WHERE request_id = %s ORDER BY commit_lsn, seq"
        + (" LIMIT %s" if limit is not None else ""),
        (request_id, limit) if limit is not None else (request_id,),
    ).fetchall()
    key_order: dict[tuple[str, str], tuple[str, ...]] = {}
    for s, t, *_ in rows:  # jsonb sorts keys by length; show a composite key in primary-key order
        if (s, t) not in key_order:
            catalog = queries._catalog(conn, s, t)
            key_order[(s, t)] = (catalog.primary_key or ()) if catalog else ()
    return [
        RowChange(schema=s, table=t, op=op, row_key=queries._in_order(names.load_json(key), key_order[(s, t)]),
                  changed_columns=tuple(changed) if changed is not None else None, commit_time=time, function=fn)
        for s, t, op, key, changed, time, fn in rows
    ]


def request_tables(conn: psycopg.Connection, request_id: str) -> list[TableChanges]:
    """How many rows of each table one request changed, by operation. Counted by the database: no
    row key or image is sent for it."""
    counts = conn.execute(
        "SELECT schema_name, table_name, op, count(*), min(n) FROM ("
        " SELECT schema_name, table_name, op, row_number() OVER (ORDER BY commit_lsn, seq) AS n"
        " FROM flux.state_mutations WHERE request_id = %s) AS changes"
        " GROUP BY schema_name, table_name, op",
        (request_id,),
    ).fetchall()
    first: dict[tuple[str, str], int] = {}
    ops: dict[tuple[str, str], dict[str, int]] = {}
    for schema, table, op, count, n in sorted(counts, key=lambda c: _OPS.index(c[2]) if c[2] in _OPS else len(_OPS)):
        first[(schema, table)] = min(n, first.get((schema, table), n))
        ops.setdefault((schema, table), {})[op] = count
    return [TableChanges(schema=s, table=t, rows=sum(ops[(s, t)].values()), ops=ops[(s, t)])
            for s, t in sorted(first, key=first.__getitem__)]


# -- why -------------------------------------------------------------------------------------


def explain(conn: psycopg.Connection, id_or_prefix: str, *, rows: int = MAX_ROWS) -> Why:
    """The trace and the row changes of one request (the first `rows` of them, and how many of each
    table and operation), the root cause when it failed, and the calls that failed besides it
    (handled ones, for a request that succeeded).

    The prefix is looked up in both records; it must name one request across them.
    """
    if not 1 <= rows <= queries.MAX_LIMIT:
        raise ConfigError(f"--rows {rows} is out of range", hint=f"Give a number from 1 to {queries.MAX_LIMIT:,}.")
    request_id, trace = traces.find_request(conn, id_or_prefix)
    mutations = tuple(request_mutations(conn, request_id, limit=rows))
    tables = tuple(request_tables(conn, request_id))
    count = sum(t.rows for t in tables)
    function = trace.function if trace else next((m.function for m in mutations if m.function), None)
    cause = root_cause(trace) if trace else None
    others = [f for f in failed_calls(trace.spans) if cause is None or f.span_id != cause.span_id] if trace else []
    logged = logged_errors(trace.spans) if trace else []
    return Why(
        request_id=request_id, function=function, trace=trace, mutations=mutations, mutation_count=count,
        mutations_truncated=count > len(mutations), tables=tables, cause=cause,
        failures=tuple(others[:MAX_FAILURES]), failure_count=len(others),
        notes=tuple(_notes(trace, mutations, count, pruned_before(conn)) + (record_cuts(trace) if trace else [])),
        not_run=not_run(trace) if trace else None,
        logged_errors=tuple(logged[:MAX_FAILURES]), logged_error_count=len(logged),
    )


def logged_errors(spans: list[dict[str, Any]]) -> list[LoggedError]:
    """The request's log events at level error or carrying an Error, in the order they were logged."""
    found = []
    for span in spans:
        for event in span.get("events") or ():
            attrs = event.get("attributes") or {}
            if event.get("name") == "log" and (attrs.get("level") == "error" or attrs.get("exception.type")):
                message = str(attrs.get("message") or "")
                error = f"{attrs.get('exception.type')}: {attrs.get('exception.message')}" if attrs.get("exception.type") else ""
                if error and error not in message:  # ctx.log("charge failed", err): the message, then the error
                    message = f"{message}: {error}" if message else error
                # The Error's stack, or its frames in the message: console.error writes an Error so.
                frame = _FRAME_LOCATION.search(str(attrs.get("exception.stacktrace") or "")) or _FRAME_LOCATION.search(message)
                found.append((event.get("time") or 0, LoggedError(span=span.get("name") or "?", message=message,
                                                                  at=frame.group(1) if frame else None)))
    return [e for _, e in sorted(found, key=lambda t: t[0])]


def _function_span(spans: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The function's own span: the gateway records it under its span when, and only when, the function ran."""
    return next((s for s in spans if (s.get("attributes") or {}).get("flux.kind") == "function"), None)


def not_run(trace: TraceRecord) -> str | None:
    """Why the gateway answered without running a function ("no valid API key", ...); None when one ran."""
    if _function_span(trace.spans) is not None or _failed_inside_flux(trace):
        return None
    return _GATEWAY_ANSWERS.get(trace.status, f"the gateway answered {trace.status}")


def _failed_inside_flux(trace: TraceRecord) -> bool:
    """The gateway ran the function and Flux failed (a bug): no function span was kept, but it ran."""
    return trace.error == INTERNAL_ERROR and bool(trace.function)


def _notes(trace: TraceRecord | None, mutations: tuple[RowChange, ...], mutation_count: int, pruned: Pruned) -> list[str]:
    if trace is None:
        # The trace started before the transaction committed: a commit before the cutoff means a trace before it.
        if pruned.traces is not None and any(m.commit_time < pruned.traces for m in mutations):
            return [(
                f"No trace is kept for this request, only its {mutation_count:,} row change(s): traces that started"
                f" before {_utc(pruned.traces)} were deleted by retention."
            )]
        return [(
            f"No trace was recorded for this request, only its {mutation_count:,} row change(s): it was served with"
            " tracing off, by another Flux, or its trace was lost before it was written."
        )]
    if mutation_count:
        partial = _partly_logged(trace, mutation_count, pruned)
        return [partial] if partial else []
    writes = _writes(trace)
    if _failed_inside_flux(trace):  # its transaction is rolled back (flux.runtime.executor)
        return ["The request changed no rows: Flux failed while running the function, and rolled its transaction"
                " back. The gateway's log has the details under this request id; its spans were not kept."]
    if _function_span(trace.spans) is None:
        return ["The request changed no rows: it ended at the gateway and never ran a function."]
    if not writes:  # db.transaction says rolled_back after reads too: there was nothing to undo
        return ["The request changed no rows."]
    if _rolled_back(trace):
        return ["The request changed no rows: its transaction was rolled back."]
    if mutations_pruned(trace, pruned):
        return [(
            f"The trace shows {len(writes)} write(s); its row changes were deleted by retention (changes committed"
            f" before {_utc(pruned.mutations)} are pruned)."
        )]
    return [_unlogged(len(writes))]


def _unlogged(writes: int) -> str:
    return (f"The trace shows {writes} write(s) but the mutation log has no row change of this request: are those"
            " tables captured (`flux attach`), and has the engine caught up (`flux cdc status` shows its lag)?")


def unlogged_writes(trace: TraceRecord, mutation_count: int, pruned: Pruned) -> str | None:
    """For `flux trace`: the note that the trace shows committed writes the mutation log has none
    or only some of (yet: the engine may be behind; or the tables are not captured); None when that
    is not so. A count of 0 alone would read as "wrote nothing", a count too low as all there was."""
    if mutation_count:
        return _partly_logged(trace, mutation_count, pruned)
    writes = _writes(trace)
    if not writes or _rolled_back(trace) or mutations_pruned(trace, pruned):
        return None
    return _unlogged(len(writes))


def _partly_logged(trace: TraceRecord, mutation_count: int, pruned: Pruned) -> str | None:
    """The note that the trace's write statements reported more rows changed (`db.rows`) than the
    mutation log holds for the request; None when it holds as many or more (triggers and cascades
    add row changes no statement reports)."""
    if _rolled_back(trace) or mutations_pruned(trace, pruned):
        return None
    reported = sum(rows for s in _writes(trace)
                   if isinstance(rows := (s.get("attributes") or {}).get("db.rows"), int) and rows > 0)
    if mutation_count >= reported:
        return None
    return (f"The trace's statements reported {reported:,} row change(s); the mutation log has {mutation_count:,} of"
            " this request: has the engine caught up (`flux cdc status` shows its lag), and are all of those tables"
            " captured (`flux attach`)? A temporary or unlogged table's rows never are.")


def _writes(trace: TraceRecord) -> list[dict[str, Any]]:
    """Statements the trace names as writes and that succeeded; one its name hides (a write in a CTE
    or in a called function) is not counted, so a note then says less, never something false."""
    return [s for s in trace.spans if _DB_WRITE.match(s.get("name") or "") and s.get("status") == "ok"]


def _rolled_back(trace: TraceRecord) -> bool:
    outcome = ((_function_span(trace.spans) or {}).get("attributes") or {}).get("db.transaction")
    return outcome == "rolled_back" or (outcome is None and trace.status >= 500)


def record_cuts(trace: TraceRecord) -> list[str]:
    """What the trace left out past its limits (README, "What is recorded"): spans, steps and logs
    past 1,000 each, counted on the function span, and the replay tape cut or left out."""
    attrs = (_function_span(trace.spans) or {}).get("attributes") or {}
    notes = []
    for key, what in (("flux.spans_dropped", "ctx.db and ctx.fetch calls"), ("flux.steps_dropped", "steps"),
                      ("flux.events_dropped", "logs")):
        if isinstance(attrs.get(key), int) and attrs[key] > 0:
            notes.append(f"{attrs[key]:,} {what} past the first 1,000 are not in the trace, only counted.")
    tape = trace.recording or {}
    if tape.get("omitted"):
        notes.append(f"The recording's events were left out: {tape['omitted']}.")
    elif tape.get("truncated"):
        notes.append(f"The recording is cut short: it holds the first {len(tape.get('events') or ()):,} events"
                     " (at most 10,000, 8 MB of db and fetch events, and none nested too deep to store); what came after"
                     " is not on it.")
    return notes


def mutations_pruned(trace: TraceRecord, pruned: Pruned) -> bool:
    """Whether the request ended (so its transaction committed) before the mutation log's cutoff."""
    return pruned.mutations is not None and trace.started_at + timedelta(milliseconds=trace.duration_ms) < pruned.mutations


def _utc(t: datetime | None) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S} UTC"


def _depths(spans: list[dict[str, Any]]) -> dict[str, int]:
    """Each span's depth, by its parent links (steps are listed as they finish, after their own
    children); an unknown parent, or a cycle, makes a root."""
    parents = {s["id"]: s.get("parent") for s in spans}
    depth: dict[str, int] = {}
    for span_id in parents:
        chain: list[str] = []
        node: str | None = span_id
        while node in parents and node not in depth and node not in chain:
            chain.append(node)
            node = parents[node]
        base = depth.get(node, -1)  # a known depth, or past the roots (an unknown parent, a cycle)
        for n, member in enumerate(reversed(chain), start=1):
            depth[member] = base + n
    return depth


def error_label(span: dict[str, Any]) -> str:
    """The short form of a span's failure: "timeout", an HTTP status, a SQLSTATE, or "error"."""
    attrs = span.get("attributes") or {}
    if attrs.get("timeout"):
        return "timeout"
    code = attrs.get("http.status_code")
    if isinstance(code, int) and code >= 400:
        return str(code)
    if attrs.get("db.sqlstate"):
        return str(attrs["db.sqlstate"])
    return "error"


def _exception(span: dict[str, Any]) -> dict[str, Any] | None:
    for event in reversed(span.get("events") or []):
        if event.get("name") == "exception":
            return event.get("attributes") or {}
    return None


def _kind(span: dict[str, Any]) -> str | None:
    return (span.get("attributes") or {}).get("flux.kind")


def _end(span: dict[str, Any]) -> float:
    return (span.get("start") or 0) + (span.get("duration_ms") or 0)


def _failed_here(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls and steps that failed where they started, in start order: not the gateway or the
    function, and not a step that failed only because a call or step inside it did."""
    failed_parents = {s.get("parent") for s in spans if s.get("status") == "error"}
    return sorted((s for s in spans if s.get("status") == "error" and _kind(s) not in ("gateway", "function")
                   and s["id"] not in failed_parents), key=lambda s: s.get("start") or 0)


def failed_calls(spans: list[dict[str, Any]]) -> list[FailedCall]:
    """Every call and step that failed where it started, in the order they started."""
    return [FailedCall(span_id=s["id"], span=s.get("name") or "?", kind=_kind(s), error=s.get("error"),
                       label=error_label(s), call_site=(s.get("attributes") or {}).get("code.location"),
                       duration_ms=s.get("duration_ms"))
            for s in _failed_here(spans)]


def _same_error(span: dict[str, Any], message: str, thrown_at: str | None) -> int:
    """How surely the thrown error is this failed call's own: 3 the same (its message, its message
    after its span's name as Flux quotes a statement that aborted the transaction, or thrown where
    the call was made: a ctx error's stack is its call site), 2 wrapped in the function's own
    message, 1 its SQLSTATE named, 0 not at all."""
    attrs = span.get("attributes") or {}
    error = span.get("error") or ""
    if error and (error == message or f"{span.get('name')}: {error}" in message):
        return 3
    if thrown_at is not None and attrs.get("code.location") == thrown_at:
        return 3
    if error and error in message:
        return 2
    if attrs.get("db.sqlstate") and re.search(rf"\b{re.escape(str(attrs['db.sqlstate']))}\b", message):
        return 1
    return 0


def _aborted_by(call: dict[str, Any], failed: list[dict[str, Any]]) -> dict[str, Any] | None:
    """For a statement refused because the transaction was already aborted (SQLSTATE 25P02), the
    statement whose failure aborted it: the last one that failed, with another SQLSTATE, before it.
    A request's ctx.db calls are one transaction, so that failure, caught and gone past, is the cause."""
    if (call.get("attributes") or {}).get("db.sqlstate") != _IN_FAILED_TRANSACTION:
        return None
    earlier = [s for s in failed if _kind(s) == "db" and _end(s) <= (call.get("start") or 0)
               and (s.get("attributes") or {}).get("db.sqlstate") not in (None, _IN_FAILED_TRANSACTION)]
    return max(earlier, key=_end) if earlier else None


def root_cause(trace: TraceRecord) -> RootCause | None:
    """What ended a request that failed; None when it succeeded. See `RootCause` for the links.

    A call that failed and was handled is never named with another error's stack: the cause of a
    thrown error is the call whose error it is, else (the function's code threw) the last call that
    failed before the throw, said to be that, else the function or the step it was thrown in.
    """
    function = _function_span(trace.spans)
    if function is None:
        gateway = next((s for s in trace.spans if s.get("status") == "error" and not s.get("parent")), None)
        return _root(gateway, "gateway") if gateway is not None else None
    exc = _exception(function)
    if exc is None:  # the function returned its status
        if trace.status < 400:
            return None
        returned = f"returned {trace.status}" + (f": {trace.error}" if trace.error else "")
        failed = _failed_here(trace.spans)
        if trace.status < 500 or not failed:  # a 4xx is the function's answer
            return _root(function, "own", error=returned, label=str(trace.status))
        return _root(max(failed, key=_end), "failed_before")
    message = exc.get("exception.message") or ""
    name = exc.get("exception.type")
    thrown = f"{name}: {message}" if name and message else (message or name)
    frame = _FRAME_LOCATION.search(exc.get("exception.stacktrace") or "")
    thrown_at = frame.group(1) if frame else None
    thrown_time = exc.get("time")
    # Only what had failed by the time of the throw; the 1 ms allows for steps' whole-ms clock.
    failed = [s for s in _failed_here(trace.spans) if thrown_time is None or _end(s) <= thrown_time + 1]
    scored = [(score, _end(s), s) for s in failed if s.get("kind") == "client"
              and (score := _same_error(s, message, thrown_at))]
    if scored:
        thrown_call = max(scored, key=lambda t: t[:2])[2]
        aborting = _aborted_by(thrown_call, failed)
        if aborting is not None:
            return _root(aborting, "aborted", exception=thrown, thrown_at=thrown_at)
        return _root(thrown_call, "same_error", exception=thrown, thrown_at=thrown_at)
    # Steps the error passed through carry it too: they are where it was thrown, not failures before it.
    carriers = [s for s in trace.spans if _kind(s) == "step" and (_exception(s) or {}).get("exception.message") == message]
    # A step the end of the request cut short failed because of it, never before it.
    before = [s for s in failed if s not in carriers and s.get("error") != _STEP_CUT]
    code_threw = bool(exc.get("exception.stacktrace")) or name == "NonErrorThrown"  # else Flux stopped the function
    if code_threw and before:
        return _root(max(before, key=_end), "failed_before", exception=thrown, thrown_at=thrown_at)
    if not code_threw:  # Flux stopped the function (time limit, memory): where it was is the steps it left open
        carriers += [s for s in trace.spans if _kind(s) == "step" and s.get("error") == _STEP_CUT]
    depth = _depths(trace.spans)
    where = max(carriers, key=lambda s: depth[s["id"]]) if carriers else function
    cause = _root(where, "own", exception=thrown, thrown_at=thrown_at)
    if code_threw:
        return cause
    # Cancelled as the request ended, after running a while (one the end kept from starting ran for 0 ms).
    cut = [s for s in trace.spans if (s.get("attributes") or {}).get("flux.abandoned") and (s.get("duration_ms") or 0) > 0]
    return dataclasses.replace(cause, in_flight=tuple(
        FailedCall(span_id=s["id"], span=s.get("name") or "?", kind=_kind(s), error=None, label="abandoned",
                   call_site=(s.get("attributes") or {}).get("code.location"), duration_ms=s.get("duration_ms"))
        for s in sorted(cut, key=lambda s: s.get("start") or 0)))


def _root(span: dict[str, Any], link: str, *, error: str | None = None, label: str | None = None,
          exception: str | None = None, thrown_at: str | None = None) -> RootCause:
    attrs = span.get("attributes") or {}
    return RootCause(
        span_id=span["id"], span=span.get("name") or "?", kind=attrs.get("flux.kind"), error=error or span.get("error"),
        label=label or error_label(span), link=link, exception=exception, thrown_at=thrown_at,
        call_site=attrs.get("code.location"),
    )
