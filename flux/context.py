"""Tag an application's database writes with a Flux request context.

For code that writes to PostgreSQL outside the Flux runtime (a worker, a script, another web
framework) and wants its row changes in `flux.state_mutations` to carry a `request_id`::

    import flux.context

    with flux.context.request(conn, function="import_users", tenant="acme") as req:
        req.execute("INSERT INTO users (email) VALUES (%s)", (email,))
        log.info("request %s", req.request_id)

The contract, as the CDC engine reads it (see `flux.cdc.assembler`):

- the context is a transactional logical message with prefix `flux` whose content is the JSON
  object `{"request_id": ..., **extra}`, emitted with `pg_logical_emit_message(true, 'flux', ...)`;
- every change of the same transaction after the message takes its context; changes before
  the first message of a transaction take the first one; a later message switches context for
  the changes after it;
- the message is part of the transaction: if the transaction rolls back, so does the message.
  It never tags another transaction.

`request()` opens a transaction with `conn.transaction()`, emits the message first, yields a
`Request` (`.request_id`, `.connection`, `.execute()`), and commits when the block ends or rolls
back when it raises. On a connection that already has a transaction open, psycopg makes the
block a savepoint: the message then commits or rolls back with that outer transaction, and
the outer transaction's earlier changes take this context only if it had none before. When a
`request()` block nested in another ends, the outer block's context is emitted again, so that
the outer block's later changes are its own again.

`emit()` is for callers that manage their own transaction: call it inside the transaction,
ideally before the first write.

What this module does not do: it does not check that the engine is attached or running, and it
does not wrap psycopg's errors (they reach the caller unchanged). `extra` values must be
serialisable by orjson. Emitting needs EXECUTE on `pg_logical_emit_message`, which PostgreSQL
grants to PUBLIC by default.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import pq

from flux.cdc.assembler import CONTEXT_PREFIX

_EMIT_SQL = "SELECT pg_logical_emit_message(true, %s::text, %s::text)"
# The context of the innermost open `request()` block, per connection.
_in_force: weakref.WeakKeyDictionary[psycopg.Connection, tuple[str, dict[str, Any]]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class Request:
    """What `request()` yields: the request id in force and the connection to write with."""

    request_id: str
    connection: psycopg.Connection

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> psycopg.Cursor:
        """`self.connection.execute(...)`, for brevity."""
        return self.connection.execute(query, params, **kwargs)


def new_request_id() -> str:
    return str(uuid.uuid4())


def emit(conn: psycopg.Connection, request_id: str | None = None, **extra: Any) -> str:
    """Emit the `flux` context message in the connection's current transaction; returns the request id.

    A uuid4 is generated when `request_id` is None. Raises ValueError for an empty or non-string
    request id, and when `conn` is in autocommit mode with no transaction open (the message would
    be a transaction of its own and tag nothing).
    """
    if request_id is None:
        request_id = new_request_id()
    if not isinstance(request_id, str) or not request_id or "\x00" in request_id:
        raise ValueError(f"request_id must be a non-empty string without NUL characters, not {request_id!r}")
    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        raise ValueError(
            "emit() needs an open transaction: on an autocommit connection the message would commit alone "
            "and tag no change. Use `with flux.context.request(conn, ...)` or `with conn.transaction():`."
        )
    content = orjson.dumps({"request_id": request_id, **extra}).decode()
    conn.execute(_EMIT_SQL, (CONTEXT_PREFIX, content))
    return request_id


@contextmanager
def request(conn: psycopg.Connection, request_id: str | None = None, **extra: Any) -> Iterator[Request]:
    """A transaction whose row changes are recorded under `request_id` (a new uuid4 if None).

    Commits when the block ends, rolls back when it raises (see the module docstring for a
    connection that already has a transaction open). `extra` keys (tenant, function, user, ...)
    are kept in the recorded `context`.
    """
    outer = _in_force.get(conn)
    with conn.transaction():
        request_id = emit(conn, request_id, **extra)
        _in_force[conn] = (request_id, extra)
        try:
            yield Request(request_id, conn)
        finally:
            if outer is None:
                _in_force.pop(conn, None)
            else:
                _in_force[conn] = outer
    if outer is not None:  # still inside the outer block's transaction: its later changes are its own
        emit(conn, outer[0], **outer[1])
