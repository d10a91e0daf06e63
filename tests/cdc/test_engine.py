"""End-to-end basics through the real engine: an insert with its context, TRUNCATE, `seq`, and restarts."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from flux.cdc.attach import attach
from flux.errors import ConfigError
from tests.support import mutations, start_engine


def test_insert_is_recorded_with_request_id_from_context_message(dsn, conn, capture):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
    running = capture(tables=["users"])
    with psycopg.connect(dsn) as c:
        c.execute("SELECT pg_logical_emit_message(true, 'flux', '{\"request_id\": \"req-1\", \"function\": \"signup\"}')")
        c.execute("INSERT INTO users VALUES (42, 'alice@example.com')")
    running.caught_up()
    [m] = mutations(dsn, "users")
    assert (m["request_id"], m["op"], m["row_key"], m["new"]) == ("req-1", "insert", {"id": 42}, {"id": 42, "email": "alice@example.com"})
    assert m["context"]["function"] == "signup"


def test_truncate_of_two_tables_in_one_statement_records_one_row_per_table(dsn, conn, capture):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    conn.execute("INSERT INTO a VALUES (1), (2)")
    conn.execute("INSERT INTO b VALUES (1)")
    running = capture(tables=["a", "b"])
    conn.execute("TRUNCATE a, b")
    running.caught_up()
    rows = mutations(dsn)
    assert sorted((m["table"], m["op"], m["row_key"], m["old"], m["new"]) for m in rows) == [
        ("a", "truncate", None, None, None),
        ("b", "truncate", None, None, None),
    ]
    assert len({m["commit_lsn"] for m in rows}) == 1
    assert [m["seq"] for m in rows] == [0, 1]


def test_truncate_of_a_partitioned_table_is_one_row_under_the_root(dsn, conn, capture):
    conn.execute("CREATE TABLE p (k int, PRIMARY KEY (k)) PARTITION BY RANGE (k)")
    conn.execute("CREATE TABLE p_low PARTITION OF p FOR VALUES FROM (0) TO (10)")
    conn.execute("CREATE TABLE p_high PARTITION OF p FOR VALUES FROM (10) TO (20)")
    conn.execute("INSERT INTO p VALUES (1), (11)")
    running = capture(tables=["p"])
    conn.execute("TRUNCATE p")
    running.caught_up()
    assert [(m["table"], m["op"]) for m in mutations(dsn)] == [("p", "truncate")]


def test_seq_is_the_position_of_the_change_in_its_transaction(dsn, conn, capture):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    running = capture(tables=["a", "b"])
    with psycopg.connect(dsn) as c:
        c.execute("INSERT INTO a VALUES (1, 'x')")
        c.execute("SELECT pg_logical_emit_message(true, 'flux', '{\"request_id\": \"r\"}')")  # not a change: no seq
        c.execute("INSERT INTO b VALUES (1)")
        c.execute("UPDATE a SET v = 'y'")
        c.execute("DELETE FROM b")
    with psycopg.connect(dsn) as c:
        c.execute("INSERT INTO b VALUES (2)")
    running.caught_up()
    rows = mutations(dsn)
    assert [(m["table"], m["op"], m["seq"]) for m in rows] == [
        ("a", "insert", 0), ("b", "insert", 1), ("a", "update", 2), ("b", "delete", 3), ("b", "insert", 0),
    ]
    assert len({m["commit_lsn"] for m in rows[:4]}) == 1
    assert rows[4]["commit_lsn"] != rows[0]["commit_lsn"]


def test_commit_lsn_and_seq_are_unique_in_the_mutation_log(dsn, conn, capture):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    running = capture(tables=["a"])
    conn.execute("INSERT INTO a SELECT generate_series(1, 50)")
    conn.execute("UPDATE a SET id = id + 100")
    running.caught_up()
    rows = mutations(dsn, "a")
    assert len(rows) == 100
    assert len({(m["commit_lsn"], m["seq"]) for m in rows}) == 100
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO flux.state_mutations (schema_name, table_name, op, xid, commit_lsn, commit_time, seq)"
            " SELECT schema_name, table_name, op, xid, commit_lsn, commit_time, seq FROM flux.state_mutations LIMIT 1"
        )


def test_restarted_engine_records_what_was_written_while_stopped_without_duplicates(dsn, conn, capture):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
    running = capture(tables=["a"])
    for i in range(1, 4):
        conn.execute("INSERT INTO a VALUES (%s, 'recorded before stop')", (i,))
    running.caught_up()
    for i in range(4, 7):
        conn.execute("INSERT INTO a VALUES (%s, 'maybe recorded before stop')", (i,))
    running.stop()  # no wait: these may or may not be recorded yet
    for i in range(7, 10):
        conn.execute("INSERT INTO a VALUES (%s, 'written while stopped')", (i,))
    conn.execute("UPDATE a SET v = 'updated while stopped' WHERE id = 1")
    restarted = start_engine(dsn)
    try:
        restarted.caught_up()
        conn.execute("INSERT INTO a VALUES (10, 'after restart')")
        restarted.caught_up()
    finally:
        restarted.stop()
    rows = mutations(dsn, "a")
    expected = [("insert", i) for i in range(1, 10)] + [("update", 1), ("insert", 10)]
    assert [(m["op"], m["row_key"]["id"]) for m in rows] == expected
    assert len({(m["commit_lsn"], m["seq"]) for m in rows}) == len(rows)


def test_a_database_that_is_not_utf8_is_captured_in_its_own_characters(dsn, conn):
    """pgoutput sends text in the client's encoding: the replication connection asks for UTF-8."""
    name = f"latin_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    latin = make_conninfo(dsn, dbname=name)
    try:
        with psycopg.connect(latin, autocommit=True) as c:
            c.execute("CREATE TABLE words (id int PRIMARY KEY, word text)")
        attach(latin, tables=["words"])
        running = start_engine(latin)
        try:
            with psycopg.connect(latin, autocommit=True) as c:
                c.execute("INSERT INTO words VALUES (1, 'café crème')")
            running.caught_up()
        finally:
            running.stop()
        assert [m["new"] for m in mutations(latin, "words")] == [{"id": 1, "word": "café crème"}]
    finally:
        with psycopg.connect(latin, autocommit=True) as c:
            c.execute("SELECT pg_drop_replication_slot('flux')")
        conn.execute(f"DROP DATABASE {name}")


def test_an_engine_whose_dsn_refuses_the_servers_certificate_stops_at_once_with_a_tls_hint(tls_dsn):
    """Retrying would never make the certificate acceptable: it retried forever, as for a server that is down."""
    running = start_engine(tls_dsn.replace("/ca.crt", "/other-ca.crt"))
    running.thread.join(timeout=15)
    if running.thread.is_alive():
        running.engine.stop()
        running.thread.join(timeout=15)
    assert len(running.errors) == 1 and isinstance(running.errors[0], ConfigError), running.errors
    assert "TLS certificate was not accepted" in str(running.errors[0]) and "sslrootcert" in running.errors[0].hint


def test_a_transaction_streaming_longer_than_the_databases_statement_timeout_is_recorded(dsn, conn, capture):
    """A statement_timeout set on the database (for its applications) applied to the sink, whose
    COPY stays open while a large transaction streams: it was cancelled, retried, cancelled again,
    and the engine never got past that transaction."""
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
    conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET statement_timeout = 300')
    running = capture(tables=["big"], backoff_initial=0.1, backoff_max=0.5)
    conn.execute("SET statement_timeout = 0")  # this session's own insert may take longer
    conn.execute("INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 200000) g")
    running.caught_up(timeout=30)  # observed: 3 s
    assert running.engine.stats.reconnects == 0
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM flux.state_mutations WHERE table_name = 'big'").fetchone() == (200_000,)


def test_an_idle_session_timeout_the_database_sets_does_not_end_the_engines_connections(dsn, conn, capture):
    """With idle_session_timeout set on the database, the server ended the sink's and catalog's
    connections between two quiet writes: a change after a pause cost a reconnect, a warning and
    a resend of what was not confirmed."""
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET idle_session_timeout = 200')
    running = capture(tables=["a"], backoff_initial=0.1)
    conn.execute("SET idle_session_timeout = 0")
    conn.execute("INSERT INTO a VALUES (1)")
    running.caught_up()
    own = ("SELECT application_name, pid FROM pg_stat_activity WHERE application_name IN ('flux-sink', 'flux-catalog')"
           " AND datname = current_database() ORDER BY 1")
    before = conn.execute(own).fetchall()
    time.sleep(1.0)  # quiet: longer than the timeout
    assert conn.execute(own).fetchall() == before and len(before) == 2
    conn.execute("INSERT INTO a VALUES (2)")
    running.caught_up()
    assert running.engine.stats.reconnects == 0
    assert [m["row_key"] for m in mutations(dsn, "a")] == [{"id": 1}, {"id": 2}]


def test_a_failure_right_after_each_reconnect_backs_off_and_is_logged_once(dsn, conn, capture, caplog):
    """The backoff was reset as soon as a session opened, so a store failing on the first write of
    every session was retried at the initial delay for good, and logged at each try."""
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    running = capture(tables=["a"], backoff_initial=0.1)
    running.caught_up()
    conn.execute("""
        CREATE FUNCTION flux.refuse() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN RAISE EXCEPTION 'store is full' USING ERRCODE = 'disk_full'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON flux.state_mutations FOR EACH STATEMENT EXECUTE FUNCTION flux.refuse();
    """)
    with caplog.at_level("WARNING", logger="flux.cdc"):
        conn.execute("INSERT INTO a VALUES (1)")
        time.sleep(4)  # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s of backoff: 5 or 6 tries, not 20 to 40
        tries = running.engine.stats.reconnects
    conn.execute("DROP TRIGGER refuse ON flux.state_mutations")
    running.caught_up()  # the failure ends: recorded, once
    assert 2 <= tries <= 7, tries
    assert len([r for r in caplog.records if "reconnecting in" in r.getMessage()]) == 1
    assert [m["row_key"] for m in mutations(dsn, "a")] == [{"id": 1}]


def test_each_change_records_its_tables_oid_and_a_partitions_the_roots(dsn, conn, capture):
    """The oid lets history follow a table across a rename (schema v7); a partition's changes are
    published, and recorded, under its root."""
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE p (id int PRIMARY KEY) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100)")
    running = capture(tables=["a", "p"])
    conn.execute("INSERT INTO a VALUES (1)")
    conn.execute("ALTER TABLE a RENAME TO b")
    conn.execute("UPDATE b SET id = 2")
    conn.execute("INSERT INTO p VALUES (5)")
    conn.execute("TRUNCATE b")
    running.caught_up()
    oids = dict(conn.execute("SELECT relname::text, oid::int FROM pg_class WHERE relname IN ('b', 'p')").fetchall())
    rows = conn.execute("SELECT table_name, op, relid::int FROM flux.state_mutations ORDER BY commit_lsn, seq").fetchall()
    assert rows == [("a", "insert", oids["b"]), ("b", "update", oids["b"]), ("p", "insert", oids["p"]),
                    ("b", "truncate", oids["b"])]
