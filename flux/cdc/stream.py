"""The replication connection: START_REPLICATION over psycopg's libpq wrapper, frames in, status out.

`ReplicationStream` owns one `replication=database` connection. It reads CopyData frames
(`read`), parses their envelope with `flux.cdc.wire`, and sends standby status updates
(`send_status`). It does not decode pgoutput, track transactions, or decide what is safe to
acknowledge: the engine does, and tells the stream which LSN to report.

Session settings fix the text form of values the walsender produces (ISO dates in UTC,
round-trippable floats, hex bytea), so `flux.cdc.values` can rely on them.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import select
import socket
import time
from typing import NamedTuple

import psycopg
from psycopg import generators, pq

from flux.cdc.wire import format_lsn, pg_now_us, standby_status
from flux.errors import ConfigError, ConnectionLostError, NotFoundError, PreflightError, SlotHeldError, from_psycopg
from flux.pg.keepalive import dead_peer_options
from flux.pg.pooler import DIRECT_DSN_HINT, behind_pooler

log = logging.getLogger("flux.cdc")

WALSENDER_OPTIONS = (
    "-c DateStyle=ISO,YMD -c TimeZone=UTC -c IntervalStyle=iso_8601"
    " -c extra_float_digits=3 -c bytea_output=hex"
)


def new_consumer_token() -> str:
    """What tells one engine's connections from another's: engines in one process share its pid."""
    return secrets.token_hex(4)


def consumer_name(token: str) -> str:
    """The replication connection's application_name: who holds the slot, for `flux cdc status`
    (the server knows only its own walsender's pid). PostgreSQL keeps 63 bytes of it: the host,
    last, is what a long name loses."""
    return f"flux-cdc {token} {os.getpid()}@{socket.gethostname()}"[:63]


_CONSUMER_NAME = re.compile(r"flux-cdc (?:([0-9a-f]{8}) )?(\d+)@(.*)")  # without a token: an older Flux


class Consumer(NamedTuple):
    pid: int
    host: str
    token: str | None


def consumer_of(application_name: str | None) -> Consumer | None:
    """The engine a `consumer_name` names; None for any other application_name."""
    named = _CONSUMER_NAME.fullmatch(application_name or "")
    return Consumer(int(named[2]), named[3], named[1]) if named else None


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def open_replication(dsn: str, *, slot: str, application_name: str, connect_timeout: int = 10) -> psycopg.Connection:
    """A `replication=database` connection to `dsn`.

    A connection pooler (PgBouncer before 1.23, or in transaction mode) refuses the replication
    startup parameter, and its refusal carries no SQLSTATE: it would read as a server that is
    down, retried forever. So when the connection fails and a plain one to the same DSN turns out
    to reach a pooler (`flux.pg.pooler`), the error says so, and is not retried. A pooler refuses
    at once: an attempt that ran out its whole connect timeout met a silent host, and is not
    probed (that second connect would double every retry's wait against a host dropping packets).
    """
    started = time.monotonic()
    try:
        return psycopg.connect(
            dsn,
            autocommit=True,
            replication="database",
            client_encoding="UTF8",  # pgoutput sends text in the client's encoding: the decoder reads UTF-8
            options=WALSENDER_OPTIONS,
            application_name=application_name,
            connect_timeout=connect_timeout,
            **dead_peer_options(dsn),  # it lives for days: a silent partition must not be waited out
        )
    except psycopg.Error as exc:
        error = from_psycopg(exc, "Could not open the replication connection", slot=slot)
        answered = connect_timeout <= 0 or time.monotonic() - started < connect_timeout
        if isinstance(error, ConnectionLostError) and answered and _reaches_pooler(dsn, connect_timeout):
            raise ConfigError(
                f"The engine's DSN reaches PostgreSQL through a connection pooler (PgBouncer?), which refused its "
                f"replication connection: {str(exc).strip().splitlines()[0]}",
                hint=f"{DIRECT_DSN_HINT} For the engine: `flux cdc run --database DSN`, or `flux serve --engine-database "
                     "DSN` (the gateway's --database may stay the pooler's).",
                slot=slot) from exc
        raise error from exc


def _reaches_pooler(dsn: str, connect_timeout: int) -> bool:
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout) as conn:
            return behind_pooler(conn)
    except psycopg.Error:
        return False  # the replication connection's own error is the one to report


class ReplicationStream:
    """One logical replication session on `slot`, publishing `publication` with pgoutput v1."""

    def __init__(self, *, dsn: str, slot: str, publication: str, start_lsn: int = 0, connect_timeout: int = 10,
                 consumer_token: str | None = None) -> None:
        self.dsn = dsn
        self.consumer_token = consumer_token or new_consumer_token()  # the engine's, kept across its sessions
        self.slot = slot
        self.publication = publication
        self.start_lsn = start_lsn
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection | None = None
        self._pgconn: pq.abc.PGconn | None = None

    def open(self) -> None:
        if not self._open(end_own_walsender=True):
            self._open(end_own_walsender=False)  # once more, the slot freed of this engine's previous connection

    def _open(self, *, end_own_walsender: bool) -> bool:
        """Open the stream: True. False when the slot was held by this engine's own previous
        connection and that was ended (the connection is closed then; a new one can stream)."""
        self._conn = open_replication(self.dsn, slot=self.slot, application_name=consumer_name(self.consumer_token),
                                      connect_timeout=self.connect_timeout)
        self._check_wal_level()
        pgconn = self._conn.pgconn
        command = (
            f"START_REPLICATION SLOT {quote_ident(self.slot)} LOGICAL {format_lsn(self.start_lsn)} "
            f"(proto_version '1', publication_names {quote_literal(quote_ident(self.publication))}, messages 'true')"
        )
        hint = "Check that the slot and publication exist (`flux attach`) and that no other consumer holds the slot."
        try:
            # Waited for through psycopg, which releases the GIL: libpq's own blocking wait (a bare
            # get_result) holds it, freezing every thread of the process (the gateway's, in `flux
            # serve`) for as long as the server takes to answer.
            pgconn.send_query(command.encode())
            results = self._conn.wait(generators.execute(pgconn))
            result = results[-1] if results else None
        except psycopg.Error as exc:  # the server went away between connecting and this command
            self.close()
            raise from_psycopg(exc, "START_REPLICATION failed", hint=hint, slot=self.slot) from exc
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            if result is None or result.status != pq.ExecStatus.FATAL_ERROR:
                message = pgconn.error_message.decode(errors="replace").strip() or "the server sent no result"
                self.close()
                raise ConnectionLostError(f"START_REPLICATION failed: {message}", hint=hint, slot=self.slot)
            # Classified by SQLSTATE like every other server error: a backend terminated or shutting
            # down (57P01, 57P03) is a lost connection, a slot held (55006) is transient (by another Flux
            # engine: this one stands by, `flux.cdc.standby`), a missing slot or publication is not.
            exc = psycopg.errors.error_from_result(result)
            holder = self._holder() if isinstance(exc, psycopg.errors.ObjectInUse) else None
            if holder is not None and holder[0].token == self.consumer_token:
                if end_own_walsender and self._end_own_walsender(holder[1]):
                    return False
                self.close()
                raise ConnectionLostError(
                    f"Replication slot {self.slot!r} is still held by this engine's previous connection (walsender pid "
                    f"{holder[1]}), which the server has not noticed is gone",
                    hint="PostgreSQL ends it within wal_sender_timeout (60 s by default) and the engine retries until "
                         "then; a role that may signal it (the same role, or one granted pg_signal_backend) ends it at "
                         "once.", slot=self.slot, walsender_pid=holder[1]) from exc
            self.close()
            if holder is not None:
                engine = holder[0]
                raise SlotHeldError(
                    f"Replication slot {self.slot!r} is held by the Flux engine of pid {engine.pid} on {engine.host}",
                    hint="One engine streams a slot at a time: this one stands by and takes over when that one stops "
                         "(`flux cdc status` says which is active).", slot=self.slot, holder_pid=engine.pid,
                    holder_host=engine.host) from exc
            if isinstance(exc, psycopg.errors.UndefinedObject):
                raise NotFoundError(
                    f"Replication slot {self.slot!r} does not exist",
                    hint="Run `flux attach` on this database first, or pass the slot it made with --slot.",
                    slot=self.slot,
                ) from exc
            detail = exc.diag.message_detail
            if detail and "invalidated" in detail:  # PostgreSQL removed WAL the slot still needed
                since = f"after {format_lsn(self.start_lsn)}, the last recorded," if self.start_lsn else "since attach"
                hint = (f"The slot fell further behind than max_slot_wal_keep_size allows, so the changes committed {since} "
                        "until now were never recorded, and the gap cannot be recovered. `flux attach` again (or `flux "
                        "detach` then `flux attach`) starts capture over with a new slot.")
                raise from_psycopg(exc, f"Replication slot {self.slot!r} was invalidated by PostgreSQL ({detail})",
                                   hint=hint, slot=self.slot)
            failing = "START_REPLICATION failed" + (f" ({detail})" if detail else "")
            raise from_psycopg(exc, failing, hint=hint, slot=self.slot, publication=self.publication)
        pgconn.nonblocking = 1
        self._pgconn = pgconn
        return True

    def _holder(self) -> tuple[Consumer, int] | None:
        """The Flux engine that holds the slot, if one does (the server's message names only its own
        walsender's pid), and that walsender's pid."""
        assert self._conn is not None
        try:  # a replication connection takes SQL by the simple protocol only: no parameters
            row = self._conn.execute(
                "SELECT r.application_name, r.pid FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid"
                f" WHERE s.slot_name = {quote_literal(self.slot)}").fetchone()
        except psycopg.Error:
            return None
        engine = consumer_of(row[0]) if row else None
        return (engine, row[1]) if engine else None

    def _end_own_walsender(self, walsender_pid: int) -> bool:
        """The slot is held by this engine's own previous connection: lost on this side (a network
        blip, a proxy's idle cut) while the server has not noticed yet, which takes it up to
        wal_sender_timeout. Standing by for it would wait for nothing: it is ended. True when it
        was (this connection is closed then)."""
        assert self._conn is not None
        try:  # waits (up to 5 s) for the walsender to exit, which frees the slot
            ended = self._conn.execute(f"SELECT pg_terminate_backend({int(walsender_pid)}, 5000)").fetchone()[0]
        except psycopg.Error as exc:
            log.warning("slot %s is still held by this engine's previous connection (walsender pid %d), which could "
                        "not be ended: %s", self.slot, walsender_pid, str(exc).strip())
            return False
        if ended:
            log.warning("slot %s was still held by this engine's previous connection (walsender pid %d), which the "
                        "server had not noticed was gone: ended it, streaming again (nothing is lost)",
                        self.slot, walsender_pid)
            self.close()
        return ended

    def _check_wal_level(self) -> None:
        """Refuse a server that cannot decode logically, with the fix, before asking for the slot
        (whose own error would blame the slot). SHOW is a replication command: one round trip."""
        assert self._conn is not None
        try:
            wal_level = self._conn.execute("SHOW wal_level").fetchone()[0]
        except psycopg.Error as exc:
            self.close()
            raise from_psycopg(exc, "Could not read wal_level on the replication connection", slot=self.slot) from exc
        if wal_level != "logical":
            self.close()
            raise PreflightError(
                f"wal_level is '{wal_level}', logical decoding needs 'logical'",
                hint="Run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL, and `flux attach` if not done yet.",
                wal_level=wal_level, slot=self.slot,
            )

    @property
    def is_open(self) -> bool:
        return self._pgconn is not None

    def read(self, timeout: float) -> memoryview | None:
        """The next CopyData frame, raw (see `flux.cdc.wire`), or None if none arrived within
        `timeout` seconds. The view is valid until the next call."""
        pgconn = self._require()
        deadline = None
        while True:
            try:
                nbytes, data = pgconn.get_copy_data(1)
            except psycopg.Error as exc:
                raise self._lost(str(exc)) from exc
            if nbytes > 0:
                return data
            if deadline is None:  # only now: most calls find a frame buffered already
                deadline = time.monotonic() + timeout
            if nbytes == -1:  # COPY ended: the server closed the stream (shutdown, terminate)
                result = pgconn.get_result()
                message = result.error_message.decode(errors="replace").strip() if result is not None else ""
                if result is not None and result.error_field(pq.DiagnosticField.SQLSTATE) == b"42704":
                    # The publication was dropped: the slot fails on this change at every retry, for good.
                    raise NotFoundError(
                        f"The replication stream stopped: {message.splitlines()[0]}",
                        hint=f"The publication {self.publication} was dropped. This slot cannot decode the changes made "
                             "while it was missing, even once it exists again: `flux attach` again replaces the slot "
                             "(those changes are not recorded).", slot=self.slot, publication=self.publication)
                raise self._lost(message or "the server ended the replication stream")
            if nbytes < -1:
                raise self._lost(pgconn.error_message.decode(errors="replace").strip())
            # libpq's buffer is empty: look at the socket too (even with no time left), so that
            # "nothing arrived" really means nothing is waiting, not just nothing buffered yet.
            remaining = max(0.0, deadline - time.monotonic())
            try:
                readable, _, _ = select.select([pgconn.socket], [], [], remaining)
                if readable:
                    pgconn.consume_input()
            except (OSError, psycopg.Error) as exc:
                raise self._lost(str(exc)) from exc
            if not readable and time.monotonic() >= deadline:
                return None

    def send_status(self, *, written: int, flushed: int, reply_requested: bool = False) -> None:
        pgconn = self._require()
        message = standby_status(
            written=written, flushed=flushed, applied=flushed, now_us=pg_now_us(time.time()), reply_requested=reply_requested
        )
        try:
            if pgconn.put_copy_data(message) != 1:
                raise self._lost(pgconn.error_message.decode(errors="replace").strip())
            while pgconn.flush() == 1:
                select.select([], [pgconn.socket], [], 1.0)
        except psycopg.Error as exc:
            raise self._lost(str(exc)) from exc

    def close(self) -> None:
        conn, self._conn, self._pgconn = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken socket has nothing useful to report
                pass

    def _require(self) -> pq.abc.PGconn:
        if self._pgconn is None:
            raise ConnectionLostError("The replication stream is not open", slot=self.slot)
        return self._pgconn

    def _lost(self, detail: str) -> ConnectionLostError:
        return ConnectionLostError(f"Replication connection lost: {detail}", slot=self.slot)
