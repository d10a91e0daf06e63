"""The one error tree of Flux.

Every error Flux raises on purpose is a `FluxError`. Each carries:

- a message saying what went wrong, in the user's terms;
- `context`: the facts that locate it (slot, lsn, table, request_id, ...);
- `hint`: what the user can do about it;
- `retryable`: whether retrying the same operation may succeed (the engine's
  backoff loop keys on this, never on message text).

The CLI turns these into one line plus the hint and a non-zero exit code.
Postgres errors are classified by SQLSTATE through psycopg's error classes.
"""

from __future__ import annotations

from typing import Any

import psycopg

# The gateway's answer when running a function raised inside Flux (a bug): the function may have run.
INTERNAL_ERROR = "Flux failed while running the function (an internal error)"


class FluxError(Exception):
    """Root of every error Flux raises on purpose."""

    exit_code = 1
    retryable = False

    def __init__(self, message: str, *, hint: str | None = None, retryable: bool | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.context = {k: v for k, v in context.items() if v is not None}
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        if not self.context:
            return self.message
        facts = ", ".join(f"{k}={v}" for k, v in self.context.items())
        return f"{self.message} ({facts})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "retryable": self.retryable,
            "context": {k: str(v) for k, v in self.context.items()},
        }


class ConfigError(FluxError):
    """Flags, environment or flux.toml are missing or inconsistent."""

    exit_code = 2


class SchemaVersionError(ConfigError):
    """The flux schema is of another version than this Flux's: newer, or older and this command does not upgrade."""


class NotFoundError(FluxError):
    """A row, request, slot or table the user named does not exist."""

    exit_code = 3


class AmbiguousError(FluxError):
    """A prefix or name matches more than one thing."""

    exit_code = 2


class DatabaseError(FluxError):
    """Postgres refused or failed an operation."""


class ConnectionLostError(DatabaseError):
    """The connection to Postgres dropped; the engine reconnects with backoff."""

    retryable = True


class PreflightError(DatabaseError):
    """The database does not meet a requirement for attaching (version, wal_level, role, slots)."""

    exit_code = 4


class ServerNotReadyError(DatabaseError):
    """The database server cannot be reached: it is not running, not accepting connections, or the DSN points elsewhere."""

    exit_code = 4
    retryable = True


class InUseError(FluxError):
    """Something Flux needs is held by another process: a project's `flux dev`, a TCP port."""

    exit_code = 2


class SlotHeldError(InUseError):
    """Another Flux engine streams the replication slot: this one stands by until it frees."""

    retryable = True


class LockTimeoutError(InUseError):
    """A table Flux must alter stayed locked by another transaction longer than Flux may wait without stopping its traffic."""

    retryable = True


class OutputError(FluxError):
    """The command's output could not be written: a full disk, a closed stdout (a reader gone is no error: exit 141)."""


class ClusterError(FluxError):
    """The embedded PostgreSQL cluster could not be found, created or started."""


class DecodeError(FluxError):
    """A pgoutput or replication-protocol message could not be decoded.

    Never skipped: a change Flux cannot decode is a change it would lose.
    """


class StreamError(FluxError):
    """The replication stream violated the order the engine relies on (e.g. a change outside BEGIN/COMMIT)."""


_CONNECTION_SQLSTATE_CLASSES = ("08", "57")  # connection exception; operator intervention (shutdown, terminate)
# Transient by nature: serialization failures and deadlocks, insufficient resources, lock timeouts.
_TRANSIENT_SQLSTATE_CLASSES = ("40", "53")
# A statement timeout or pg_cancel_backend: the statement ended, the connection did not. It was read
# as a lost connection, and the CLI said the server could not be reached (exit 4).
_QUERY_CANCELED = "57014"
_TRANSIENT_SQLSTATES = ("55P03", "55006", _QUERY_CANCELED)


def from_psycopg(exc: psycopg.Error, message: str, *, hint: str | None = None, **context: Any) -> FluxError:
    """Wrap a psycopg error, choosing the class by SQLSTATE rather than by message text."""
    sqlstate = getattr(exc, "sqlstate", None)
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if (isinstance(exc, psycopg.OperationalError) and sqlstate != _QUERY_CANCELED
            and (sqlstate is None or sqlstate[:2] in _CONNECTION_SQLSTATE_CLASSES)):
        return ConnectionLostError(f"{message}: {detail}", hint=hint, sqlstate=sqlstate, **context)
    if hint is None and sqlstate == "42501":
        hint = ("Connect as a role with that privilege, such as the one that ran `flux attach`. To let a role read what "
                "Flux records: GRANT USAGE ON SCHEMA flux TO <role>; GRANT SELECT ON ALL TABLES IN SCHEMA flux TO <role>;")
    transient = sqlstate is not None and (sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES or sqlstate in _TRANSIENT_SQLSTATES)
    context.setdefault("retryable", transient)
    return DatabaseError(f"{message}: {detail}", hint=hint, sqlstate=sqlstate, **context)
