"""Flux never stops a table's traffic waiting for its lock: attach, detach and the engine's capture
of new tables wait a bounded time, then say who holds the table."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest

from flux.cdc.attach import attach, detach
from flux.cdc.autocapture import reconcile_new_tables
from flux.errors import LockTimeoutError
from tests.cli.test_attach import run_flux


def _identity(conn, table: str) -> str:
    return conn.execute("SELECT relreplident FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()[0]


def _holding(dsn: str, table: str) -> psycopg.Connection:
    """A session idle in a transaction that has read `table`: it holds ACCESS SHARE until it ends."""
    blocker = psycopg.connect(dsn, application_name="long-report")
    blocker.execute(f"SELECT count(*) FROM {table}")
    return blocker


def test_attach_behind_a_long_transaction_gives_up_having_changed_nothing_and_names_it(dsn, conn):
    """It waited for the ACCESS EXCLUSIVE lock of REPLICA IDENTITY FULL as long as the transaction
    lasted, and every later query of the table queued behind it."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    blocker = _holding(dsn, "orders")
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeoutError) as raised:
            attach(dsn, tables=["orders"], lock_timeout=0.2)
        took = time.monotonic() - started
        pid = blocker.info.backend_pid
    finally:
        blocker.close()
    assert took < 10
    assert f"pid {pid} (postgres, long-report) holds public.orders (AccessShareLock), idle in transaction" in raised.value.message
    assert f"pg_terminate_backend({pid})" in raised.value.hint and raised.value.exit_code == 2
    assert _identity(conn, "orders") == "d"
    assert conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = 'flux'").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()[0] == 0


def test_while_attach_waits_for_a_lock_the_tables_other_queries_wait_one_try_at_most(dsn, conn):
    """The point of the bound: before, a query of the table waited behind attach's ALTER for as long
    as the transaction in the way lasted (here: until the application's statement_timeout)."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    blocker = _holding(dsn, "orders")
    outcome: list = []
    attaching = threading.Thread(target=lambda: outcome.append(attach(dsn, tables=["orders"])), daemon=True)
    try:
        attaching.start()
        time.sleep(0.3)
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute("SET statement_timeout = '3s'")  # a try lasts 1 s (the default --lock-timeout)
            for _ in range(4):
                assert app.execute("SELECT count(*) FROM orders").fetchone() == (0,)
                time.sleep(0.4)
    finally:
        blocker.close()  # the report ends: attach's next try goes through
    attaching.join(timeout=30)
    assert outcome and outcome[0].tables == ["public.orders"] and _identity(conn, "orders") == "f"


def test_attach_goes_through_once_the_transaction_holding_the_table_ends_between_tries(dsn, conn):
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    blocker = _holding(dsn, "orders")
    ender = threading.Timer(0.5, blocker.commit)
    ender.start()
    try:
        result = attach(dsn, tables=["orders"], lock_timeout=0.2)
    finally:
        ender.join()
        blocker.close()
    assert result.tables == ["public.orders"] and _identity(conn, "orders") == "f"


def test_detach_behind_a_long_transaction_leaves_the_attachment_whole(dsn, conn):
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    attach(dsn, tables=["orders"])
    blocker = _holding(dsn, "orders")
    try:
        with pytest.raises(LockTimeoutError, match="Detach changed nothing"):
            detach(dsn, lock_timeout=0.2)
    finally:
        blocker.close()
    assert _identity(conn, "orders") == "f"
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()[0] == 1
    assert detach(dsn).restored == [{"table": "public.orders", "restored": "DEFAULT"}]


def test_the_engines_capture_of_a_new_table_does_not_wait_behind_a_long_transaction(dsn, conn, caplog):
    attach(dsn, all_tables=True)
    conn.execute("DROP EVENT TRIGGER flux_capture_new_tables")  # as for a role that may not own one
    conn.execute("CREATE TABLE late (id int PRIMARY KEY)")
    blocker = _holding(dsn, "late")
    caplog.set_level(logging.WARNING, logger="flux.cdc")
    try:
        started = time.monotonic()
        changed = reconcile_new_tables(dsn, slot="flux")
        took = time.monotonic() - started
        pid = blocker.info.backend_pid
    finally:
        blocker.close()
    assert changed == [] and took < 5
    assert "cannot capture REPLICA IDENTITY FULL on public.late yet: another transaction holds the table" in caplog.text
    assert f"pid {pid} (postgres, long-report)" in caplog.text
    assert reconcile_new_tables(dsn, slot="flux") == ["REPLICA IDENTITY FULL on public.late"]


def test_attach_cli_says_so_in_one_line_with_the_hint_and_exit_2(dsn, conn):
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    blocker = _holding(dsn, "orders")
    try:
        proc = run_flux("attach", "--database", dsn, "--tables", "orders", "--lock-timeout", "0.2")
    finally:
        blocker.close()
    assert proc.returncode == 2, proc.stderr
    assert "Attach changed nothing" in proc.stderr and "--lock-timeout" in proc.stderr and "Traceback" not in proc.stderr


def test_attach_says_which_transactions_its_slot_waits_for(dsn, conn):
    """Creating a slot waits for every transaction running when it starts: attach hung with no word of which."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE other (id int)")
    writer = psycopg.connect(dsn, application_name="batch-job")
    writer.execute("INSERT INTO other VALUES (1)")  # a transaction with an xid, left open
    told: list[list[str]] = []

    def report(lines: list[str]) -> None:
        told.append(lines)
        writer.commit()  # the job ends: the slot can be made

    try:
        result = attach(dsn, tables=["orders"], on_wait=report)
        pid = writer.info.backend_pid
    finally:
        writer.close()
    assert "replication slot flux" in result.created
    assert len(told) == 1 and told[0][0].startswith(f"pid {pid} (postgres, batch-job), idle in transaction for "), told
