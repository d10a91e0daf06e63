"""flux.context: applications tag their writes, and the real engine records them under that request."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

import flux.context
from flux.cdc.attach import attach
from tests.support import RunningEngine, mutations, start_engine


@pytest.fixture
def running(dsn: str, conn: psycopg.Connection) -> Iterator[RunningEngine]:
    """An `items` table, attached, with an engine consuming it."""
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    attach(dsn, tables=["items"])
    engine = start_engine(dsn, status_interval=0.1)  # idle reads wait 0.1 s: quick stop
    yield engine
    engine.engine.stop()
    engine.thread.join(timeout=30)


def recorded(dsn: str) -> list[tuple[int, str | None, dict | None]]:
    return [(m["new"]["id"], m["request_id"], m["context"]) for m in mutations(dsn, "items")]


def test_request_records_its_changes_under_the_request_id_with_extra_keys(dsn, running):
    with psycopg.connect(dsn, autocommit=True) as c:
        with flux.context.request(c, request_id="req-1", tenant="acme", function="signup", user=7) as req:
            req.execute("INSERT INTO items VALUES (1, 'a')")
            req.connection.execute("INSERT INTO items VALUES (2, 'b')")
    running.caught_up()
    context = {"request_id": "req-1", "tenant": "acme", "function": "signup", "user": 7}
    assert recorded(dsn) == [(1, "req-1", context), (2, "req-1", context)]
    assert req.request_id == "req-1"


def test_request_without_request_id_generates_a_uuid4_and_exposes_it(dsn, running):
    with psycopg.connect(dsn) as c:
        with flux.context.request(c) as req:
            req.execute("INSERT INTO items VALUES (1, 'a')")
    running.caught_up()
    assert uuid.UUID(req.request_id).version == 4
    assert recorded(dsn) == [(1, req.request_id, {"request_id": req.request_id})]


def test_request_commits_on_success_and_rolls_back_writes_and_message_on_error(dsn, running):
    with psycopg.connect(dsn, autocommit=True) as c:
        with pytest.raises(RuntimeError):
            with flux.context.request(c, request_id="failed") as req:
                req.execute("INSERT INTO items VALUES (1, 'rolled back')")
                raise RuntimeError("boom")
        with flux.context.request(c, request_id="ok") as req:
            req.execute("INSERT INTO items VALUES (2, 'kept')")
        c.execute("INSERT INTO items VALUES (3, 'untagged')")
    running.caught_up()
    assert [(i, rid) for i, rid, _ in recorded(dsn)] == [(2, "ok"), (3, None)]


def test_emit_tags_a_transaction_the_caller_manages(dsn, running):
    with psycopg.connect(dsn) as c:  # not autocommit: the first statement opens the transaction
        c.execute("INSERT INTO items VALUES (1, 'before the message')")
        assert flux.context.emit(c, "req-9", function="batch") == "req-9"
        c.execute("INSERT INTO items VALUES (2, 'after the message')")
        c.commit()
    running.caught_up()
    context = {"request_id": "req-9", "function": "batch"}
    assert recorded(dsn) == [(1, "req-9", context), (2, "req-9", context)]


def test_request_inside_an_open_transaction_is_undone_when_the_outer_transaction_rolls_back(dsn, running):
    with psycopg.connect(dsn) as c:
        c.execute("INSERT INTO items VALUES (1, 'outer, earlier')")
        with flux.context.request(c, request_id="inner") as req:  # a savepoint in the open transaction
            req.execute("INSERT INTO items VALUES (2, 'inner')")
        c.rollback()
        with flux.context.request(c, request_id="inner") as req:
            req.execute("INSERT INTO items VALUES (3, 'committed')")
    running.caught_up()
    assert [(i, rid) for i, rid, _ in recorded(dsn)] == [(3, "inner")]


def test_changes_after_a_nested_request_block_are_the_outer_requests_again(dsn, running):
    with psycopg.connect(dsn, autocommit=True) as c:
        with flux.context.request(c, request_id="outer") as outer:
            outer.execute("INSERT INTO items VALUES (1, 'outer, before')")
            with flux.context.request(c, request_id="inner") as inner:
                inner.execute("INSERT INTO items VALUES (2, 'inner')")
            outer.execute("INSERT INTO items VALUES (3, 'outer, after')")
            with pytest.raises(RuntimeError):
                with flux.context.request(c, request_id="failed"):
                    raise RuntimeError("rolled back to its savepoint")
            outer.execute("INSERT INTO items VALUES (4, 'outer, last')")
    running.caught_up()
    assert [(i, rid) for i, rid, _ in recorded(dsn)] == [(1, "outer"), (2, "inner"), (3, "outer"), (4, "outer")]


def test_emit_refuses_an_autocommit_connection_outside_a_transaction(conn):
    with pytest.raises(ValueError, match="open transaction"):
        flux.context.emit(conn, "req-1")


@pytest.mark.parametrize("bad", ["", 42, "a\x00b"])
def test_emit_rejects_a_request_id_that_is_not_a_storable_non_empty_string(bad):
    with pytest.raises(ValueError, match="request_id"):
        flux.context.emit(None, bad)  # checked before the connection is touched
