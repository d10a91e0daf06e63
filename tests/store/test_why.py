"""`flux why`'s library half: the request's row changes, its root cause, and what is missing."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from flux.errors import ConfigError
from flux.gateway.traces import TraceWriter
from flux.store.retention import prune
from flux.store.schema import ensure_schema
from flux.store.traces import TraceRecord, insert_traces
from flux.store.why import MAX_FAILURES, MAX_ROWS, explain, request_mutations, root_cause
from tests.functions import Stub, running_gateway, write_project
from tests.traces_seed import (
    FAIL,
    NO_TRACE,
    OK,
    aborted_spans,
    bulk_mutations,
    mutation,
    new_tx,
    exception,
    nested_spans,
    retry_spans,
    returned_spans,
    span,
    trace,
    waiting_spans,
)


# -- mutations -------------------------------------------------------------------------------


def test_request_mutations_in_commit_order(seeded):
    changes = request_mutations(seeded, NO_TRACE)
    assert [(c.table, c.op, c.row_key) for c in changes] == [("members", "update", {"org": 1, "id": "a"}),
                                                            ("users", "update", {"id": 42})]
    assert changes[0].function == "set_role"


def test_request_mutations_show_a_composite_key_in_primary_key_order(seeded):
    assert list(request_mutations(seeded, NO_TRACE)[0].row_key) == ["org", "id"]


def test_request_mutations_with_a_limit_gives_the_first_rows(conn):
    ensure_schema(conn)
    bulk_mutations(conn, "users", "insert", 50, request_id=OK)
    assert [m.row_key for m in request_mutations(conn, OK, limit=3)] == [{"id": 1}, {"id": 2}, {"id": 3}]


def test_explain_of_a_request_that_changed_many_rows_gives_the_first_and_counts_all(conn):
    ensure_schema(conn)
    bulk_mutations(conn, "users", "insert", 19_990, request_id=OK)
    bulk_mutations(conn, "audit", "insert", 5, request_id=OK)
    bulk_mutations(conn, "users", "update", 5, request_id=OK, first_id=3)
    why = explain(conn, OK)
    assert [m.row_key for m in why.mutations] == [{"id": n} for n in range(1, MAX_ROWS + 1)]
    assert (why.mutation_count, why.mutations_truncated) == (20_000, True)
    assert [(t.table, t.rows, t.ops) for t in why.tables] == [
        ("users", 19_995, {"insert": 19_990, "update": 5}), ("audit", 5, {"insert": 5})]


def test_explain_rows_sets_how_many_changes_it_gives(conn):
    ensure_schema(conn)
    bulk_mutations(conn, "users", "insert", 30, request_id=OK)
    assert len(explain(conn, OK, rows=30).mutations) == 30 and not explain(conn, OK, rows=30).mutations_truncated
    assert len(explain(conn, OK, rows=5).mutations) == 5


def test_explain_rows_out_of_range_is_a_usage_error(seeded):
    with pytest.raises(ConfigError):
        explain(seeded, OK, rows=0)


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
    assert cause.link == "failed_before"  # the function threw an error of its own after the call failed


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


def test_explain_of_a_successful_request_lists_its_rows_and_the_handled_failure_with_no_root_cause(seeded):
    why = explain(seeded, OK)
    assert [(m.table, m.op, m.row_key) for m in why.mutations] == [("orders", "insert", {"id": 1})]
    assert why.notes == ()
    assert why.cause is None
    assert [(f.span, f.label, f.call_site) for f in why.failures] == [("slack.notify", "429", "functions/create_order.js:14:9")]


def test_explain_of_a_failed_request_that_only_read_does_not_say_rolled_back(conn):
    """The runtime records db.transaction = rolled_back for any statement, reads too: nothing was undone."""
    ensure_schema(conn)
    gw = span("gateway", "server", "gateway", ms=5, error="boom", http__status_code=500)
    fn = span("sel", "internal", "function", parent=gw, ms=4, error="boom", db__transaction="rolled_back",
              events=[exception("boom", at=4, frames="    at default (functions/sel.js:3:9)")])
    spans = [gw, fn, span("db.select", "client", "db", parent=fn, start=1, ms=1, db__statement="SELECT 1")]
    insert_traces(conn, [trace(FAIL, status=500, error="boom", spans=spans)])
    assert explain(conn, FAIL).notes == ("The request changed no rows.",)


def test_explain_of_a_failed_request_whose_only_write_failed_does_not_say_rolled_back(conn):
    ensure_schema(conn)
    spans = retry_spans()
    insert_traces(conn, [trace(FAIL, status=500, error="DatabaseError: duplicate key", spans=spans[:2] + spans[-1:])])
    assert explain(conn, FAIL).notes == ("The request changed no rows.",)


def test_explain_trusts_a_committed_transaction_when_the_log_has_no_rows(seeded):
    """A 500 whose transaction committed: its writes went to tables that are not captured."""
    gw = span("gateway", "server", "gateway", error="failed", http__status_code=500)
    fn = span("f", "internal", "function", parent=gw, db__transaction="committed")
    spans = [gw, fn, span("db.insert(unlogged)", "client", "db", parent=fn)]
    insert_traces(seeded, [trace("c0ffee00-0000-4000-8000-000000000005", status=500, spans=spans)])
    (note,) = explain(seeded, "c0ffee00").notes
    assert "rolled back" not in note and "flux attach" in note


def test_explain_notes_writes_the_log_did_not_record(seeded):
    insert_traces(seeded, [trace("c0ffee00-0000-4000-8000-000000000004")])
    (note,) = explain(seeded, "c0ffee00").notes
    assert "flux attach" in note


PARTLY = "c0ffee00-0000-4000-8000-000000000006"


def _three_rows_written(conn, logged: int) -> None:
    """A committed request whose insert reported 3 rows, `logged` of them in the mutation log."""
    gw = span("gateway", "server", "gateway", http__status_code=200)
    fn = span("f", "internal", "function", parent=gw, db__transaction="committed")
    insert_traces(conn, [trace(PARTLY, spans=[gw, fn, span("db.insert(items)", "client", "db", parent=fn, db__rows=3)])])
    tx = new_tx()
    for n in range(logged):
        mutation(conn, "items", "insert", request_id=PARTLY, key={"id": n}, new={"id": n}, tx=tx, seq=n)


def test_explain_notes_a_log_that_holds_fewer_rows_than_the_statements_reported(conn):
    """The count alone read as all there was: "1 row changed" while the engine had not caught up."""
    ensure_schema(conn)
    _three_rows_written(conn, logged=1)
    (note,) = explain(conn, PARTLY).notes
    assert note.startswith("The trace's statements reported 3 row change(s); the mutation log has 1 of this request")


def test_explain_has_no_note_when_the_log_holds_every_row_the_statements_reported(conn):
    ensure_schema(conn)
    _three_rows_written(conn, logged=3)
    assert explain(conn, PARTLY).notes == ()

def test_explain_of_a_gateway_only_request_blames_the_gateway(conn):
    ensure_schema(conn)
    gw = span("gateway", "server", "gateway", ms=0.3, error="no route for GET /nope", http__status_code=404)
    insert_traces(conn, [trace("0badf00d-0000-4000-8000-000000000005", function=None, status=404, path="/nope",
                               error="no route for GET /nope", spans=[gw], ms=0.3)])
    why = explain(conn, "0badf00d")
    assert why.cause is not None and (why.cause.span, why.cause.label, why.cause.thrown_at) == ("gateway", "404", None)
    assert any("never ran a function" in n for n in why.notes)


# -- root cause ------------------------------------------------------------------------------


def failed(request_id: str, spans: list[dict], *, status: int = 500, error: str | None = None) -> TraceRecord:
    return trace(request_id, status=status, error=error, spans=spans)


def test_the_root_cause_is_the_call_whose_error_was_thrown_not_an_earlier_handled_failure():
    cause = root_cause(failed(FAIL, retry_spans()))
    assert cause is not None
    assert (cause.span, cause.label, cause.link) == ("db.insert(tags)", "23505", "same_error")
    assert cause.exception.startswith("DatabaseError: duplicate key value")
    assert cause.thrown_at == cause.call_site == "functions/retry.js:6:16"


def test_a_failure_ignored_inside_nested_steps_is_not_the_root_cause():
    cause = root_cause(failed(FAIL, nested_spans()))
    assert cause is not None
    assert (cause.span, cause.label, cause.call_site, cause.thrown_at) == (
        "db.query", "42601", "functions/nested.js:8:16", "functions/nested.js:8:16")


def test_a_call_whose_error_the_function_wrapped_in_its_own_is_the_root_cause():
    spans = retry_spans()
    message = f"could not tag: {spans[-1]['error']}"
    spans[1]["events"] = [exception(message, at=59, frames="    at default (functions/retry.js:9:11)")]
    cause = root_cause(failed(FAIL, spans))
    assert cause is not None and (cause.span, cause.link, cause.thrown_at) == (
        "db.insert(tags)", "same_error", "functions/retry.js:9:11")


def test_a_thrown_error_of_the_functions_own_names_the_last_call_that_failed_before_it():
    spans = retry_spans()
    spans[1]["events"] = [exception("tags are full", at=59, frames="    at default (functions/retry.js:9:11)")]
    cause = root_cause(failed(FAIL, spans))
    assert cause is not None and (cause.span, cause.label, cause.link) == ("db.insert(tags)", "23505", "failed_before")
    assert (cause.exception, cause.thrown_at) == ("Error: tags are full", "functions/retry.js:9:11")


def test_an_error_thrown_with_no_failed_call_is_the_functions_own():
    gw = span("gateway", "server", "gateway", ms=5, error="boom", http__status_code=500)
    fn = span("sel", "internal", "function", parent=gw, ms=4, error="boom", db__transaction="rolled_back",
              events=[exception("boom", at=4, frames="    at default (functions/sel.js:3:9)")])
    spans = [gw, fn, span("db.select", "client", "db", parent=fn, start=1, ms=1, code__location="functions/sel.js:2:16")]
    cause = root_cause(failed(FAIL, spans))
    assert cause is not None
    assert (cause.span, cause.kind, cause.link, cause.exception, cause.thrown_at) == (
        "sel", "function", "own", "Error: boom", "functions/sel.js:3:9")


def test_an_error_thrown_inside_nested_steps_names_the_innermost_step():
    gw = span("gateway", "server", "gateway", ms=5, error="card declined", http__status_code=500)
    thrown = {"at": 4, "frames": "    at functions/pay.js:4:13"}
    fn = span("pay", "internal", "function", parent=gw, ms=5, error="card declined", events=[exception("card declined", **thrown)])
    outer = span("outer", "internal", "step", parent=fn, ms=4, error="card declined", events=[exception("card declined", **thrown)])
    inner = span("inner", "internal", "step", parent=outer, ms=3, error="card declined", events=[exception("card declined", **thrown)])
    cause = root_cause(failed(FAIL, [gw, fn, inner, outer]))  # steps are listed as they finish: inner first
    assert cause is not None and (cause.span, cause.kind, cause.link) == ("inner", "step", "own")


def test_an_error_flux_raised_itself_is_the_functions_own_not_an_earlier_failure():
    """The time limit: no frame of the function threw it, so the failed call before it did not lead to it."""
    message = "the function exceeded its time limit (50 ms)"
    gw = span("gateway", "server", "gateway", ms=51, error=f"TimeoutError: {message}", http__status_code=504)
    fn = span("slow", "internal", "function", parent=gw, ms=51, error=f"TimeoutError: {message}",
              events=[exception(message, at=51, type_="TimeoutError")])
    spans = [gw, fn, span("stub.limit", "client", "fetch", parent=fn, ms=1, error="HTTP 429 Too Many Requests",
                          http__status_code=429)]
    cause = root_cause(failed(FAIL, spans, status=504))
    assert cause is not None and (cause.span, cause.link, cause.exception) == ("slow", "own", f"TimeoutError: {message}")


def test_the_time_limit_inside_nested_steps_names_the_innermost_step_it_was_in():
    """Spans as the runtime writes them for a loop in a step in a step: the steps left open are
    failed "the request ended before this step did", and the function carries the TimeoutError."""
    message = "the function exceeded its time limit (50 ms)"
    cut = "the request ended before this step did"
    gw = span("gateway", "server", "gateway", ms=51, error=f"TimeoutError: {message}", http__status_code=504)
    fn = span("spin", "internal", "function", parent=gw, ms=51, error=f"TimeoutError: {message}",
              events=[exception(message, at=51, type_="TimeoutError")])
    outer = span("outer", "internal", "step", parent=fn, start=1, ms=50, error=cut)
    inner = span("inner", "internal", "step", parent=outer, start=2, ms=49, error=cut)
    done = span("db.select", "client", "db", parent=inner, start=3, ms=1)
    why = failed(FAIL, [gw, fn, outer, inner, done], status=504)
    cause = root_cause(why)
    assert cause is not None and (cause.span, cause.kind, cause.link, cause.exception) == (
        "inner", "step", "own", f"TimeoutError: {message}")


def test_a_step_left_running_when_the_function_threw_is_not_where_it_threw():
    cut = "the request ended before this step did"
    gw = span("gateway", "server", "gateway", ms=5, error="boom", http__status_code=500)
    fn = span("bg", "internal", "function", parent=gw, ms=5, error="boom",
              events=[exception("boom", at=4, frames="    at default (functions/bg.js:3:9)")])
    background = span("poll", "internal", "step", parent=fn, start=1, ms=3, error=cut)  # cut as the error ended it
    cause = root_cause(failed(FAIL, [gw, fn, background]))
    assert cause is not None and (cause.span, cause.link, cause.thrown_at) == ("bg", "own", "functions/bg.js:3:9")


def test_a_success_whose_transaction_a_caught_error_aborted_names_that_statement():
    error = 'duplicate key value violates unique constraint "tags_pkey" (SQLSTATE 23505)'
    message = (f"the handler returned 200, but its transaction was rolled back: db.insert(tags): {error} failed,"
               " and the function went on after catching that error")
    gw = span("gateway", "server", "gateway", ms=9, error=f"TransactionAborted: {message}", http__status_code=500)
    fn = span("tag", "internal", "function", parent=gw, ms=8, error=f"TransactionAborted: {message}",
              events=[exception(message, at=8, type_="TransactionAborted")])
    spans = [gw, fn,
             span("db.insert(tags)", "client", "db", parent=fn, start=1, ms=1, code__location="functions/tag.js:2:13"),
             span("db.insert(tags)", "client", "db", parent=fn, start=3, ms=1, error=error, db__sqlstate="23505",
                  code__location="functions/tag.js:3:19")]
    cause = root_cause(failed(FAIL, spans))
    assert cause is not None and (cause.span, cause.call_site, cause.link) == ("db.insert(tags)", "functions/tag.js:3:19", "same_error")


def test_a_returned_4xx_is_the_functions_own_answer():
    cause = root_cause(failed(FAIL, returned_spans(404, "no such widget 7"), status=404, error="no such widget 7"))
    assert cause is not None
    assert (cause.span, cause.kind, cause.label, cause.link, cause.error) == (
        "widget", "function", "404", "own", "returned 404: no such widget 7")


def test_a_returned_4xx_is_the_functions_answer_even_after_a_failed_call():
    lookup = span("widgets.get", "client", "fetch", ms=2, error="HTTP 404 Not Found", http__status_code=404)
    cause = root_cause(failed(FAIL, returned_spans(404, "no such widget 7", lookup), status=404, error="no such widget 7"))
    assert cause is not None and (cause.span, cause.link) == ("widget", "own")


def test_a_returned_5xx_names_the_last_call_that_failed_before_it():
    timeout = span("stripe.create", "client", "fetch", start=2, ms=2000, error="stripe.create: no response within 2000 ms",
                   timeout=True, code__location="functions/create_user.js:31:21")
    spans = returned_spans(500, "Stripe API timeout", timeout)
    cause = root_cause(failed(FAIL, spans, error="Stripe API timeout"))
    assert cause is not None
    assert (cause.span, cause.label, cause.link, cause.exception) == ("stripe.create", "timeout", "failed_before", None)


def test_a_returned_5xx_with_no_failed_call_is_the_functions_own():
    cause = root_cause(failed(FAIL, returned_spans(503, "maintenance mode"), status=503, error="maintenance mode"))
    assert cause is not None and (cause.span, cause.link, cause.error) == ("widget", "own", "returned 503: maintenance mode")


def test_a_succeeded_request_has_no_root_cause():
    assert root_cause(trace(OK)) is None


RETRY = """
export default async function (req, ctx) {
  let r = await ctx.fetch("STUB/status/429", { name: "stub.limit" });
  if (r.status === 429) r = await ctx.fetch("STUB/ok", { name: "stub.limit" });
  await ctx.db.query("INSERT INTO tags (id) VALUES (1)");
  await ctx.db.query("INSERT INTO tags (id) VALUES (1)");
  return { body: { ok: true } };
}
"""


def _request_id_of_a_call(root, dsn: str, path: str) -> str:
    """POST `path` to a real gateway over `root`, whose trace is written before this returns."""

    async def call() -> str:
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        async with running_gateway(root, dsn, sink=writer) as (_, client):
            response = await client.post(path, json={})
        await writer.close()
        return response.headers["x-flux-request-id"]

    return asyncio.run(call())


def test_the_root_cause_of_a_real_trace_is_the_statement_whose_error_was_thrown(tmp_path, dsn, conn):
    """The audit's case end to end (real V8, gateway and HTTP stub): a 429 retried, then a duplicate key thrown."""
    ensure_schema(conn)
    conn.execute("CREATE TABLE tags (id int PRIMARY KEY)")
    stub = Stub()
    try:
        write_project(tmp_path, {"retry": RETRY.replace("STUB", stub.url)})
        why = explain(conn, _request_id_of_a_call(tmp_path, dsn, "/retry"))
    finally:
        stub.close()
    assert why.cause is not None
    assert (why.cause.span, why.cause.label, why.cause.link, why.cause.thrown_at) == (
        "db.insert(tags)", "23505", "same_error", "functions/retry.js:5:16")
    assert [(f.span, f.label) for f in why.failures] == [("stub.limit", "429")]


def test_a_commit_refused_by_the_database_is_labelled_by_its_sqlstate(tmp_path, dsn, conn):
    """A deferred unique constraint fails at COMMIT, after the function returned: the cause is the
    function, labelled 23505, not `error`."""
    ensure_schema(conn)
    conn.execute("CREATE TABLE users (email text UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    write_project(tmp_path, {"dup": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1), ($1)", ["a@x"]);
          return {status: 201};
        }
    """})
    why = explain(conn, _request_id_of_a_call(tmp_path, dsn, "/dup"))
    assert why.cause is not None and (why.cause.span, why.cause.label, why.cause.link) == ("dup", "23505", "own")
    assert why.cause.error.endswith("(SQLSTATE 23505)")


# -- failed calls ----------------------------------------------------------------------------


def test_explain_lists_the_failures_besides_the_root_cause(conn):
    ensure_schema(conn)
    insert_traces(conn, [failed(FAIL, retry_spans())])
    why = explain(conn, FAIL)
    assert why.cause is not None and why.cause.span == "db.insert(tags)"
    assert [(f.span, f.label, f.call_site) for f in why.failures] == [("stub.limit", "429", "functions/retry.js:3:21")]
    assert why.failure_count == 1


def test_explain_of_a_success_lists_every_handled_failure_in_order(conn):
    ensure_schema(conn)
    fn = span("three", "internal", "function")
    calls = [span("a.one", "client", "fetch", parent=fn, start=1, error="HTTP 429 Too Many Requests", http__status_code=429),
             span("b.two", "client", "fetch", parent=fn, start=2, error="HTTP 500 Internal Server Error", http__status_code=500),
             span("db.query", "client", "db", parent=fn, start=3, error="syntax error", db__sqlstate="42601")]
    insert_traces(conn, [trace(OK, spans=[fn, *reversed(calls)])])
    why = explain(conn, OK)
    assert why.cause is None
    assert [(f.span, f.label) for f in why.failures] == [("a.one", "429"), ("b.two", "500"), ("db.query", "42601")]


def test_explain_lists_at_most_ten_failures_and_counts_them_all(conn):
    ensure_schema(conn)
    fn = span("loop", "internal", "function")
    calls = [span(f"call.{n}", "client", "fetch", parent=fn, start=n, error="HTTP 429", http__status_code=429) for n in range(15)]
    insert_traces(conn, [trace(OK, spans=[fn, *calls])])
    why = explain(conn, OK)
    assert [f.span for f in why.failures] == [f"call.{n}" for n in range(MAX_FAILURES)]
    assert (MAX_FAILURES, why.failure_count) == (10, 15)


def old_request(conn, days: int) -> None:
    """OK, started `days` days ago, and the row it inserted then."""
    ensure_schema(conn)
    insert_traces(conn, [trace(OK, ago=timedelta(days=days))])
    conn.execute(
        "INSERT INTO flux.state_mutations (request_id, schema_name, table_name, op, row_key, new, xid, commit_lsn,"
        " commit_time, seq) VALUES (%s, 'public', 'orders', 'insert', '{\"id\": 1}', '{\"id\": 1}', 7, '0/100',"
        " now() - make_interval(days => %s) + interval '1 second', 0)", (OK, days))


def test_explain_says_a_trace_deleted_by_retention_was_deleted(conn):
    old_request(conn, 40)
    prune(conn, older_than=timedelta(days=30), mutations=False)
    (note,) = explain(conn, OK).notes
    assert note.startswith("No trace is kept for this request, only its 1 row change(s): traces that started before ")
    assert note.endswith(" UTC were deleted by retention.")


def test_explain_says_row_changes_deleted_by_retention_were_deleted(conn):
    old_request(conn, 40)
    prune(conn, older_than=timedelta(days=30), traces=False)
    (note,) = explain(conn, OK).notes
    assert "its row changes were deleted by retention" in note and "flux attach" not in note


def test_explain_of_a_request_newer_than_the_cutoff_does_not_blame_retention(conn):
    old_request(conn, 20)
    conn.execute("DELETE FROM flux.state_mutations")
    prune(conn, older_than=timedelta(days=30))
    (note,) = explain(conn, OK).notes
    assert "flux attach" in note


def test_a_request_flux_failed_inside_ran_its_function_and_says_where_the_details_are(conn):
    """Only the gateway's span is kept when running the function raised inside Flux: the function
    ran (and was rolled back), which "not run" and "never ran a function" denied."""
    ensure_schema(conn)
    error = "Flux failed while running the function (an internal error)"
    gw = span("gateway", "server", "gateway", ms=5, error=error, http__status_code=500)
    insert_traces(conn, [trace(FAIL, function="call", status=500, error=error, spans=[gw])])
    why = explain(conn, FAIL)
    assert why.not_run is None and why.cause is not None and why.cause.link == "gateway"
    assert why.notes == ("The request changed no rows: Flux failed while running the function, and rolled its"
                         " transaction back. The gateway's log has the details under this request id; its spans were"
                         " not kept.",)


def test_a_statement_the_aborted_transaction_refused_names_the_one_that_aborted_it():
    cause = root_cause(failed(FAIL, aborted_spans()))
    assert cause is not None
    assert (cause.span, cause.label, cause.link, cause.call_site, cause.thrown_at) == (
        "db.insert(items)", "23505", "aborted", "functions/save.js:3:18", "functions/save.js:7:16")
    assert cause.exception.startswith("DatabaseError: current transaction is aborted")


def test_a_refusal_with_no_earlier_failure_on_record_is_the_cause_itself():
    cause = root_cause(failed(FAIL, aborted_spans(caught=False)))
    assert cause is not None and (cause.span, cause.link) == ("db.select", "same_error")


def test_errors_logged_by_a_request_that_succeeded_are_listed_in_order_with_where(conn):
    """Events as the runtime writes them: console.error, ctx.log with an Error, an Error logged in a
    step, an unhandled rejection Flux logged; an info or warn log is not an error."""
    ensure_schema(conn)
    rejection = {"level": "error", "message": "Unhandled promise rejection: Error: in a timer", "exception.type": "Error",
                 "exception.message": "in a timer", "exception.stacktrace": "Error: in a timer\n    at eval (functions/t.js:2:28)"}
    logged = {"message": "config unreadable", "exception.type": "SyntaxError", "exception.message": "Unexpected token",
              "exception.stacktrace": "SyntaxError: Unexpected token\n    at default (functions/t.js:3:14)"}

    def log(at: float, **attributes) -> dict:
        return {"name": "log", "time": 1764880000000.0 + at, "attributes": attributes}

    gw = span("gateway", "server", "gateway", ms=9, http__status_code=200)
    fn = span("t", "internal", "function", parent=gw, ms=8, events=[
        log(1, level="error", message="cache miss storm"), log(2, **logged), log(3, message="just info"),
        log(4, level="warn", message="a warning"), log(7, **rejection)])
    step = span("warm", "internal", "step", parent=fn, start=4, ms=1, events=[
        log(5, level="error", message="Error: warm failed\n    at eval (functions/t.js:4:54)")])
    insert_traces(conn, [trace(OK, spans=[gw, fn, step])])
    why = explain(conn, OK)
    assert why.cause is None and why.logged_error_count == 4
    assert [(e.span, e.message, e.at) for e in why.logged_errors] == [
        ("t", "cache miss storm", None),
        ("t", "config unreadable: SyntaxError: Unexpected token", "functions/t.js:3:14"),
        ("warm", "Error: warm failed\n    at eval (functions/t.js:4:54)", "functions/t.js:4:54"),
        ("t", "Unhandled promise rejection: Error: in a timer", "functions/t.js:2:28"),
    ]


def test_the_time_limit_names_the_calls_in_flight_when_flux_stopped_the_function():
    cause = root_cause(failed(FAIL, waiting_spans(), status=504))
    assert cause is not None and (cause.span, cause.link) == ("charge", "own")
    assert [(f.span, f.duration_ms, f.call_site) for f in cause.in_flight] == [
        ("stripe.charge", 3000, "functions/pay.js:4:15")]


def test_a_function_that_threw_has_no_calls_in_flight_named():
    cause = root_cause(failed(FAIL, retry_spans()))
    assert cause is not None and cause.in_flight == ()
