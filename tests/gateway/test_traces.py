"""The trace writer: batches off the response path, drained on close."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from datetime import datetime, timezone

import psycopg
from psycopg.conninfo import make_conninfo

from flux.gateway import traces
from flux.gateway.traces import TraceWriter
from flux.store.schema import ensure_schema
from flux.store.traces import TraceRecord


def _record(n: int) -> TraceRecord:
    return TraceRecord(
        id=f"00000000-0000-4000-8000-{n:012d}", tenant="default", function="f", method="POST", path="/f",
        status=200, duration_ms=1.0, started_at=datetime.now(timezone.utc), error=None, spans=[], request={},
        response={}, recording=None, code_version=None, git_commit=None, replay_of=None,
    )


def test_records_submitted_together_are_written_in_one_batch(dsn, conn: psycopg.Connection):
    ensure_schema(conn)

    async def main() -> tuple[int, int]:
        writer = TraceWriter(dsn, flush_interval=0.2)
        await writer.start()
        for n in range(30):
            writer.submit(_record(n))
            await asyncio.sleep(0)  # as requests come, each in its own loop turn
        await writer.flushed()
        await writer.close()
        return writer.written, writer.batches

    assert asyncio.run(main()) == (30, 1)
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone()[0] == 30


def test_closing_the_writer_writes_what_is_queued(dsn, conn: psycopg.Connection):
    ensure_schema(conn)

    async def main() -> int:
        writer = TraceWriter(dsn, flush_interval=5)
        await writer.start()
        for n in range(3):
            writer.submit(_record(n))
        await writer.close()
        return writer.written

    assert asyncio.run(main()) == 3
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone()[0] == 3


def _write(dsn: str, records: list[TraceRecord]) -> TraceWriter:
    async def main() -> TraceWriter:
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        for record in records:
            writer.submit(record)
        await asyncio.wait_for(writer.close(), 30)
        return writer

    return asyncio.run(main())


def test_records_are_sent_as_utf8_whatever_the_client_encoding_the_environment_asks_for(dsn, conn, monkeypatch):
    """The records go as JSON already encoded in UTF-8: a session in another encoding would store mojibake or refuse them."""
    ensure_schema(conn)
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    text = "café 日本 ✓"
    writer = _write(dsn, [dataclasses.replace(_record(1), error=text, response={"body": text})])
    assert (writer.written, writer.failed) == (1, 0)
    assert conn.execute("SELECT error, response->>'body' FROM flux.trace_requests").fetchone() == (text, text)


def test_a_record_the_database_refuses_is_left_out_and_the_rest_are_written(dsn, conn: psycopg.Connection, caplog):
    """Retrying such a batch would stop every later trace from being written."""
    ensure_schema(conn)
    refused = dataclasses.replace(_record(2), status=2**40)  # past the integer column
    writer = _write(dsn, [_record(1), refused, _record(3)])
    assert (writer.written, writer.failed) == (2, 1)
    stored = {row[0] for row in conn.execute("SELECT id FROM flux.trace_requests")}
    assert stored == {_record(1).id, _record(3).id}
    assert any(refused.id in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_a_refused_record_leaves_no_wait_in_the_status(dsn, conn: psycopg.Connection):
    """The database answered it: /_flux/health must not go on saying the database has not taken records."""
    ensure_schema(conn)

    async def main() -> dict:
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        writer.submit(dataclasses.replace(_record(1), status=2**40))  # past the integer column
        await writer.flushed()
        await asyncio.sleep(0.3)  # idle, nothing pending
        status = writer.status()
        await writer.close()
        return status

    status = asyncio.run(main())
    assert (status["pending"], status["failed"], status["waiting_seconds"]) == (0, 1, 0.0)


def test_a_record_over_the_size_limit_is_stored_without_its_recording(dsn, conn: psycopg.Connection, monkeypatch):
    """A query can return hundreds of megabytes, and a batch is one jsonb document (256 MB at most)."""
    ensure_schema(conn)
    monkeypatch.setattr(traces, "MAX_RECORD_BYTES", 20_000)
    recording = {"v": 4, "truncated": False, "entropy": "", "commit": {"transaction": "committed"},
                 "events": [[0, "db", {"sql": "SELECT", "result": "x" * 30_000}]]}
    big = dataclasses.replace(_record(1), recording=recording, response={"body": "ok"})
    writer = _write(dsn, [big, _record(2)])
    assert (writer.written, writer.shrunk) == (2, 1)
    stored, response = conn.execute("SELECT recording, response FROM flux.trace_requests WHERE id = %s", [big.id]).fetchone()
    assert stored["truncated"] is True and stored["events"] == [] and "over the 20000-byte limit" in stored["omitted"]
    assert stored["commit"] == {"transaction": "committed"}  # what the COMMIT made of the answer stays
    assert response == {"body": "ok"}


def test_a_log_line_about_one_request_carries_its_request_id_as_a_field(dsn, conn: psycopg.Connection, monkeypatch, caplog):
    """For a log pipeline (--log-format json), which joins it to the trace by this field, not by parsing the message."""
    ensure_schema(conn)
    monkeypatch.setattr(traces, "MAX_RECORD_BYTES", 20_000)
    big = dataclasses.replace(_record(1), response={"body": "x" * 30_000})
    _write(dsn, [big])
    [line] = [r for r in caplog.records if "over the 20000-byte limit" in r.getMessage()]
    assert line.request_id == big.id


def _nested(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


def test_a_tape_capped_for_depth_stops_before_the_event_it_capped_and_says_truncated(dsn, conn: psycopg.Connection):
    """A record part too deep to encode caps every part at 64 levels: the tape's db result became a
    note a replay would hand the function, on a tape that still said it was whole."""
    ensure_schema(conn)
    events = [[0, "now", 1], [1, "db", {"sql": "SELECT", "params": [], "result": {"rows": [{"j": _nested(70)}]}}],
              [2, "settled", [1]], [3, "random", 0.5]]
    recording = {"v": 4, "truncated": False, "entropy": "", "events": events}
    deep = dataclasses.replace(_record(1), spans=[{"attributes": {"x": _nested(1100)}}], recording=recording)
    _write(dsn, [deep])
    stored, spans = conn.execute("SELECT recording, spans FROM flux.trace_requests WHERE id = %s", [deep.id]).fetchone()
    assert "[not recorded: nested deeper than 64 levels]" in str(spans)
    assert (stored["truncated"], stored["events"]) == (True, [[0, "now", 1]])


def test_records_are_written_in_batches_under_the_size_limit(dsn, conn: psycopg.Connection, monkeypatch):
    ensure_schema(conn)
    monkeypatch.setattr(traces, "MAX_BATCH_BYTES", 3_000)
    records = [dataclasses.replace(_record(n), response={"body": "x" * 1_000}) for n in range(6)]
    writer = _write(dsn, records)
    assert writer.written == 6 and writer.batches >= 3
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone()[0] == 6


def test_pending_counts_the_batch_being_retried():
    """What a shutdown that gives up reports as not written."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> int:
        writer = TraceWriter(f"postgresql://nobody@127.0.0.1:{port}/none?connect_timeout=1", flush_interval=0.01)
        await writer.start()
        for n in range(3):
            writer.submit(_record(n))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if writer._queue.empty():  # the batch was taken, and its write is failing
                break
        pending = writer.pending
        writer._task.cancel()
        return pending

    assert asyncio.run(main()) == 3



def test_records_a_read_only_database_refuses_are_kept_and_written_once_it_takes_writes(dsn, conn: psycopg.Connection):
    """A read-only server (a standby during a failover) refuses every record alike: that is the
    database's state, not the records'. They were once left out one by one, all of them lost."""
    ensure_schema(conn)
    dbname = conn.info.dbname
    conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')

    async def main() -> tuple[dict, TraceWriter]:
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        for n in range(3):
            writer.submit(_record(n))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if writer.last_error:
                break
        refused = writer.status()
        await asyncio.to_thread(conn.execute, f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        await asyncio.wait_for(writer.close(), 30)
        return refused, writer

    refused, writer = asyncio.run(main())
    assert refused["pending"] == 3 and "read-only" in refused["last_error"]
    assert (writer.written, writer.failed) == (3, 0)
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone()[0] == 3


def test_once_the_database_takes_records_again_after_failures_the_log_says_so(dsn, conn: psycopg.Connection, caplog):
    """Each failed write is a warning; their end had no word, so a log read later could not tell
    whether the writer ever recovered."""
    ensure_schema(conn)
    dbname = conn.info.dbname
    conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    caplog.set_level(logging.INFO, logger="flux.gateway")

    async def main() -> None:
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        writer.submit(_record(1))
        while not writer.last_error:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(conn.execute, f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        await asyncio.wait_for(writer.close(), 30)

    asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if r.name == "flux.gateway"]
    assert said[0].startswith("writing trace records failed") and said[-1].startswith("trace records are written again, after")


def test_the_writers_connection_finds_a_dead_peer_within_a_minute_unless_the_dsn_says_otherwise(dsn):
    """With the kernel's defaults, a batch sent to a host gone silent (a failover) waited about 15 minutes."""
    async def options(dsn: str) -> dict[bytes, bytes | None]:
        conn = await TraceWriter(dsn).connect()
        try:
            return {option.keyword: option.val for option in conn.pgconn.info}
        finally:
            await conn.close()

    default = asyncio.run(options(dsn))
    assert (default[b"keepalives_idle"], default[b"keepalives_count"], default[b"tcp_user_timeout"]) == (b"30", b"3", b"60000")
    assert asyncio.run(options(make_conninfo(dsn, tcp_user_timeout=5000)))[b"tcp_user_timeout"] == b"5000"


def test_a_batch_waiting_on_a_locked_table_is_logged_and_shown_in_the_status(dsn, conn: psycopg.Connection,
                                                                               monkeypatch, caplog):
    """Another session's LOCK TABLE held the writer with no word while the queue grew."""
    ensure_schema(conn)
    monkeypatch.setattr(traces, "STALL_LOG_SECONDS", 0.2)
    conn.autocommit = False
    conn.execute("LOCK TABLE flux.trace_requests")

    async def main() -> tuple[dict, TraceWriter]:
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        writer.submit(_record(1))
        await asyncio.sleep(0.7)
        held = writer.status()
        await asyncio.to_thread(conn.commit)
        await asyncio.wait_for(writer.close(), 30)
        return held, writer

    held, writer = asyncio.run(main())
    assert held["pending"] == 1 and held["waiting_seconds"] >= 0.5
    assert any("waited" in r.getMessage() and "flux.trace_requests" in r.getMessage() for r in caplog.records)
    assert writer.written == 1 and writer.status()["waiting_seconds"] == 0.0


def test_the_queue_is_bounded_in_bytes_and_drops_what_would_pass_the_bound():
    """Bounded in number only, 20,000 waiting records of a megabyte each were 20 GB held while the
    database was away."""
    big = {"v": 2, "truncated": False, "entropy": "", "events": [[0, "db", {"sql": "SELECT", "result": "x" * 1_000_000}]]}
    writer = TraceWriter("postgresql://nobody@127.0.0.1:1/none", max_queue_bytes=3_500_000)  # not started
    for n in range(5):
        writer.submit(dataclasses.replace(_record(n), recording=big))
    assert (writer.pending, writer.dropped) == (3, 2)
    assert 3_000_000 < writer.pending_bytes <= 3_500_000


def test_a_server_that_accepts_and_says_nothing_is_a_failed_connection_retried_not_a_wait_for_good():
    """Without a connect timeout the writer waited on such a server forever, writing nothing again."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nothing ever answers
        port = silent.getsockname()[1]

        status = _status_at_first_failure(TraceWriter(f"postgresql://nobody@127.0.0.1:{port}/none", flush_interval=0.01,
                                                      connect_timeout=1))
    assert status["pending"] == 1 and "timeout" in status["last_error"]


def _status_at_first_failure(writer: TraceWriter) -> dict:
    """The writer's status once it has failed to write one record (within 6 s), the writer then stopped."""
    async def main() -> dict:
        await writer.start()
        writer.submit(_record(1))
        for _ in range(60):
            await asyncio.sleep(0.1)
            if writer.last_error:
                break
        status = writer.status()
        writer._task.cancel()
        return status

    return asyncio.run(main())


def _slow_inserts(conn: psycopg.Connection, seconds_per_record: float) -> None:
    """Each statement into flux.trace_requests takes `seconds_per_record` for every record it holds."""
    conn.execute(f"""
        CREATE FUNCTION slow_traces() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep({seconds_per_record} * (SELECT count(*) FROM added)); RETURN NULL; END $$;
        CREATE TRIGGER slow AFTER INSERT ON flux.trace_requests REFERENCING NEW TABLE AS added
            FOR EACH STATEMENT EXECUTE FUNCTION slow_traces();
    """)


def test_a_batch_a_statement_timeout_cuts_off_is_written_in_smaller_statements(dsn, conn: psycopg.Connection, caplog):
    """A role's statement_timeout cancelled every full batch, and the same batch was retried whole
    forever: nothing was written again, and the queue filled until records were dropped."""
    ensure_schema(conn)
    _slow_inserts(conn, 0.02)  # 30 records: 0.6 s; 8 records: 0.16 s

    async def main() -> TraceWriter:
        writer = TraceWriter(dsn + "?options=-c%20statement_timeout%3D250", flush_interval=0.05)
        await writer.start()
        for n in range(30):
            writer.submit(_record(n))
        await asyncio.wait_for(writer.close(), 30)
        return writer

    writer = asyncio.run(main())
    assert (writer.written, writer.failed, writer.dropped, writer.last_error) == (30, 0, 0, None)
    assert writer.batch_cap < 30
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone()[0] == 30
    assert any("statement timeout" in r.getMessage() and "at a time" in r.getMessage() for r in caplog.records)


def test_after_smaller_statements_the_batch_size_grows_back(dsn, conn: psycopg.Connection, monkeypatch):
    ensure_schema(conn)
    monkeypatch.setattr(traces, "GROW_AFTER_BATCHES", 2)

    async def main() -> list[int]:
        writer = TraceWriter(dsn, flush_interval=0.01, batch_size=8)
        writer.batch_cap = 2  # as after cancelled statements
        await writer.start()
        caps = []
        for n in range(4):
            writer.submit(_record(n))
            await writer.flushed()
            caps.append(writer.batch_cap)
        await writer.close()
        return caps

    assert asyncio.run(main()) == [2, 4, 4, 8]


def test_a_single_record_over_the_statement_timeout_is_kept_and_retried_with_a_hint(dsn, conn: psycopg.Connection):
    ensure_schema(conn)
    _slow_inserts(conn, 0.5)

    status = _status_at_first_failure(TraceWriter(dsn + "?options=-c%20statement_timeout%3D100", flush_interval=0.01))
    assert status["pending"] == 1 and status["failed"] == 0
    assert "statement timeout" in status["last_error"] and "ALTER ROLE <role> SET statement_timeout = 0" in status["last_error"]


def test_behind_pgbouncer_in_transaction_mode_every_batch_is_written_at_the_first_try(dsn, bouncer_dsn, server_hop, conn,
                                                                                    caplog):
    """psycopg prepares a statement run 5 times on a connection; through PgBouncer the next batch
    may run on another server connection, which lacks it ("_pg3_0 does not exist"): retried, late."""
    ensure_schema(conn)

    async def main() -> int:
        writer = TraceWriter(bouncer_dsn, flush_interval=0.01)
        await writer.start()
        for n in range(8):
            writer.submit(_record(n))
            await writer.flushed()
            server_hop()
        await writer.close()
        return writer.written

    assert asyncio.run(main()) == 8
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone()[0] == 8
