from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from datetime import timedelta

import pytest
from rich.cells import cell_len
from typer.testing import CliRunner

from flux.cli import app
from flux.cli.trace import parse_since
from flux.errors import AmbiguousError, ConfigError, NotFoundError
from flux.store.retention import prune
from flux.store.schema import ensure_schema
from flux.store.traces import TraceRecord, find_request, get_trace, insert_traces
from tests.traces_seed import (
    FAIL,
    NO_TRACE,
    OK,
    OK2,
    aborted_spans,
    bulk_mutations,
    exception,
    mutation,
    nested_spans,
    ok_spans,
    retry_spans,
    returned_spans,
    seed,
    span,
    trace,
    waiting_spans,
)


def invoke(dsn: str, *args: str):
    return CliRunner().invoke(app, [*args, "--database", dsn])


def lines(output: str) -> list[str]:
    return [line.rstrip() for line in output.splitlines()]


# -- flux trace ------------------------------------------------------------------------------


def test_trace_draws_the_span_tree_with_right_aligned_durations(seeded, dsn):
    result = invoke(dsn, "trace", "91a3f1")
    assert result.exit_code == 0, result.output
    out = lines(result.output)
    assert "  Trace Graph  91a3f1c2" in out
    assert "  POST /create_order · 200 OK · 194ms" in out
    tree = out[out.index("  Trace Graph  91a3f1c2") + 2:][:5]
    assert [line.split()[0:2] for line in tree] == [
        ["gateway", "194ms"], ["└─", "create_order"], ["├─", "db.insert(orders)"], ["├─", "stripe.charge"], ["└─", "slack.notify"],
    ]
    assert tree[2].startswith("     ├─ ")
    assert {len(line) for line in tree} == {len(tree[0])}  # one right-aligned column
    assert tree[4].endswith(" 429")


def test_trace_aligns_durations_after_wide_characters_in_span_names(conn, dsn):
    ensure_schema(conn)
    gw = span("gateway", "server", "gateway", ms=9, http__status_code=200)
    fn = span("order", "internal", "function", parent=gw, ms=8)
    wide = span("注文を作成する🚀", "internal", "step", parent=fn, start=1, ms=5)  # 2 cells a character
    spans = [gw, fn, wide, span("db.insert(orders)", "client", "db", parent=wide, start=2, ms=3)]
    insert_traces(conn, [trace(OK, spans=spans)])
    for command in ("trace", "why"):
        out = lines(invoke(dsn, command, OK).output)
        rows = [line for line in out if line.endswith("ms") and "·" not in line]
        assert len(rows) == (4 if command == "trace" else 3)
        assert {cell_len(line) for line in rows} == {cell_len(rows[0])}, out  # one right-aligned column


def test_trace_cuts_a_long_span_name_rather_than_push_every_duration_right(conn, dsn):
    ensure_schema(conn)
    gw = span("gateway", "server", "gateway", ms=9, http__status_code=200)
    fn = span("order", "internal", "function", parent=gw, ms=8)
    long = span("reconcile " + "x" * 500, "internal", "step", parent=fn, start=1, ms=5)
    insert_traces(conn, [trace(OK, spans=[gw, fn, long])])
    out = lines(invoke(dsn, "trace", OK).output)
    rows = [line for line in out if line.endswith("ms") and "·" not in line]
    assert len(rows) == 3 and max(len(line) for line in rows) < 100
    assert "x…" in rows[2]
    assert json.loads(invoke(dsn, "trace", OK, "--json").stdout)["spans"][2]["name"] == "reconcile " + "x" * 500


def test_requests_aligns_columns_after_wide_characters(conn, dsn):
    ensure_schema(conn)
    insert_traces(conn, [trace(OK, path="/注文"), trace(OK2, path="/orders", ago=timedelta(minutes=2))])
    out = lines(invoke(dsn, "requests").output)
    assert len({line.index("create_order") for line in out[1:]}) == 2  # in characters, not cells
    assert len({cell_len(line[:line.index("create_order")]) for line in out[1:]}) == 1


def test_requests_cuts_a_long_path_rather_than_widen_every_line(conn, dsn):
    ensure_schema(conn)
    long = "/" + "x" * 5000
    insert_traces(conn, [trace(OK, path=long), trace(OK2, path="/orders", ago=timedelta(minutes=2))])
    out = lines(invoke(dsn, "requests").output)
    assert max(cell_len(line) for line in out) < 200
    assert "POST /xxx" in out[1] and "x… " in out[1] and "POST /orders" in out[2]
    assert json.loads(invoke(dsn, "requests", "--json").stdout)[0]["path"] == long


def test_trace_of_a_query_in_a_loop_shows_the_runs_ends_and_one_line_for_the_rest(conn, dsn):
    ensure_schema(conn)
    gw = span("gateway", "server", "gateway", ms=900, http__status_code=500)
    fn = span("loop", "internal", "function", parent=gw, ms=899)
    queries = [span("db.select", "client", "db", parent=fn, start=n, ms=0.5 if n != 7 else 40) for n in range(1000)]
    queries[500] = span("db.select", "client", "db", parent=fn, start=500, ms=1, error="boom (SQLSTATE 22012)",
                        db__sqlstate="22012")
    insert_traces(conn, [trace(OK, status=500, spans=[gw, fn, *queries])])
    out = lines(invoke(dsn, "trace", OK).output)
    tree = out[out.index("  Trace Graph  91a3f1c2") + 2:out.index("  ── Spans: 1002  ·  Errors: 1  ·  DB writes: 0")]
    assert [line.split()[-1] for line in tree] == ["900ms", "899ms", "0.5ms", "0.5ms", "40ms", "0.5ms", "22012", "0.5ms",
                                                   "0.5ms", "0.5ms", "0.5ms"]
    assert tree[4].split("─ ")[1].startswith("… 497 more db.select, --json has each") and tree[4].endswith("0.5ms to 40ms")
    assert tree[9].split("─ ")[1].startswith("… 496 more db.select, --json has each")
    assert tree[6].endswith("22012")  # a failure is never folded away
    assert len(json.loads(invoke(dsn, "trace", OK, "--json").stdout)["spans"]) == 1002


def test_trace_shows_a_short_run_of_like_calls_one_by_one(seeded, dsn):
    out = lines(invoke(dsn, "trace", OK).output)
    assert not any("more" in line for line in out)


def test_trace_summary_counts_spans_failures_and_db_writes(seeded, dsn):
    out = invoke(dsn, "trace", OK).output
    assert "── Spans: 5  ·  Errors: 1  ·  DB writes: 1" in out


def test_trace_of_a_timeout_shows_timeout_and_the_status_phrase(seeded, dsn):
    out = lines(invoke(dsn, "trace", "550e8400").output)
    assert "  POST /signup · 500 Internal Server Error · 44ms" in out
    assert any(line.startswith("     └─ stripe.create") and line.endswith("timeout") for line in out)
    assert "  ── Spans: 4  ·  Errors: 1  ·  DB writes: 0" in out


def test_trace_says_what_the_record_left_out_past_its_limits(conn, dsn):
    ensure_schema(conn)
    gw = span("gateway", "server", "gateway", ms=9, http__status_code=200)
    fn = span("many", "internal", "function", parent=gw, ms=8, flux__spans_dropped=100, flux__steps_dropped=5)
    record = trace(OK, spans=[gw, fn])
    tape = {**record.recording, "truncated": True, "events": [[n, "random", 0.5] for n in range(10_000)]}
    insert_traces(conn, [dataclasses.replace(record, recording=tape)])
    out = invoke(dsn, "trace", OK).output
    assert "note: 100 ctx.db and ctx.fetch calls past the first 1,000 are not in the trace, only counted." in out
    assert "note: 5 steps past the first 1,000 are not in the trace, only counted." in out
    assert "note: The recording is cut short: it holds the first 10,000 events" in out
    assert len(json.loads(invoke(dsn, "trace", OK, "--json").stdout)["notes"]) == 3
    assert "5 steps past the first 1,000" in invoke(dsn, "why", OK).output


def test_trace_of_committed_writes_the_mutation_log_lacks_says_so_rather_than_only_zero(conn, dsn):
    ensure_schema(conn)  # the engine behind (or the table not captured): the insert has no row change yet
    insert_traces(conn, [trace(OK)])
    out = invoke(dsn, "trace", OK).output
    assert "DB writes: 0" in out
    assert "note: The trace shows 1 write(s) but the mutation log has no row change of this request" in out
    assert "has the engine caught up" in json.loads(invoke(dsn, "trace", OK, "--json").stdout)["notes"][0]


def test_trace_of_a_write_the_mutation_log_holds_part_of_says_so(conn, dsn):
    """"DB writes: 1" for an insert that reported 2 rows read as all there was."""
    ensure_schema(conn)
    spans = ok_spans()
    spans[2]["attributes"]["db.rows"] = 2
    insert_traces(conn, [trace(OK, spans=spans)])
    mutation(conn, "orders", "insert", request_id=OK, key={"id": 1}, new={"id": 1})
    out = invoke(dsn, "trace", OK).output
    assert "DB writes: 1" in out
    assert "note: The trace's statements reported 2 row change(s); the mutation log has 1 of this request" in out


def test_trace_of_a_rolled_back_or_logged_request_has_no_notes(seeded, dsn):
    assert json.loads(invoke(dsn, "trace", FAIL, "--json").stdout)["notes"] == []  # rolled back: nothing to log
    assert json.loads(invoke(dsn, "trace", OK, "--json").stdout)["notes"] == []  # its write is logged


def test_trace_json_is_the_record_with_db_writes(seeded, dsn):
    result = invoke(dsn, "trace", OK, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["id"] == OK and data["status"] == 200 and data["db_writes"] == 1
    assert [s["name"] for s in data["spans"]][:2] == ["gateway", "create_order"]
    assert data["recording"]["v"] == 2


def test_trace_whose_row_changes_were_pruned_says_its_db_writes_are_unknown(seeded, dsn):
    old = "c0ffee00-0000-4000-8000-000000000006"
    insert_traces(seeded, [trace(old, ago=timedelta(days=40))])
    seeded.execute(  # its row change, which the prune deletes
        "INSERT INTO flux.state_mutations (request_id, schema_name, table_name, op, row_key, new, xid, commit_lsn,"
        " commit_time, seq) VALUES (%s, 'public', 'orders', 'insert', '{\"id\": 9}', '{\"id\": 9}', 7, '0/10',"
        " now() - interval '40 days', 0)", (old,))
    prune(seeded, older_than=timedelta(days=30), traces=False)
    out = invoke(dsn, "trace", "c0ffee00").output
    assert "DB writes: unknown (row changes committed before " in out and " UTC were pruned)" in out
    assert json.loads(invoke(dsn, "trace", "c0ffee00", "--json").stdout)["db_writes_pruned"] is True
    assert json.loads(invoke(dsn, "trace", OK, "--json").stdout)["db_writes_pruned"] is False


def test_trace_not_found_after_a_prune_says_traces_were_deleted_by_retention(seeded, dsn):
    prune(seeded, older_than=timedelta(days=1), mutations=False)
    result = invoke(dsn, "trace", OK2)
    assert isinstance(result.exception, NotFoundError)
    assert "were deleted by retention" in result.exception.hint


def test_why_of_a_request_not_found_after_a_prune_says_what_retention_deleted(seeded, dsn):
    """An id copied from an old ticket or log: flux trace said its trace may have been pruned, flux why did not."""
    seeded.execute(  # a row change the prune deletes, so that it records its cutoff
        "INSERT INTO flux.state_mutations (request_id, schema_name, table_name, op, row_key, xid, commit_lsn,"
        " commit_time, seq) VALUES (%s, 'public', 'orders', 'insert', '{\"id\": 9}', 7, '0/10', now() - interval '40 days', 0)",
        (OK2,))
    prune(seeded, older_than=timedelta(days=1))
    result = invoke(dsn, "why", OK2)
    assert isinstance(result.exception, NotFoundError)
    assert result.exception.hint.startswith("`flux requests` lists recent requests. Traces that started before ")
    assert " UTC and row changes committed before " in result.exception.hint
    assert result.exception.hint.endswith(" UTC were deleted by retention.")


def test_trace_ambiguous_prefix_names_the_candidates(seeded, dsn):
    result = invoke(dsn, "trace", "91a3f")
    assert isinstance(result.exception, AmbiguousError)
    assert OK in result.exception.hint and OK2 in result.exception.hint


def test_trace_unknown_id_is_not_found(seeded, dsn):
    result = invoke(dsn, "trace", "deadbeef")
    assert isinstance(result.exception, NotFoundError)


def test_trace_too_short_a_prefix_is_a_usage_error(seeded, dsn):
    result = invoke(dsn, "trace", "550")
    assert isinstance(result.exception, ConfigError)


def test_trace_error_exits_with_a_hint_through_main(seeded, dsn):
    proc = subprocess.run([sys.executable, "-m", "flux", "trace", "deadbeef", "--database", dsn],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == NotFoundError.exit_code
    assert "error:" in proc.stderr and "hint:" in proc.stderr


# -- flux why --------------------------------------------------------------------------------


def test_why_shows_the_seed_execution_block(seeded, dsn):
    result = invoke(dsn, "why", "550e8400")
    assert result.exit_code == 0, result.output
    out = lines(result.output)
    assert "  Execution  550e8400" in out
    assert "  POST /signup  →  function: create_user" in out
    assert any(line.endswith(" UTC  ·  44ms") for line in out)
    spans = out[out.index("  Spans") + 1:][:3]
    assert [line.split()[0] for line in spans] == ["create_user", "db.insert(users)", "stripe.create"]
    assert spans[1].startswith("    db.insert(users)") and spans[2].endswith("timeout")
    assert "  Status  500 — Stripe API timeout" in out


def test_why_names_the_last_failed_call_before_an_error_the_function_threw_itself_and_says_so(seeded, dsn):
    out = lines(invoke(dsn, "why", FAIL).output)
    at = out.index("  Root cause  (the last call that failed before the function threw)")
    assert out[at + 1:at + 5] == [
        "    stripe.create  timeout after 3000 ms",
        "    call made at functions/signup.js:6:26",
        "    then the function threw  Error: Stripe API timeout",
        "    thrown at functions/signup.js:7:11",
    ]


def test_why_names_the_call_whose_error_was_thrown_and_lists_the_handled_one_apart(conn, dsn):
    ensure_schema(conn)
    error = 'duplicate key value violates unique constraint "tags_pkey" (SQLSTATE 23505)'
    insert_traces(conn, [trace(FAIL, status=500, error=f"DatabaseError: {error}", spans=retry_spans())])
    out = lines(invoke(dsn, "why", FAIL).output)
    at = out.index("  Root cause")
    assert out[at + 1:at + 3] == [f"    db.insert(tags)  {error}", "    thrown at functions/retry.js:6:16"]
    assert out[at + 3:at + 5] == ["  Other failed calls", "    stub.limit  HTTP 429 Too Many Requests  at functions/retry.js:3:21"]


def test_why_json_gives_the_same_cause_and_failures_as_the_text(conn, dsn):
    ensure_schema(conn)
    insert_traces(conn, [trace(FAIL, status=500, error="DatabaseError: syntax error", spans=nested_spans())])
    data = json.loads(invoke(dsn, "why", FAIL, "--json").stdout)
    cause = data["cause"]
    assert (cause["span"], cause["label"], cause["link"], cause["thrown_at"], cause["call_site"]) == (
        "db.query", "42601", "same_error", "functions/nested.js:8:16", "functions/nested.js:8:16")
    assert [(f["span"], f["label"]) for f in data["failures"]] == [("stub.flaky", "500")]
    assert data["failure_count"] == 1


def test_why_says_a_failed_request_changed_no_rows(seeded, dsn):
    out = invoke(dsn, "why", FAIL).output
    assert "Rows changed" not in out
    assert "note: The request changed no rows: its transaction was rolled back." in out


def test_why_lists_rows_changed_with_history_hints(seeded, dsn):
    out = lines(invoke(dsn, "why", NO_TRACE[:8]).output)
    assert "    users  update  id = 42" in out
    assert "      flux state history users --id 42" in out
    assert "    members  update  org = 1, id = a" in out
    assert "      flux state history members --key org=1 --key id=a" in out


def test_why_of_many_rows_shows_the_first_ones_and_counts_per_table_and_op(conn, dsn):
    ensure_schema(conn)
    bulk_mutations(conn, "users", "insert", 19_990, request_id=NO_TRACE)
    bulk_mutations(conn, "audit", "update", 10, request_id=NO_TRACE)
    out = lines(invoke(dsn, "why", NO_TRACE).output)
    assert len(out) < 70
    at = out.index("  Rows changed  20,000 in 2 tables; the first 20 shown")
    assert out[at + 1:at + 3] == ["    users  insert  id = 1", "      flux state history users --id 1"]
    assert out[at + 41:at + 48] == [
        "    … and 19,980 more", "  Rows changed by table",
        "    users  19,990 rows: 19,990 insert", "      flux state blame users",
        "    audit  10 rows: 10 update", "      flux state blame audit", "  note: No trace was recorded for this request, only"
        " its 20,000 row change(s): it was served with tracing off, by another Flux, or its trace was lost before it was written."]


def test_why_json_bounds_the_rows_and_says_so(conn, dsn):
    ensure_schema(conn)
    bulk_mutations(conn, "users", "insert", 25, request_id=NO_TRACE)
    data = json.loads(invoke(dsn, "why", NO_TRACE, "--json").stdout)
    assert (len(data["mutations"]), data["mutation_count"], data["mutations_truncated"]) == (20, 25, True)
    assert data["tables"] == [{"schema": "public", "table": "users", "rows": 25, "ops": {"insert": 25}}]
    everything = json.loads(invoke(dsn, "why", NO_TRACE, "--json", "--rows", "25").stdout)
    assert (len(everything["mutations"]), everything["mutations_truncated"]) == (25, False)


def test_why_without_a_trace_says_so(seeded, dsn):
    out = invoke(dsn, "why", NO_TRACE).output
    assert "function: set_role  (no trace recorded)" in out
    assert "No trace was recorded for this request" in out


def test_why_of_a_succeeded_request_shows_the_handled_failure(seeded, dsn):
    out = lines(invoke(dsn, "why", OK).output)
    assert "  Status  200 OK" in out
    assert "  Root cause" not in out
    at = out.index("  Failed calls  (handled: the request succeeded)")
    assert out[at + 1] == "    slack.notify  HTTP 429  at functions/create_order.js:14:9"
    assert "      flux state history orders --id 1" in out


def test_why_of_a_succeeded_request_lists_every_handled_failure(conn, dsn):
    ensure_schema(conn)
    fn = span("three", "internal", "function")
    calls = [span("a.one", "client", "fetch", parent=fn, start=1, error="HTTP 429 Too Many Requests", http__status_code=429),
             span("b.two", "client", "fetch", parent=fn, start=2, error="HTTP 500 Internal Server Error", http__status_code=500),
             span("db.query", "client", "db", parent=fn, start=3, error="syntax error (SQLSTATE 42601)", db__sqlstate="42601")]
    insert_traces(conn, [trace(OK, spans=[fn, *calls])])
    out = lines(invoke(dsn, "why", OK).output)
    at = out.index("  Failed calls  (handled: the request succeeded)")
    assert out[at + 1:at + 4] == ["    a.one  HTTP 429 Too Many Requests", "    b.two  HTTP 500 Internal Server Error",
                                  "    db.query  syntax error (SQLSTATE 42601)"]


def test_why_bounds_the_failed_calls_it_lists(conn, dsn):
    ensure_schema(conn)
    fn = span("loop", "internal", "function")
    calls = [span(f"call.{n}", "client", "fetch", parent=fn, start=n, error="HTTP 429", http__status_code=429) for n in range(15)]
    insert_traces(conn, [trace(OK, spans=[fn, *calls])])
    out = lines(invoke(dsn, "why", OK).output)
    at = out.index("  Failed calls  (handled: the request succeeded)")
    assert out[at + 10:at + 12] == ["    call.9  HTTP 429", "    … and 5 more (flux trace shows them all)"]


def test_why_json_has_cause_mutations_and_notes(seeded, dsn):
    result = invoke(dsn, "why", NO_TRACE, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["request_id"] == NO_TRACE and data["trace"] is None and data["cause"] is None
    assert [(m["table"], m["op"], m["row_key"]) for m in data["mutations"]] == [
        ("members", "update", {"org": 1, "id": "a"}), ("users", "update", {"id": 42})]
    assert data["notes"] and "No trace" in data["notes"][0]
    cause = json.loads(invoke(dsn, "why", FAIL, "--json").stdout)["cause"]
    assert cause["span"] == "stripe.create" and cause["thrown_at"] == "functions/signup.js:7:11"


def test_why_of_an_unknown_request_is_not_found(seeded, dsn):
    result = invoke(dsn, "why", "deadbeef")
    assert isinstance(result.exception, NotFoundError)


def gateway_only(request_id: str, status: int, error: str, *, function: str | None = "hello") -> TraceRecord:
    """A trace of a request the gateway answered itself: its own span, no function span under it."""
    gw = span("gateway", "server", "gateway", ms=0.3, error=error, http__status_code=status)
    return trace(request_id, function=function, status=status, path="/hello", error=error, spans=[gw], ms=0.3)


def test_why_of_a_request_without_a_valid_api_key_says_it_was_not_routed(conn, dsn):
    ensure_schema(conn)
    insert_traces(conn, [gateway_only("a0000401-0000-4000-8000-000000000001", 401, "missing or invalid API key",
                                      function=None)])
    out = lines(invoke(dsn, "why", "a0000401").output)
    assert "  POST /hello  →  not routed: no valid API key" in out


def test_why_of_a_request_stopped_at_the_gateway_says_the_function_did_not_run(conn, dsn):
    ensure_schema(conn)
    insert_traces(conn, [gateway_only("a0000413-0000-4000-8000-000000000001", 413, "the request body is over the 10-byte limit"),
                         gateway_only("a0000400-0000-4000-8000-000000000001", 400, "the request body is not valid JSON")])
    too_big = lines(invoke(dsn, "why", "a0000413").output)
    assert "  POST /hello  →  function: hello  (not run: the request body is over max_body_bytes)" in too_big
    not_json = lines(invoke(dsn, "why", "a0000400").output)
    assert "  POST /hello  →  function: hello  (not run: the request body is not valid JSON)" in not_json


def test_why_of_a_request_refused_at_capacity_says_so_in_its_not_run(conn, dsn):
    ensure_schema(conn)
    insert_traces(conn, [gateway_only("a0000503-0000-4000-8000-000000000001", 503,
                                      "the server is at capacity: 0 request(s) already wait for one of 2 workers")])
    out = lines(invoke(dsn, "why", "a0000503").output)
    assert "  POST /hello  →  function: hello  (not run: the server was at capacity, or stopping)" in out


def test_why_says_a_returned_4xx_was_the_functions_own_answer_in_text_and_json(conn, dsn):
    ensure_schema(conn)
    insert_traces(conn, [trace(FAIL, status=404, error="no such widget 7", spans=returned_spans(404, "no such widget 7"))])
    out = lines(invoke(dsn, "why", FAIL).output)
    at = out.index("  Root cause  (the function's own answer)")
    assert out[at + 1] == "    widget  returned 404: no such widget 7"
    cause = json.loads(invoke(dsn, "why", FAIL, "--json").stdout)["cause"]
    assert (cause["span"], cause["kind"], cause["link"], cause["error"]) == ("widget", "function", "own", "returned 404: no such widget 7")


def test_why_of_a_returned_5xx_after_a_failed_call_names_the_call_and_says_how(conn, dsn):
    ensure_schema(conn)
    timeout = span("stripe.create", "client", "fetch", start=2, ms=2000, error="stripe.create: no response within 2000 ms",
                   timeout=True, code__location="functions/create_user.js:31:21")
    insert_traces(conn, [trace(FAIL, status=500, error="Stripe API timeout", spans=returned_spans(500, "Stripe API timeout", timeout))])
    out = lines(invoke(dsn, "why", FAIL).output)
    at = out.index("  Root cause  (the last call that failed before the function returned 500)")
    assert out[at + 1:at + 3] == ["    stripe.create  timeout  stripe.create: no response within 2000 ms",
                                  "    call made at functions/create_user.js:31:21"]


def test_why_of_a_trace_with_writes_but_no_logged_rows_asks_about_capture(seeded, dsn):
    insert_traces(seeded, [trace("c0ffee00-0000-4000-8000-000000000004")])
    out = invoke(dsn, "why", "c0ffee00").output
    assert "the mutation log has no row change of this request" in out and "flux attach" in out


# -- flux requests ---------------------------------------------------------------------------


def test_requests_lists_newest_first_with_every_column(seeded, dsn):
    result = invoke(dsn, "requests")
    assert result.exit_code == 0, result.output
    out = lines(result.output)
    assert out[0].split() == ["ID", "TIME", "(UTC)", "TENANT", "REQUEST", "FUNCTION", "STATUS", "DURATION", "ERROR"]
    assert [line.split()[0] for line in out[1:]] == [OK[:8], FAIL[:8], OK2[:8]]
    fail = out[2].split()
    assert fail[3:] == ["acme", "POST", "/signup", "create_user", "500", "44ms", "Stripe", "API", "timeout"]
    assert out[1].split()[3] == "default"


def test_requests_shows_an_id_longer_where_another_requests_id_starts_the_same(seeded, dsn):
    """Among the 500,000 traces of "At scale" about 29 pairs share their first 8 characters: shown as
    8, each of them was an id that `flux trace` and `flux why` refuse as ambiguous."""
    twin, mutations_only = OK[:8] + "-ffff-4000-8000-000000000009", FAIL[:13] + "-ffff-000000000000"
    insert_traces(seeded, [trace(twin)])
    mutation(seeded, "orders", "insert", request_id=mutations_only, key={"id": 9}, function="create_order")
    shown = [line.split()[0] for line in lines(invoke(dsn, "requests").output)[1:]]
    assert sorted(shown) == sorted([OK[:13], twin[:13], FAIL, OK2[:8]])
    assert all(invoke(dsn, "why", prefix).exit_code == 0 for prefix in shown)


def test_trace_and_why_head_their_output_with_an_id_that_names_one_request(seeded, dsn):
    """Their headers showed the id's first 8 characters, which may start another request's id too."""
    insert_traces(seeded, [trace(OK[:8] + "-ffff-4000-8000-000000000009")])
    mutation(seeded, "orders", "insert", request_id=FAIL[:13] + "-ffff-000000000000", key={"id": 9}, function="create_order")
    for request_id, shown in ((OK, OK[:13]), (FAIL, FAIL), (OK2, OK2[:8]), (NO_TRACE, NO_TRACE[:8])):
        assert f"  Execution  {shown}" in lines(invoke(dsn, "why", request_id).output)
        assert find_request(seeded, shown)[0] == request_id
        assert json.loads(invoke(dsn, "why", request_id, "--json").stdout)["request_id"] == request_id
        if request_id != NO_TRACE:
            assert f"  Trace Graph  {shown}" in lines(invoke(dsn, "trace", request_id).output)
            assert get_trace(seeded, shown).id == request_id
            assert json.loads(invoke(dsn, "trace", request_id, "--json").stdout)["id"] == request_id


def test_why_explains_a_request_whose_id_its_writer_made_shorter_than_four_characters(seeded, dsn):
    """flux state showed `req:42`, and flux why refused it as too short to look up."""
    mutation(seeded, "users", "insert", request_id="42", key={"id": 7}, function="import")
    assert "req:42" in invoke(dsn, "state", "history", "users", "--id", "7").output
    result = invoke(dsn, "why", "req:42")
    assert result.exit_code == 0, result.output
    assert "  Execution  42" in lines(result.output)


def test_requests_of_a_single_tenant_project_leave_the_tenant_column_out(seeded, dsn):
    out = lines(invoke(dsn, "requests", "--tenant", "default").output)
    assert out[0].split() == ["ID", "TIME", "(UTC)", "REQUEST", "FUNCTION", "STATUS", "DURATION", "ERROR"]
    assert [line.split()[0] for line in out[1:]] == [OK[:8]]


def test_requests_filters_by_status_function_tenant_and_since(seeded, dsn):
    def ids(*args: str) -> list[str]:
        result = invoke(dsn, "requests", *args)
        assert result.exit_code == 0, result.output
        return [line.split()[0] for line in lines(result.output)[1:]]

    assert ids("--status", "5xx") == [FAIL[:8]]
    assert ids("--status", "2xx") == [OK[:8], OK2[:8]]
    assert ids("--function", "list_orders") == [OK2[:8]]
    assert ids("--tenant", "acme") == [FAIL[:8], OK2[:8]]
    assert ids("--since", "1h") == [OK[:8], FAIL[:8]]
    assert ids("--limit", "1") == [OK[:8]]


def test_requests_json_lists_summaries(seeded, dsn):
    data = json.loads(invoke(dsn, "requests", "--status", "error", "--json").stdout)
    assert [(r["id"], r["status"], r["function"], r["error"]) for r in data] == [(FAIL, 500, "create_user", "Stripe API timeout")]


def test_requests_clips_a_long_database_error_before_its_sqlstate(conn, dsn):
    ensure_schema(conn)
    error = 'DatabaseError: duplicate key value violates unique constraint "tags_pkey" (SQLSTATE 23505)'
    insert_traces(conn, [trace(FAIL, status=500, error=error, spans=retry_spans())])
    (row,) = lines(invoke(dsn, "requests").output)[1:]
    assert row.endswith("  DatabaseError: duplicate key value violate… (SQLSTATE 23505)")


def test_requests_keeps_a_sqlstate_from_the_middle_of_a_long_error(conn, dsn):
    ensure_schema(conn)
    error = ("TransactionAborted: the handler returned 200, but its transaction was rolled back: db.insert(tags):"
             ' duplicate key value violates unique constraint "tags_pkey" (SQLSTATE 23505) failed, and the function went on')
    insert_traces(conn, [trace(FAIL, status=500, error=error, spans=retry_spans())])
    (row,) = lines(invoke(dsn, "requests").output)[1:]
    assert row.endswith("  TransactionAborted: the handler returned… (SQLSTATE 23505)…")


def test_requests_clips_a_long_error_without_a_sqlstate_at_its_end(conn, dsn):
    ensure_schema(conn)
    insert_traces(conn, [trace(FAIL, status=500, error="x" * 100, spans=retry_spans())])
    (row,) = lines(invoke(dsn, "requests").output)[1:]
    assert row.endswith("  " + "x" * 59 + "…")


def test_requests_with_nothing_matching_says_so(seeded, dsn):
    assert "No recorded request matches these filters" in invoke(dsn, "requests", "--status", "4xx").output


def test_requests_on_an_empty_store_says_nothing_is_recorded_yet(conn, dsn):
    ensure_schema(conn)
    assert "No requests recorded yet" in invoke(dsn, "requests").output


def test_requests_bad_since_is_a_usage_error(seeded, dsn):
    result = invoke(dsn, "requests", "--since", "yesterday")
    assert isinstance(result.exception, ConfigError)


@pytest.mark.parametrize(("text", "expected"), [("30s", timedelta(seconds=30)), ("10m", timedelta(minutes=10)),
                                                ("2h", timedelta(hours=2)), ("1d", timedelta(days=1)),
                                                ("1.5h", timedelta(minutes=90))])
def test_parse_since_units(text, expected):
    assert parse_since(text) == expected


def test_gateway_only_trace_shows_its_status_on_the_gateway_span(conn, dsn):
    seed(conn)
    gw = span("gateway", "server", "gateway", ms=0.3, error="no route for GET /nope", http__status_code=404)
    insert_traces(conn, [trace("0badf00d-0000-4000-8000-000000000005", function=None, status=404, path="/nope",
                               error="no route for GET /nope", spans=[gw], ms=0.3)])
    out = lines(invoke(dsn, "trace", "0badf00d").output)
    assert "  POST /nope · 404 Not Found · 0.3ms" in out
    assert any(line.startswith("  gateway") and line.endswith("404") for line in out)


def test_every_trace_command_has_help():
    for command in ("trace", "why", "requests"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "--database" in result.output and "--json" in result.output


@pytest.mark.parametrize("since", ["1000000000d", "999999999d", "36501d"])
def test_requests_since_past_a_hundred_years_is_a_usage_error(seeded, dsn, since):
    result = invoke(dsn, "requests", "--since", since)
    assert isinstance(result.exception, ConfigError) and "too long" in str(result.exception)


def test_requests_limit_past_the_maximum_is_a_usage_error_not_a_database_error(seeded, dsn):
    result = invoke(dsn, "requests", "-n", "99999999999999999999")
    assert isinstance(result.exception, ConfigError) and "--limit" in str(result.exception)


def test_why_of_a_refusal_by_an_aborted_transaction_names_the_statement_that_aborted_it(conn, dsn):
    ensure_schema(conn)
    insert_traces(conn, [trace(FAIL, status=500, spans=aborted_spans(), error="DatabaseError: current transaction is aborted")])
    out = lines(invoke(dsn, "why", FAIL).output)
    at = out.index("  Root cause  (it aborted the transaction; the function went on, and threw a later statement's refusal)")
    assert out[at + 1] == '    db.insert(items)  duplicate key value violates unique constraint "items_pkey" (SQLSTATE 23505)'
    assert out[at + 2:at + 5] == [
        "    call made at functions/save.js:3:18",
        "    then the function threw  DatabaseError: current transaction is aborted, commands ignored until end of"
        " transaction block (SQLSTATE 25P02)",
        "    thrown at functions/save.js:7:16"]


def test_why_lists_the_errors_a_request_that_succeeded_logged(conn, dsn):
    ensure_schema(conn)
    rejection = {"level": "error", "message": "Unhandled promise rejection: Error: in a timer", "exception.type": "Error",
                 "exception.message": "in a timer", "exception.stacktrace": "Error: in a timer\n    at eval (functions/t.js:2:28)"}
    gw = span("gateway", "server", "gateway", ms=9, http__status_code=200)
    fn = span("t", "internal", "function", parent=gw, ms=8, events=[
        {"name": "log", "time": 1764880000005.0, "attributes": rejection}])
    insert_traces(conn, [trace(OK, spans=[gw, fn])])
    out = lines(invoke(dsn, "why", OK).output)
    at = out.index("  Errors logged")
    assert out[at + 1] == "    t  Unhandled promise rejection: Error: in a timer  at functions/t.js:2:28"
    data = json.loads(invoke(dsn, "why", OK, "--json").stdout)
    assert data["logged_error_count"] == 1 and data["logged_errors"][0]["at"] == "functions/t.js:2:28"


def test_why_shows_a_logged_errors_carriage_return_and_what_follows_it(conn, dsn):
    """Only the stack, below the message's first newline, is left out: a carriage return (or a form feed,
    a U+2028) is no line break there, and what a function logged after it must not vanish."""
    ensure_schema(conn)
    logged = {"level": "error", "message": "Error: paid\rnot paid\u2028really", "exception.type": "Error",
              "exception.message": "paid\rnot paid\u2028really",
              "exception.stacktrace": "Error: paid\rnot paid\u2028really\n    at eval (functions/t.js:2:28)"}
    gw = span("gateway", "server", "gateway", ms=9, http__status_code=200)
    fn = span("t", "internal", "function", parent=gw, ms=8, events=[
        {"name": "log", "time": 1764880000005.0, "attributes": logged}])
    insert_traces(conn, [trace(OK, spans=[gw, fn])])
    out = lines(invoke(dsn, "why", OK).output)
    assert out[out.index("  Errors logged") + 1] == "    t  Error: paid\\rnot paid\\u2028really  at functions/t.js:2:28"


def test_why_and_trace_of_a_time_limit_show_the_call_it_was_waiting_on_as_abandoned(conn, dsn):
    ensure_schema(conn)
    insert_traces(conn, [trace(FAIL, status=504, spans=waiting_spans(), error="TimeoutError: ...")])
    out = lines(invoke(dsn, "why", FAIL).output)
    at = out.index("    calls in flight when it was stopped, cut short:")
    assert out[at + 1] == "      stripe.charge  3.00s  at functions/pay.js:4:15"
    tree = lines(invoke(dsn, "trace", FAIL).output)
    assert any(line.startswith("     │  └─ stripe.charge") and line.endswith("abandoned") for line in tree), tree
    cause = json.loads(invoke(dsn, "why", FAIL, "--json").stdout)["cause"]
    assert [f["span"] for f in cause["in_flight"]] == ["stripe.charge"]


def test_requests_trace_and_why_never_pass_a_clients_escape_sequences_to_the_terminal(conn, dsn):
    """A path (and the 404 quoting it) is the client's, a span name or error the function's: ESC,
    BEL and the like are shown as their escapes, or they would recolour, retitle or worse the
    reader's terminal."""
    ensure_schema(conn)
    path = "/\x1b[31mRED\x1b]0;pwned\x07"
    gw = span("gateway", "server", "gateway", ms=1, http__status_code=500, error="boom\x1b[2J")
    fn = span("f", "internal", "function", parent=gw, ms=1, error="boom\x1b[2J",
              events=[exception("boom\x1b[2J", at=1, frames="    at default (functions/f.js:2:9)")])
    step = span("step\x1b]8;;http://evil\x07", "internal", "step", parent=fn, ms=1)
    insert_traces(conn, [trace(FAIL, status=500, path=path, error="boom\x1b[2J", spans=[gw, fn, step])])
    for args in (("requests",), ("trace", FAIL), ("why", FAIL)):
        out = invoke(dsn, *args).output
        assert "\x1b" not in out and "\x07" not in out, (args, out)
        assert "\\u001b" in out
    assert "/\\u001b[31mRED\\u001b]0;pwned\\u0007" in invoke(dsn, "requests").output
    assert json.loads(invoke(dsn, "trace", FAIL, "--json").stdout)["path"] == path  # --json has it as it is


def test_an_ambiguous_prefix_error_shows_a_forged_ids_escape_sequences_as_escapes(conn, dsn):
    """A request id in the mutation log is what a transaction's context said: any writer's text."""
    ensure_schema(conn)
    bulk_mutations(conn, "users", "insert", 1, request_id="abcd\x1b]0;pwned\x07")
    bulk_mutations(conn, "users", "insert", 1, request_id="abcd-2", first_id=2)
    proc = subprocess.run([sys.executable, "-m", "flux", "why", "abcd", "--database", dsn],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == AmbiguousError.exit_code
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr and "abcd\\u001b]0;pwned\\u0007" in proc.stderr


def test_the_readme_documents_every_key_of_the_json_of_why_and_requests():
    import re
    from pathlib import Path

    from flux.store.traces import TraceSummary
    from flux.store.why import FailedCall, LoggedError, RootCause, RowChange, TableChanges, Why

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    documented = set(re.findall(r"`([a-z_]+)`", readme))
    for kind in (Why, RootCause, FailedCall, LoggedError, RowChange, TableChanges, TraceSummary):
        missing = {f.name for f in dataclasses.fields(kind)} - documented
        assert not missing, (kind.__name__, missing)


# -- a role that may only read ---------------------------------------------------------------


def test_the_read_commands_work_for_a_role_that_may_only_read_the_flux_schema(seeded, conn, dsn):
    """A support engineer's role: USAGE on flux and SELECT on its tables, nothing else. The read
    commands run no DDL and write nothing, so none needs more."""
    conn.execute("CREATE ROLE flux_support LOGIN")
    try:
        conn.execute("GRANT USAGE ON SCHEMA flux TO flux_support; GRANT SELECT ON ALL TABLES IN SCHEMA flux TO flux_support")
        reader = dsn.replace("postgres@", "flux_support@")
        for command in (["trace", OK[:8]], ["why", OK[:8]], ["requests"], ["state", "history", "users", "--id", "42"],
                        ["state", "blame", "users"]):
            result = invoke(reader, *command)
            assert result.exit_code == 0, (command, result.output)
    finally:
        conn.execute("DROP OWNED BY flux_support; DROP ROLE flux_support")
