"""A request's database session against a real PostgreSQL: its transaction and its round trips."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from flux.runtime.host import _SESSION_RESET, DbPool, DbSession, HostCallError

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


def _on_pool(dsn: str, work: Callable[[AsyncConnectionPool], Awaitable[None]], *, size: int = 1, gateway: bool = False) -> None:
    """`work(pool)` on a pool of `size` connections; with `gateway`, the gateway's own (`DbPool`, autocommit)."""
    async def main() -> None:
        if gateway:
            pool = DbPool(dsn, min_size=size, max_size=size, open=False, kwargs={"autocommit": True})
        else:
            pool = AsyncConnectionPool(dsn, min_size=size, max_size=size, open=False)
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


def test_a_statement_after_one_that_could_not_be_sent_still_runs_in_the_transaction(dsn, conn):
    """The first statement to reach the server carries BEGIN (and, for a connection another tenant
    used last, the DEALLOCATE of its prepared statements), not the first one the function tried."""
    conn.execute("DROP DATABASE IF EXISTS latin1_db")
    conn.execute("CREATE DATABASE latin1_db ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    counts: list[int] = []

    async def work(pool: AsyncConnectionPool) -> None:
        async with pool.connection() as setup:
            await setup.execute("CREATE TABLE notes (v text)")
        session = DbSession(pool, CONTEXT)
        with pytest.raises(HostCallError):
            await session.query("SELECT '€' AS sign", [])
        await session.query("INSERT INTO notes VALUES ('kept only if committed')", [])
        await session.finish(commit=False)
        async with pool.connection() as check:
            counts.append((await (await check.execute("SELECT count(*) FROM notes")).fetchone())[0])

    try:
        _on_pool(make_conninfo(dsn, dbname="latin1_db"), work)
    finally:
        conn.execute("DROP DATABASE latin1_db")
    assert counts == [0]


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
    # The session reset after each COMMIT is the same statements every time: prepared too.
    reset = {sql.decode() for sql in _SESSION_RESET}
    assert set(prepared) == {"INSERT INTO users (email) VALUES ($1)", "SELECT pg_logical_emit_message(true, $1::text, $2::text)", *reset}
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 3


def test_a_connection_passed_to_another_tenant_keeps_none_of_the_last_ones_prepared_statements(dsn, conn):
    """Their text, a secret inlined in the SQL included, is in pg_prepared_statements for any
    session to read: another tenant's function could return it."""
    seen: list[list[dict]] = []

    async def work(pool: AsyncConnectionPool) -> None:
        for _ in range(3):  # prepared at the second run
            session = DbSession(pool, {**CONTEXT, "tenant": "acme"})
            await session.query("SELECT 'inline:acme-token-1234567890' AS v", [])
            await session.finish(commit=True)
        session = DbSession(pool, {**CONTEXT, "tenant": "acme"})  # SQL-level PREPARE is refused, but not in a DO block
        await session.query("DO $$ BEGIN EXECUTE 'PREPARE mine AS SELECT ''inline:acme-token-1234567890'''; END $$", [])
        await session.finish(commit=True)
        session = DbSession(pool, {**CONTEXT, "tenant": "globex"})
        seen.append((await session.query("SELECT name, statement FROM pg_prepared_statements", []))["rows"])
        await session.finish(commit=True)

    _on_pool(dsn, work)
    [rows] = seen
    assert [row for row in rows if "acme" in row["statement"]] == []


def test_flux_keeps_its_own_statements_prepared_on_a_connection_tenants_share_in_turn(dsn, conn):
    """They hold nothing of a tenant's, and preparing them spares the server parsing them per request."""
    prepared: list[str] = []

    async def work(pool: AsyncConnectionPool) -> None:
        for tenant in ["acme", "globex", "acme", "globex"]:
            session = DbSession(pool, {**CONTEXT, "tenant": tenant})
            await session.query("SELECT 1 AS v", [])
            await session.finish(commit=True)
        async with pool.connection() as same:  # the pool's one connection
            cur = await same.execute("SELECT statement FROM pg_prepared_statements")
            prepared.extend(row[0] for row in await cur.fetchall())

    _on_pool(dsn, work)
    assert set(prepared) == {"SELECT pg_logical_emit_message(true, $1::text, $2::text)", *(sql.decode() for sql in _SESSION_RESET)}


def _reads_across_a_migration(dsn: str, conn: psycopg.Connection, first: list[str], then: str) -> list[list[dict]]:
    """Requests that run `first`, then `SELECT * FROM users` and `then`: twice (prepared by then),
    then twice after a column was added. The rows each gave."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    conn.execute("INSERT INTO users (email) VALUES ('a@x')")
    rows: list[list[dict]] = []

    async def read(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        for sql in first:
            await session.query(sql, [])
        rows.append((await session.query("SELECT * FROM users", []))["rows"])
        rows.append((await session.query(then, []))["rows"])
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
    return rows


def test_a_prepared_statement_a_migration_made_stale_runs_again_unseen(dsn, conn):
    """`SELECT *` prepared before a column was added: the server refuses it (0A000); as the
    transaction's first statement it is prepared again and the request never sees the error."""
    rows = _reads_across_a_migration(dsn, conn, [], "SELECT 1 AS one")
    assert rows[-4] == rows[-2] == [{"id": 1, "email": "a@x", "plan": "free"}]


@pytest.mark.parametrize("sql", ["COMMIT", "rollback", "ROLLBACK WORK", "/* why /* nested */ */ END", "-- done\nABORT",
                                 "BEGIN", "start transaction", "PREPARE TRANSACTION 'x'",
                                 ";COMMIT", "/* x */ ; ; ROLLBACK", "-- c\n;\n; end", "; PREPARE TRANSACTION 'x'"])
def test_a_statement_that_would_end_the_transaction_is_refused(dsn, conn, sql):
    """Otherwise a later throw could not roll the request back, and later writes would lose its id."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    refusals: list[str] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        await session.query("INSERT INTO users (email) VALUES ($1)", ["before@x"])
        with pytest.raises(HostCallError) as refused:
            await session.query(sql, [])
        refusals.append(refused.value.info["message"])
        await session.query("INSERT INTO users (email) VALUES ($1)", ["after@x"])
        await session.finish(commit=False)  # the handler threw

    _on_pool(dsn, work)
    assert "cannot run" in refusals[0] and "SAVEPOINT" in refusals[0]
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_rolling_back_to_a_savepoint_keeps_the_transaction_going(dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    outcome: list[Any] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        await session.query("INSERT INTO users (email) VALUES ($1)", ["a@x"])
        await session.query("SAVEPOINT again", [])
        with pytest.raises(HostCallError):
            await session.query("INSERT INTO users (email) VALUES ($1)", ["a@x"])
        await session.query("ROLLBACK TO SAVEPOINT again", [])
        await session.finish(commit=True)
        outcome.extend([session.outcome, session.lost_writes])

    _on_pool(dsn, work)
    assert outcome == ["committed", None]
    assert conn.execute("SELECT email FROM users").fetchall() == [("a@x",)]


def _refusal_of(dsn: str, sql: str) -> str:
    """The message `query` refuses `sql` with."""
    refusals: list[str] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        with pytest.raises(HostCallError) as refused:
            await session.query(sql, [])
        refusals.append(refused.value.info["message"])
        await session.finish(commit=False)

    _on_pool(dsn, work)
    return refusals[0]


@pytest.mark.parametrize("sql", ["PREPARE mine AS SELECT 1", "DEALLOCATE ALL", "deallocate flux_1"])
def test_sql_level_prepared_statements_are_refused(dsn, sql):
    """They would outlive the request on a pooled connection, and DEALLOCATE would drop Flux's own."""
    refusal = _refusal_of(dsn, sql)
    assert "cannot run" in refusal and "prepares statements itself" in refusal


def test_the_next_request_on_a_connection_sees_none_of_the_last_ones_session_state(dsn, conn):
    """Settings, role, LISTEN, advisory locks, temporary tables and currval would otherwise carry
    over to whichever request, of any tenant, gets the pooled connection next."""
    role = f"flux_test_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} NOLOGIN")
    conn.execute("CREATE SEQUENCE ids")
    seen: list[dict[str, Any]] = []

    async def work(pool: AsyncConnectionPool) -> None:
        first = DbSession(pool, CONTEXT)
        for sql in ["SELECT set_config('app.tenant', 'acme', false)", "SET statement_timeout = 1234",
                    "CREATE TEMP TABLE scratch (v text)", "SELECT pg_advisory_lock(42)", "LISTEN news",
                    "SELECT nextval('ids')", f"SET ROLE {role}"]:
            await first.query(sql, [])
        await first.finish(commit=True)
        second = DbSession(pool, CONTEXT)
        result = await second.query(
            "SELECT current_setting('app.tenant', true) AS tenant, current_setting('statement_timeout') AS timeout,"
            " to_regclass('pg_temp.scratch') IS NULL AS no_scratch, current_user AS who,"
            " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS advisory,"
            " (SELECT count(*) FROM pg_listening_channels()) AS listening", [])
        seen.append(result["rows"][0])
        with pytest.raises(HostCallError) as no_currval:
            await second.query("SELECT currval('ids')", [])
        seen.append({"currval": no_currval.value.info["sqlstate"]})
        await second.finish(commit=False)

    try:
        _on_pool(dsn, work)
    finally:
        conn.execute(f"DROP ROLE {role}")
    superuser = conn.execute("SELECT current_user").fetchone()[0]
    assert seen == [{"tenant": "", "timeout": "0", "no_scratch": True, "who": superuser, "advisory": 0, "listening": 0},
                    {"currval": "55000"}]  # "currval of sequence is not yet defined in this session"


def _commit_after_a_caught_failure(dsn: str, before: list[tuple[str, list[Any]]], failing: tuple[str, list[Any]]) -> list[Any]:
    """Run `before`, then `failing`, whose error is caught, then commit, as a handler that returns
    after catching it: the session's outcome and `lost_writes`."""
    outcome: list[Any] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        for sql, params in before:
            await session.query(sql, params)
        with pytest.raises(HostCallError):
            await session.query(*failing)
        await session.finish(commit=True)
        outcome.extend([session.outcome, session.lost_writes])

    _on_pool(dsn, work)
    return outcome


def test_a_commit_after_a_caught_failure_says_what_was_lost(dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    insert = "INSERT INTO users (email) VALUES ($1)"
    outcome, lost = _commit_after_a_caught_failure(dsn, [(insert, ["first@x"]), (insert, ["dup@x"])], (insert, ["dup@x"]))
    assert outcome == "rolled_back" and "db.insert(users)" in lost and "SQLSTATE 23505" in lost
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_a_caught_failure_before_any_write_loses_nothing(dsn, conn):
    """The usual insert-or-409: nothing the function was told had succeeded is rolled back."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    conn.execute("INSERT INTO users (email) VALUES ('taken@x')")
    outcome = _commit_after_a_caught_failure(dsn, [("SELECT id FROM users WHERE email = $1", ["other@x"])],
                                             ("INSERT INTO users (email) VALUES ($1)", ["taken@x"]))
    assert outcome == ["rolled_back", None]


def test_a_statement_with_a_nul_is_refused(dsn):
    """libpq would send only the statement's text before the NUL, while the span records all of it."""
    assert "NUL" in _refusal_of(dsn, "SELECT 1\x00; DROP TABLE users")


@pytest.mark.parametrize("before", [
    "WITH made AS (INSERT INTO users (email) VALUES ('cte@x') RETURNING id) SELECT id FROM made",
    "SELECT add_user('fn@x')",
    "SELECT * FROM users_made",
    "SELECT 1 INTO TEMP made_here",
], ids=["data-modifying-with", "writing-function", "view-over-writing-function", "select-into"])
def test_a_write_in_a_statement_tagged_select_is_lost_too(dsn, conn, before):
    """PostgreSQL tags these SELECT, yet they wrote: a success answered after a caught failure
    would name rows that do not exist."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    conn.execute("INSERT INTO users (email) VALUES ('taken@x')")
    conn.execute("CREATE FUNCTION add_user(e text) RETURNS int LANGUAGE sql AS "
                 "$$ INSERT INTO users (email) VALUES (e) RETURNING id $$")
    conn.execute("CREATE VIEW users_made AS SELECT add_user('view@x') AS id")
    outcome, lost = _commit_after_a_caught_failure(dsn, [(before, [])], ("INSERT INTO users (email) VALUES ($1)", ["taken@x"]))
    assert outcome == "rolled_back" and "SQLSTATE 23505" in lost


def test_reads_through_functions_and_views_that_write_nothing_lose_nothing(dsn, conn):
    """count(), now(), gen_random_uuid() and a plain view write nothing a rollback loses."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    conn.execute("INSERT INTO users (email) VALUES ('taken@x')")
    conn.execute("CREATE VIEW emails AS SELECT lower(email) AS email FROM users")
    outcome = _commit_after_a_caught_failure(dsn, [
        ("SELECT count(*), now(), gen_random_uuid(), nextval(pg_get_serial_sequence('users', 'id')) FROM users", []),
        ("SELECT email FROM emails WHERE email = $1", ["taken@x"]),
        ("SELECT id FROM users WHERE email = $1 FOR UPDATE", ["taken@x"]),
    ], ("INSERT INTO users (email) VALUES ($1)", ["taken@x"]))
    assert outcome == ["rolled_back", None]


def test_a_database_error_carries_detail_hint_and_position(dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    conn.execute("INSERT INTO users (email) VALUES ('dup@x')")
    infos: list[dict[str, Any]] = []

    async def work(pool: AsyncConnectionPool) -> None:
        for sql in ["INSERT INTO users (email) VALUES ('dup@x')",
                    "DO $$ BEGIN RAISE EXCEPTION 'no plan' USING DETAIL = 'plan 7 is gone', HINT = 'pick another'; END $$",
                    "SELECT nope FROM users"]:
            session = DbSession(pool, CONTEXT)
            with pytest.raises(HostCallError) as failed:
                await session.query(sql, [])
            infos.append(failed.value.info)
            await session.finish(commit=False)

    _on_pool(dsn, work)
    unique, raised, missing = infos
    assert unique["detail"] == "Key (email)=(dup@x) already exists."
    assert (raised["detail"], raised["hint"]) == ("plan 7 is gone", "pick another")
    assert (missing["sqlstate"], missing["position"]) == ("42703", 8)


def test_behind_pgbouncer_in_transaction_mode_a_statement_run_again_still_runs(bouncer_dsn, server_hop, conn):
    """Each transaction may run on another server connection, where a statement prepared in an
    earlier one does not exist (26000) or another client's of the same name does (42P05): a
    connection through a pooler prepares nothing."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    failures: list[str] = []

    async def work(pool: DbPool) -> None:
        for n in range(6):
            session = DbSession(pool, CONTEXT)
            try:  # a second statement: a failed first one is retried, unseen (see the stale statement's test)
                await session.query("INSERT INTO users (email) VALUES ($1)", [f"{n}@x"])
                await session.query("SELECT count(*) FROM users WHERE email = $1", [f"{n}@x"])
            except HostCallError as exc:
                failures.append(exc.info["message"])
            await session.finish(commit=True)
            server_hop()
        assert pool.pooler is True

    _on_pool(bouncer_dsn, work, gateway=True)
    assert failures == []
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 6
    assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] == 0


def _first_statements_then(dsn: str, first: list[str], then: str) -> dict[str, Any]:
    """Run `first`, then `then` in one session; the row `then` gave."""
    seen: list[dict[str, Any]] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        for sql in first:
            await session.query(sql, [])
        seen.append((await session.query(then, []))["rows"][0])
        await session.finish(commit=True)

    _on_pool(dsn, work)
    return seen[0]


@pytest.mark.parametrize("sql", ["SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                                 "SET LOCAL transaction_isolation = 'serializable'"])
def test_an_isolation_level_set_by_the_first_statement_holds_for_the_transaction(dsn, sql):
    """PostgreSQL takes it only before the transaction's first query, and the context message was
    one: SET TRANSACTION failed (25001) and no request could run SERIALIZABLE or REPEATABLE READ."""
    assert _first_statements_then(dsn, [sql], "SELECT current_setting('transaction_isolation') AS iso") == {"iso": "serializable"}


def test_statements_setting_the_transaction_may_come_one_after_another_before_the_first_query(dsn):
    row = _first_statements_then(
        dsn, ["SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "SET TRANSACTION READ ONLY", "SET TRANSACTION DEFERRABLE"],
        "SELECT current_setting('transaction_isolation') AS iso, current_setting('transaction_read_only') AS ro,"
        " current_setting('transaction_deferrable') AS deferrable")
    assert row == {"iso": "serializable", "ro": "on", "deferrable": "on"}


def test_an_isolation_level_set_after_a_query_says_to_set_it_first(dsn):
    errors: list[dict[str, Any]] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        await session.query("SELECT 1", [])
        with pytest.raises(HostCallError) as refused:
            await session.query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", [])
        errors.append(refused.value.info)
        await session.finish(commit=False)

    _on_pool(dsn, work)
    assert errors[0]["sqlstate"] == "25001" and errors[0]["hint"].startswith("Make it the request's first ctx.db statement")


def test_a_stale_prepared_statement_after_the_isolation_level_runs_again_under_that_level(dsn, conn):
    """Its exchange carries the context message: the retry begins again with the level set."""
    rows = _reads_across_a_migration(dsn, conn, ["SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"],
                                     "SELECT current_setting('transaction_isolation') AS iso")
    assert rows[-2:] == [[{"id": 1, "email": "a@x", "plan": "free"}], [{"iso": "repeatable read"}]]


def test_a_serialization_failure_at_commit_is_one_line_ending_in_its_sqlstate(dsn, conn):
    """Two SERIALIZABLE transactions that each read what the other writes (write skew): the second
    to commit fails. Its error read `commit failed: ...` with DETAIL and HINT lines and no SQLSTATE."""
    conn.execute("CREATE TABLE oncall (id int PRIMARY KEY, on_duty bool)")
    conn.execute("INSERT INTO oncall VALUES (1, true), (2, true)")
    failures: list[dict[str, Any]] = []

    async def work(pool: AsyncConnectionPool) -> None:
        sessions = [DbSession(pool, CONTEXT), DbSession(pool, CONTEXT)]
        for session in sessions:
            await session.query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", [])
            await session.query("SELECT count(*) FROM oncall WHERE on_duty", [])
        for n, session in enumerate(sessions, 1):
            await session.query("UPDATE oncall SET on_duty = false WHERE id = $1", [n])
        await sessions[0].finish(commit=True)
        with pytest.raises(HostCallError) as failed:
            await sessions[1].finish(commit=True)
        failures.append(failed.value.info)

    _on_pool(dsn, work, size=2)
    [info] = failures
    assert info["sqlstate"] == "40001" and info["hint"] == "The transaction might succeed if retried."
    assert info["message"] == ("commit failed: could not serialize access due to read/write dependencies among "
                               "transactions (SQLSTATE 40001)")
    assert conn.execute("SELECT id FROM oncall WHERE NOT on_duty").fetchall() == [(1,)]


def test_more_parameters_than_the_protocol_carries_are_refused_and_the_transaction_goes_on(dsn, conn):
    """libpq refused the 65,536th parameter while sending, which closed the transaction's
    connection: the request's earlier writes were lost, and its later statements failed with
    `failed to enter pipeline mode`."""
    conn.execute("CREATE TABLE users (id int)")
    errors: list[dict[str, Any]] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        await session.query("INSERT INTO users VALUES (1)", [])
        ok = await session.query("SELECT cardinality(ARRAY[%s]::int[]) AS n" % ",".join(f"${i}" for i in range(1, 65536)),
                                 list(range(65535)))
        assert ok["rows"] == [{"n": 65535}]
        with pytest.raises(HostCallError) as refused:
            await session.query("SELECT ARRAY[%s]::int[]" % ",".join(f"${i}" for i in range(1, 65537)), list(range(65536)))
        errors.append(refused.value.info)
        await session.query("INSERT INTO users VALUES (2)", [])
        await session.finish(commit=True)

    _on_pool(dsn, work)
    assert errors[0]["name"] == "RangeError" and "65,536 parameters, more than the 65,535" in errors[0]["message"]
    assert conn.execute("SELECT id FROM users ORDER BY id").fetchall() == [(1,), (2,)]


def _after_the_server_ends_the_session(dsn: str, conn: psycopg.Connection, *, write: bool) -> list[dict[str, Any]]:
    """A session whose first statement runs (a write, or a SET), then whose connection the server
    ends; two more statements, then the commit. What each of those three raised."""
    errors: list[dict[str, Any]] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        await session.query("INSERT INTO users VALUES (1)" if write else "SET LOCAL statement_timeout = '5s'", [])
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE datname = current_database() AND state = 'idle in transaction'")
        for _ in range(2):
            with pytest.raises(HostCallError) as lost:
                await session.query("SELECT 1", [])
            errors.append(lost.value.info)
        try:
            await session.finish(commit=True)
        except HostCallError as exc:
            errors.append(exc.info)

    conn.execute("CREATE TABLE users (id int)")
    _on_pool(dsn, work)
    return errors


def test_a_connection_the_server_ended_mid_transaction_is_named_lost_for_every_later_statement(dsn, conn):
    first, second, commit = _after_the_server_ends_the_session(dsn, conn, write=True)
    assert first["message"].startswith("ctx.db: the connection to the database was lost after its transaction had been idle for ")
    assert "idle_in_transaction_session_timeout" in first["message"]
    assert second == first  # not `failed to enter pipeline mode`
    assert commit["message"] == f"the transaction could not commit: {first['message']}"  # not "a query was still running"


def test_a_lost_connection_that_had_not_written_leaves_the_answer_alone(dsn, conn):
    """Nothing was lost with it (a read could have written, through a function): a function that
    caught the error and answered keeps its answer."""
    assert len(_after_the_server_ends_the_session(dsn, conn, write=False)) == 2


def test_connections_the_server_closed_while_idle_in_the_pool_are_replaced_unseen(dsn, conn):
    """A DBA's idle_session_timeout (or a restart, a proxy's idle limit) closed the pool's idle
    connections: the first request after an idle spell failed with `server closed the connection
    unexpectedly`, and so did the next ones, one per dead connection."""
    conn.execute("CREATE TABLE users (id int)")
    conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET idle_session_timeout = 200')
    outcomes: list[str | None] = []

    async def work(pool: AsyncConnectionPool) -> None:
        for n in range(3):
            session = DbSession(pool, CONTEXT)
            await session.query("INSERT INTO users VALUES ($1)", [n])
            await session.finish(commit=True)
            outcomes.append(session.outcome)
            await asyncio.sleep(0.6)  # past the timeout: the server closes the pool's idle connections

    _on_pool(dsn, work, size=2)
    assert outcomes == ["committed"] * 3
    assert conn.execute("SELECT id FROM users ORDER BY id").fetchall() == [(0,), (1,), (2,)]


def test_behind_pgbouncer_in_transaction_mode_the_isolation_level_holds_across_round_trips(bouncer_dsn, server_hop, conn):
    """The level is set in a round trip of its own, before the context message's: the pooler keeps
    the transaction's server connection between them."""
    levels: list[str] = []

    async def work(pool: DbPool) -> None:
        for _ in range(3):
            session = DbSession(pool, CONTEXT)
            await session.query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", [])
            server_hop()  # takes the server connection released last: ours, were it released between round trips
            levels.append((await session.query("SELECT current_setting('transaction_isolation') AS iso", []))["rows"][0]["iso"])
            await session.finish(commit=True)

    _on_pool(bouncer_dsn, work, gateway=True)
    assert levels == ["serializable"] * 3


def test_a_lost_connection_after_a_refused_statement_counts_the_idle_time_from_it(dsn, conn):
    """The idle time counted from the last exchange that succeeded: here, from none at all."""
    errors: list[str] = []

    async def work(pool: AsyncConnectionPool) -> None:
        session = DbSession(pool, CONTEXT)
        with pytest.raises(HostCallError):
            await session.query("SELECT no_such_column", [])
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        with pytest.raises(HostCallError) as lost:
            await session.query("SELECT 1", [])
        errors.append(lost.value.info["message"])
        await session.finish(commit=False)

    _on_pool(dsn, work)
    idle_ms = float(errors[0].split("idle for ")[1].split(" ms")[0].replace(",", ""))
    assert idle_ms < 5_000
