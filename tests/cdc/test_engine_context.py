"""End-to-end request context: which `flux` logical message each recorded change is attributed to.

The contract (see `flux.cdc.assembler`): a change takes the context of the most recent
transactional `flux` message before it in its transaction; changes before the first message
take the first one; malformed content never drops a change.
"""

from __future__ import annotations

import orjson
import psycopg

from tests.support import mutations


def flux_message(content: object, *, transactional: bool = True, prefix: str = "flux") -> tuple[str, tuple]:
    """A statement emitting `content` (JSON-encoded unless already a str) as a logical message."""
    text = content if isinstance(content, str) else orjson.dumps(content).decode()
    return "SELECT pg_logical_emit_message(%s, %s, %s::text)", (transactional, prefix, text)


def contexts(dsn: str, table: str) -> list[tuple[str | None, dict | None]]:
    return [(m["request_id"], m["context"]) for m in mutations(dsn, table)]


def setup_items(conn: psycopg.Connection, capture, **config):
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    return capture(tables=["items"], **config)


def one_insert_under(dsn: str, running, content: object) -> tuple[str | None, dict | None]:
    """(request_id, context) recorded for one insert made after a `flux` message of `content`."""
    with psycopg.connect(dsn) as c:
        c.execute(*flux_message(content))
        c.execute("INSERT INTO items VALUES (1, 'x')")
    running.caught_up()
    [recorded] = contexts(dsn, "items")
    return recorded


def test_changes_after_a_message_get_its_request_id_and_extra_keys(dsn, conn, capture):
    running = setup_items(conn, capture)
    with psycopg.connect(dsn) as c:
        c.execute(*flux_message({"request_id": "req-1", "tenant": "acme", "function": "signup", "user": 42}))
        c.execute("INSERT INTO items VALUES (1, 'a'), (2, 'b')")
        c.execute("UPDATE items SET v = 'c' WHERE id = 1")
    running.caught_up()
    context = {"request_id": "req-1", "tenant": "acme", "function": "signup", "user": 42}
    assert contexts(dsn, "items") == [("req-1", context)] * 3


def test_changes_before_the_first_message_get_the_first_message(dsn, conn, capture):
    running = setup_items(conn, capture)
    with psycopg.connect(dsn) as c:
        c.execute("INSERT INTO items VALUES (1, 'early')")
        c.execute(*flux_message({"request_id": "req-1"}))
        c.execute("INSERT INTO items VALUES (2, 'late')")
    running.caught_up()
    assert [rid for rid, _ in contexts(dsn, "items")] == ["req-1", "req-1"]


def test_changes_already_written_in_batches_before_the_first_message_are_backfilled(dsn, conn, capture):
    running = setup_items(conn, capture, batch_rows=100)
    with psycopg.connect(dsn) as c:
        c.execute("INSERT INTO items SELECT g, 'early' FROM generate_series(1, 250) g")
        c.execute(*flux_message({"request_id": "req-big", "function": "import"}))
        c.execute("INSERT INTO items VALUES (251, 'late')")
    running.caught_up()
    recorded = contexts(dsn, "items")
    assert len(recorded) == 251
    assert set(rid for rid, _ in recorded) == {"req-big"}
    assert all(ctx == {"request_id": "req-big", "function": "import"} for _, ctx in recorded)


def test_several_messages_in_one_transaction_switch_context(dsn, conn, capture):
    running = setup_items(conn, capture)
    with psycopg.connect(dsn) as c:
        c.execute("INSERT INTO items VALUES (1, 'x')")
        c.execute(*flux_message({"request_id": "first"}))
        c.execute("INSERT INTO items VALUES (2, 'x')")
        c.execute(*flux_message({"request_id": "second"}))
        c.execute("INSERT INTO items VALUES (3, 'x')")
        c.execute("DELETE FROM items WHERE id = 1")
        c.execute(*flux_message({"request_id": "third"}))
        c.execute("TRUNCATE items")
    running.caught_up()
    assert [(m["op"], m["request_id"]) for m in mutations(dsn, "items")] == [
        ("insert", "first"), ("insert", "first"), ("insert", "second"), ("delete", "second"), ("truncate", "third"),
    ]


def test_context_does_not_carry_over_to_the_next_transaction(dsn, conn, capture):
    running = setup_items(conn, capture)
    with psycopg.connect(dsn) as c:
        c.execute(*flux_message({"request_id": "req-1"}))
        c.execute("INSERT INTO items VALUES (1, 'x')")
    with psycopg.connect(dsn) as c:
        c.execute("INSERT INTO items VALUES (2, 'x')")
    running.caught_up()
    assert [rid for rid, _ in contexts(dsn, "items")] == ["req-1", None]


def test_change_without_any_message_has_null_request_id_and_its_xid(dsn, conn, capture):
    running = setup_items(conn, capture)
    with psycopg.connect(dsn) as c:
        c.execute("INSERT INTO items VALUES (1, 'x')")
        xid = int(c.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
    running.caught_up()
    [m] = mutations(dsn, "items")
    assert (m["request_id"], m["context"], m["xid"]) == (None, None, xid)


def test_content_that_is_not_json_is_kept_raw_with_null_request_id(dsn, conn, capture):
    rid, ctx = one_insert_under(dsn, setup_items(conn, capture), "request 7, not json")
    assert rid is None
    assert ctx["raw"] == "request 7, not json"
    assert ctx["malformed"]


def test_json_object_without_request_id_is_kept_raw_with_null_request_id(dsn, conn, capture):
    rid, ctx = one_insert_under(dsn, setup_items(conn, capture), '{"tenant": "acme"}')
    assert (rid, ctx["raw"]) == (None, '{"tenant": "acme"}')


def test_json_array_is_kept_raw_with_null_request_id(dsn, conn, capture):
    rid, ctx = one_insert_under(dsn, setup_items(conn, capture), '[{"request_id": "req-1"}]')
    assert (rid, ctx["raw"]) == (None, '[{"request_id": "req-1"}]')


def test_context_that_jsonb_cannot_store_is_recorded_without_stopping_the_engine(dsn, conn, capture):
    # U+0000 and numbers beyond numeric's range are valid JSON that text/jsonb refuse:
    # storing them as sent would fail the sink on every retry.
    running = setup_items(conn, capture)
    with psycopg.connect(dsn) as c:
        c.execute(*flux_message('{"request_id": "req\\u0000x", "note": "a\\u0000b", "path": "C:\\\\u0000", "tiny": 1e-20000}'))
        c.execute("INSERT INTO items VALUES (1, 'x')")
    with psycopg.connect(dsn) as c:
        c.execute("SELECT pg_logical_emit_message(true, 'flux', '\\x7b00'::bytea)")  # raw NUL byte, not JSON
        c.execute("INSERT INTO items VALUES (2, 'x')")
    running.caught_up()
    (rid, ctx), (raw_rid, raw_ctx) = contexts(dsn, "items")
    assert (rid, ctx) == ("req\ufffdx", {"request_id": "req\ufffdx", "note": "a\ufffdb", "path": "C:\\u0000", "tiny": 0})
    assert (raw_rid, raw_ctx["raw"]) == (None, "{\ufffd")


def test_a_context_with_a_nul_escape_keeps_its_numbers_exact(dsn, conn, capture):
    rid, ctx = one_insert_under(dsn, setup_items(conn, capture), '{"request_id": "G\\u0000x", "n": 123456789012345678901234567890}')
    assert (rid, ctx["n"]) == ("G\ufffdx", 123456789012345678901234567890)


def test_extra_keys_keep_numbers_exactly_as_sent(dsn, conn, capture):
    _, ctx = one_insert_under(dsn, setup_items(conn, capture),
                              '{"request_id": "req-1", "order": 123456789012345678901234567890, "rate": 0.1000000000000000055511151231257827}')
    assert ctx["order"] == 123456789012345678901234567890
    assert str(ctx["rate"]) == "0.1000000000000000055511151231257827"


def test_non_transactional_flux_message_does_not_set_context(dsn, conn, capture):
    running = setup_items(conn, capture)
    with psycopg.connect(dsn) as c:
        c.execute(*flux_message({"request_id": "not-transactional"}, transactional=False))
        c.execute("INSERT INTO items VALUES (1, 'x')")
    with psycopg.connect(dsn) as c:
        c.execute(*flux_message({"request_id": "req-2"}))
        c.execute(*flux_message({"request_id": "not-transactional"}, transactional=False))
        c.execute("INSERT INTO items VALUES (2, 'x')")
    running.caught_up()
    assert [rid for rid, _ in contexts(dsn, "items")] == [None, "req-2"]


def test_messages_with_other_prefixes_do_not_affect_context(dsn, conn, capture):
    running = setup_items(conn, capture)
    with psycopg.connect(dsn) as c:
        c.execute(*flux_message({"request_id": "other"}, prefix="fluxx"))
        c.execute("INSERT INTO items VALUES (1, 'x')")
        c.execute(*flux_message({"request_id": "req-1"}))
        c.execute(*flux_message({"request_id": "other"}, prefix="FLUX"))
        c.execute("INSERT INTO items VALUES (2, 'x')")
    running.caught_up()
    assert [rid for rid, _ in contexts(dsn, "items")] == ["req-1", "req-1"]


def test_message_in_a_rolled_back_savepoint_does_not_apply(dsn, conn, capture):
    running = setup_items(conn, capture)
    with psycopg.connect(dsn) as c:
        c.execute(*flux_message({"request_id": "kept"}))
        c.execute("SAVEPOINT s")
        c.execute(*flux_message({"request_id": "rolled-back"}))
        c.execute("ROLLBACK TO SAVEPOINT s")
        c.execute("INSERT INTO items VALUES (1, 'x')")
    running.caught_up()
    assert [rid for rid, _ in contexts(dsn, "items")] == ["kept"]
