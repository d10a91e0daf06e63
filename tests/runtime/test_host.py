"""A request's database session against a real PostgreSQL: its transaction and its round trips."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
import pytest
from psycopg import pq
from psycopg_pool import AsyncConnectionPool

from flux.runtime.host import DbSession, HostCallError

CONTEXT = {"request_id": "r1", "tenant": "default", "function": "w"}


def _traced_session(dsn: str, trace: Path, autocommit: bool, work: Callable[[DbSession], Awaitable[None]]) -> list[str]:
    """Run `work(session)` on a one-connection pool whose protocol messages libpq writes to
    `trace`; the backend's messages, one line each."""

    async def main() -> None:
        with open(trace, "w") as out:
            async def configure(conn: psycopg.AsyncConnection) -> None:
                conn.pgconn.trace(out.fileno())
                conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)

            pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False, configure=configure,
                                       kwargs={"autocommit": autocommit})
            await pool.open(wait=True)
            try:
                await work(DbSession(pool, CONTEXT))
            finally:
                async with pool.connection(timeout=5) as conn:  # a session left open fails here, not hangs
                    conn.pgconn.untrace()  # flushes libpq's buffered trace
                await pool.close()

    asyncio.run(main())
    return [line for line in trace.read_text().splitlines() if line.startswith("B\t")]


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit-pool", "transaction-pool"])
def test_begin_the_context_message_and_the_first_statement_take_one_round_trip(dsn, conn, tmp_path, autocommit):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")

    async def work(session: DbSession) -> None:
        await session.query("INSERT INTO users (email) VALUES ($1)", ["a@x"])
        await session.finish(commit=True)

    backend = _traced_session(dsn, tmp_path / "libpq.trace", autocommit, work)
    # One ReadyForQuery per round trip: the first statement's, then the COMMIT's.
    ready = [line for line in backend if "\tReadyForQuery\t" in line]
    assert [line.split()[-1] for line in ready] == ["T", "I"]
    assert conn.execute("SELECT email FROM users").fetchall() == [("a@x",)]


def test_a_failed_first_statement_rolls_back_and_leaves_nothing(dsn, conn, tmp_path):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    conn.execute("INSERT INTO users (email) VALUES ('a@x')")
    outcome: list[str | None] = []

    async def work(session: DbSession) -> None:
        with pytest.raises(HostCallError, match="SQLSTATE 23505"):
            await session.query("INSERT INTO users (email) VALUES ($1), ($2)", ["b@x", "a@x"])
        await session.finish(commit=True)
        outcome.append(session.outcome)

    _traced_session(dsn, tmp_path / "libpq.trace", True, work)
    assert outcome == ["rolled_back"]
    assert conn.execute("SELECT email FROM users ORDER BY id").fetchall() == [("a@x",)]
