"""`flux cdc status` on the library level: the warnings of what an attachment does not capture."""

from __future__ import annotations

import pytest

from flux.cdc.attach import attach
from flux.cdc.status import cdc_status
from flux.errors import ConfigError
from flux.store.schema import SCHEMA_VERSION


def unlogged_warnings(dsn: str) -> list[str]:
    return [w for w in cdc_status(dsn).warnings if "UNLOGGED" in w]


def test_status_warns_of_a_table_all_tables_captures_that_was_made_unlogged(dsn, conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    attach(dsn, all_tables=True)
    # A schema publication does not stop this, and the table's changes then never reach the WAL.
    conn.execute("ALTER TABLE t SET UNLOGGED")
    conn.execute("CREATE UNLOGGED TABLE scratch (id int)")
    [warning] = unlogged_warnings(dsn)
    assert "2 table(s)" in warning and "public.scratch, public.t." in warning and "SET LOGGED" in warning


def test_status_warns_of_an_unlogged_partition_of_a_listed_table(dsn, conn):
    conn.execute("CREATE TABLE p (k int PRIMARY KEY) PARTITION BY RANGE (k)")
    conn.execute("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10)")
    conn.execute("CREATE UNLOGGED TABLE elsewhere (id int)")  # not in a --tables capture: not a gap
    attach(dsn, tables=["p"])
    conn.execute("CREATE UNLOGGED TABLE p2 PARTITION OF p FOR VALUES FROM (10) TO (20)")
    [warning] = unlogged_warnings(dsn)
    assert "1 table(s) or partition(s)" in warning and "public.p2." in warning


def test_status_has_no_unlogged_warning_when_every_captured_table_is_logged(dsn, conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, all_tables=True)
    assert unlogged_warnings(dsn) == []


def test_status_warns_of_a_listed_table_created_again_since_attach(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    attach(dsn, tables=["a", "b"])
    conn.execute("DROP EVENT TRIGGER flux_capture_new_tables")  # as for a role that cannot own one
    conn.execute("DROP TABLE a")
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    [warning] = [w for w in cdc_status(dsn).warnings if "created again" in w]
    assert warning.startswith("1 listed table(s) were created again since attach") and ": public.a." in warning


def test_status_and_the_engines_reconcile_do_not_wait_behind_a_partitions_lock(dsn, conn):
    """They read each captured table's partitions with pg_partition_tree(), which takes ACCESS SHARE on
    every partition (one entry of the server's lock table each): they waited for as long as a
    transaction held one partition ACCESS EXCLUSIVE (an ALTER, a TRUNCATE, a long DDL)."""
    import threading

    import psycopg

    from flux.cdc.autocapture import reconcile_new_tables

    conn.execute("CREATE TABLE p (k int PRIMARY KEY) PARTITION BY RANGE (k)")
    conn.execute("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10)")
    attach(dsn, tables=["p"])
    done: list[object] = []
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE p1 IN ACCESS EXCLUSIVE MODE")
        threads = [threading.Thread(target=lambda: done.append(cdc_status(dsn)), daemon=True),
                   threading.Thread(target=lambda: done.append(reconcile_new_tables(dsn, slot="flux")), daemon=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        locker.rollback()
    assert len(done) == 2


def test_status_refuses_a_newer_schema_saying_to_upgrade_flux(dsn, conn):
    """It read what a newer release records as if it were this one's, and said nothing of the mismatch."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    conn.execute("UPDATE flux.meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(ConfigError, match="newer than this Flux") as err:
        cdc_status(dsn)
    assert "Upgrade Flux" in err.value.hint


def test_status_of_an_older_schema_says_who_upgrades_it_and_what_that_does_to_older_processes(dsn, conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    conn.execute("UPDATE flux.meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION - 1),))
    [warning] = [w for w in cdc_status(dsn).warnings if "schema" in w]
    assert f"version {SCHEMA_VERSION - 1}, older" in warning and "`flux attach`" in warning and "refuse to start" in warning
