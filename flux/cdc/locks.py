"""Changing a live database without stalling it: how attach, detach and reconcile take their locks.

`ALTER TABLE ... REPLICA IDENTITY` takes an ACCESS EXCLUSIVE lock. Waited for in the lock queue
behind an application's long transaction, it would hold every later query on the table back (reads
included) for as long as that transaction stays open. So the work runs with a short lock timeout,
retried for a bounded time, naming who holds the tables. Creating a logical slot waits for every
transaction that has an xid; `warn_of_open_transactions` names the old ones. Nothing here
ends another session: that is the DBA's call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg

from flux.cdc.publication import TableRef
from flux.errors import PreflightError

log = logging.getLogger("flux.cdc")

LOCK_TIMEOUT = "1s"  # per try at the locks attach takes; LOCK_WAIT seconds of tries in all
LOCK_WAIT = 30.0


def in_one_transaction(conn: psycopg.Connection, run: Callable[[], None], tables: Callable[[], list[TableRef]], *,
                        lock_wait: float, what: str, slot: str) -> None:
    """`run()` in one transaction, whose locks are waited for LOCK_TIMEOUT at a time, for up to
    `lock_wait` seconds of tries. REPLICA IDENTITY takes an exclusive lock: waiting for it in the
    queue behind a long transaction would hold every later query on the table back meanwhile."""
    deadline, said = time.monotonic() + lock_wait, False
    while True:
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                run()
            return
        except psycopg.errors.LockNotAvailable:
            holders = lock_holders(conn, tables())
            if time.monotonic() >= deadline:
                raise PreflightError(
                    f"Could not {what} within {lock_wait:g} s: open transactions hold them" + (f" ({holders})" if holders else ""),
                    hint=f"REPLICA IDENTITY needs a moment's exclusive lock, tried for {LOCK_TIMEOUT} at a time so that your "
                         "queries never queue behind it. Run it again when they end, or end them (SELECT "
                         "pg_terminate_backend(pid)). Nothing was changed.", retryable=True, slot=slot)
            if not said:
                log.warning("waiting for open transactions that hold the tables%s; retrying for up to %g s",
                            f" ({holders})" if holders else "", lock_wait)
                said = True
            time.sleep(0.2)


def lock_holders(conn: psycopg.Connection, tables: list[TableRef]) -> str:
    """The sessions holding locks on `tables` (or their partitions), as 'pid N (state, open S s)'."""
    rows = conn.execute(
        """
        SELECT DISTINCT a.pid, coalesce(a.state, 'state not visible to this role'),
               extract(epoch FROM now() - a.xact_start)::int
        FROM unnest(%s::text[], %s::text[]) AS t(s, r)
        JOIN pg_namespace rn ON rn.nspname = t.s JOIN pg_class r ON r.relnamespace = rn.oid AND r.relname = t.r
        CROSS JOIN LATERAL (SELECT r.oid AS relid UNION SELECT relid FROM pg_partition_tree(r.oid)) p
        JOIN pg_locks l ON l.locktype = 'relation' AND l.relation = p.relid AND l.granted
        JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE a.pid <> pg_backend_pid() ORDER BY 3 DESC NULLS LAST LIMIT 5
        """,
        ([t.schema for t in tables], [t.name for t in tables]),
    ).fetchall()
    return ", ".join(f"pid {pid} ({state}, open {age} s)" for pid, state, age in rows)


OPEN_TRANSACTION_WARNING_S = 2  # seconds a transaction has been open when attach names it as holding the slot up


def warn_of_open_transactions(conn: psycopg.Connection) -> None:
    """Creating a logical slot waits for every transaction that has an xid to end: name those open
    for a while (a session left idle in transaction holds attach up for as long as it stays so)."""
    rows = conn.execute(
        "SELECT pid, coalesce(state, 'state not visible to this role'), extract(epoch FROM now() - xact_start)::int"
        " FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()"
        " AND xact_start < now() - make_interval(secs => %s) ORDER BY xact_start LIMIT 5",
        (OPEN_TRANSACTION_WARNING_S,),
    ).fetchall()
    if rows:
        log.warning("creating the replication slot waits for these open transactions to end: %s. It goes on once they do "
                    "(SELECT pg_terminate_backend(pid) ends one).",
                    ", ".join(f"pid {pid} ({state}, open {age} s)" for pid, state, age in rows))
