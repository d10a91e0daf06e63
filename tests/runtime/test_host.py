"""A request's database session against a real PostgreSQL: its transaction and its round trips."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
import pytest
from psycopg import pq
from psycopg.conninfo import make_conninfo
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


def _on_pool(dsn: str, work: Callable[[AsyncConnectionPool], Awaitable[None]]) -> None:
    async def main() -> None:
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False)
        await pool.open(wait=True)
        try:
            await work(pool)
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_query_holds_one_statement(dsn, conn):
    """Values travel apart from the statement (the extended protocol), first statement or later."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    errors: list[str | None] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        for _ in range(2):
            try:
                await session.query("INSERT INTO users (email) VALUES ('a@x'); DELETE FROM users", [])
            except HostCallError as exc:
                errors.append(exc.info["sqlstate"])
        await session.finish(commit=True)

    _on_pool(dsn, work)
    assert errors == ["42601", "42601"]  # "cannot insert multiple commands into a prepared statement"
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_an_interrupted_query_closes_its_connection_and_commits_nothing(dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    outcomes: list[str | None] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        await session.query("INSERT INTO users (email) VALUES ($1)", ["lost@x"])
        sleeping = asyncio.ensure_future(session.query("SELECT pg_sleep(30)", []))
        await asyncio.sleep(0.3)
        sleeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeping
        await session.abort()
        outcomes.append(session.outcome)
        # The pool's one connection was closed mid-exchange; the next session gets a new one.
        after = DbSession(pool, CONTEXT)
        await asyncio.wait_for(after.query("INSERT INTO users (email) VALUES ($1)", ["kept@x"]), 10)
        await after.finish(commit=True)
        outcomes.append(after.outcome)

    _on_pool(dsn, work)
    assert outcomes == ["rolled_back", "committed"]
    assert conn.execute("SELECT email FROM users").fetchall() == [("kept@x",)]


def test_a_query_the_database_encoding_cannot_hold_is_a_clear_error(dsn, conn):
    conn.execute("DROP DATABASE IF EXISTS latin1_db")
    conn.execute("CREATE DATABASE latin1_db ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    errors: list[str] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        try:
            await session.query("SELECT '€' AS sign", [])
        except HostCallError as exc:
            errors.append(exc.info["message"])
        await session.finish(commit=False)

    try:
        _on_pool(make_conninfo(dsn, dbname="latin1_db"), work)
    finally:
        conn.execute("DROP DATABASE latin1_db")
    assert errors == ["the query has a character the database's encoding (LATIN1) cannot hold: '€'"]


def test_a_statement_run_again_on_a_connection_is_prepared_there(dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    prepared: list[str] = []

    async def work(pool: AsyncConnectionPool) -> None:
        for n in range(3):
            session = DbSession(pool, CONTEXT)
            await session.query("INSERT INTO users (email) VALUES ($1)", [f"{n}@x"])
            await session.finish(commit=True)
        async with pool.connection() as same:  # the pool's one connection
            cur = await same.execute("SELECT statement FROM pg_prepared_statements WHERE name LIKE 'flux_%' ORDER BY statement")
            prepared.extend(row[0] for row in await cur.fetchall())

    _on_pool(dsn, work)
    assert prepared == ["INSERT INTO users (email) VALUES ($1)", "SELECT pg_logical_emit_message(true, $1::text, $2::text)"]
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 3


def test_a_prepared_statement_a_migration_made_stale_runs_again_unseen(dsn, conn):
    """`SELECT *` prepared before a column was added: the server refuses it (0A000); as the
    transaction's first statement it is prepared again and the request never sees the error."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    conn.execute("INSERT INTO users (email) VALUES ('a@x')")
    rows: list[list[dict]] = []

    async def read(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        rows.append((await session.query("SELECT * FROM users", []))["rows"])
        await session.finish(commit=True)

    async def work(pool: AsyncConnectionPool) -> None:
        await read(pool)
        await read(pool)  # prepared now
        async with pool.connection() as other:
            await other.execute("ALTER TABLE users ADD COLUMN plan text DEFAULT 'free'")
            await other.commit()
        await read(pool)
        await read(pool)

    _on_pool(dsn, work)
    assert rows[-2] == rows[-1] == [{"id": 1, "email": "a@x", "plan": "free"}]
