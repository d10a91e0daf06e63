"""Flux never stops a table's traffic waiting for its lock: attach, detach and the engine's capture
of new tables wait a bounded time, then say who holds the table."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from flux.cdc.attach import AttachResult, attach, detach
from flux.cdc.autocapture import reconcile_new_tables
from flux.cdc.locks import LockRoom, refuse_too_many_locks, shortest_deadlock_timeout_ms
from flux.errors import LockTimeoutError, PreflightError
from tests.cli.test_attach import run_flux


def _identity(conn, table: str) -> str:
    return conn.execute("SELECT relreplident FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()[0]


def _holding(dsn: str, table: str) -> psycopg.Connection:
    """A session idle in a transaction that has read `table`: it holds ACCESS SHARE until it ends."""
    blocker = psycopg.connect(dsn, application_name="long-report")
    blocker.execute(f"SELECT count(*) FROM {table}")
    return blocker


def _ends_after(seconds: float, session: psycopg.Connection) -> threading.Timer:
    ender = threading.Timer(seconds, session.commit)
    ender.start()
    return ender


def _attach_behind_a_transaction_that_ends(dsn: str, after: float, **options) -> AttachResult:
    """attach(orders) while a session idle in a transaction (which no idle_session_timeout ends)
    holds it, for `after` seconds."""
    blocker = _holding(dsn, "orders")
    ender = _ends_after(after, blocker)
    try:
        return attach(dsn, tables=["orders"], **options)
    finally:
        ender.join()
        blocker.close()


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
    assert raised.value.context == {"slot": "flux", "publication": "flux"}
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
    result = _attach_behind_a_transaction_that_ends(dsn, 0.5, lock_timeout=0.2)
    assert result.tables == ["public.orders"] and _identity(conn, "orders") == "f"


def test_detach_behind_a_long_transaction_leaves_the_attachment_whole(dsn, conn):
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    attach(dsn, tables=["orders"])
    blocker = _holding(dsn, "orders")
    try:
        with pytest.raises(LockTimeoutError, match="Detach changed nothing") as raised:
            detach(dsn, lock_timeout=0.2)
    finally:
        blocker.close()
    assert raised.value.context == {"slot": "flux", "publication": "flux"}
    assert _identity(conn, "orders") == "f"
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()[0] == 1
    assert detach(dsn).restored == [{"table": "public.orders", "restored": "DEFAULT"}]


def test_detach_drop_data_of_the_kept_data_behind_a_long_reader_gives_up_and_names_it(dsn, conn):
    """Dropping the data an earlier detach kept waited as long as a reader of it held a table, and
    the gateway's trace writes queued behind the DROP meanwhile."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    attach(dsn, tables=["orders"])
    detach(dsn)  # the recorded data kept
    blocker = _holding(dsn, "flux.state_mutations")
    try:
        dropping, outcome = _in_thread(lambda: detach(dsn, drop_data=True, lock_timeout=0.1))
        dropping.join(timeout=15)
        pid = blocker.info.backend_pid
    finally:
        blocker.close()
    dropping.join(timeout=30)
    assert outcome and isinstance(outcome[0], LockTimeoutError), outcome
    assert f"pid {pid} (postgres, long-report) holds flux.state_mutations (AccessShareLock)" in outcome[0].message
    assert conn.execute("SELECT to_regnamespace('flux') IS NOT NULL").fetchone() == (True,)
    assert detach(dsn, drop_data=True).data_dropped


def test_detach_drop_data_behind_a_long_reader_of_the_recorded_data_names_it(dsn, conn):
    """It named the holders of the captured tables only: 'a transaction that has ended since'."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    attach(dsn, tables=["orders"])
    blocker = _holding(dsn, "flux.state_mutations")
    try:
        with pytest.raises(LockTimeoutError) as raised:
            detach(dsn, drop_data=True, lock_timeout=0.1)
        pid = blocker.info.backend_pid
    finally:
        blocker.close()
    assert f"pid {pid} (postgres, long-report) holds flux.state_mutations (AccessShareLock)" in raised.value.message
    assert _identity(conn, "orders") == "f"  # changed nothing


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


@pytest.mark.parametrize(("statement_timeout", "most_s"), [(None, 0.5), ("300ms", 0.25)], ids=["plain", "statement-timeout"])
def test_the_engines_capture_does_not_queue_again_behind_the_transaction_it_gave_way_to(dsn, conn, statement_timeout, most_s):
    """Each pass (about every 10 s) queued its ALTER behind the same long transaction for a second:
    the table's other queries stopped a second in every ten for as long as that transaction ran. And
    under a statement_timeout the database sets below the pass's lock bound, its session (which kept
    the database's timeouts) had the wait cancelled (57014, not a lock timeout), so the pass did not
    note whom it gave way to and queued again, to the timeout, at every pass."""
    attach(dsn, all_tables=True)
    conn.execute("DROP EVENT TRIGGER flux_capture_new_tables")  # as for a role that may not own one
    conn.execute("CREATE TABLE late (id int PRIMARY KEY)")
    if statement_timeout is not None:
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET statement_timeout = '{statement_timeout}'")
    blocker = _holding(dsn, "late")
    try:
        assert reconcile_new_tables(dsn, slot="flux") == []  # it waited, and gave way
        started = time.monotonic()
        assert reconcile_new_tables(dsn, slot="flux") == []
        took = time.monotonic() - started
    finally:
        blocker.close()
    assert took < most_s, took
    assert reconcile_new_tables(dsn, slot="flux") == ["REPLICA IDENTITY FULL on public.late"]  # that transaction ended


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


@pytest.mark.parametrize("timeout", ["lock_timeout", "statement_timeout"])
def test_attach_waits_for_its_slot_past_the_databases_timeout_for_applications(dsn, conn, timeout):
    """The slot waits for the transactions running when it is made, which blocks nobody: a
    lock_timeout or statement_timeout set for the database's applications cancelled it."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE other (id int)")
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET {timeout} = '500ms'")
    writer = psycopg.connect(dsn, application_name="batch-job")
    writer.execute("INSERT INTO other VALUES (1)")  # a transaction with an xid, left open
    try:
        result = attach(dsn, tables=["orders"], on_wait=lambda lines: writer.commit())  # after 2 s
    finally:
        writer.close()
    assert "replication slot flux" in result.created


def test_attach_outlasts_the_databases_idle_session_timeout_between_tries(dsn, conn):
    """The session idled in the pause between two tries (1 s, then 2 s), and the server ended it."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET idle_session_timeout = '500ms'")
    result = _attach_behind_a_transaction_that_ends(dsn, 1.5)  # during the second try's pause
    assert result.tables == ["public.orders"] and _identity(conn, "orders") == "f"


def test_detach_outlasts_the_databases_idle_session_timeout_between_tries(dsn, conn):
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    attach(dsn, tables=["orders"])
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET idle_session_timeout = '500ms'")
    blocker = _holding(dsn, "orders")
    ender = _ends_after(1.5, blocker)
    try:
        result = detach(dsn)
    finally:
        ender.join()
        blocker.close()
    assert result.restored == [{"table": "public.orders", "restored": "DEFAULT"}]


def test_attach_through_a_pooler_leaves_the_databases_timeouts_to_its_other_clients(dsn, conn, bouncer_dsn):
    """Its server connection goes on serving others: a timeout turned off there would stay off."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET statement_timeout = '1min'")
    attach(bouncer_dsn, tables=["orders"])
    with psycopg.connect(bouncer_dsn, autocommit=True) as other:  # PgBouncer hands on the connection released last
        assert other.execute("SHOW statement_timeout").fetchone() == ("1min",)


def test_the_slots_watch_outlasts_the_databases_idle_session_timeout(dsn, conn):
    """The watch's session idled a second between two looks, and the server ended it: attach said
    nothing more of what its slot waited for."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE other (id int)")
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET idle_session_timeout = '500ms'")
    writers = {}
    for job in ("job-1", "job-2"):  # two transactions with an xid, left open
        writer = psycopg.connect(dsn, application_name=job)
        writer.execute("INSERT INTO other VALUES (1)")
        writers[writer.info.backend_pid] = writer
    told: list[list[str]] = []

    def report(lines: list[str]) -> None:
        told.append(lines)
        writers[int(lines[0].split()[1])].commit()  # the job it names ends

    enders = [_ends_after(10, writer) for writer in writers.values()]  # should the watch fall silent
    try:
        result = attach(dsn, tables=["orders"], on_wait=report)
    finally:
        for ender in enders:
            ender.cancel()
        for writer in writers.values():
            writer.close()
    assert "replication slot flux" in result.created
    assert len(told) == 2, told


@contextmanager
def _prepared(dsn: str, conn, statement: str) -> Iterator[str]:
    """A transaction that ran `statement` and was PREPAREd for a two-phase commit, then left: its
    gid. Rolled back afterwards if it is still there."""
    gid = f"xa-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as session:
        session.execute("BEGIN")
        session.execute(statement)
        session.execute(f"PREPARE TRANSACTION '{gid}'")
    try:
        yield gid
    finally:
        if conn.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchone():
            conn.execute(f"ROLLBACK PREPARED '{gid}'")


def test_attach_behind_a_prepared_transaction_names_it_with_what_ends_it(dsn, conn):
    """It said 'a prepared transaction (4/2) ... see pg_prepared_xacts': a virtual transaction id,
    which that view does not show."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    with _prepared(dsn, conn, "SELECT count(*) FROM orders") as gid:
        with pytest.raises(LockTimeoutError) as raised:
            attach(dsn, tables=["orders"], lock_timeout=0.1)
    assert (f"prepared transaction '{gid}' (postgres, database {conn.info.dbname}) holds public.orders (AccessShareLock), "
            "prepared ") in raised.value.message
    assert f"it ends only with COMMIT PREPARED '{gid}' or ROLLBACK PREPARED '{gid}', run in database" in raised.value.message


def test_attach_says_its_slot_waits_for_a_prepared_transaction_and_what_ends_it(dsn, conn):
    """pg_blocking_pids gives 0 for a prepared transaction: attach said 'pid 0 (?), ?: None'."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE other (id int)")
    told: list[list[str]] = []

    def report(lines: list[str]) -> None:
        told.append(lines)
        conn.execute(f"ROLLBACK PREPARED '{gid}'")

    with _prepared(dsn, conn, "INSERT INTO other VALUES (1)") as gid:
        result = attach(dsn, tables=["orders"], on_wait=report)
    assert "replication slot flux" in result.created
    assert len(told) == 1 and len(told[0]) == 1, told
    assert told[0][0].startswith(f"prepared transaction '{gid}' (postgres, database {conn.info.dbname}), prepared "), told
    assert f"ROLLBACK PREPARED '{gid}'" in told[0][0]


def _until(conn, query: str, params: tuple = (), timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not conn.execute(query, params).fetchone()[0]:
        assert time.monotonic() < deadline, f"never true: {query}"
        time.sleep(0.01)


def _in_thread(target) -> tuple[threading.Thread, list]:
    """`target()` in a thread; the list gets its result, or the exception it raised."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(target())
        except Exception as exc:  # the test asserts on it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _taking_the_tables_in_the_other_order(dsn: str, conn, flux_step) -> tuple[object, object]:
    """The application's transaction holds c, then asks for a, which Flux holds while it waits for b
    (a report's) and then c: a cycle. Flux must be the one that steps aside, and the application's
    transaction commit. Returns what the application's query and `flux_step` came to."""
    conn.execute("INSERT INTO c VALUES (1)")
    report = _holding(dsn, "b")
    app = psycopg.connect(dsn, application_name="checkout")
    try:
        app.execute("DELETE FROM c")  # holds c (and, unlike an INSERT into a partition, not its parent)
        flux, flux_outcome = _in_thread(flux_step)
        _until(conn, "SELECT EXISTS (SELECT FROM pg_locks WHERE relation = 'a'::regclass AND mode = 'AccessExclusiveLock'"
                     " AND granted)")
        query, query_outcome = _in_thread(lambda: app.execute("SELECT count(*) FROM a").fetchone())
        _until(conn, "SELECT EXISTS (SELECT FROM pg_locks WHERE pid = %s AND NOT granted)", (app.info.backend_pid,))
        time.sleep(0.2)  # the application has waited a while when Flux gets b and asks for c
        report.commit()
        query.join(timeout=10)
        if query_outcome and not isinstance(query_outcome[0], Exception):
            app.commit()
        flux.join(timeout=30)
    finally:
        report.close()
        app.close()
    if query_outcome[0] == (0,):
        assert conn.execute("SELECT count(*) FROM c").fetchone() == (0,)  # the application's transaction committed
    return query_outcome[0], flux_outcome[0]


def test_an_application_transaction_taking_attachs_tables_in_the_other_order_is_not_the_one_aborted(dsn, conn):
    """Attach altered a, waited for b, then c, holding a all along: PostgreSQL's deadlock check ran
    first in the application's backend, which had waited longer, and aborted its transaction (40P01)."""
    for table in "abc":
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    query, result = _taking_the_tables_in_the_other_order(dsn, conn, lambda: attach(dsn, tables=["a", "b", "c"]))
    assert query == (0,), query
    assert not isinstance(result, Exception), result
    assert [_identity(conn, table) for table in "abc"] == ["f", "f", "f"]


def test_an_application_transaction_taking_detachs_tables_in_the_other_order_is_not_the_one_aborted(dsn, conn):
    for table in "abc":
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    attach(dsn, tables=["a", "b", "c"])
    query, result = _taking_the_tables_in_the_other_order(dsn, conn, lambda: detach(dsn))
    assert query == (0,), query
    assert not isinstance(result, Exception), result
    assert [_identity(conn, table) for table in "abc"] == ["d", "d", "d"]


def _waits_on_a_table_held_while_flux_waits_for_another(dsn: str, conn, flux_step) -> float:
    """The longest a query of a waited while Flux, which needs a and b, waited for b (a report's)."""
    report = _holding(dsn, "b")
    flux, outcome = _in_thread(flux_step)
    longest = 0.0
    try:
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute("SET statement_timeout = '2s'")
            until = time.monotonic() + 2.5  # --lock-timeout 2: the first try and part of the pause after it
            while time.monotonic() < until:
                started = time.monotonic()
                app.execute("SELECT count(*) FROM a")
                longest = max(longest, time.monotonic() - started)
                time.sleep(0.02)
    finally:
        report.close()  # the report ends: the next try goes through
    flux.join(timeout=30)
    assert outcome and not isinstance(outcome[0], Exception), outcome
    return longest


def _one_try_at_most(conn) -> float:
    """The longest a try holding some tables waits for the others: before deadlock_timeout (here the server's)."""
    deadlock_ms = conn.execute("SELECT setting::float FROM pg_settings WHERE name = 'deadlock_timeout'").fetchone()[0]
    return 0.8 * deadlock_ms / 1000 + 0.2  # and a little for the rollback and this test's own round trips


def test_while_attach_waits_for_one_table_a_table_it_holds_waits_one_bounded_try_at_most(dsn, conn):
    """Attach held a (altered) for as long as it waited for b: --lock-timeout, 2 s here."""
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    longest = _waits_on_a_table_held_while_flux_waits_for_another(
        dsn, conn, lambda: attach(dsn, tables=["a", "b"], lock_timeout=2))
    assert longest < _one_try_at_most(conn), longest
    assert [_identity(conn, table) for table in "ab"] == ["f", "f"]


def test_while_detach_waits_for_one_table_a_table_it_holds_waits_one_bounded_try_at_most(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    attach(dsn, tables=["a", "b"])
    longest = _waits_on_a_table_held_while_flux_waits_for_another(dsn, conn, lambda: detach(dsn, lock_timeout=2))
    assert longest < _one_try_at_most(conn), longest
    assert [_identity(conn, table) for table in "ab"] == ["d", "d"]


def test_the_engines_capture_of_a_partitioned_table_steps_aside_for_an_application_taking_its_partitions_in_the_other_order(
        dsn, conn):
    """The engine set FULL on the partitions one after another in one transaction, holding a while it
    waited for b, then c: the application's transaction was the one aborted (40P01)."""
    conn.execute("CREATE TABLE late (id int PRIMARY KEY)")
    attach(dsn, tables=["late"])
    conn.execute("DROP EVENT TRIGGER flux_capture_new_tables")  # as for a role that may not own one
    conn.execute("DROP TABLE late")  # and created again, partitioned: the engine captures it by its name
    conn.execute("CREATE TABLE late (id int PRIMARY KEY) PARTITION BY RANGE (id)")
    for table, values in (("a", "10) TO (20"), ("b", "20) TO (30"), ("c", "0) TO (10")):
        conn.execute(f"CREATE TABLE {table} PARTITION OF late FOR VALUES FROM ({values})")
    query, changed = _taking_the_tables_in_the_other_order(dsn, conn, lambda: reconcile_new_tables(dsn, slot="flux"))
    assert query == (0,), query
    assert changed == []  # it gave way, and captures the table on its next pass:
    assert reconcile_new_tables(dsn, slot="flux") == ["public.late"]
    assert [_identity(conn, table) for table in ("late", "a", "b", "c")] == ["f", "f", "f", "f"]


def test_attach_of_several_tables_gives_up_within_deadlock_timeout_and_says_a_longer_lock_timeout_would_not_help(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET deadlock_timeout = '100ms'")  # attach's sessions see it
    blocker = _holding(dsn, "b")
    try:
        with pytest.raises(LockTimeoutError) as raised:
            attach(dsn, tables=["a", "b"], lock_timeout=0.1)
    finally:
        blocker.close()
    assert "(waited 0.08 s, 5 times" in raised.value.message
    assert "gives up within 0.08 s, before deadlock_timeout (100 ms, the shortest a session of the database starts with:" \
        in raised.value.hint
    assert "pass --lock-timeout" not in raised.value.hint
    assert [_identity(conn, table) for table in "ab"] == ["d", "d"]


@contextmanager
def _application_role(conn, dsn: str, deadlock_timeout: str) -> Iterator[str]:
    """A login role given its own deadlock_timeout (`ALTER ROLE ... SET`), which may use a and b:
    a DSN that logs in as it."""
    name = f"checkout_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {name} LOGIN")
    try:
        conn.execute(f"ALTER ROLE {name} SET deadlock_timeout = '{deadlock_timeout}'")
        conn.execute(f"GRANT SELECT, DELETE ON a, b TO {name}")
        yield dsn.replace("postgres@", f"{name}@")
    finally:
        conn.execute(f"DROP OWNED BY {name}")
        conn.execute(f"DROP ROLE {name}")


def _cycle_closed_by_an_application_role(dsn: str, conn, flux_step) -> tuple[object, object]:
    """The application's role has a deadlock_timeout of 500 ms, the server 1 s. Its transaction holds
    b, and asks for a once Flux, which locks a then b, holds a and waits for b: a cycle, which the
    application's backend checks for first. Returns what its query and `flux_step` came to."""
    assert conn.execute("SHOW deadlock_timeout").fetchone() == ("1s",)
    conn.execute("INSERT INTO b VALUES (1)")
    with _application_role(conn, dsn, "500ms") as app_dsn:
        app = psycopg.connect(app_dsn, application_name="checkout")
        try:
            assert app.execute("SHOW deadlock_timeout").fetchone() == ("500ms",)
            app.execute("DELETE FROM b")
            flux, flux_outcome = _in_thread(flux_step)
            _until(conn, "SELECT EXISTS (SELECT FROM pg_locks WHERE relation = 'a'::regclass AND mode = 'AccessExclusiveLock'"
                         " AND granted)", timeout=10)
            asked = time.monotonic()
            query, query_outcome = _in_thread(lambda: app.execute("SELECT count(*) FROM a").fetchone())
            query.join(timeout=10)
            assert time.monotonic() - asked > 0.1  # it waited behind Flux: the cycle was closed
            if query_outcome and not isinstance(query_outcome[0], Exception):
                app.commit()
            flux.join(timeout=30)
        finally:
            app.close()
    if query_outcome[0] == (0,):
        assert conn.execute("SELECT count(*) FROM b").fetchone() == (0,)  # the application's transaction committed
    return query_outcome[0], flux_outcome[0]


def test_an_application_role_with_a_shorter_deadlock_timeout_is_not_the_one_aborted_by_attach(dsn, conn):
    """Attach's try gave up at 80% of the server's deadlock_timeout (0.8 s): a role whose own was
    500 ms ran its deadlock check first, and its transaction was aborted (40P01)."""
    for table in "ab":
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    query, result = _cycle_closed_by_an_application_role(dsn, conn, lambda: attach(dsn, tables=["a", "b"]))
    assert query == (0,), query
    assert not isinstance(result, Exception), result
    assert [_identity(conn, table) for table in "ab"] == ["f", "f"]


def test_an_application_role_with_a_shorter_deadlock_timeout_is_not_the_one_aborted_by_the_engines_capture(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    conn.execute("DROP EVENT TRIGGER flux_capture_new_tables")  # as for a role that may not own one
    conn.execute("DROP TABLE a")  # and created again, partitioned: the engine captures it and b by its name
    conn.execute("CREATE TABLE a (id int PRIMARY KEY) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE b PARTITION OF a FOR VALUES FROM (0) TO (10)")
    query, changed = _cycle_closed_by_an_application_role(dsn, conn, lambda: reconcile_new_tables(dsn, slot="flux"))
    assert query == (0,), query
    assert changed == []  # it gave way, and captures the table on its next pass:
    assert reconcile_new_tables(dsn, slot="flux") == ["public.a"]
    assert [_identity(conn, table) for table in "ab"] == ["f", "f"]


@pytest.mark.parametrize(("setting", "ms"), [
    ("ALTER ROLE {role} SET deadlock_timeout = '0.25s'", 250),
    ("ALTER ROLE {role} IN DATABASE {db} SET deadlock_timeout = 200", 200),  # a plain number is ms
    ("ALTER DATABASE {db} SET deadlock_timeout = '0.3s'", 300),
    ("ALTER ROLE ALL SET deadlock_timeout = '90 ms'", 90),
    ("ALTER ROLE ALL IN DATABASE {db} SET deadlock_timeout = '1500us'", 2),  # PostgreSQL rounds to whole ms
    ("ALTER ROLE {role} IN DATABASE postgres SET deadlock_timeout = '100ms'", 1000),  # another database's: the server's
])
def test_the_deadlock_bound_is_the_shortest_any_session_of_the_database_starts_with_read_by_a_plain_role(
        dsn, conn, setting, ms):
    """A role without privileges, as flux_attach has none on the catalogs, reads them all."""
    reader, role = (f"{what}_{uuid.uuid4().hex[:8]}" for what in ("reader", "app"))
    conn.execute(f"CREATE ROLE {reader} LOGIN")
    conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        conn.execute(setting.format(role=role, db=conn.info.dbname))
        with psycopg.connect(dsn.replace("postgres@", f"{reader}@")) as flux:
            assert shortest_deadlock_timeout_ms(flux) == ms
            assert flux.execute("SHOW lock_timeout").fetchone() == ("0",)  # left as it was
    finally:
        conn.execute("ALTER ROLE ALL RESET deadlock_timeout")
        conn.execute(f"ALTER ROLE ALL IN DATABASE {conn.info.dbname} RESET deadlock_timeout")
        conn.execute(f"DROP ROLE {reader}")
        conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize(("per_slot", "slots", "in_use", "tables"), [(64, 120, 100, 5000), (10, 20, 30, 151), (64, 120, 7000, 400)])
def test_the_max_locks_per_transaction_a_refusal_suggests_makes_room_for_its_tables(per_slot, slots, in_use, tables):
    room = LockRoom(per_slot=per_slot, slots=slots, in_use=in_use)
    with pytest.raises(PreflightError) as raised:
        refuse_too_many_locks(room, tables, action="Attach changed nothing")
    suggested = int(re.search(r"max_locks_per_transaction = (\d+),", raised.value.hint).group(1))
    assert suggested > per_slot and suggested % 64 == 0
    refuse_too_many_locks(LockRoom(per_slot=suggested, slots=slots, in_use=in_use), tables, action="Attach changed nothing")


def _while_attach_waits_for_b(dsn: str, conn, run, statements: list[str]) -> None:
    """Run `run` (an attach) while another session holds table b, run `statements` once it waits for
    that lock, then let it go on; the attach must succeed."""
    report = _holding(dsn, "b")
    try:
        flux, outcome = _in_thread(run)
        _until(conn, "SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity s USING (pid)"
                     " WHERE s.application_name = 'flux' AND NOT l.granted)")
        for statement in statements:
            conn.execute(statement)
    finally:
        report.rollback()
        report.close()
    flux.join(timeout=30)
    assert not isinstance(outcome[0], Exception), outcome[0]


def test_a_table_created_while_an_all_tables_attach_waits_for_a_lock_is_published_full(dsn, conn):
    """A schema publication holds every table of its schemas: one created after attach had read them (while a
    try waited, or between its batches) was published with its key-only identity, its updates recorded so."""
    for table in "ab":
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    _while_attach_waits_for_b(dsn, conn, lambda: attach(dsn, all_tables=True), [
        "CREATE TABLE c (id int PRIMARY KEY)", "CREATE SCHEMA later", "CREATE TABLE later.d (id int PRIMARY KEY)"])
    assert dict(conn.execute("SELECT relname, relreplident FROM pg_class WHERE relname IN ('a', 'b', 'c', 'd')").fetchall()) == {
        "a": "f", "b": "f", "c": "f", "d": "f"}
    assert conn.execute("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'flux'").fetchone() == (4,)


def test_a_listed_table_dropped_while_attach_waits_for_a_lock_is_left_out_and_the_rest_attached(dsn, conn):
    """Attach failed whole ('relation "public.c" does not exist'), its try having read the list before the DROP."""
    for table in "abc":
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    _while_attach_waits_for_b(dsn, conn, lambda: attach(dsn, tables=["a", "b", "c"]), ["DROP TABLE c"])
    assert conn.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = 'flux' ORDER BY 1").fetchall() == [
        ("a",), ("b",)]
