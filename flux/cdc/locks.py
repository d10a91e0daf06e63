"""Bounded waits for the locks Flux takes on the user's tables, and who holds a table when it cannot.

`ALTER TABLE ... REPLICA IDENTITY` (attach, detach, the engine capturing a new table or partition)
takes an ACCESS EXCLUSIVE lock; `ALTER PUBLICATION ... ADD TABLE` a SHARE UPDATE EXCLUSIVE one.
Waiting for the first behind a long transaction queues every later query of the table behind the
ALTER: on a production database the table stops answering for as long as that transaction runs.
So Flux waits for such a lock a second at most (`lock_timeout`), then steps aside, so that the
queries queued behind it run, and tries again after a pause that doubles each time; after
LOCK_TRIES tries it gives up having changed nothing, naming the sessions that hold the table.
A table is held up a second at a time, never for as long as the transaction in the way lasts.

A try takes all its tables' locks up front (`lock_up_front`), before any ALTER, and waits for them a
bounded time in all. With several tables, while it waits for one it holds the others, and an
application transaction taking two of them in the other order closes a cycle: the try then gives up
before the shortest `deadlock_timeout` a session of the database starts with (the server's, or one
set for a role or the database), so it is gone when PostgreSQL's deadlock check runs and chooses a
backend to abort, and the application's transaction waits a moment and goes on.

Each lock a transaction holds takes an entry of the server's shared lock table until it ends
(`LockRoom`): attach and detach split work on more tables than a share of it allows into batches.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from psycopg import errors, sql

from flux.cdc.publication import TableRef
from flux.cdc.sink import turn_off_timeouts
from flux.errors import LockTimeoutError, PreflightError
from flux.pg.pooler import behind_pooler

DEFAULT_LOCK_TIMEOUT_S = 1.0  # attach and detach (`--lock-timeout`)
ENGINE_LOCK_TIMEOUT_S = 1.0  # the engine's capture of new tables, which it retries every pass anyway
LOCK_TRIES = 5  # with the default timeout, pauses of 1, 2, 4 and 8 s between them: about 20 s in all
MAX_NAMED = 5  # sessions named in an error, the longest-running first: on a busy table the rest are its traffic
# A try holding tables while it waits gives up at this share of deadlock_timeout: the margin covers
# its rollback and the timers' slack, so that it has let go before another backend's deadlock check.
DEADLOCK_SHARE = 0.8

T = TypeVar("T")

# PostgreSQL sizes its shared lock table (all sessions' locks) for max_locks_per_transaction locks
# per backend slot and prepared transaction; past it (and a little slack) every session's next lock
# fails: 'out of shared memory', HINT 'You might need to increase max_locks_per_transaction'.
# Backend slots: connections, autovacuum workers and launcher, background workers, WAL senders.
_LOCK_TABLE = """
SELECT current_setting('max_locks_per_transaction')::int,
       (current_setting('max_connections')::int + current_setting('autovacuum_max_workers')::int + 1
          + current_setting('max_worker_processes')::int + current_setting('max_wal_senders')::int
          + current_setting('max_prepared_transactions')::int),
       (SELECT count(*) FROM pg_locks WHERE NOT fastpath)
"""
LOCK_TABLE_SHARE = 0.25  # of the lock table, the most one batch of Flux's takes


@dataclass(frozen=True)
class LockRoom:
    """The server's shared lock table: `per_slot` entries (max_locks_per_transaction) for each of
    its `slots`, and the entries `in_use` (not fast-path) when looked at."""

    per_slot: int
    slots: int
    in_use: int

    @property
    def capacity(self) -> int:
        """Entries as sized, before PostgreSQL's slack."""
        return self.per_slot * self.slots

    @property
    def batch(self) -> int:
        """Tables one batch of many may lock: a quarter of the table, and no more than half of what
        is free, so that the application's sessions keep room for theirs."""
        return max(1, min(int(self.capacity * LOCK_TABLE_SHARE), self.most))

    @property
    def most(self) -> int:
        """Tables one transaction that cannot be split may lock: half of what is free."""
        return max(1, (self.capacity - self.in_use) // 2)


def lock_room(conn: psycopg.Connection) -> LockRoom:
    per_slot, slots, in_use = conn.execute(_LOCK_TABLE).fetchone()
    return LockRoom(per_slot=per_slot, slots=slots, in_use=in_use)


def in_batches(items: list[T], weight: Callable[[T], int], size: int) -> list[list[T]]:
    """`items` in order, cut into batches whose weights (a table's: it and its partitions) add up to
    `size` at most; an item heavier than that is a batch of its own."""
    batches: list[list[T]] = []
    total = 0
    for item in items:
        if not batches or total + weight(item) > size:
            batches.append([])
            total = 0
        batches[-1].append(item)
        total += weight(item)
    return batches


def refuse_too_many_locks(room: LockRoom, tables: int, *, action: str, **context: str) -> None:
    """A transaction that cannot be split and would lock more than `room.most` tables: refused
    before it locks anything, rather than fill the lock table for every session of the server.
    `action` says what was done ("Attach changed nothing")."""
    if tables > room.most:
        raise PreflightError(
            f"{action}: one of its transactions would lock {tables} tables at once (a partitioned table's partitions each "
            f"count), and the server's "
            f"shared lock table holds about {room.capacity} locks for all sessions ({room.in_use} in use): filling it "
            "fails every session's next lock ('out of shared memory')",
            # Not "fewer tables": a partitioned table's partitions are locked with it, and detach has no choice.
            hint=f"Raise max_locks_per_transaction, which sizes that table (now {room.per_slot}: ALTER SYSTEM SET "
                 f"max_locks_per_transaction = {_enough_per_slot(room, tables)}, then restart PostgreSQL), and run it again.",
            **context)


def _enough_per_slot(room: LockRoom, tables: int) -> int:
    """A max_locks_per_transaction under which `tables` is at most half of the room left free at
    today's use (what `LockRoom.most` allows), rounded up to a multiple of 64."""
    needed = -(-(room.in_use + 2 * tables) // room.slots)
    return -(-max(needed, room.per_slot + 1) // 64) * 64


def own_waits(conn: psycopg.Connection) -> None:
    """Attach and detach bound their own waits: a lock a second at a time (as above), the slot's
    creation for as long as the transactions running then last, said as it waits (BlockerWatch). So
    the timeouts a role or database sets for its applications are turned off for their sessions: a
    lock_timeout or statement_timeout cancelled the slot's creation behind any longer transaction,
    with nothing to say why, a statement_timeout shorter than a try cut it short unretried, and an
    idle_session_timeout ended the session in the pause between two tries (and the watch's between
    two looks). Not through a pooler, whose server connection would keep the setting for its other
    clients."""
    if not behind_pooler(conn):
        turn_off_timeouts(conn)


def bound_lock_waits(conn: psycopg.Connection, seconds: float) -> None:
    """Every lock this transaction waits for, it waits `seconds` at most (SQLSTATE 55P03 after)."""
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{max(1, round(seconds * 1000))}ms")))


@dataclass
class LockBudget:
    """How long a try waits for locks: `seconds` (`--lock-timeout`), or less when it holds tables
    while waiting (`lock_up_front` says how long it waited in `waited`, and the deadlock_timeout
    that bounded it in `deadlock_ms`)."""

    seconds: float
    waited: float | None = None
    deadlock_ms: float | None = None


# One statement, so that the wait is bounded server-side and no round trip falls inside it: each
# LOCK waits at most what is left of the try's budget (1 ms once it is spent: a free lock is still
# granted at once). ONLY: a partition is listed itself when its own identity changes. A table this
# role does not own (or that is gone) is left to the statement that changes it, whose refusal says
# so ("must be owner of table"), where LOCK's would say "permission denied".
_LOCK_IN_TURN = """
DO $flux$
DECLARE
    deadline timestamptz := clock_timestamp() + current_setting('flux.lock_budget_ms')::int * interval '1 ms';
    t record;
BEGIN
    FOR t IN SELECT e->>0 AS schema_name, e->>1 AS table_name, e->>2 AS mode
             FROM jsonb_array_elements(current_setting('flux.lock_list')::jsonb) WITH ORDINALITY AS l(e, i)
             JOIN pg_namespace n ON n.nspname = e->>0 JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = e->>1
             WHERE pg_has_role(c.relowner, 'USAGE') ORDER BY i LOOP
        PERFORM set_config('lock_timeout',
                           greatest(1, ceil(extract(epoch FROM deadline - clock_timestamp()) * 1000))::int || 'ms', true);
        BEGIN
            EXECUTE format('LOCK TABLE ONLY %I.%I IN %s MODE', t.schema_name, t.table_name, t.mode);
        EXCEPTION WHEN undefined_table THEN
            NULL;  -- dropped while this waited for an earlier one: the statements after it skip it too
        END;
    END LOOP;
END
$flux$
"""


# The deadlock check runs in the backend that waits, after its own deadlock_timeout: an application
# role or database given a shorter one (ALTER ROLE / ALTER DATABASE ... SET) checks sooner than the
# server's setting says. PostgreSQL reads each such value itself, as lock_timeout (the same unit and
# parser), so that every form it accepts ('100ms', '0.1s', '100', '1min') counts as it does.
_SHORTEST_DEADLOCK_TIMEOUT = """
DO $flux$
DECLARE
    shortest float := (SELECT setting::float FROM pg_settings WHERE name = 'deadlock_timeout');
    saved text := current_setting('lock_timeout');
    value text;
BEGIN
    FOR value IN SELECT substr(e, strpos(e, '=') + 1)
                 FROM pg_db_role_setting s CROSS JOIN unnest(s.setconfig) AS e
                 WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
                   AND lower(split_part(e, '=', 1)) = 'deadlock_timeout' LOOP
        PERFORM set_config('lock_timeout', value, true);
        shortest := least(shortest, (SELECT setting::float FROM pg_settings WHERE name = 'lock_timeout'));
    END LOOP;
    PERFORM set_config('lock_timeout', saved, true);
    PERFORM set_config('flux.deadlock_timeout_ms', shortest::text, true);
END
$flux$
"""


def shortest_deadlock_timeout_ms(conn: psycopg.Connection) -> float:
    """The shortest deadlock_timeout a session of this database can start with, in ms: this session's
    (the server's, unless one is set for Flux's own role, which then hides it), and every one set for
    a role, for this database or all, or for a role in this database (pg_db_role_setting, which any
    role may read). Not one a session SETs itself (a superuser, or a role granted SET on the
    parameter). In the current transaction, whose lock_timeout it leaves as it was."""
    conn.execute(_SHORTEST_DEADLOCK_TIMEOUT)
    return float(conn.execute("SELECT current_setting('flux.deadlock_timeout_ms')").fetchone()[0])


def lock_up_front(conn: psycopg.Connection, budget: LockBudget, exclusive: Iterable[TableRef],
                  share_update: Iterable[TableRef] = ()) -> None:
    """In the current transaction, before any ALTER: ACCESS EXCLUSIVE on `exclusive` (their identity
    changes), SHARE UPDATE EXCLUSIVE on `share_update` (they join or leave the publication), one
    after another. With one table, it waits `budget.seconds` (it holds no other table meanwhile);
    with more, DEADLOCK_SHARE of `shortest_deadlock_timeout_ms` at most, in all. A later wait of the
    transaction (a lock this did not foresee) is bounded the same. 55P03 when the time is up."""
    modes = {t: "SHARE UPDATE EXCLUSIVE" for t in share_update} | {t: "ACCESS EXCLUSIVE" for t in exclusive}
    seconds = budget.seconds
    if len(modes) > 1:
        budget.deadlock_ms = shortest_deadlock_timeout_ms(conn)
        seconds = min(seconds, DEADLOCK_SHARE * budget.deadlock_ms / 1000)
    budget.waited = seconds
    if modes:
        listed = [[t.schema, t.name, mode] for t, mode in sorted(modes.items(), key=lambda item: str(item[0]))]
        conn.execute("SELECT set_config('flux.lock_budget_ms', %s, true), set_config('flux.lock_list', %s, true)",
                     (str(max(1, round(seconds * 1000))), json.dumps(listed)))
        conn.execute(_LOCK_IN_TURN)
    bound_lock_waits(conn, seconds)


def with_lock_retries(conn: psycopg.Connection, step: Callable[[], T], *, action: str, command: str, budget: LockBudget,
                      tables: Callable[[], list[TableRef]], **context: str) -> T:
    """`step` (one transaction that calls `lock_up_front`), tried LOCK_TRIES times while a lock
    wait times out; then a LockTimeoutError naming who holds `tables()`, with `context` (slot, publication)."""
    started = time.monotonic()
    seconds = budget.seconds
    for attempt in range(1, LOCK_TRIES + 1):
        try:
            return step()
        except errors.LockNotAvailable:
            if attempt < LOCK_TRIES:
                time.sleep(seconds * 2 ** (attempt - 1))  # the queries queued behind the try run meanwhile
    try:
        held = holders(conn, tables())
    except psycopg.Error:  # who holds it is a courtesy: the timeout is what to report
        held = []
    shown = held[:MAX_NAMED] + ([f"and {len(held) - MAX_NAMED} more"] if len(held) > MAX_NAMED else [])
    who = "; ".join(shown) if held else "a transaction that has ended since"
    first_pid = next((h.split()[1] for h in held if h.startswith("pid ")), None)
    end_it = f" (or end it: SELECT pg_terminate_backend({first_pid});)" if first_pid else ""
    waited = budget.waited if budget.waited is not None else seconds
    if waited >= seconds:
        hint = (f"Let that transaction finish{end_it}, then run `{command}` again; or pass --lock-timeout SECONDS to wait "
                "longer (the table's other queries wait as long meanwhile).")
    else:
        hint = (f"Let that transaction finish{end_it}, then run `{command}` again, at a quieter moment or for fewer tables "
                f"at a time: a try holding some of its tables while it waits for the others gives up within {waited:g} s, "
                f"before deadlock_timeout ({budget.deadlock_ms:g} ms, the shortest a session of the database starts with: "
                "the server's, or one set for a role or the database, which psql's \\drds lists), so that no application "
                "transaction is aborted for it, whatever --lock-timeout says.")
    raise LockTimeoutError(
        f"{action} changed nothing: a table it must alter is in use by another transaction, and waiting for it would stop "
        f"the table's other queries (waited {waited:g} s, {LOCK_TRIES} times over {time.monotonic() - started:.0f} s): {who}",
        hint=hint, **context,
    )


def holders(conn: psycopg.Connection, tables: list[TableRef]) -> list[str]:
    """The sessions (and prepared transactions) holding a lock on any of `tables`, longest-running
    first, one line each."""
    if not tables:
        return []
    names = [sql.Identifier(t.schema, t.name).as_string(conn) for t in tables]
    # A prepared transaction's locks have no pid; its xid lock, of the same virtual transaction, leads to its gid.
    rows = conn.execute(
        """
        SELECT n.nspname || '.' || c.relname, l.mode, a.pid, a.usename, a.application_name, a.state,
               extract(epoch FROM now() - coalesce(a.xact_start, a.query_start, p.prepared))::bigint,
               left(regexp_replace(a.query, '\\s+', ' ', 'g'), 120), p.gid, p.owner, p.database
        FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_stat_activity a ON a.pid = l.pid
        LEFT JOIN pg_locks x ON l.pid IS NULL AND x.pid IS NULL AND x.locktype = 'transactionid'
                            AND x.virtualtransaction = l.virtualtransaction
        LEFT JOIN pg_prepared_xacts p ON p.transaction = x.transactionid
        WHERE l.locktype = 'relation' AND l.granted AND l.pid IS DISTINCT FROM pg_backend_pid()
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.relation IN (SELECT to_regclass(name) FROM unnest(%s::text[]) AS name)
        ORDER BY 7 DESC NULLS LAST, 3
        """,
        (names,),
    ).fetchall()
    return [_session_line(pid, user, application, state, seconds, query, f"holds {table} ({mode})")
            if pid is not None
            else _prepared_line(gid, owner, database, seconds, f"holds {table} ({mode})") if gid is not None
            else f"a prepared transaction holds {table} ({mode}): see pg_prepared_xacts"  # ended as this looked
            for table, mode, pid, user, application, state, seconds, query, gid, owner, database in rows]


def holding_transactions(conn: psycopg.Connection, tables: list[TableRef]) -> set[str]:
    """The transactions (virtual transaction ids, a prepared one's too) holding a lock on any of `tables`."""
    if not tables:
        return set()
    names = [sql.Identifier(t.schema, t.name).as_string(conn) for t in tables]
    return {vxid for (vxid,) in conn.execute(
        "SELECT DISTINCT virtualtransaction FROM pg_locks WHERE locktype = 'relation' AND granted"
        " AND pid IS DISTINCT FROM pg_backend_pid() AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND relation IN (SELECT to_regclass(name) FROM unnest(%s::text[]) AS name)", (names,)).fetchall()}


def blocking_sessions(conn: psycopg.Connection, pid: int) -> dict[int | str, str]:
    """What the backend `pid` waits for (pg_blocking_pids), one line each: sessions by pid, prepared
    transactions by gid. pg_blocking_pids gives 0 for a prepared transaction, without saying which:
    every one is named (the slot's creation, which BlockerWatch watches, waits for all of them, in
    every database)."""
    rows = conn.execute(
        """
        SELECT b.pid, NULL, a.usename, a.application_name, a.state,
               extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))::bigint,
               left(regexp_replace(a.query, '\\s+', ' ', 'g'), 120)
        FROM unnest(pg_blocking_pids(%(pid)s)) AS b(pid) LEFT JOIN pg_stat_activity a ON a.pid = b.pid WHERE b.pid <> 0
        UNION ALL
        SELECT NULL, p.gid, p.owner, p.database, NULL, extract(epoch FROM now() - p.prepared)::bigint, NULL
        FROM pg_prepared_xacts p WHERE 0 = ANY (pg_blocking_pids(%(pid)s))
        ORDER BY 6 DESC NULLS LAST, 1, 2
        """,
        {"pid": pid},
    ).fetchall()
    return {blocker if blocker is not None else gid:
            _session_line(blocker, user, application, state, seconds, query, "") if blocker is not None
            else _prepared_line(gid, user, application, seconds, "")
            for blocker, gid, user, application, state, seconds, query in rows}


def _session_line(pid: int, user: str | None, application: str | None, state: str | None, seconds: int | None,
                  query: str | None, what: str) -> str:
    who = ", ".join(part for part in (user, application) if part) or "?"
    doing = f"{state} for {seconds} s" if seconds is not None else state or "?"
    return f"pid {pid} ({who}){' ' + what if what else ''}, {doing}: {query!r}"


def _prepared_line(gid: str, owner: str, database: str, seconds: int | None, what: str) -> str:
    """A transaction PREPAREd for a two-phase commit and left: no session, and it never ends by itself."""
    quoted = "'" + gid.replace("'", "''") + "'"
    return (f"prepared transaction {quoted} ({owner}, database {database}){' ' + what if what else ''}, prepared "
            f"{seconds} s ago: it ends only with COMMIT PREPARED {quoted} or ROLLBACK PREPARED {quoted}, run in database "
            f"{database}")


class BlockerWatch:
    """While a statement of backend `pid` runs, reports (`report(lines)`) the sessions it has waited
    for longer than `after` seconds, each time they change: on another connection, in a thread."""

    def __init__(self, dsn: str, pid: int, report: Callable[[list[str]], None], *, after: float = 2.0, every: float = 1.0) -> None:
        self._dsn, self._pid, self._report, self._after, self._every = dsn, pid, report, after, every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="flux-blocker-watch", daemon=True)

    def __enter__(self) -> BlockerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        if self._done.wait(self._after):
            return
        reported: set[int | str] = set()
        try:
            with psycopg.connect(self._dsn, autocommit=True, connect_timeout=10, application_name="flux attach (watching)") as conn:
                own_waits(conn)
                while not self._done.is_set():
                    blockers = blocking_sessions(conn, self._pid)
                    if blockers and set(blockers) != reported and not self._done.is_set():
                        self._report(list(blockers.values()))
                    reported = set(blockers)
                    self._done.wait(self._every)
        except psycopg.Error:  # only a report: the statement it watches goes on, and says its own errors
            return
