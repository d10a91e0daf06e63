"""Trace rows and mutation-log rows as Flux writes them, seeded for the store's and the CLI's tests."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from flux.store.schema import ensure_schema
from flux.store.traces import TraceRecord, insert_traces

# Request ids: OK and OK2 share the prefix "91a3f"; FAIL is the seed's 550e8400.
OK = "91a3f1c2-7d4e-4b6a-9c1d-2e3f4a5b6c7d"
OK2 = "91a3f9e8-0000-4000-8000-000000000002"
FAIL = "550e8400-e29b-41d4-a716-446655440000"
NO_TRACE = "7b1d3f9a-0000-4000-8000-000000000003"
NOW = datetime.now(UTC).replace(microsecond=0)
STACK = "Error: Stripe API timeout\n    at default (functions/signup.js:7:11)\n    at async <anonymous>:1:1"
_ids = itertools.count(1)
_tx = itertools.count(1)


def span(name: str, kind: str, flux_kind: str, *, parent: dict | None = None, start: float = 0.0, ms: float = 1.0,
         error: str | None = None, events: list | None = None, **attributes: Any) -> dict[str, Any]:
    """A span as the runtime writes it; attribute names are given with `__` for each dot."""
    attrs = {"flux.kind": flux_kind, **{k.replace("__", "."): v for k, v in attributes.items()}}
    return {"id": f"{next(_ids):016x}", "parent": parent["id"] if parent else None, "name": name, "kind": kind,
            "start": 1764880000000.0 + start, "duration_ms": ms, "status": "error" if error else "ok", "error": error,
            "attributes": attrs, "events": events or []}


def ok_spans() -> list[dict[str, Any]]:
    """The seed's create_order: a db insert, a charge, and a Slack call that got 429 (handled)."""
    gw = span("gateway", "server", "gateway", ms=194, http__status_code=200)
    fn = span("create_order", "internal", "function", parent=gw, start=2, ms=192, db__transaction="committed")
    return [
        gw, fn,
        span("db.insert(orders)", "client", "db", parent=fn, start=3, ms=4, db__statement="INSERT INTO orders ..."),
        span("stripe.charge", "client", "fetch", parent=fn, start=8, ms=180, http__status_code=200),
        span("slack.notify", "client", "fetch", parent=fn, start=189, ms=3, error="HTTP 429", http__status_code=429,
             code__location="functions/create_order.js:14:9"),
    ]


def fail_spans() -> list[dict[str, Any]]:
    """The seed's create_user: the insert ran, then the Stripe call timed out and the function threw."""
    gw = span("gateway", "server", "gateway", ms=45, error="Stripe API timeout", http__status_code=500)
    exc = {"name": "exception", "time": 1764880000044.0, "attributes": {
        "exception.type": "Error", "exception.message": "Stripe API timeout", "exception.stacktrace": STACK}}
    fn = span("create_user", "internal", "function", parent=gw, start=1, ms=44, error="Stripe API timeout",
              events=[exc], db__transaction="rolled_back")
    return [
        gw, fn,
        span("db.insert(users)", "client", "db", parent=fn, start=2, ms=3),
        span("stripe.create", "client", "fetch", parent=fn, start=6, ms=38, error="timeout after 3000 ms", timeout=True,
             code__location="functions/signup.js:6:26"),
    ]


def exception(message: str, *, at: float, type_: str = "Error", frames: str = "") -> dict[str, Any]:
    """The `exception` event the runtime puts on a span an error was thrown through, `at` ms after the
    seed's epoch; an error Flux raised itself (time limit, memory) has no `frames`, so no stack."""
    return {"name": "exception", "time": 1764880000000.0 + at, "attributes": {
        "exception.type": type_, "exception.message": message,
        "exception.stacktrace": f"{type_}: {message}\n{frames}" if frames else ""}}


def aborted_spans(*, caught: bool = True) -> list[dict]:
    """Captured from the runtime: an insert that failed 23505, caught, then a select the aborted
    transaction refused (25P02), which the function threw."""
    refused = "current transaction is aborted, commands ignored until end of transaction block (SQLSTATE 25P02)"
    gw = span("gateway", "server", "gateway", ms=5, error=f"DatabaseError: {refused}", http__status_code=500)
    fn = span("save", "internal", "function", parent=gw, ms=4, error=f"DatabaseError: {refused}", events=[
        exception(refused, at=4, type_="DatabaseError", frames="    at functions/save.js:7:16")])
    insert = span("db.insert(items)", "client", "db", parent=fn, start=1, ms=1, db__sqlstate="23505",
                  error='duplicate key value violates unique constraint "items_pkey" (SQLSTATE 23505)',
                  code__location="functions/save.js:3:18")
    select = span("db.select", "client", "db", parent=fn, start=3, ms=0.3, error=refused, db__sqlstate="25P02",
                  code__location="functions/save.js:7:16")
    return [gw, fn, *([insert] if caught else []), select]


def waiting_spans() -> list[dict]:
    """Captured from the runtime: the time limit hit while a step awaited a slow fetch, which the
    end of the request cancelled after 3 s (abandoned), and a call it kept from starting (0 ms)."""
    message = "the function exceeded its time limit (3000 ms)"
    gw = span("gateway", "server", "gateway", ms=3010, error=f"TimeoutError: {message}", http__status_code=504)
    fn = span("pay", "internal", "function", parent=gw, ms=3010, error=f"TimeoutError: {message}",
              events=[exception(message, at=3010, type_="TimeoutError")])
    step = span("charge", "internal", "step", parent=fn, start=5, ms=3005, error="the request ended before this step did")
    fetch = span("stripe.charge", "client", "fetch", parent=step, start=6, ms=3000, flux__abandoned=True,
                 code__location="functions/pay.js:4:15")
    never = span("db.insert(audit)", "client", "db", parent=fn, start=3010, ms=0, flux__abandoned=True,
                 code__location="functions/pay.js:9:9")
    return [gw, fn, step, fetch, never]


def retry_spans() -> list[dict[str, Any]]:
    """A function that got a 429, retried it successfully, then threw an uncaught duplicate-key error
    (a ctx error's stack is the call site). Captured from the runtime's spans for the same code."""
    error = 'duplicate key value violates unique constraint "tags_pkey" (SQLSTATE 23505)'
    gw = span("gateway", "server", "gateway", ms=60, error=f"DatabaseError: {error}", http__status_code=500)
    fn = span("retry", "internal", "function", parent=gw, start=1, ms=58, error=f"DatabaseError: {error}",
              events=[exception(error, at=59, type_="DatabaseError", frames="    at functions/retry.js:6:16")],
              db__transaction="rolled_back")
    return [
        gw, fn,
        span("stub.limit", "client", "fetch", parent=fn, start=2, ms=1, error="HTTP 429 Too Many Requests",
             http__status_code=429, code__location="functions/retry.js:3:21"),
        span("stub.limit", "client", "fetch", parent=fn, start=4, ms=45, http__status_code=200,
             code__location="functions/retry.js:4:36"),
        span("db.insert(tags)", "client", "db", parent=fn, start=50, ms=4, db__rows=1,
             code__location="functions/retry.js:5:16"),
        span("db.insert(tags)", "client", "db", parent=fn, start=55, ms=3, error=error, db__sqlstate="23505",
             code__location="functions/retry.js:6:16"),
    ]


def nested_spans() -> list[dict[str, Any]]:
    """A fetch 500 ignored inside two nested steps (steps are listed as they finish, inner first), then
    a syntax error thrown at line 8. Captured from the runtime's spans for the same code."""
    error = 'syntax error at or near "SELEC" (SQLSTATE 42601)'
    gw = span("gateway", "server", "gateway", ms=65, error=f"DatabaseError: {error}", http__status_code=500)
    fn = span("nested", "internal", "function", parent=gw, start=1, ms=64, error=f"DatabaseError: {error}",
              events=[exception(error, at=64, type_="DatabaseError", frames="    at functions/nested.js:8:16")],
              db__transaction="rolled_back")
    outer = span("outer", "internal", "step", parent=fn, start=7, ms=50)
    inner = span("inner", "internal", "step", parent=outer, start=7, ms=50)
    return [
        gw, fn, inner, outer,
        span("stub.flaky", "client", "fetch", parent=inner, start=10, ms=44, error="HTTP 500 Internal Server Error",
             http__status_code=500, code__location="functions/nested.js:4:17"),
        span("db.select", "client", "db", parent=fn, start=58, ms=1, db__rows=1, code__location="functions/nested.js:7:16"),
        span("db.query", "client", "db", parent=fn, start=62, ms=1, error=error, db__sqlstate="42601",
             code__location="functions/nested.js:8:16"),
    ]


def returned_spans(status: int, error: str | None, *calls: dict[str, Any]) -> list[dict[str, Any]]:
    """A function that returned `status` itself after `calls` (made with `parent=None`): the gateway's
    span fails only for a 5xx (a 4xx the function returned is its answer)."""
    gw = span("gateway", "server", "gateway", ms=14, http__status_code=status, error=error if status >= 500 else None)
    fn = span("widget", "internal", "function", parent=gw, start=1, ms=12)
    return [gw, fn, *({**c, "parent": fn["id"]} for c in calls)]


def trace(request_id: str, *, function: str | None = "create_order", status: int = 200, path: str = "/create_order",
          tenant: str | None = "default", ago: timedelta = timedelta(minutes=1), error: str | None = None,
          spans: list[dict[str, Any]] | None = None, ms: float = 194.0) -> TraceRecord:
    return TraceRecord(
        id=request_id, tenant=tenant, function=function, method="POST", path=path, status=status, duration_ms=ms,
        started_at=NOW - ago, error=error, spans=spans if spans is not None else ok_spans(),
        request={"headers": {"content-type": "application/json"}, "query": {}, "body": {"email": "a@example.com"},
                 "body_truncated": False, "body_bytes": 25},
        response={"headers": {}, "body": {"id": 1}, "body_truncated": False, "body_bytes": 8},
        recording={"v": 2, "truncated": False, "entropy": "ab", "events": [[0, "now", 1764880000000.5]]},
        code_version="0123456789abcdef", git_commit=None,
    )


def fail_trace() -> TraceRecord:
    return trace(FAIL, function="create_user", status=500, path="/signup", error="Stripe API timeout",
                 spans=fail_spans(), ms=44.0, tenant="acme", ago=timedelta(minutes=3))


def new_tx() -> int:
    """A transaction number of its own, for several `mutation` calls of one transaction: a fixed one
    collided with the counter once a worker's earlier tests had drawn as many."""
    return next(_tx)


def mutation(conn: psycopg.Connection, table: str, op: str, *, request_id: str | None, key: dict | None,
             new: dict | None = None, function: str | None = None, seq: int = 0, tx: int | None = None) -> None:
    """One row of the mutation log as the engine writes it, each call its own transaction unless `tx` is given."""
    n = tx if tx is not None else next(_tx)
    context = {"request_id": request_id, "function": function} if request_id else None
    conn.execute(
        "INSERT INTO flux.state_mutations (request_id, context, schema_name, table_name, op, row_key, new,"
        " xid, commit_lsn, commit_time, seq) VALUES (%s, %s, 'public', %s, %s, %s, %s, %s, %s::pg_lsn, %s, %s)",
        (request_id, json.dumps(context) if context else None, table, op, json.dumps(key) if key else None,
         json.dumps(new) if new else None, 1000 + n, f"0/{n * 0x100:X}", NOW + timedelta(seconds=n), seq),
    )


def bulk_mutations(conn: psycopg.Connection, table: str, op: str, count: int, *, request_id: str, first_id: int = 1) -> None:
    """`count` rows of one transaction as the engine writes them (keys first_id, first_id + 1, ...), in one statement."""
    n = next(_tx)
    conn.execute(
        "INSERT INTO flux.state_mutations (request_id, context, schema_name, table_name, op, row_key, new, xid,"
        " commit_lsn, commit_time, seq) SELECT %(rid)s, %(context)s, 'public', %(table)s, %(op)s,"
        " jsonb_build_object('id', i), jsonb_build_object('id', i, 'note', repeat('x', 200)), %(xid)s, %(lsn)s::pg_lsn,"
        " %(time)s, i - %(first)s FROM generate_series(%(first)s, %(first)s + %(count)s - 1) AS i",
        {"rid": request_id, "context": json.dumps({"request_id": request_id, "function": "bulk"}), "table": table,
         "op": op, "xid": 1000 + n, "lsn": f"0/{n * 0x100:X}", "time": NOW + timedelta(seconds=n), "first": first_id,
         "count": count},
    )


def seed(conn: psycopg.Connection) -> None:
    """OK (200, one order written), OK2 (200, another tenant), FAIL (500, rolled back: no rows), and
    NO_TRACE: a request whose row changes are logged but whose trace is not."""
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.members (org int, id text, role text, PRIMARY KEY (org, id))")
    insert_traces(conn, [trace(OK), trace(OK2, tenant="acme", ago=timedelta(days=2), function="list_orders"), fail_trace()])
    mutation(conn, "orders", "insert", request_id=OK, key={"id": 1}, new={"id": 1, "total": 40}, function="create_order")
    shared = new_tx()
    mutation(conn, "members", "update", request_id=NO_TRACE, key={"org": 1, "id": "a"}, function="set_role", seq=0, tx=shared)
    mutation(conn, "users", "update", request_id=NO_TRACE, key={"id": 42}, function="set_role", seq=1, tx=shared)
