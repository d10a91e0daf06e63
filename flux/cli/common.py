"""Flag sets shared by every command, defined once, and config resolution at the edge."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from psycopg.conninfo import conninfo_to_dict

from flux.errors import ConfigError, ConnectionLostError, ServerNotReadyError, from_psycopg
from flux.pg.pooler import behind_pooler
from flux.pg.tls import certificate_refused
from flux.store.queries import no_jit

DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database",
        "-d",
        help="PostgreSQL DSN. Falls back to $FLUX_DATABASE_URL, then to the embedded database of `flux dev` in this directory.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]


ENV_DSN = "FLUX_DATABASE_URL"
STATE_DIR = ".flux"
CONNECT_TIMEOUT = 10  # seconds; a firewalled host must not hang a command

# Where a DSN came from: it decides what to tell the user when the server cannot be reached.
FROM_FLAG = "--database"
FROM_ENV = ENV_DSN
FROM_EMBEDDED = "embedded"


@dataclass(frozen=True, slots=True)
class Database:
    """A DSN and where it came from; `project` is the directory whose `flux dev` owns an embedded one."""

    dsn: str
    source: str  # FROM_FLAG (or another flag, such as --engine-database), FROM_ENV or FROM_EMBEDDED
    project: Path | None = None

    def unreachable(self, exc: BaseException) -> ServerNotReadyError:
        """The error for a server that does not answer, with a hint that fits where the DSN came from."""
        detail = _first_line(exc.__cause__ if isinstance(exc.__cause__, psycopg.Error) else exc)
        if self.source == FROM_EMBEDDED:
            return ServerNotReadyError(
                f"Cannot reach the embedded database of {self.project}: {detail}",
                hint="Start `flux dev` in that project, or pass --database DSN.",
            )
        # A login refused without a password asked or used (an unknown role or database under trust
        # authentication) carries no SQLSTATE and no libpq flag: it reads like a server that is
        # down, so the hint covers both.
        return ServerNotReadyError(f"Cannot reach {self._where()}: {detail}",
                                   hint="Check that the server is running, and the DSN's host, port, user, password"
                                        " and database.")

    def refused(self, exc: BaseException) -> ConfigError:
        """The error for a server that answered and refused the login: no retry or restart fixes that."""
        where = self._where()
        return ConfigError(f"{where[0].upper()}{where[1:]} refused the connection: {_first_line(exc.__cause__ or exc)}",
                           hint="The server is up: check the user, the password (in the DSN, PGPASSWORD or ~/.pgpass) "
                                "and the database name.")

    def _where(self) -> str:
        if self.source == FROM_EMBEDDED:
            return f"the embedded database of {self.project}"
        return f"the database given by {self.source}" if self.source.startswith("--") else f"the database in ${ENV_DSN}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def project_cluster_meta(start: Path | None = None) -> tuple[Path, dict] | None:
    """The nearest enclosing directory that ran `flux dev`, and its `.flux/cluster.json`."""
    here = (start or Path.cwd()).resolve()
    for directory in [here, *here.parents]:
        meta = directory / STATE_DIR / "cluster.json"
        if meta.is_file():
            try:
                return directory, json.loads(meta.read_text())
            except ValueError:
                return None
    return None


def checked_dsn(dsn: str, source: str) -> str:
    """`dsn` if libpq can parse it; a malformed one is a usage error, not a failed connection."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"{source} is not a valid PostgreSQL DSN: {_without_secrets(_first_line(exc), dsn)}",
            hint="Write a URL, postgresql://USER@HOST:PORT/DBNAME, or key=value pairs, 'host=HOST port=PORT dbname=DBNAME'.",
        ) from exc
    # libpq checks a port only when it connects, and then fails as an unreachable server would (exit 4).
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(f"{source} is not a valid PostgreSQL DSN: port {port!r} is not a number from 1 to 65535",
                              hint="Fix the port in the DSN (5432 is PostgreSQL's default).")
    sslmode = params.get("sslmode")  # the same: "connection is bad: invalid sslmode value", read as a server that is down
    if sslmode is not None and sslmode not in _SSLMODES:
        raise ConfigError(f"{source} is not a valid PostgreSQL DSN: sslmode {sslmode!r} is not one of {', '.join(_SSLMODES)}",
                          hint="require encrypts; verify-ca and verify-full also check the server's certificate (sslrootcert).")
    return dsn


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _without_secrets(message: str, dsn: str) -> str:
    """libpq's parse error quotes the part of the DSN it choked on, which can be (part of) the
    password: `invalid percent-encoded token: "s3cr%t"`, `missing "=" after "secret"`. A quoted
    part is kept only when it holds no letter or digit, or is a key of the DSN (`invalid URI query
    parameter: "sslmod"`), which is no secret."""
    def part(match: re.Match[str]) -> str:
        text = match.group(1)
        if not any(c.isalnum() for c in text) or re.search(rf"(?:^|[\s?&]){re.escape(text)}\s*=", dsn):
            return match.group(0)
        return '"[redacted]"'

    return re.sub(r'"([^"]*)"', part, message)


def resolve_database(flag: str | None) -> Database:
    """--database, then $FLUX_DATABASE_URL, then the embedded cluster of this project."""
    if flag:
        return Database(checked_dsn(flag, FROM_FLAG), FROM_FLAG)
    if os.environ.get(ENV_DSN):
        return Database(checked_dsn(os.environ[ENV_DSN], f"${ENV_DSN}"), FROM_ENV)
    found = project_cluster_meta()
    if found and found[1].get("port"):
        from flux.pg.cluster import DATABASE, SUPERUSER

        directory, meta = found
        return Database(f"postgresql://{SUPERUSER}@127.0.0.1:{meta['port']}/{DATABASE}", FROM_EMBEDDED, directory)
    raise ConfigError(
        "No database given",
        hint=f"Pass --database DSN, set {ENV_DSN}, or run `flux dev` in this directory first.",
    )


@contextmanager
def reaching(db: Database) -> Iterator[None]:
    """Run a step against `db`; a server that cannot be reached becomes ServerNotReadyError (exit 4)."""
    try:
        yield
    except ConnectionLostError as exc:
        if _login_refused(exc.__cause__):
            raise db.refused(exc) from exc
        refused = certificate_refused(db.dsn, exc.__cause__)
        if refused is not None:
            raise refused from exc
        raise db.unreachable(exc) from exc


def _login_refused(cause: BaseException | None) -> bool:
    """Whether a failed connection got as far as the login: libpq says whether the server asked for a
    password (none given) or one was sent (and the server still closed the connection). A connect
    failure carries no SQLSTATE, and its message text is the server's, in its language."""
    pgconn = getattr(cause, "pgconn", None)
    return isinstance(cause, psycopg.OperationalError) and pgconn is not None and bool(
        pgconn.needs_password or pgconn.used_password)


WAIT_FOR_DATABASE = 60.0  # seconds `flux serve` and `flux cdc run` wait at start for a database not up yet
WAIT_LOG_SECONDS = 10.0  # while waiting, how often the log says why
class LogFormat(str, Enum):
    text = "text"
    json = "json"


LogFormatOption = Annotated[
    LogFormat,
    typer.Option("--log-format", envvar="FLUX_LOG_FORMAT", case_sensitive=False,
                 help="text, or json: one JSON object per line (time, level, logger, message, exception) for a log pipeline."),
]
WaitOption = Annotated[
    float,
    typer.Option("--wait-for-database", min=0, metavar="SECONDS",
                 help="At start, how long to wait for a database that cannot be reached (not up yet, restarting), "
                      "saying why every 10 s, before exiting 4 for a supervisor to restart it. A login the server "
                      "refuses exits 2 at once. 0: exit at once."),
]


def wait_for_database(db: Database, seconds: float, *, stopped: Callable[[], bool] = lambda: False) -> bool:
    """Return True once `db` accepts a connection, waiting up to `seconds` for a server that cannot be
    reached (not up yet at boot, restarting, in recovery); False if `stopped()` turns true meanwhile.

    Past the wait, ServerNotReadyError (exit 4): a supervisor restarts the process, which an exit at
    once (0.9 s) made a tight loop that systemd gives up on (5 starts in 10 s). A login the server
    refuses, or a certificate this client refuses, raise ConfigError at once: waiting fixes neither.
    """
    log = logging.getLogger("flux")
    deadline = time.monotonic() + seconds
    delay, said = 0.5, None  # said: when the log last said why it waits
    while not stopped():
        left = deadline - time.monotonic()
        try:
            with reaching(db):
                try:
                    psycopg.connect(db.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT).close()
                except psycopg.Error as exc:
                    raise from_psycopg(exc, "Could not connect") from exc
            if said is not None:  # it said it waited: say that the wait is over
                log.info("reached the database after %.1f s", time.monotonic() - (deadline - seconds))
            return True
        except ServerNotReadyError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                if seconds > 0:
                    exc.message += f" (waited {seconds:g} s, --wait-for-database)"
                raise
            if said is None or time.monotonic() - said >= WAIT_LOG_SECONDS:
                log.warning("waiting for the database, %.0f s more (--wait-for-database): %s", left, exc.message)
                said = time.monotonic()
            until = time.monotonic() + min(delay, left)
            while time.monotonic() < until:  # in short steps: a stop signal ends the wait
                if stopped():
                    return False
                time.sleep(0.05)
            delay = min(delay * 2, 5.0)
    return False


@contextmanager
def connect(database: str | None, *, failing: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the resolved DSN; psycopg errors become FluxErrors saying `failing`."""
    db = resolve_database(database)
    with reaching(db):
        try:
            with psycopg.connect(db.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                no_jit(conn)
                # Each statement may run on another server connection there, without what psycopg
                # prepared at a statement's fifth run (blame following a row's key changes, a prune).
                if behind_pooler(conn):
                    conn.prepare_threshold = None
                yield conn
        except psycopg.Error as exc:
            raise from_psycopg(exc, failing) from exc
