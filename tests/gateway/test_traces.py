"""The trace writer: batches off the response path, drained on close."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import psycopg

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
