"""The host side of the `ctx` API: database sessions, and the span each call becomes.

`DbSession` is one request's transaction. Its first statement is the `flux` context message
(`pg_logical_emit_message`) carrying request_id, tenant and function, so the CDC engine
attributes every write of the request (statements that set the transaction's isolation level,
which PostgreSQL takes only before any query, go ahead of it); `finish(commit=...)` commits or rolls back. Statements
are serialised: a request's queries share one connection, in the order the function issued them.
Statements that would end the transaction early (COMMIT, ROLLBACK...) are refused (the rules on
a statement's text are `sqltext`'s), and the connection's session state is reset before another
request gets it. How values cross, both ways, is `dbvalues`'.

Outbound calls (`ctx.fetch`) are `flux.runtime.fetch`'s.

What this module does not do: it never sees JavaScript, and it does not redact (the gateway
redacts the whole trace at the end, once, so nothing can slip past a per-field rule).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import pq
from psycopg.abc import Buffer, PQGen
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq.abc import PGconn, PGresult
from psycopg.waiting import Ready, Wait
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from flux.cdc.assembler import CONTEXT_PREFIX
from flux.pg.pooler import behind_pooler_async
from flux.runtime.dbvalues import LoadContext, ParamError, ResultTypes, adapt_param, json_ready, unsafe_int_paths
from flux.runtime.sqltext import read_scan, refusal, sets_transaction, statement_start

log = logging.getLogger("flux.runtime")

_VERB = re.compile(r"(?:WITH\b.*?\)\s*)?(INSERT|UPDATE|DELETE|SELECT|MERGE)\b", re.IGNORECASE | re.DOTALL)
_IDENT = r'((?:"[^"]+"|[A-Za-z_][\w$]*)(?:\.(?:"[^"]+"|[A-Za-z_][\w$]*))?)'
_TABLE = {
    "insert": re.compile(r"\bINSERT\s+INTO\s+" + _IDENT, re.IGNORECASE),
    "update": re.compile(r"\bUPDATE\s+(?:ONLY\s+)?" + _IDENT, re.IGNORECASE),
    "delete": re.compile(r"\bDELETE\s+FROM\s+(?:ONLY\s+)?" + _IDENT, re.IGNORECASE),
    "select": re.compile(r"\bFROM\s+(?:ONLY\s+)?" + _IDENT, re.IGNORECASE),
    "merge": re.compile(r"\bMERGE\s+INTO\s+" + _IDENT, re.IGNORECASE),
}


def db_span_name(sql: str) -> str:
    """`db.insert(users)`, `db.select(orders)`; `db.query` when the statement is something else."""
    verb = _VERB.match(sql, statement_start(sql))
    if not verb:
        return "db.query"
    kind = verb.group(1).lower()
    table = _TABLE[kind].search(sql, verb.start(1))
    return f"db.{kind}({table.group(1).replace(chr(34), '')})" if table else f"db.{kind}"


@dataclass(slots=True)
class Span:
    id: str
    parent: str | None
    name: str
    kind: str
    start: float  # epoch ms
    duration_ms: float = 0.0
    status: str = "ok"
    error: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "parent": self.parent, "name": self.name, "kind": self.kind, "start": self.start,
            "duration_ms": round(self.duration_ms, 3), "status": self.status, "error": self.error,
            "attributes": self.attributes, "events": self.events,
        }


class Clock:
    """Wall-clock epoch milliseconds with perf_counter resolution, for span timing."""

    def __init__(self) -> None:
        self._wall = time.time() * 1000.0
        self._perf = time.perf_counter()

    def now_ms(self) -> float:
        return self._wall + (time.perf_counter() - self._perf) * 1000.0


class HostCallError(Exception):
    """A ctx call failed; `info` is what the JS side turns into its Error (name, message, sqlstate...)."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info.get("message"))
        self.info = info


FAILING_POOL_WAIT_S = 1.0  # a request's wait for a connection once the pool's last attempt to connect failed
# psycopg_pool retries a failed connection with a backoff that doubles for up to this long, then
# gives up until a request needs a connection, which starts a new attempt at once. Its default
# (5 minutes) let the backoff reach a minute or more: the gateway came back that long after the database.
RECONNECT_WINDOW_S = 5.0


class DbPool(AsyncConnectionPool):
    """The functions' connection pool, which knows whether its last attempt to connect failed.

    While the database is away, a request waiting on a pool that cannot connect waited out its
    whole time limit and answered 504, as if the function were slow. A request on a failing pool
    waits FAILING_POOL_WAIT_S instead, then `ctx.db` throws an error that says so. The pool's
    attempts give up after RECONNECT_WINDOW_S and the next request starts another, so it finds the
    database back within about that long.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("reconnect_timeout", RECONNECT_WINDOW_S)
        super().__init__(*args, configure=self._connected, **kwargs)
        self._errors_at_success = 0
        self.pooler: bool | None = None  # the database is reached through PgBouncer or the like; None: not known yet

    async def _connected(self, conn: psycopg.AsyncConnection) -> None:
        # Through a pooler in transaction mode a statement prepared in one transaction is not
        # there in the next ("prepared statement does not exist"), or another client's of the
        # same name is ("already exists"): such a connection prepares nothing, nor does psycopg.
        if await behind_pooler_async(conn):
            conn.prepare_threshold = None
            _POOLED.add(conn)
            if not self.pooler:
                log.info("the database is reached through a connection pooler (PgBouncer?): ctx.db prepares no statements")
            self.pooler = True
        elif self.pooler is None:
            self.pooler = False
        self._errors_at_success = self.get_stats().get("connections_errors", 0)

    @property
    def failing(self) -> bool:
        return self.get_stats().get("connections_errors", 0) > self._errors_at_success


class DbSession:
    """One request's database transaction, opened at the first query.

    The session speaks to libpq itself, in pipeline mode, with psycopg adapting the parameters
    and loading the rows (`psycopg.adapt.Transformer`). It sends its own BEGIN, so that BEGIN
    travels with the context message and the first statement: one round trip, where psycopg's
    implicit BEGIN would take one of its own. psycopg's cursor and pipeline classes cost more CPU
    than a request's few statements need, and after an idle spell every microsecond of a request's
    CPU costs two or three (measured in-process, interleaved: an INSERT and its COMMIT took 0.30 ms
    of the loop's CPU through them and 0.20 ms this way, back to back; 0.91 and 0.69 ms at 20 ms
    gaps).

    Every statement uses the extended protocol, so a query string holds one statement and its
    values travel apart from it. A statement a connection runs a second time is prepared on it
    (in the same round trip), as psycopg does after five: the server then skips parsing and
    planning it (measured: 15 to 45 us of the server's CPU per request of the bench); not on a
    connection through a pooler such as PgBouncer (`DbPool`), whose next transaction may run on
    another server connection. Prepared statements do not outlive a tenant on a connection: the first round trip of a request of
    another tenant starts with DEALLOCATE ALL, since any session can read their text (a secret
    inlined in the SQL) in `pg_prepared_statements`. A connection whose exchange was interrupted
    (a time limit, a client gone) is closed rather than reused: its protocol state is unknown.

    PostgreSQL aborts a transaction at its first failed statement. A function that catches that
    error and returns still cannot commit what it wrote before it: `lost_writes` then says so, and
    the executor does not let such a request answer as a success.
    """

    def __init__(self, pool: AsyncConnectionPool | None, context: dict[str, Any]) -> None:
        self._pool = pool
        self._context = orjson.dumps(context)
        self._tenant = context.get("tenant")
        self._conn: psycopg.AsyncConnection | None = None
        self._begun = False  # BEGIN was sent on _conn
        self._announced = False  # the context message was sent on _conn
        self._leading: list[bytes] = []  # the SET TRANSACTION statements that ran before it, in order
        self._idle_from = 0.0  # when the last exchange ended: the transaction was idle since
        self._lost: dict[str, Any] | None = None  # the error of the connection's loss, for every later statement
        self._lock = asyncio.Lock()
        self.statements = 0
        self.writes = 0  # statements that succeeded and were not reads: what a commit would keep
        self._unproven: set[str] = set()  # statements tagged as reads that may have written all the same
        self._types = _result_types(pool) if pool is not None else ResultTypes()
        self.aborted_by: str | None = None  # the failure that aborted it: "db.insert(users): duplicate key ... (SQLSTATE 23505)"
        self.lost_writes: str | None = None  # why the writes of a handler that returned were rolled back
        self.outcome: str | None = None  # "committed" | "rolled_back" once finished
        self.commit_timed_out = False  # the COMMIT outran the request's deadline and was cancelled
        self._commit_cancel: asyncio.Future[bool] | None = None  # held: a task nothing references may vanish

    async def query(self, sql: str, params: list[Any]) -> dict[str, Any]:
        """Run one statement: {rows, rowCount, command} as the function gets it, and `bigints`, there
        when int8 values are past Number's safe range: their paths in the rows (for the executor)."""
        if self._pool is None:
            raise HostCallError({"name": "FluxError", "message": "ctx.db is not configured: start Flux with a database"})
        async with self._lock:
            return await self._query(sql, params)

    async def _query(self, sql: str, params: list[Any], *, lost: dict[str, Any] | None = None) -> dict[str, Any]:
        """`query`, under the session's lock. `lost`: the first statement is run again, on another
        connection, after its first connection was found closed (that error)."""
        if self.outcome is not None:
            raise HostCallError({"name": "FluxError", "message": "ctx.db was used after the request finished"})
        refused = refusal(sql)
        if refused is not None:
            raise HostCallError({"name": "FluxError", "message": refused, "sqlstate": None})
        if len(params) > MAX_PARAMS:  # libpq would refuse it only once the transaction's connection is in use: lost
            raise HostCallError({"name": "RangeError", "sqlstate": None, "message": (
                f"ctx.db.query: {len(params):,} parameters, more than the {MAX_PARAMS:,} PostgreSQL's protocol carries "
                f"in one statement; pass the values as arrays ($1::int[], with unnest) or in several statements")})
        if self._lost is not None:
            raise HostCallError(self._lost)
        try:
            adapted = [adapt_param(p, n) for n, p in enumerate(params, 1)]
        except ParamError as exc:
            raise HostCallError({"name": "TypeError", "message": str(exc)}) from None
        try:
            first = not self._begun  # not `self._conn is None`: a query may fail before it is sent
            if self._conn is None:
                failing = lost is not None or getattr(self._pool, "failing", False)
                try:
                    self._conn = await self._pool.getconn(timeout=FAILING_POOL_WAIT_S if failing else None)
                except PoolTimeout:
                    if lost is not None:
                        self._lost = lost
                        raise HostCallError(lost) from None
                    if not failing:
                        raise
                    raise HostCallError({"name": "DatabaseError", "sqlstate": None, "message": (
                        f"ctx.db: no connection to the database within {FAILING_POOL_WAIT_S:g} s: the gateway's "
                        "attempts to connect are failing (its log says why)")}) from None
            conn = self._conn
            encoding = conn.info.encoding
            transformer = Transformer(LoadContext(self._types.adapters, conn))
            values = transformer.dump_sequence(adapted, [PyFormat.AUTO] * len(adapted))
            sql_bytes = sql.encode(encoding)

            # The context message goes with the first statement, unless that one sets the
            # transaction's isolation level (or READ ONLY, DEFERRABLE), which PostgreSQL takes
            # only before any query: then with the first statement that does not.
            announce = not self._announced and not sets_transaction(sql)

            def statements(*, again: bool = False) -> list[_Statement]:
                statement = _statement(conn, sql_bytes, values, transformer.types, transformer.formats)
                sent = [_Statement(b"BEGIN"), *(_Statement(st) for st in self._leading)] if first or again else []
                if switched:
                    sent.insert(0, _Statement(b"DEALLOCATE ALL"))
                if announce:
                    sent.append(_statement(conn, _CONTEXT_MESSAGE, [CONTEXT_PREFIX.encode(), self._context], [_TEXT_OID] * 2, None))
                sent.append(statement)
                return sent

            # Only now, once nothing can fail before BEGIN (and a DEALLOCATE) is sent.
            switched = first and _serve_tenant(conn, self._tenant)
            sent = statements()
            self._begun = True
            self._announced = self._announced or announce
            try:
                result = (await _exchange(conn, sent))[-1]
            except psycopg.Error as exc:
                if conn.closed:  # the connection broke: the server ended the session, or the network failed
                    broken = _connection_lost(exc, None if first else time.monotonic() - self._idle_from)
                    if first and lost is None:
                        # Nothing of the request ran: the server had closed the connection while it
                        # was idle in the pool (idle_session_timeout, a restart, a proxy's idle limit),
                        # and likely the pool's other idle ones too, which the pool checks.
                        await self._pool.putconn(conn)
                        self._conn, self._begun, self._announced = None, False, False
                        await self._pool.check()
                        return await self._query(sql, params, lost=broken)
                    self._lost = broken
                    raise HostCallError(broken) from None
                self._idle_from = time.monotonic()  # a statement the server refused ends an exchange too
                # A stale prepared statement (a migration changed its result columns) in the
                # exchange that carries the context message: nothing but the transaction's
                # settings ran before it, so it starts again, with the statement prepared anew.
                stale = exc.sqlstate in _STALE_PREPARED and any(st.name and not st.prepare for st in sent)
                if not (announce and stale):
                    raise
                await _exchange(conn, [_Statement(b"ROLLBACK")])
                result = (await _exchange(conn, statements(again=True)))[-1]
            if not self._announced:
                self._leading.append(sql_bytes)
            self._idle_from = time.monotonic()
            self.statements += 1
            command = (result.command_status or b"").decode(encoding, "replace").split(" ")[0]
            if command in _MAY_READ:
                self._unproven.add(sql)  # a read, unless it wrote through a function or a data-modifying WITH
            elif command not in _NO_WRITES:
                self.writes += 1
            rows: list[dict[str, Any]] = []
            names: list[str] = []
            if result.status == pq.ExecStatus.TUPLES_OK:
                _check_result_size(result)  # the statement ran: its writes stand unless the function throws
                unknown = self._types.unknown(result)
                if unknown:
                    await self._learn_types(conn, unknown)
                transformer.set_pgresult(result)
                names = [(result.fname(i) or b"").decode(encoding, "replace") for i in range(result.nfields)]
                rows = transformer.load_rows(0, result.ntuples, lambda values: dict(zip(names, values)))
                row_count = result.ntuples
            else:
                row_count = result.command_tuples if result.command_tuples is not None else -1
            try:
                # Checked as the settle writes it, [[call id, ok, result]]: orjson's 254 levels count those two.
                ready, wide = json_ready([[0, True, {"rows": rows, "rowCount": row_count, "command": command}]])
                value = ready[0][2]
                if wide and rows:  # rare: an integer past 2^53 somewhere; in an int8 column, the function gets a BigInt
                    bigints = unsafe_int_paths(value["rows"], self._types.int8_columns(result, names))
                    if bigints:
                        value["bigints"] = bigints
                return value
            except orjson.JSONEncodeError:  # a json or jsonb value of 250 levels: the statement ran, as past the size cap
                raise HostCallError({"name": "RangeError", "sqlstate": None, "message": (
                    "ctx.db.query: a value of the result is nested deeper than 249 levels, the most that can reach "
                    "the function")}) from None
        except UnicodeEncodeError as exc:
            raise HostCallError({
                "name": "DatabaseError", "message": f"the query has a character the database's encoding "
                f"({conn.info.parameter_status('client_encoding')}) cannot hold: {exc.object[exc.start:exc.end]!r}", "sqlstate": None,
            }) from None
        except psycopg.Error as exc:
            info = _database_error(exc)
            if exc.sqlstate != _IN_FAILED_TRANSACTION and exc.sqlstate is not None:
                self.aborted_by = f"{db_span_name(sql)}: {info['message']}"
            if "hint" not in info and exc.sqlstate == _AFTER_A_QUERY and sets_transaction(sql):
                info["hint"] = ("Make it the request's first ctx.db statement: Flux runs the statements that set the "
                                "transaction's characteristics ahead of its context message only until another has run.")
            raise HostCallError(info) from None

    async def _learn_types(self, conn: psycopg.AsyncConnection, unknown: list[int]) -> None:
        """Ask pg_type which of `unknown` are arrays (once per type and pool), so that their values
        come back as lists. In a savepoint: the request's transaction must survive the lookup
        failing (a role that may not read pg_type, a statement_timeout the function set), the
        values then coming back as text."""
        lookup = _Statement(ResultTypes.LEARN_QUERY, [b"{%s}" % b",".join(b"%d" % oid for oid in unknown)], [0], None)
        try:
            found = (await _exchange(conn, [_Statement(b"SAVEPOINT flux_types"), lookup, _Statement(b"RELEASE flux_types")]))[1]
        except psycopg.Error:
            await _exchange(conn, [_Statement(b"ROLLBACK TO flux_types"), _Statement(b"RELEASE flux_types")])
            return
        value = found.get_value
        self._types.learn(unknown, [(int(value(r, 0)), int(value(r, 1)), value(r, 2).decode())  # type: ignore[union-attr]
                                    for r in range(found.ntuples)])

    async def finish(self, *, commit: bool, deadline: float | None = None) -> None:
        """Commit or roll back, reset the session, and give the connection back. Never raises for
        a rollback. A commit asked of a transaction that a failed statement aborted rolls back,
        and sets `lost_writes` when statements before it had written.

        A COMMIT still running at `deadline` (loop time; deferred triggers run in it) is cancelled
        on the server, not abandoned: the server's answer then says whether it committed (a
        cancelled one fails with SQLSTATE 57014 and rolls back; its connection is then closed, as
        after any failed exchange, and the pool replaces it). `commit_timed_out` is set when the
        cancel was sent.
        """
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                self.outcome = self.outcome or ("committed" if commit else "rolled_back")
                return
            assert self._pool is not None
            if conn.closed:  # a query cut short closed it, or the connection broke: whatever it had done is rolled back
                self.outcome = "rolled_back"
                await self._pool.putconn(conn)
                if commit and self._lost is not None:
                    # A read may have written through a function or view; the server cannot be asked now.
                    if self.writes or self._unproven:
                        raise HostCallError({**self._lost, "message": f"the transaction could not commit: {self._lost['message']}"})
                    return
                if commit:
                    raise HostCallError({
                        "name": "DatabaseError", "sqlstate": None,
                        "message": "the transaction could not commit: a ctx.db query was still running when the handler "
                                   "returned (was it awaited?), and stopping it closed the connection, so the "
                                   "request's writes were rolled back"})
                return
            reset = [_statement(conn, sql, [], [], None) for sql in _SESSION_RESET]
            try:
                status = conn.info.transaction_status
                if commit and status == pq.TransactionStatus.INTRANS:
                    timer = None if deadline is None else asyncio.get_running_loop().call_at(deadline, self._cancel_commit, conn)
                    try:
                        await _exchange(conn, [_Statement(b"COMMIT"), *reset])
                    finally:
                        if timer is not None:
                            timer.cancel()
                    self.outcome = "committed"
                else:
                    await _exchange(conn, [_Statement(b"ROLLBACK"), *reset] if status != pq.TransactionStatus.IDLE else reset)
                    self.outcome = "rolled_back"
                    if commit and status == pq.TransactionStatus.INERROR and (self.writes or await self._reads_wrote(conn)):
                        self.lost_writes = (
                            f"its transaction was rolled back: {self.aborted_by or 'a statement'} failed, and the function "
                            f"went on after catching that error, but PostgreSQL had aborted the transaction there, so what "
                            f"the request wrote could not commit. Let the error propagate, or run the statement between "
                            f"SAVEPOINT name and ROLLBACK TO SAVEPOINT name")
            except psycopg.Error as exc:
                await conn.close()  # the session reset was skipped with the failed statement: not reusable
                if commit and getattr(exc, "flux_index", 0) > 0 and self.outcome is None and status == pq.TransactionStatus.INTRANS:
                    self.outcome = "committed"  # the COMMIT went through; a reset statement after it failed
                    return
                self.outcome = "rolled_back"
                if commit:
                    # One line ending in its SQLSTATE, as a statement's error: a serialization failure
                    # (40001) or a deferred constraint's violation (23505) at COMMIT is told by it.
                    raise HostCallError(_database_error(exc, "commit failed: ")) from None
            finally:
                try:
                    # Delivered before the connection serves anyone else; one that could not be
                    # delivered in time might still arrive, so that connection is not reused.
                    if self._commit_cancel is not None and not await self._commit_cancel:
                        await conn.close()
                finally:
                    await self._pool.putconn(conn)

    async def _reads_wrote(self, conn: psycopg.AsyncConnection) -> bool:
        """Whether a statement tagged as a read, before the one that aborted the transaction, may
        have written: its text says so, or a name in it is a volatile function (but for the
        harmless built-in ones, such as random() and nextval()), or a view or a row security
        policy that calls one. Asked only after a caught failure (the transaction rolled back, the
        session reset), on the way to a success that would otherwise hide the loss. Whether the
        transaction had an xid would not tell: the context message takes one at BEGIN."""
        names: set[str] = set()
        for sql in self._unproven:
            writes, mentioned = read_scan(sql)
            if writes:
                return True
            names |= mentioned
        if not names:
            return False
        quoted = ",".join('"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"' for name in sorted(names))
        try:
            [result] = await _exchange(conn, [_Statement(_WRITES_THROUGH, [("{%s}" % quoted).encode(conn.info.encoding)], [0])])
        except (psycopg.Error, UnicodeEncodeError):
            return True
        return result.get_value(0, 0) != b"f"

    def _cancel_commit(self, conn: psycopg.AsyncConnection) -> None:
        self.commit_timed_out = True
        self._commit_cancel = asyncio.ensure_future(_cancel_on_server(conn))

    async def abort(self) -> None:
        """After a timeout: cancel whatever runs on the connection, then roll back."""
        conn = self._conn
        if conn is not None and conn.info.transaction_status == pq.TransactionStatus.ACTIVE:
            await _cancel_on_server(conn)
        await self.finish(commit=False)


def _database_error(exc: psycopg.Error, prefix: str = "") -> dict[str, Any]:
    """What the function gets for a statement PostgreSQL refused: its primary message, whole (a
    first line could hold part of a secret, a PEM key's, that redaction, which sees the trace at
    the end, could no longer recognise), ending in its SQLSTATE, and what PostgreSQL adds: the key
    of a unique violation, a RAISE's DETAIL and HINT, where in the SQL."""
    diag = exc.diag
    primary = prefix + (diag.message_primary or str(exc).strip())
    info: dict[str, Any] = {"name": "DatabaseError", "message": f"{primary} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else primary,
                            "sqlstate": exc.sqlstate, "detail": diag.message_detail}
    if diag.message_hint:
        info["hint"] = diag.message_hint
    if diag.statement_position:
        info["position"] = int(diag.statement_position)
    return info


def _connection_lost(exc: psycopg.Error, idle_s: float | None) -> dict[str, Any]:
    """The error of a statement whose connection broke (it had been `idle_s` idle in the transaction)."""
    idle = "" if idle_s is None else (
        f" after its transaction had been idle for {idle_s * 1000:,.0f} ms (a server's idle_in_transaction_session_timeout "
        f"ends such a session: keep slow calls out of the transaction, or raise it for the functions' role)")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return {"name": "DatabaseError", "sqlstate": exc.sqlstate, "message": (
        f"ctx.db: the connection to the database was lost{idle}: {reason}" + (f" (SQLSTATE {exc.sqlstate})" if exc.sqlstate else "")
        + "; the request's transaction was rolled back, and no later statement can run in it")}


# The most a query may hand a function, counted as the server sent it: a result is converted to
# Python objects and then to JSON in the gateway's memory, which no isolate limit covers (and one
# past the isolate's heap could not reach the function anyway). Results of fewer cells than
# _SIZED_FROM are not measured: they cannot come near it unless their values are huge, and those
# the isolate's own limit stops.
MAX_QUERY_RESULT_BYTES = 64 * 1024 * 1024
_SIZED_FROM = 10_000


def _check_result_size(result: PGresult) -> None:
    rows, columns = result.ntuples, result.nfields
    if rows * columns < _SIZED_FROM:
        return
    value = result.get_value  # a copy of the cell (psycopg exposes no length): freed at once, and
    size = 0                   # the walk stops as soon as the cap is passed
    for row in range(rows):
        for column in range(columns):
            cell = value(row, column)
            if cell is not None:
                size += len(cell)
        if size > MAX_QUERY_RESULT_BYTES:
            raise HostCallError({
                "name": "RangeError", "sqlstate": None,
                "message": f"ctx.db.query: the result ({rows:,} rows) is over {MAX_QUERY_RESULT_BYTES // (1024 * 1024)} MB, "
                           f"the most a query may return to a function; select fewer rows (LIMIT, a cursor with FETCH) "
                           f"or columns"})


async def _cancel_on_server(conn: psycopg.AsyncConnection) -> bool:
    """Ask the server to stop what `conn` runs (the statement then fails with SQLSTATE 57014);
    False when the request could not be delivered within 5 s."""
    try:
        await asyncio.wait_for(conn.cancel_safe(), 5)
    except (psycopg.Error, TimeoutError):
        return False
    return True


_CONTEXT_MESSAGE = b"SELECT pg_logical_emit_message(true, $1::text, $2::text)"
# Whether names a read statement mentioned ($1) are volatile functions, or relations whose views
# or row security policies use one (through other views too), but for the built-in volatile
# functions that write nothing a rollback loses (random(), nextval(), advisory locks, sleeps ...).
_WRITES_THROUGH = rb"""
WITH RECURSIVE used(classid, objid) AS (
    SELECT 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid, c.oid FROM pg_catalog.pg_class c
    WHERE c.relname = ANY($1::pg_catalog.text[])
  UNION
    SELECT 'pg_catalog.pg_proc'::pg_catalog.regclass::pg_catalog.oid, p.oid FROM pg_catalog.pg_proc p
    WHERE p.proname = ANY($1::pg_catalog.text[])
  UNION
    SELECT d.refclassid, d.refobjid
    FROM used u
    JOIN (SELECT r.ev_class AS rel, 'pg_catalog.pg_rewrite'::pg_catalog.regclass::pg_catalog.oid AS classid, r.oid AS objid
          FROM pg_catalog.pg_rewrite r WHERE r.ev_type = '1'
          UNION ALL
          SELECT p.polrelid, 'pg_catalog.pg_policy'::pg_catalog.regclass::pg_catalog.oid, p.oid FROM pg_catalog.pg_policy p) x
      ON u.classid = 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid AND x.rel = u.objid
    JOIN pg_catalog.pg_depend d ON d.classid = x.classid AND d.objid = x.objid
)
SELECT EXISTS (
    SELECT FROM used u JOIN pg_catalog.pg_proc p ON p.oid = u.objid
    WHERE u.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass::pg_catalog.oid AND p.provolatile = 'v'
      AND NOT (p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace AND (
          p.proname IN ('random', 'setseed', 'gen_random_uuid', 'uuidv4', 'uuidv7', 'clock_timestamp', 'timeofday',
                        'nextval', 'setval', 'currval', 'lastval', 'set_config', 'txid_status', 'pg_xact_status',
                        'current_query', 'pg_blocking_pids', 'pg_is_in_recovery', 'pg_jit_available')
          OR p.proname LIKE ANY (ARRAY['pg\_sleep%', 'pg\_advisory\_%', 'pg\_try\_advisory\_%', 'pg\_stat\_get\_%',
                                       'pg\_%\_size', 'pg\_current\_wal\_%'])))
)"""
_TEXT_OID = 25
MAX_PARAMS = 65_535  # the protocol's Bind message counts a statement's parameters in 16 bits
# Statements prepared per connection, at most; past it a statement runs unnamed (parsed each time).
# Counted over the connection's life: a stale statement is forgotten but stays prepared on the server.
PREPARED_MAX = 64
# SQLSTATEs that say a prepared statement can no longer be used: its result type changed (a
# column added under `SELECT *`), or it is gone. It is forgotten, and prepared again next time.
_STALE_PREPARED = frozenset({"0A000", "26000"})

# Command tags of statements that a rollback loses nothing of. FETCH and MOVE run a cursor's
# query, which its DECLARE (in _MAY_READ) said.
_NO_WRITES = frozenset({"SHOW", "FETCH", "MOVE", "CLOSE", "LOCK", "SAVEPOINT", "RELEASE", "ROLLBACK", "SET", "RESET",
                        "LISTEN", "UNLISTEN"})
# Tags of reads that can write all the same: WITH x AS (INSERT ...) SELECT, SELECT fn_that_writes(),
# EXPLAIN ANALYZE. Any other tag is a write.
_MAY_READ = frozenset({"SELECT", "DECLARE", "EXPLAIN"})
# Session state a function can leave on a pooled connection, for the next request or tenant to see:
# settings (SET, set_config(..., false)), its role, LISTEN, session advisory locks, temporary
# tables, held cursors, sequences' currval. Sent after the COMMIT or ROLLBACK, in the same round
# trip, and prepared on the connection after its first use (measured: 18 us more per request).
# Flux's own prepared statements stay for the same tenant's next requests and are dropped when
# the connection passes to another tenant (`_serve_tenant`); SQL-level ones are refused.
_SESSION_RESET = (b"RESET ALL", b"SET SESSION AUTHORIZATION DEFAULT", b"UNLISTEN *",
                  b"SELECT pg_advisory_unlock_all()", b"DISCARD TEMP", b"CLOSE ALL", b"DISCARD SEQUENCES")
_FLUX_STATEMENTS = frozenset({_CONTEXT_MESSAGE, *_SESSION_RESET})  # the same for every tenant
_IN_FAILED_TRANSACTION = "25P02"  # each statement after the one that aborted the transaction
_AFTER_A_QUERY = "25001"  # an isolation level or DEFERRABLE set once the transaction has run a query


@dataclass(slots=True)
class _Statement:
    sql: bytes
    values: Sequence[Buffer | None] | None = None
    types: Sequence[int] | None = None
    formats: Sequence[pq.Format] | None = None
    name: bytes | None = None  # a prepared statement's name: executed as such
    prepare: bool = False  # prepare `name` in the same exchange, before executing it
    cache: _Prepared | None = None

    @property
    def key(self) -> tuple[bytes, tuple[int, ...]]:
        """What a connection's prepared statements are found by: the SQL and its parameter types."""
        return self.sql, tuple(self.types or ())


class _Prepared:
    """What Flux has prepared on one connection, by (SQL, parameter types), and for which tenant."""

    __slots__ = ("names", "seen", "made", "tenant", "limit")

    def __init__(self, tenant: str | None = None, *, prepares: bool = True) -> None:
        self.names: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
        self.seen: set[tuple[bytes, tuple[int, ...]]] = set()
        self.made = 0
        self.tenant = tenant
        self.limit = PREPARED_MAX if prepares else 0  # 0 through a pooler (`DbPool`)


_PREPARED: weakref.WeakKeyDictionary[psycopg.AsyncConnection, _Prepared] = weakref.WeakKeyDictionary()
_POOLED: weakref.WeakSet[psycopg.AsyncConnection] = weakref.WeakSet()  # connections through a pooler: none prepared
# One database's types per pool: what its results load with, array types learned included.
_RESULT_TYPES: weakref.WeakKeyDictionary[AsyncConnectionPool, ResultTypes] = weakref.WeakKeyDictionary()


def _result_types(pool: AsyncConnectionPool) -> ResultTypes:
    types = _RESULT_TYPES.get(pool)
    if types is None:
        types = _RESULT_TYPES[pool] = ResultTypes()
    return types


def _serve_tenant(conn: psycopg.AsyncConnection, tenant: str | None) -> bool:
    """Whether `conn` last served another tenant. Its prepared statements must then go (the
    caller sends DEALLOCATE ALL, which also drops any a function made through a DO block): their
    text, a secret or data inlined in SQL included, is in `pg_prepared_statements` for any later
    request on the connection to read. Flux's own statements are prepared again at their next use,
    so that a pool shared by tenants in turn keeps them prepared."""
    cache = _PREPARED.get(conn)
    if cache is None:
        _PREPARED[conn] = _Prepared(tenant, prepares=conn not in _POOLED)
        return False
    if cache.tenant == tenant:
        return False
    _PREPARED[conn] = fresh = _Prepared(tenant, prepares=bool(cache.limit))
    fresh.seen = {key for key in cache.seen if key[0] in _FLUX_STATEMENTS}
    return True


def _statement(conn: psycopg.AsyncConnection, sql: bytes, values: Sequence[Buffer | None], types: Sequence[int],
               formats: Sequence[pq.Format] | None) -> _Statement:
    """`sql` as a statement on `conn`: executed by name once prepared there, prepared at its second use."""
    cache = _PREPARED.get(conn)
    if cache is None:
        cache = _PREPARED[conn] = _Prepared(prepares=conn not in _POOLED)
    statement = _Statement(sql, values, types, formats)
    key = statement.key
    name = cache.names.get(key)
    if name is not None:
        statement.name, statement.cache = name, cache
    elif key in cache.seen and cache.made < cache.limit:
        cache.made += 1
        statement.name, statement.prepare, statement.cache = b"flux_%d" % cache.made, True, cache
    else:
        if len(cache.seen) >= 4 * PREPARED_MAX:  # statements seen once each, such as SQL built per request
            cache.seen.clear()
        cache.seen.add(key)
    return statement


async def _exchange(conn: psycopg.AsyncConnection, statements: list[_Statement]) -> list[PGresult]:
    """Send `statements` in one pipeline, with one Sync, and return their results, one each;
    the first failed statement's error is raised (the server skips the rest up to the Sync),
    with its position in `statements` as `flux_index`."""
    pgconn = conn.pgconn
    try:
        pgconn.enter_pipeline_mode()
        for st in statements:
            if st.prepare:
                pgconn.send_prepare(st.name, st.sql, param_types=st.types)
            if st.name is not None:
                pgconn.send_query_prepared(st.name, st.values, param_formats=st.formats)
            else:
                pgconn.send_query_params(st.sql, st.values, param_types=st.types, param_formats=st.formats)
        pgconn.pipeline_sync()
        received = iter(await conn.wait(_until_sync(pgconn)))
        pgconn.exit_pipeline_mode()
    except BaseException:
        await conn.close()  # its protocol state is unknown: the pool replaces a closed connection
        raise
    results: list[PGresult] = []
    error: psycopg.Error | None = None
    for index, st in enumerate(statements):
        key = st.key
        if st.prepare:
            prepared = next(received)
            if prepared.status == pq.ExecStatus.COMMAND_OK and st.cache is not None:
                st.cache.names[key] = st.name  # type: ignore[assignment]
            elif prepared.status == pq.ExecStatus.FATAL_ERROR and error is None:
                error = psycopg.errors.error_from_result(prepared, encoding=conn.info.encoding)
                error.flux_index = index  # type: ignore[attr-defined]
        result = next(received)
        if result.status == pq.ExecStatus.FATAL_ERROR and error is None:
            error = psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
            error.flux_index = index  # type: ignore[attr-defined]
            if st.cache is not None and not st.prepare and error.sqlstate in _STALE_PREPARED:
                st.cache.names.pop(key, None)
        results.append(result)
    if error is not None:
        raise error
    return results


def _until_sync(pgconn: PGconn) -> PQGen[list[PGresult]]:
    """psycopg's generator protocol (it yields what it waits for): flush the pipeline, then read
    results up to its Sync. libpq ends each statement's results with None."""
    while pgconn.flush():
        if (yield Wait.RW) & Ready.R:
            pgconn.consume_input()
    results: list[PGresult] = []
    while True:
        while pgconn.is_busy():
            yield Wait.R
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            continue
        if result.status == pq.ExecStatus.PIPELINE_SYNC:
            return results
        results.append(result)
