"""`flux.store.retention`: pruning traces by start time and mutations by commit time, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import psycopg
import pytest

from flux.errors import ConfigError, DatabaseError, InUseError, NotFoundError
from flux.project import Retention
from flux.store.retention import Pruned, first_lsn_at_or_after, keep, prune, pruned_before
from flux.store.schema import ensure_schema
from flux.store.traces import insert_traces
from tests.traces_seed import NOW, trace


def transaction(conn: psycopg.Connection, lsn: int, days_ago: float, rows: int = 1) -> None:
    """One committed transaction of `rows` row changes, as the engine records it."""
    conn.execute(
        "INSERT INTO flux.state_mutations (schema_name, table_name, op, row_key, new, xid, commit_lsn, commit_time, seq)"
        " SELECT 'public', 'users', 'insert', jsonb_build_object('id', s), jsonb_build_object('id', s), 1,"
        " '0/0'::pg_lsn + %s::numeric, %s, s FROM generate_series(0, %s - 1) s",
        (lsn, NOW - timedelta(days=days_ago), rows),
    )


@pytest.fixture
def recorded(conn: psycopg.Connection) -> psycopg.Connection:
    """Traces started 40, 31, 29 and 1 days ago; transactions committed then, with LSNs far apart."""
    ensure_schema(conn)
    insert_traces(conn, [trace(f"{days:08x}-0000-4000-8000-000000000000", ago=timedelta(days=days)) for days in (40, 31, 29, 1)])
    for lsn, days, rows in [(0x1000, 40, 3), (0x5_0000_0000, 31, 1), (0x5_0000_0100, 29, 2), (0x9_0000_0000, 1, 1)]:
        transaction(conn, lsn, days, rows)
    return conn


def remaining(conn: psycopg.Connection) -> tuple[list[int], list[int]]:
    traces = [round((NOW - t).total_seconds() / 86400) for (t,) in conn.execute(
        "SELECT started_at FROM flux.trace_requests ORDER BY started_at")]
    mutations = [round((NOW - t).total_seconds() / 86400) for (t,) in conn.execute(
        "SELECT commit_time FROM flux.state_mutations ORDER BY commit_lsn, seq")]
    return traces, mutations


def test_prune_deletes_what_is_older_than_the_cutoff_and_keeps_the_rest(recorded):
    result = prune(recorded, older_than=timedelta(days=30))
    assert (result.traces, result.mutations, result.dry_run) == (2, 4, False)
    assert remaining(recorded) == ([29, 1], [29, 29, 1])


def test_a_dry_run_counts_and_deletes_nothing(recorded):
    result = prune(recorded, older_than=timedelta(days=30), dry_run=True)
    assert (result.traces, result.mutations, result.dry_run) == (2, 4, True)
    assert remaining(recorded) == ([40, 31, 29, 1], [40, 40, 40, 31, 29, 29, 1])


def test_prune_can_leave_either_log_alone(recorded):
    result = prune(recorded, older_than=timedelta(days=30), traces=False)
    assert (result.traces, result.mutations) == (None, 4)
    assert remaining(recorded) == ([40, 31, 29, 1], [29, 29, 1])


def test_a_cutoff_past_every_mutation_deletes_them_all(recorded):
    assert prune(recorded, older_than=timedelta(hours=1)).mutations == 7
    assert remaining(recorded) == ([], [])


def test_a_prune_that_finds_nothing_older_records_no_cutoff(recorded):
    # Readers would say that what came before it was deleted by retention: [retention]'s first pass
    # in a young database said so of every trace not found and every row older than the attachment.
    result = prune(recorded, older_than=timedelta(days=50))
    assert (result.traces, result.mutations) == (0, 0)
    assert pruned_before(recorded) == Pruned()


def test_a_later_prune_that_finds_nothing_older_keeps_the_earlier_cutoff(recorded):
    prune(recorded, older_than=timedelta(days=30))
    earlier = pruned_before(recorded)
    assert earlier.traces is not None and earlier.mutations is not None
    prune(recorded, older_than=timedelta(days=30))  # a later now(), and nothing left before it
    assert pruned_before(recorded) == earlier


def test_prune_deletes_in_batches_and_reports_each(recorded):
    seen: list[tuple[str, int, int]] = []
    prune(recorded, older_than=timedelta(days=30), batch_rows=100, progress=lambda *p: seen.append(p))
    assert seen == [("traces", 2, 2), ("mutations", 4, 4)]
    for lsn in range(200):
        transaction(recorded, 0x10 + lsn, 50)
    seen.clear()
    prune(recorded, older_than=timedelta(days=30), batch_rows=100, progress=lambda *p: seen.append(p))
    assert seen == [("traces", 0, 0), ("mutations", 100, 200), ("mutations", 200, 200)]


def stopped_after_first_batch(conn: psycopg.Connection, batch_rows: int) -> int:
    """Prune mutations older than 30 days, stopping after the first batch; how many it deleted."""
    stop = threading.Event()
    return prune(conn, older_than=timedelta(days=30), traces=False, batch_rows=batch_rows,
                 progress=lambda *_: stop.set(), stop=stop).mutations


def partial_transactions(conn: psycopg.Connection) -> list:
    return conn.execute("SELECT commit_lsn::text, count(*) FROM flux.state_mutations GROUP BY 1"
                        " HAVING count(*) <> max(seq) + 1").fetchall()


def test_a_batch_ends_at_a_transaction_boundary(conn):
    ensure_schema(conn)
    for lsn in range(100):
        transaction(conn, 0x10 + lsn, 50, rows=3)
    assert stopped_after_first_batch(conn, 100) == 99  # 33 transactions: the 34th would not fit
    assert partial_transactions(conn) == []


def test_a_transaction_larger_than_a_batch_goes_in_one(conn):
    ensure_schema(conn)
    transaction(conn, 0x10, 50, rows=250)
    transaction(conn, 0x20, 50, rows=1)
    assert stopped_after_first_batch(conn, 100) == 250
    assert conn.execute("SELECT count(*) FROM flux.state_mutations").fetchone() == (1,)


def test_the_cutoff_is_in_utc_whatever_the_sessions_time_zone(recorded):
    recorded.execute("SET TimeZone = 'Pacific/Chatham'")
    result = prune(recorded, older_than=timedelta(days=30), dry_run=True)
    assert result.cutoff.utcoffset() == timedelta(0)


def test_the_cut_lsn_is_the_first_transaction_committed_at_or_after_the_cutoff(conn):
    ensure_schema(conn)
    rng = random.Random(7)
    lsn, days = 0x100, 400.0
    for _ in range(300):  # gaps from bytes to terabytes of WAL; commit times rise with LSNs
        lsn += rng.choice([1, 0x40, 0x10_0000, 0x3_0000_0000, 0x100_0000_0000])
        days -= rng.random() * 2
        transaction(conn, lsn, days, rows=rng.choice([1, 1, 3]))
    for cutoff_days in [500, 400, 250.5, 100, 7, 3.25, 0.5, -1] + [rng.uniform(0, 400) for _ in range(30)]:
        cutoff = NOW - timedelta(days=cutoff_days)
        expected = conn.execute("SELECT min(commit_lsn)::text FROM flux.state_mutations WHERE commit_time >= %s",
                                (cutoff,)).fetchone()[0]
        assert first_lsn_at_or_after(conn, cutoff) == expected, cutoff_days


def test_a_transaction_recorded_while_a_prune_finds_every_one_older_is_kept(conn, dsn):
    """Every recorded transaction older than the cutoff: the cut was the newest LSN plus one, read
    again after the search, so a transaction the engine recorded in between was deleted with them."""
    ensure_schema(conn)
    transaction(conn, 0x1000, 40)

    class EngineCommitsMeanwhile(psycopg.Cursor):
        recorded = False

        def execute(self, query, params=None, **kwargs):
            result = super().execute(query, params, **kwargs)
            if "flux.state_mutations" in str(query) and not EngineCommitsMeanwhile.recorded:
                EngineCommitsMeanwhile.recorded = True  # after the prune's first read of the log
                transaction(conn, 0x2000, 0)
            return result

    with psycopg.connect(dsn, autocommit=True, cursor_factory=EngineCommitsMeanwhile) as pruner:
        assert prune(pruner, older_than=timedelta(days=30), traces=False).mutations == 1
    assert conn.execute("SELECT commit_lsn::text FROM flux.state_mutations").fetchall() == [("0/2000",)]


def test_a_transaction_longer_to_delete_than_the_databases_statement_timeout_is_deleted(conn, dsn):
    """A transaction larger than a batch goes in one statement: under the database's statement_timeout
    it was cancelled at every run, and no prune ever got past it."""
    ensure_schema(conn)
    transaction(conn, 0x10, 40, rows=100_000)
    conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET statement_timeout = 20')
    with psycopg.connect(dsn, autocommit=True) as pruner:
        assert prune(pruner, older_than=timedelta(days=30), batch_rows=100).mutations == 100_000
        assert pruner.execute("SHOW statement_timeout").fetchone() == ("20ms",)  # the session's own, set back


def test_a_second_prune_at_the_same_time_is_refused_naming_the_session_that_prunes(recorded, dsn):
    with psycopg.connect(dsn, autocommit=True, application_name="flux serve retention") as other:
        other.execute("SELECT pg_advisory_lock(hashtext('flux.prune'))")
        with pytest.raises(InUseError) as refused:
            prune(recorded, older_than=timedelta(days=30))
        assert f"(pid {other.info.backend_pid}, flux serve retention from 127.0.0.1, " in refused.value.message
        other.execute("SELECT pg_advisory_unlock(hashtext('flux.prune'))")
        assert prune(recorded, older_than=timedelta(days=30)).traces == 2


def test_prune_refuses_a_database_without_the_flux_schema(conn):
    with pytest.raises(NotFoundError):
        prune(conn, older_than=timedelta(days=30))


@pytest.mark.parametrize("kwargs", [{"older_than": timedelta(0)}, {"older_than": timedelta(days=1), "traces": False,
                                                                    "mutations": False}])
def test_prune_refuses_nothing_to_do(recorded, kwargs):
    with pytest.raises(ConfigError):
        prune(recorded, **kwargs)


def test_a_set_stop_ends_the_prune_after_its_batch_in_hand(recorded):
    stop = threading.Event()
    for lsn in range(300):
        transaction(recorded, 0x10 + lsn, 50)

    def progress(what: str, done: int, total: int) -> None:
        if what == "mutations":
            stop.set()  # during the first batch of mutations

    result = prune(recorded, older_than=timedelta(days=30), batch_rows=100, progress=progress, stop=stop)
    assert (result.traces, result.mutations) == (2, 100)
    assert recorded.execute("SELECT count(*) FROM flux.state_mutations WHERE commit_lsn < '0/1000'").fetchone() == (200,)


def test_keep_applies_the_projects_retention_until_cancelled(recorded, dsn):
    periods = Retention(traces=timedelta(days=30), mutations=timedelta(days=35))

    async def main() -> None:
        keeper = asyncio.create_task(keep(dsn, lambda: periods, every_s=0.05, first_after_s=0))
        deadline = time.monotonic() + 10
        while remaining(recorded) != ([29, 1], [31, 29, 29, 1]):
            assert time.monotonic() < deadline, remaining(recorded)
            await asyncio.sleep(0.05)
        keeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await keeper

    asyncio.run(main())


def test_keep_logs_a_pass_that_fails_unexpectedly_and_goes_on(recorded, dsn, caplog):
    # A period of the wrong type stands for any bug of Flux's in a pass: neither a FluxError nor a
    # database error. It must not end retention for good, nor stop the other log's pass.
    periods = Retention(traces="30d", mutations=timedelta(days=35))  # type: ignore[arg-type]

    async def main() -> None:
        keeper = asyncio.create_task(keep(dsn, lambda: periods, every_s=0.05, first_after_s=0))
        deadline = time.monotonic() + 10
        while remaining(recorded)[1] != [31, 29, 29, 1] or len(caplog.records) < 2:
            assert time.monotonic() < deadline, (remaining(recorded), caplog.records)
            await asyncio.sleep(0.05)
        assert not keeper.done()
        keeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await keeper

    with caplog.at_level("ERROR", logger="flux.retention"):
        asyncio.run(main())
    assert all(r.getMessage().startswith("pruning traces failed unexpectedly") and r.exc_info for r in caplog.records)


def test_a_prune_stopped_before_it_finished_says_so(recorded):
    stop = threading.Event()
    result = prune(recorded, older_than=timedelta(days=30), progress=lambda *_: stop.set(), stop=stop)
    assert (result.traces, result.mutations, result.stopped) == (2, 0, True)
    assert prune(recorded, older_than=timedelta(days=30)).stopped is False


def test_prune_refuses_a_batch_of_no_rows(recorded):
    stop = threading.Event()  # set after a few batches, should a batch of no rows be tried: it never comes back short
    calls: list[int] = []

    def progress(*_) -> None:
        calls.append(1)
        if len(calls) > 5:
            stop.set()

    with pytest.raises(ConfigError):
        prune(recorded, older_than=timedelta(days=30), batch_rows=0, progress=progress, stop=stop)


def test_a_stopping_server_ends_a_pass_waiting_on_a_lock_at_once(recorded, dsn):
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE flux.trace_requests IN ACCESS EXCLUSIVE MODE")
        release = threading.Timer(20, locker.rollback)  # without a cancel, the pass would wait this long
        release.start()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flux-retention' AND wait_event_type = 'Lock'"

        async def main() -> None:
            keeper = asyncio.create_task(keep(dsn, lambda: Retention(traces=timedelta(days=30)), first_after_s=0))
            deadline = time.monotonic() + 10
            while recorded.execute(waiting).fetchone() != (1,):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            keeper.cancel()
            with pytest.raises(asyncio.CancelledError):
                await keeper

        started = time.monotonic()
        asyncio.run(main())  # returns once the pass's worker thread has ended
        stopped_in = time.monotonic() - started
        release.cancel()
        locker.rollback()
    assert stopped_in < 8
    assert remaining(recorded)[0] == [40, 31, 29, 1]  # the batch in hand rolled back


@contextmanager
def reader_role(conn: psycopg.Connection, dsn: str) -> Iterator[tuple[str, str]]:
    """A login role that may read the flux schema and nothing more: (its name, a DSN for it)."""
    role = f"reader_{conn.info.dbname}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        conn.execute(f"GRANT USAGE ON SCHEMA flux TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA flux TO {role}")
        yield role, dsn.replace("postgres@", f"{role}@")
    finally:
        conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_role_that_may_only_read_is_told_which_grants_a_prune_needs(recorded, dsn):
    with reader_role(recorded, dsn) as (_, role_dsn):
        with psycopg.connect(role_dsn, autocommit=True) as reader:
            assert prune(reader, older_than=timedelta(days=30), dry_run=True).traces == 2  # reading is enough
            with pytest.raises(DatabaseError) as caught:
                prune(reader, older_than=timedelta(days=30))
        assert caught.value.context["sqlstate"] == "42501" and "DELETE ON flux.trace_requests" in caught.value.hint
        assert remaining(recorded) == ([40, 31, 29, 1], [40, 40, 40, 31, 29, 29, 1])


def test_the_grants_the_hint_gives_are_enough_to_prune(recorded, dsn):
    """A DELETE with a WHERE reads what it deletes: a hint without SELECT sends the role to a second refusal."""
    with reader_role(recorded, dsn) as (role, role_dsn):
        recorded.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA flux FROM {role}; REVOKE USAGE ON SCHEMA flux FROM {role}")
        with psycopg.connect(role_dsn, autocommit=True) as reader:
            with pytest.raises(DatabaseError) as caught:
                prune(reader, older_than=timedelta(days=30))
        grants = re.findall(r"GRANT .+?;", caught.value.hint)
        assert grants
        for grant in grants:
            recorded.execute(grant)
        with psycopg.connect(role_dsn, autocommit=True) as granted:
            result = prune(granted, older_than=timedelta(days=30))
        assert (result.traces, result.mutations) == (2, 4)
        assert remaining(recorded) == ([29, 1], [29, 29, 1])


def test_a_role_that_may_prune_one_log_but_not_the_other_deletes_and_records_nothing(recorded, dsn):
    """It deleted the traces, recorded a mutations cutoff (readers then said the kept changes
    before it were deleted by retention), and only then was refused."""
    with reader_role(recorded, dsn) as (role, role_dsn):
        recorded.execute(f"GRANT DELETE ON flux.trace_requests TO {role}; GRANT INSERT, UPDATE ON flux.meta TO {role}")
        with psycopg.connect(role_dsn, autocommit=True) as pruner:
            with pytest.raises(DatabaseError) as caught:
                prune(pruner, older_than=timedelta(days=30))
        assert remaining(recorded) == ([40, 31, 29, 1], [40, 40, 40, 31, 29, 29, 1])
        assert pruned_before(recorded) == Pruned()
        assert caught.value.hint.endswith(f'run: GRANT DELETE ON flux.state_mutations TO "{role}"; --dry-run only reads.')


def test_a_lost_connection_is_reported_as_such_not_as_the_unlock_that_followed(recorded, dsn):
    for lsn in range(300):
        transaction(recorded, 0x10 + lsn, 50)
    with psycopg.connect(dsn, autocommit=True) as pruner:
        pid = pruner.info.backend_pid

        def progress(*_) -> None:  # after the first batch, the server ends the session
            recorded.execute("SELECT pg_terminate_backend(%s)", (pid,))

        with pytest.raises(psycopg.OperationalError) as caught:
            prune(pruner, older_than=timedelta(days=30), traces=False, batch_rows=100, progress=progress)
    assert "the connection is closed" not in str(caught.value), caught.value


def test_behind_pgbouncer_in_transaction_mode_a_prune_leaves_no_lock_behind(recorded, bouncer_dsn, server_hop, dsn):
    """A session advisory lock taken through PgBouncer stays on the server connection that ran it,
    and the unlock, run on another, releases nothing: later prunes were refused as 'running'."""
    for n in range(12):
        transaction(recorded, 0x10 + n, 50)
    with psycopg.connect(bouncer_dsn, autocommit=True) as pooled:
        result = prune(pooled, older_than=timedelta(days=30), batch_rows=2, progress=lambda *_: server_hop())
    assert (result.traces, result.mutations) == (2, 16)
    assert recorded.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0] == 0
    assert prune(recorded, older_than=timedelta(days=30)).mutations == 0  # not refused as if another were running


def test_behind_pgbouncer_a_prune_is_refused_while_another_holds_the_lock(recorded, bouncer_dsn, dsn):
    with psycopg.connect(dsn, autocommit=True) as other, psycopg.connect(bouncer_dsn, autocommit=True) as pooled:
        other.execute("SELECT pg_advisory_lock(hashtext('flux.prune'))")
        with pytest.raises(InUseError):
            prune(pooled, older_than=timedelta(days=30))
    assert remaining(recorded) == ([40, 31, 29, 1], [40, 40, 40, 31, 29, 29, 1])
