"""The `MutationSink` contract, kept by `PostgresSink` and by `PipelinedSink` around it, and what
the pipelined one adds: commits that complete behind the caller's back, never reported early."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import psycopg
import pytest

from flux.cdc.assembler import Backfill, MutationRow
from flux.cdc.pipelined import PipelinedSink
from flux.cdc.sink import PostgresSink, Progress
from flux.errors import ConnectionLostError

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(lsn: str, seq: int, *, request_id: str | None = None) -> MutationRow:
    return MutationRow(
        request_id, None if request_id is None else f'{{"request_id": "{request_id}"}}', "public", "t", "insert",
        f'{{"id": {seq}}}', None, f'{{"id": {seq}}}', None, None, ("id",), 7, lsn, T0, seq,
    )  # fmt: skip


def progress(lsn: int) -> Progress:
    return Progress("s", lsn, lsn + 8, T0)


def recorded(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT commit_lsn::text, seq, request_id FROM flux.state_mutations ORDER BY 1, 2").fetchall()


@pytest.fixture(params=["postgres", "pipelined"])
def sink(request, dsn):
    inner = PostgresSink(dsn=dsn)
    made = inner if request.param == "postgres" else PipelinedSink(inner, max_queued_rows=100)
    yield made
    made.close()


def _committed(sink, target: Progress, *, mutations: int) -> None:
    sink.commit(target, mutations=mutations)
    if isinstance(sink, PipelinedSink):
        sink.wait_durable(10)


def test_written_rows_are_invisible_until_the_commit_that_records_progress_with_them(sink, dsn):
    assert sink.load_progress("s") is None
    sink.write([row("0/10", 0), row("0/10", 1)])
    sink.write([row("0/20", 0)])
    assert recorded(dsn) == []
    _committed(sink, progress(0x20), mutations=3)
    assert recorded(dsn) == [("0/10", 0, None), ("0/10", 1, None), ("0/20", 0, None)]
    assert sink.load_progress("s") == progress(0x20)


def test_rollback_discards_everything_since_the_last_commit(sink, dsn):
    sink.write([row("0/10", 0)])
    _committed(sink, progress(0x10), mutations=1)
    sink.write([row("0/20", 0)])
    sink.rollback()
    sink.write([row("0/30", 0)])
    _committed(sink, progress(0x30), mutations=1)
    assert [r[0] for r in recorded(dsn)] == ["0/10", "0/30"]


def test_backfill_gives_the_rows_already_written_the_context_that_came_after_them(sink, dsn):
    sink.write([row("0/10", 0), row("0/10", 1)])
    sink.backfill(Backfill("0/10", 2, "req-1", '{"request_id": "req-1"}'))
    sink.write([row("0/10", 2, request_id="req-1")])
    _committed(sink, progress(0x10), mutations=3)
    assert recorded(dsn) == [("0/10", 0, "req-1"), ("0/10", 1, "req-1"), ("0/10", 2, "req-1")]


@pytest.fixture
def blocker(dsn):
    """Holds the engine progress row locked, so that a sink's commit waits until the test rolls it back."""
    PostgresSink(dsn=dsn).close()  # creates the schema
    conn = psycopg.connect(dsn)
    conn.execute("INSERT INTO flux.cdc_progress (slot_name, commit_lsn, end_lsn) VALUES ('s', '0/0', '0/0')")
    conn.commit()
    conn.execute("SELECT 1 FROM flux.cdc_progress WHERE slot_name = 's' FOR UPDATE")
    yield conn
    conn.close()


def test_a_pipelined_commit_returns_at_once_and_is_durable_only_when_the_server_says_so(dsn, blocker):
    sink = PipelinedSink(PostgresSink(dsn=dsn), max_queued_rows=100)
    try:
        sink.write([row("0/10", 0)])
        started = time.monotonic()
        sink.commit(progress(0x10), mutations=1)
        assert time.monotonic() - started < 1
        time.sleep(0.3)
        assert (sink.pending_commits, sink.durable.progress, recorded(dsn)) == (1, None, [])
        blocker.rollback()  # releases the lock
        durable = sink.wait_durable(10)
        assert (durable.progress, durable.mutations, sink.pending_commits) == (progress(0x10), 1, 0)
        assert recorded(dsn) == [("0/10", 0, None)]
    finally:
        sink.close()


def test_a_full_pipeline_holds_the_writer_back(dsn, blocker):
    sink = PipelinedSink(PostgresSink(dsn=dsn), max_queued_rows=10)
    try:
        sink.write([row("0/10", 0)])
        sink.commit(progress(0x10), mutations=1)  # the worker waits on the lock
        time.sleep(0.2)
        sink.write([row("0/20", i) for i in range(10)])  # fills the queue
        writer = threading.Thread(target=sink.write, args=([row("0/30", 0)],), daemon=True)
        writer.start()
        writer.join(0.5)
        assert writer.is_alive()
        blocker.rollback()
        writer.join(10)
        assert not writer.is_alive()
    finally:
        sink.close()


def test_a_failed_pipelined_commit_is_raised_and_never_reported_done(dsn, blocker):
    sink = PipelinedSink(PostgresSink(dsn=dsn), max_queued_rows=100)
    try:
        sink.write([row("0/10", 0)])
        sink.commit(progress(0x10), mutations=1)
        # Its own connection: inside the blocker's transaction pg_stat_activity would be one frozen snapshot.
        with psycopg.connect(dsn, autocommit=True) as admin:
            deadline = time.monotonic() + 10
            query = "SELECT pid FROM pg_stat_activity WHERE application_name = 'flux-sink' AND wait_event_type = 'Lock'"
            while (waiting := admin.execute(query).fetchone()) is None:
                assert time.monotonic() < deadline, "the sink's commit never waited on the locked row"
                time.sleep(0.02)
            admin.execute("SELECT pg_terminate_backend(%s)", (waiting[0],))
        blocker.rollback()
        deadline = time.monotonic() + 10
        with pytest.raises(ConnectionLostError):
            while time.monotonic() < deadline:
                sink.pending_commits  # noqa: B018 -- the accessor raises once the worker has failed
                time.sleep(0.05)
        with pytest.raises(ConnectionLostError):
            sink.durable  # noqa: B018
        with pytest.raises(ConnectionLostError):
            sink.write([row("0/20", 0)])
    finally:
        sink.close()
    assert recorded(dsn) == []


def test_progress_never_moves_back_when_a_stalled_engine_commits_late(dsn):
    ahead, late = PostgresSink(dsn=dsn), PostgresSink(dsn=dsn)
    try:
        ahead.load_progress("s")
        ahead.commit(progress(0x200), mutations=0)
        late.commit(progress(0x100), mutations=0)  # the stalled one wakes up
        assert PostgresSink(dsn=dsn).load_progress("s") == progress(0x200)
    finally:
        ahead.close()
        late.close()


def test_changes_another_engine_recorded_meanwhile_are_a_retryable_error_that_says_so(dsn):
    first, second = PostgresSink(dsn=dsn), PostgresSink(dsn=dsn)
    try:
        first.write([row("0/10", 0)])
        first.commit(progress(0x10), mutations=1)
        second.write([row("0/10", 0)])
        with pytest.raises(ConnectionLostError) as caught:
            second.commit(progress(0x10), mutations=1)
        assert caught.value.retryable and "another engine consumed this slot" in str(caught.value)
    finally:
        first.close()
        second.close()


def test_a_statement_timeout_the_database_sets_does_not_cancel_a_sink_transaction_the_engine_keeps_open(dsn, conn):
    """Applications set statement_timeout (and idle_in_transaction_session_timeout) on their role or
    database. The sink's COPY stays open while the engine reads the rest of a source transaction,
    so a transaction that streams for longer than that was cancelled on every retry: the engine
    never got past it (WAL piled up for ever). The sink's session turns both off."""
    conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET statement_timeout = 200')
    conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET idle_in_transaction_session_timeout = 200')
    sink = PostgresSink(dsn=dsn)
    try:
        sink.load_progress("s")
        sink.write([row("0/10", 0)])
        time.sleep(0.5)  # the engine decoding the next rows of a large transaction
        sink.write([row("0/10", 1)])
        sink.backfill(Backfill("0/10", 2, "late", '{"request_id": "late"}'))
        time.sleep(0.5)  # idle in the sink transaction after the backfill's UPDATE
        sink.write([row("0/10", 2)])
        sink.commit(progress(0x10), mutations=3)
    finally:
        sink.close()
    assert recorded(dsn) == [("0/10", 0, "late"), ("0/10", 1, "late"), ("0/10", 2, None)]
