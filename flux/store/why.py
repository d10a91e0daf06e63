"""`flux why`: what one request did and why it ended as it did.

`explain` joins the two records Flux keeps of a request, its trace (`flux.store.traces`) and its
row changes in the mutation log, and picks the root cause of a failure out of the spans. It does
not guarantee that both exist: a request served with tracing off has only row changes, and a
request whose transaction rolled back, or whose tables are not captured, has only a trace. It
says which. Every function here takes a psycopg connection and returns frozen dataclasses;
rendering is the CLI's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from flux.store import queries, traces
from flux.store.traces import TraceRecord

_FRAME_LOCATION = re.compile(r"(functions/[^\s():]+:\d+(?::\d+)?)")
_DB_WRITE = re.compile(r"^db\.(insert|update|delete|merge)\b")
# The answers the gateway gives without running a function, by status (README, "The gateway").
_GATEWAY_ANSWERS = {
    401: "no valid API key",
    404: "no route",
    400: "the request body is not valid JSON",
    413: "the request body is over max_body_bytes",
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
class RootCause:
    """The span a failure started in, and where the function threw."""

    span_id: str
    span: str  # its name
    kind: str | None  # attributes["flux.kind"]: gateway | function | db | fetch | step
    error: str | None  # the span's own error, e.g. "timeout after 3000 ms"
    label: str  # short form shown in the span tree: "timeout", "429", "23505", "error"
    exception: str | None  # what the function threw: "Error: Stripe API timeout"
    thrown_at: str | None  # first frame in the function's source: "functions/signup.js:7:11"
    call_site: str | None  # where the failing call was made: the span's code.location


@dataclass(frozen=True, slots=True)
class Why:
    """Everything `flux why` knows about one request."""

    request_id: str
    function: str | None
    trace: TraceRecord | None  # None: no trace was recorded
    mutations: tuple[RowChange, ...]  # in commit order
    cause: RootCause | None  # None when no span failed
    notes: tuple[str, ...]  # what is missing and what that may mean
    not_run: str | None = None  # why the gateway answered without running a function; None when one ran


# -- the request's row changes -----------------------------------------------------------------


def request_mutations(conn: psycopg.Connection, request_id: str) -> list[RowChange]:
    """The rows one request changed, in commit order."""
    rows = conn.execute(
        "SELECT schema_name, table_name, op, row_key::text, changed_columns, commit_time, context->>'function'"
        " FROM flux.state_mutations WHERE request_id = %s ORDER BY commit_lsn, seq",
        (request_id,),
    ).fetchall()
    key_order: dict[tuple[str, str], tuple[str, ...]] = {}
    for s, t, *_ in rows:  # jsonb sorts keys by length; show a composite key in primary-key order
        if (s, t) not in key_order:
            catalog = queries._catalog(conn, s, t)
            key_order[(s, t)] = (catalog.primary_key or ()) if catalog else ()
    return [
        RowChange(schema=s, table=t, op=op, row_key=queries._in_order(queries.load_json(key), key_order[(s, t)]),
                  changed_columns=tuple(changed) if changed is not None else None, commit_time=time, function=fn)
        for s, t, op, key, changed, time, fn in rows
    ]


# -- why -------------------------------------------------------------------------------------


def explain(conn: psycopg.Connection, id_or_prefix: str) -> Why:
    """The trace and the row changes of one request, and the root cause when it failed.

    The prefix is looked up in both records; it must name one request across them.
    """
    request_id, trace = traces.find_request(conn, id_or_prefix)
    mutations = tuple(request_mutations(conn, request_id))
    function = trace.function if trace else next((m.function for m in mutations if m.function), None)
    return Why(
        request_id=request_id, function=function, trace=trace, mutations=mutations,
        cause=_cause(trace) if trace else None, notes=tuple(_notes(trace, mutations)),
        not_run=not_run(trace) if trace else None,
    )


def _function_span(spans: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The function's own span: the gateway records it under its span when, and only when, the function ran."""
    return next((s for s in spans if (s.get("attributes") or {}).get("flux.kind") == "function"), None)


def not_run(trace: TraceRecord) -> str | None:
    """Why the gateway answered without running a function ("no valid API key", ...); None when one ran."""
    if _function_span(trace.spans) is not None:
        return None
    return _GATEWAY_ANSWERS.get(trace.status, f"the gateway answered {trace.status}")


def _cause(trace: TraceRecord) -> RootCause | None:
    """`root_cause`, except that a status the function returned itself (nothing in it failed, the
    gateway only passed the status on) is the function's, not the gateway's."""
    cause = root_cause(trace.spans)
    function = _function_span(trace.spans)
    if cause is None or cause.kind != "gateway" or function is None:
        return cause
    returned = f"returned {trace.status}" + (f": {trace.error}" if trace.error else "")
    return RootCause(span_id=function["id"], span=function.get("name") or "?", kind="function", error=returned,
                     label=str(trace.status), exception=None, thrown_at=None,
                     call_site=(function.get("attributes") or {}).get("code.location"))


def _notes(trace: TraceRecord | None, mutations: tuple[RowChange, ...]) -> list[str]:
    if trace is None:
        return [(
            f"No trace was recorded for this request, only its {len(mutations)} row change(s): it was served with"
            " tracing off, by another Flux, or its trace was lost before it was written."
        )]
    if mutations:
        return []
    function_span = _function_span(trace.spans)
    outcome = ((function_span or {}).get("attributes") or {}).get("db.transaction")
    writes = [s for s in trace.spans if _DB_WRITE.match(s.get("name") or "") and s.get("status") == "ok"]
    if function_span is None:
        return ["The request changed no rows: it ended at the gateway and never ran a function."]
    if outcome == "rolled_back" or (outcome is None and writes and trace.status >= 500):
        return ["The request changed no rows: its transaction was rolled back."]
    if writes:
        return [(
            f"The trace shows {len(writes)} write(s) but the mutation log has no row change of this request:"
            " are those tables captured (`flux attach`), and has the engine caught up?"
        )]
    return ["The request changed no rows."]


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


def root_cause(spans: list[dict[str, Any]]) -> RootCause | None:
    """The deepest failed span (a call or step inside the function before the function itself),
    the earliest one among equals; with what the function threw and where."""
    failed = [s for s in spans if s.get("status") == "error"]
    if not failed:
        return None
    depth = _depths(spans)
    span = min(failed, key=lambda s: (-depth[s["id"]], s.get("start") or 0))
    by_id = {s["id"]: s for s in spans}
    # The exception: the failed span's own, else its nearest ancestor's (a step's, the function's).
    exc: dict[str, Any] | None = None
    node: dict[str, Any] | None = span
    while node is not None and exc is None:
        exc = _exception(node)
        node = by_id.get(node.get("parent"))
    thrown, thrown_at = None, None
    if exc is not None:
        name, message = exc.get("exception.type"), exc.get("exception.message")
        thrown = f"{name}: {message}" if name and message else (message or name)
        match = _FRAME_LOCATION.search(exc.get("exception.stacktrace") or "")
        thrown_at = match.group(1) if match else None
    attrs = span.get("attributes") or {}
    return RootCause(
        span_id=span["id"], span=span.get("name") or "?", kind=attrs.get("flux.kind"), error=span.get("error"),
        label=error_label(span), exception=thrown, thrown_at=thrown_at, call_site=attrs.get("code.location"),
    )
