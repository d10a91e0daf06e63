from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from flux.errors import AmbiguousError, ConfigError, NotFoundError
from flux.store.schema import drop_schema, ensure_schema
from flux.store.traces import (
    TraceRecord,
    count_mutations,
    encode_trace,
    explain,
    get_trace,
    insert_encoded_traces_async,
    insert_traces,
    list_traces,
    request_mutations,
)

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


def trace(request_id: str, *, function: str | None = "create_order", status: int = 200, path: str = "/create_order",
          tenant: str | None = "default", ago: timedelta = timedelta(minutes=1), error: str | None = None,
          spans: list[dict[str, Any]] | None = None, ms: float = 194.0) -> TraceRecord:
    return TraceRecord(
        id=request_id, tenant=tenant, function=function, method="POST", path=path, status=status, duration_ms=ms,
        started_at=NOW - ago, error=error, spans=spans if spans is not None else ok_spans(),
        request={"headers": {"content-type": "application/json"}, "query": {}, "body": {"email": "a@example.com"},
                 "body_truncated": False, "body_bytes": 25},
        response={"headers": {}, "body": {"id": 1}, "body_truncated": False, "body_bytes": 8},
        recording={"v": 1, "truncated": False, "entropy": "ab", "events": [[0, "now", 1764880000000.5]]},
        code_version="0123456789abcdef", git_commit=None,
    )


def fail_trace() -> TraceRecord:
    return trace(FAIL, function="create_user", status=500, path="/signup", error="Stripe API timeout",
                 spans=fail_spans(), ms=44.0, tenant="acme", ago=timedelta(minutes=3))


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


def seed(conn: psycopg.Connection) -> None:
    """OK (200, one order written), OK2 (200, another tenant), FAIL (500, rolled back: no rows), and
    NO_TRACE: a request whose row changes are logged but whose trace is not."""
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.members (org int, id text, role text, PRIMARY KEY (org, id))")
    insert_traces(conn, [trace(OK), trace(OK2, tenant="acme", ago=timedelta(days=2), function="list_orders"), fail_trace()])
    mutation(conn, "orders", "insert", request_id=OK, key={"id": 1}, new={"id": 1, "total": 40}, function="create_order")
    mutation(conn, "members", "update", request_id=NO_TRACE, key={"org": 1, "id": "a"}, function="set_role", seq=0, tx=90)
    mutation(conn, "users", "update", request_id=NO_TRACE, key={"id": 42}, function="set_role", seq=1, tx=90)


@pytest.fixture
def seeded(conn: psycopg.Connection) -> psycopg.Connection:
    seed(conn)
    return conn


# -- writing ---------------------------------------------------------------------------------


def test_insert_then_get_round_trips_every_column(conn):
    ensure_schema(conn)
    record = fail_trace()
    insert_traces(conn, [record])
    got = get_trace(conn, FAIL)
    assert got.recorded_at is not None
    assert replace(got, recorded_at=None) == record


def test_insert_is_idempotent_on_id(conn):
    ensure_schema(conn)
    insert_traces(conn, [trace(OK)])
    insert_traces(conn, [trace(OK, status=500), trace(OK2)])
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone()[0] == 2
    assert get_trace(conn, OK).status == 200


def test_insert_encoded_traces_async_writes_a_batch(dsn, conn):
    ensure_schema(conn)

    async def write() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            await insert_encoded_traces_async(aconn, [encode_trace(trace(OK)), encode_trace(fail_trace())])

    asyncio.run(write())
    assert {r[0] for r in conn.execute("SELECT id FROM flux.trace_requests")} == {OK, FAIL}


def test_insert_keeps_numbers_exact_and_a_null_recording(conn):
    ensure_schema(conn)
    insert_traces(conn, [replace(trace(OK), recording=None, response={"body": {"big": 2**70, "n": 0.1}})])
    got = get_trace(conn, OK)
    assert got.recording is None
    assert got.response == {"body": {"big": 2**70, "n": 0.1}}


def test_insert_stores_a_nul_character_as_a_replacement_and_keeps_escaped_text(conn):
    ensure_schema(conn)
    body = {"nul": "a\x00b", "text": "\\u0000", "both": "\\\x00"}
    insert_traces(conn, [replace(trace(OK), request={"body": body}, path="/a\x00", error="x\x00")])
    got = get_trace(conn, OK)
    assert got.request == {"body": {"nul": "a\ufffdb", "text": "\\u0000", "both": "\\\ufffd"}}
    assert (got.path, got.error) == ("/a\ufffd", "x\ufffd")


# -- get_trace -------------------------------------------------------------------------------


def test_get_trace_by_unique_prefix(seeded):
    assert get_trace(seeded, "550e8400").id == FAIL


def test_get_trace_accepts_req_prefix_and_upper_case(seeded):
    assert get_trace(seeded, "req:550E8400").id == FAIL


def test_get_trace_ambiguous_prefix_lists_the_candidates(seeded):
    with pytest.raises(AmbiguousError) as err:
        get_trace(seeded, "91a3f")
    assert OK in err.value.hint and OK2 in err.value.hint


def test_get_trace_unknown_prefix_is_not_found(seeded):
    with pytest.raises(NotFoundError):
        get_trace(seeded, "deadbeef")


def test_get_trace_prefix_wildcards_are_literal(seeded):
    with pytest.raises(NotFoundError):
        get_trace(seeded, "91a_%")


def test_get_trace_needs_four_characters(seeded):
    with pytest.raises(ConfigError) as err:
        get_trace(seeded, "91a")
    assert "at least 4" in err.value.hint


def test_get_trace_with_tenant_sees_only_that_tenants_traces(seeded):
    assert get_trace(seeded, "91a3f", tenant="default").id == OK  # OK2 is acme's: no longer ambiguous
    with pytest.raises(NotFoundError):
        get_trace(seeded, FAIL, tenant="default")


def test_prefix_lookup_is_a_range_scan_of_the_primary_key(seeded):
    seeded.execute("SET enable_seqscan = off")
    plan = json.dumps(seeded.execute(
        "EXPLAIN (FORMAT JSON) SELECT id FROM flux.trace_requests WHERE id LIKE %s", ("91a3f%",)
    ).fetchone()[0])
    assert "trace_requests_pkey" in plan


def test_get_trace_without_a_flux_schema_is_not_found(conn):
    with pytest.raises(NotFoundError):
        get_trace(conn, FAIL)


def test_reads_of_an_older_schema_say_how_to_upgrade(conn):
    ensure_schema(conn)
    conn.execute("DROP TABLE flux.trace_requests; UPDATE flux.meta SET value = '2' WHERE key = 'schema_version'")
    with pytest.raises(ConfigError) as err:
        list_traces(conn)
    assert "upgrade" in err.value.hint


# -- list_traces -----------------------------------------------------------------------------


def test_list_traces_newest_first(seeded):
    assert [t.id for t in list_traces(seeded)] == [OK, FAIL, OK2]


@pytest.mark.parametrize(("status", "expected"), [("5xx", [FAIL]), ("500", [FAIL]), ("error", [FAIL]),
                                                  ("2xx", [OK, OK2]), ("4xx", [])])
def test_list_traces_filters_by_status(seeded, status, expected):
    assert [t.id for t in list_traces(seeded, status=status)] == expected


def test_list_traces_rejects_an_unknown_status_filter(seeded):
    with pytest.raises(ConfigError):
        list_traces(seeded, status="bad")


def test_list_traces_filters_by_function_tenant_and_since(seeded):
    assert [t.id for t in list_traces(seeded, function="create_user")] == [FAIL]
    assert [t.id for t in list_traces(seeded, tenant="acme")] == [FAIL, OK2]
    late = datetime.now(UTC) - NOW  # NOW is fixed at import; the suite may reach this test minutes later
    assert [t.id for t in list_traces(seeded, since=timedelta(hours=1) + late)] == [OK, FAIL]
    assert [t.id for t in list_traces(seeded, since=timedelta(minutes=2) + late)] == [OK]


def test_list_traces_limit(seeded):
    assert [t.id for t in list_traces(seeded, limit=1)] == [OK]


def test_list_traces_summaries_carry_status_and_error(seeded):
    (row,) = list_traces(seeded, status="5xx")
    assert (row.method, row.path, row.function, row.status, row.error) == ("POST", "/signup", "create_user", 500, "Stripe API timeout")


# -- mutations -------------------------------------------------------------------------------


def test_request_mutations_in_commit_order(seeded):
    changes = request_mutations(seeded, NO_TRACE)
    assert [(c.table, c.op, c.row_key) for c in changes] == [("members", "update", {"org": 1, "id": "a"}),
                                                            ("users", "update", {"id": 42})]
    assert changes[0].function == "set_role"


def test_request_mutations_show_a_composite_key_in_primary_key_order(seeded):
    assert list(request_mutations(seeded, NO_TRACE)[0].row_key) == ["org", "id"]


def test_count_mutations_counts_the_requests_rows(seeded):
    assert (count_mutations(seeded, OK), count_mutations(seeded, FAIL)) == (1, 0)


# -- explain ---------------------------------------------------------------------------------


def test_explain_finds_the_failing_call_and_where_the_function_threw(seeded):
    why = explain(seeded, "550e8400")
    assert why.request_id == FAIL and why.function == "create_user" and why.trace is not None
    cause = why.cause
    assert cause is not None
    assert (cause.span, cause.kind, cause.label, cause.error) == ("stripe.create", "fetch", "timeout", "timeout after 3000 ms")
    assert cause.exception == "Error: Stripe API timeout"
    assert cause.thrown_at == "functions/signup.js:7:11"
    assert cause.call_site == "functions/signup.js:6:26"


def test_explain_says_a_failed_request_changed_no_rows_because_it_rolled_back(seeded):
    why = explain(seeded, FAIL)
    assert why.mutations == ()
    assert any("rolled back" in n for n in why.notes)


def test_explain_without_a_trace_uses_the_mutation_log_and_says_so(seeded):
    why = explain(seeded, "7b1d3f9a")
    assert why.trace is None and why.cause is None
    assert why.request_id == NO_TRACE and why.function == "set_role"
    assert [m.table for m in why.mutations] == ["members", "users"]
    assert any("No trace was recorded" in n for n in why.notes)


def test_explain_of_a_successful_request_lists_its_rows_and_the_handled_failure(seeded):
    why = explain(seeded, OK)
    assert [(m.table, m.op, m.row_key) for m in why.mutations] == [("orders", "insert", {"id": 1})]
    assert why.notes == ()
    assert why.cause is not None and (why.cause.span, why.cause.label) == ("slack.notify", "429")


def test_explain_notes_writes_the_log_did_not_record(seeded):
    insert_traces(seeded, [trace("c0ffee00-0000-4000-8000-000000000004")])
    (note,) = explain(seeded, "c0ffee00").notes
    assert "flux attach" in note


def test_explain_of_an_unknown_request_is_not_found(seeded):
    with pytest.raises(NotFoundError):
        explain(seeded, "deadbeef")


def test_explain_prefix_must_be_unique_across_traces_and_the_log(seeded):
    mutation(seeded, "users", "insert", request_id="550e8400-ffff-4000-8000-000000000009", key={"id": 7})
    with pytest.raises(AmbiguousError) as err:
        explain(seeded, "550e8400")
    assert FAIL in err.value.hint and "550e8400-ffff-4000-8000-000000000009" in err.value.hint


def test_explain_of_a_gateway_only_request_blames_the_gateway(conn):
    ensure_schema(conn)
    gw = span("gateway", "server", "gateway", ms=0.3, error="no route for GET /nope", http__status_code=404)
    insert_traces(conn, [trace("0badf00d-0000-4000-8000-000000000005", function=None, status=404, path="/nope",
                               error="no route for GET /nope", spans=[gw], ms=0.3)])
    why = explain(conn, "0badf00d")
    assert why.cause is not None and (why.cause.span, why.cause.label, why.cause.thrown_at) == ("gateway", "404", None)
    assert any("never ran a function" in n for n in why.notes)


def test_drop_schema_leaves_nothing_to_find(seeded):
    drop_schema(seeded)
    with pytest.raises(NotFoundError):
        explain(seeded, FAIL)
