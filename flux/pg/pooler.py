"""Whether a connection reaches PostgreSQL through a connection pooler (PgBouncer and the like).

A pooler answers the client's startup itself: the process id in the BackendKeyData it sends is
its own (PgBouncer makes one up), not that of the server process that runs the queries, which
`pg_backend_pid()` returns. The two are equal on a direct connection, always, and differ through
a pooler. That costs one query, once per connection.

What this does not tell: the pooler's mode. Through PgBouncer in transaction mode each
transaction may run on another server connection, so what a session keeps (prepared statements,
session advisory locks, settings) is not there in the next one; Flux assumes that mode whenever
the ids differ, since session mode only makes it give up a little speed.
"""

from __future__ import annotations

import psycopg
from psycopg import pq

_BACKEND_PID = "SELECT pg_backend_pid()"

# The hint for what a pooler cannot carry: a replication connection, a lock held across transactions.
DIRECT_DSN_HINT = "Give it a DSN that reaches PostgreSQL directly (the server's own host and port, not the pooler's)."


def behind_pooler(conn: psycopg.Connection) -> bool:
    """Whether `conn` talks to a pooler rather than to the server process that runs its queries.
    An idle connection is left idle (the transaction a non-autocommit one opened is rolled back)."""
    idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
    row = conn.execute(_BACKEND_PID, prepare=False).fetchone()
    if idle and conn.info.transaction_status != pq.TransactionStatus.IDLE:
        conn.rollback()
    return row is not None and row[0] != conn.info.backend_pid


async def behind_pooler_async(conn: psycopg.AsyncConnection) -> bool:
    """`behind_pooler` for an async connection."""
    idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
    row = await (await conn.execute(_BACKEND_PID, prepare=False)).fetchone()
    if idle and conn.info.transaction_status != pq.TransactionStatus.IDLE:
        await conn.rollback()
    return row is not None and row[0] != conn.info.backend_pid
