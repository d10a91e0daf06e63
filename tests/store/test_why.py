"""`flux why`'s library half: the request's row changes, its root cause, and what is missing."""

from __future__ import annotations

import psycopg
import pytest

from flux.store.schema import ensure_schema
from flux.store.traces import insert_traces
from flux.store.why import explain, request_mutations, root_cause
from tests.traces_seed import FAIL, NO_TRACE, OK, seed, span, trace


@pytest.fixture
def seeded(conn: psycopg.Connection) -> psycopg.Connection:
    seed(conn)
    return conn


# -- mutations -------------------------------------------------------------------------------


def test_request_mutations_in_commit_order(seeded):
    changes = request_mutations(seeded, NO_TRACE)
    assert [(c.table, c.op, c.row_key) for c in changes] == [("members", "update", {"org": 1, "id": "a"}),
                                                            ("users", "update", {"id": 42})]
    assert changes[0].function == "set_role"


def test_request_mutations_show_a_composite_key_in_primary_key_order(seeded):
    assert list(request_mutations(seeded, NO_TRACE)[0].row_key) == ["org", "id"]


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


def test_the_root_cause_of_a_nested_step_is_the_inner_step_though_it_is_listed_first(conn):
    """Steps are recorded as they finish: an inner step before the outer one that holds it."""
    gw = span("gateway", "server", "gateway", error="inner broke")
    fn = span("f", "internal", "function", parent=gw, error="inner broke")
    outer = span("outer", "internal", "step", parent=fn, error="inner broke")
    inner = span("inner", "internal", "step", parent=outer, error="inner broke")
    cause = root_cause([gw, fn, inner, outer])
    assert cause is not None and cause.span == "inner"


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


def test_explain_of_a_gateway_only_request_blames_the_gateway(conn):
    ensure_schema(conn)
    gw = span("gateway", "server", "gateway", ms=0.3, error="no route for GET /nope", http__status_code=404)
    insert_traces(conn, [trace("0badf00d-0000-4000-8000-000000000005", function=None, status=404, path="/nope",
                               error="no route for GET /nope", spans=[gw], ms=0.3)])
    why = explain(conn, "0badf00d")
    assert why.cause is not None and (why.cause.span, why.cause.label, why.cause.thrown_at) == ("gateway", "404", None)
    assert any("never ran a function" in n for n in why.notes)
