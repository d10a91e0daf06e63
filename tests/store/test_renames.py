"""Following a table back across renames by its oid, and the guards against an oid that is not its own."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from flux.cdc.attach import attach
from flux.errors import NotFoundError
from flux.pg.cluster import find_bindir
from flux.store.queries import row_history
from flux.store.renames import Names, renamed_to, table_names
from flux.store.schema import ensure_schema


def record(conn: psycopg.Connection, table: str, op: str, relid: int) -> None:
    """One change of row 1, recorded under `table` with oid `relid`, after every change before it."""
    n = conn.execute("SELECT count(*) + 1 FROM flux.state_mutations").fetchone()[0]
    image = json.dumps({"id": 1})
    conn.execute(
        "INSERT INTO flux.state_mutations (schema_name, table_name, op, row_key, old, new, old_complete, xid, commit_lsn,"
        " commit_time, seq, relid) VALUES ('public', %s, %s, %s, %s, %s, %s, %s, %s::pg_lsn, now(), 0, %s)",
        (table, op, image, image if op != "insert" else None, image if op != "delete" else None,
         True if op != "insert" else None, n, f"0/{n * 0x100:X}", relid),
    )


@pytest.fixture
def log(conn: psycopg.Connection) -> psycopg.Connection:
    ensure_schema(conn)
    return conn


def _oid(conn: psycopg.Connection, table: str) -> int:
    conn.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY)")
    return conn.execute("SELECT %s::regclass::oid::int", (f"public.{table}",)).fetchone()[0]


def test_earlier_names_are_followed_newest_first(log):
    oid = _oid(log, "c")
    record(log, "a", "insert", oid)
    record(log, "b", "update", oid)
    record(log, "c", "update", oid)
    assert table_names(log, "public", "c") == Names(oid, (("public", "b"), ("public", "a")))
    assert table_names(log, "public", "b") == Names(None)  # no table of that name now: its own changes only


def test_a_former_name_of_the_oid_whose_changes_overlap_the_current_names_is_not_followed(log):
    """Two names of one oid at once cannot be one table (an oid of another database, or reused):
    its changes are not passed off as this table's."""
    oid = _oid(log, "b")
    record(log, "a", "insert", oid)
    record(log, "b", "update", oid)
    record(log, "a", "delete", oid)  # a after b began: another table's
    assert table_names(log, "public", "b") == Names(oid)
    assert [m.recorded_as for m in row_history(log, "public", "b", id_value="1").mutations] == ["b"]


def test_the_walk_back_through_former_names_stops_at_the_first_that_overlaps_the_next(log):
    oid = _oid(log, "c")
    record(log, "a", "insert", oid)
    record(log, "b", "insert", oid)
    record(log, "a", "delete", oid)  # overlaps b: a is not followed
    record(log, "b", "update", oid)
    record(log, "c", "update", oid)
    record(log, "b", "insert", oid + 1)  # another table's oid: not followed
    assert table_names(log, "public", "c") == Names(oid, (("public", "b"),))
    assert [(m.op, m.recorded_as) for m in row_history(log, "public", "c", id_value="1").mutations] == [
        ("insert", "b"), ("update", "b"), ("update", "c")]


@pytest.fixture
def restored(pg_info, dsn) -> Iterator[str]:
    """An empty database beside the test's, to restore a dump of it into; dropped afterwards."""
    name = f"r_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_info.dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield psycopg.conninfo.make_conninfo(dsn, dbname=name)
    with psycopg.connect(pg_info.dsn, autocommit=True) as admin:
        for (slot,) in admin.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)).fetchall():
            admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_a_log_restored_from_a_dump_follows_no_oid_recorded_before_the_restore(conn, dsn, capture, restored):
    """A restored database has new oids throughout, and the log's old ones may name other tables
    there (on another server they are handed out from the same start): such a table must not get
    the history of the table whose oid it now has."""
    conn.execute("CREATE TABLE public.a (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE public.c (id int PRIMARY KEY, v text)")
    running = capture(tables=["a", "c"])
    conn.execute("INSERT INTO a VALUES (1, 'x')")
    conn.execute("ALTER TABLE a RENAME TO b")
    conn.execute("UPDATE b SET v = 'y'")
    running.caught_up()
    bindir = find_bindir()
    dump = subprocess.run([str(bindir / "pg_dump"), "--no-publications", "-d", dsn], capture_output=True, check=True)
    subprocess.run([str(bindir / "psql"), "-q", "-d", restored], input=dump.stdout, capture_output=True, check=True)
    with psycopg.connect(restored, autocommit=True) as copy:
        # As on another server, where the old oid of a (now b) is c's.
        copy.execute("UPDATE flux.state_mutations SET relid = 'public.c'::regclass")
        assert [m.recorded_as for m in row_history(copy, "public", "b", id_value="1").mutations] == ["b"]
        with pytest.raises(NotFoundError):
            row_history(copy, "public", "c", id_value="1")
        copy.execute("DELETE FROM flux.attachments")  # the original's, which `flux detach` there would forget
        attach(restored, tables=["b", "c"], slot="copy")  # claims the log: the oids recorded from now on are its own
        with pytest.raises(NotFoundError):
            row_history(copy, "public", "c", id_value="1")
        copy.execute("INSERT INTO flux.state_mutations (schema_name, table_name, op, row_key, new, xid, commit_lsn,"
                      " commit_time, seq, relid) VALUES ('public', 'd', 'insert', '{\"id\": 1}', '{\"id\": 1}', 1, '9/0',"
                      " now(), 0, 'public.c'::regclass)")  # recorded since, in this database: c was named d then
        assert [m.recorded_as for m in row_history(copy, "public", "c", id_value="1").mutations] == ["d"]


def test_a_former_name_is_said_to_be_renamed_only_when_the_walk_back_reaches_it(log):
    oid = _oid(log, "b")
    record(log, "a", "insert", oid)
    record(log, "b", "update", oid)
    assert renamed_to(log, "public", "a") == ("public", "b")
    assert renamed_to(log, "public", "b") is None  # a table has that name
    record(log, "a", "delete", oid)  # under a again after b began: another table's oid
    assert renamed_to(log, "public", "a") is None
