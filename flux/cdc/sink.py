"""Where mutations go: the `MutationSink` seam and its PostgreSQL implementation.

The contract every sink keeps, and the engine relies on for exactly-once delivery:
- `write()` may be called many times inside one sink transaction (bounded memory for huge
  source transactions); nothing is visible until `commit()`;
- `commit(progress)` makes the written rows and the progress durable atomically;
- `load_progress()` returns the last committed progress, waiting for a commit a previous
  consumer still has in flight, so a restarted engine can skip every source transaction whose
  commit LSN is not newer;
- `rollback()` discards everything since the last commit.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import psycopg

from flux.cdc.assembler import COLUMNS, Backfill, MutationRow
from flux.cdc.roles import require_engine_role
from flux.cdc.wire import format_lsn, parse_lsn
from flux.errors import ConnectionLostError, FluxError, from_psycopg
from flux.pg.keepalive import dead_peer_options
from flux.store.schema import ensure_schema

log = logging.getLogger("flux.cdc")


@dataclass(frozen=True, slots=True)
class Progress:
    slot_name: str
    commit_lsn: int
    end_lsn: int
    commit_time: datetime | None


class MutationSink(Protocol):
    def load_progress(self, slot_name: str) -> Progress | None: ...

    def write(self, rows: Sequence[MutationRow]) -> None: ...

    def backfill(self, backfill: Backfill) -> None: ...

    def commit(self, progress: Progress, *, mutations: int) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class EncodedRows:
    """Rows in a sink's wire form, ready to send."""

    chunks: tuple[bytes, ...]
    rows: int
    first_commit_lsn: str


class EncodingSink(MutationSink, Protocol):
    """A sink that encodes rows apart from sending them, so that the two can run on different threads.

    `write(rows)` is `write_encoded(encode(rows))`; `encode` is pure and may run on any thread.
    """

    def encode(self, rows: Sequence[MutationRow]) -> EncodedRows: ...

    def write_encoded(self, encoded: EncodedRows) -> None: ...


# Timeouts an application may set on its role or database, and the server version that has each:
# the engine's own sessions turn them off (`turn_off_timeouts`).
_TIMEOUTS = {"statement_timeout": 0, "lock_timeout": 0, "idle_in_transaction_session_timeout": 0,
             "idle_session_timeout": 140000, "transaction_timeout": 170000}


def turn_off_timeouts(conn: psycopg.Connection) -> None:
    """Turn off, for this session, the timeouts set for applications on the role or database.

    They are not the store's: the COPY of a sink transaction stays open while the engine reads the
    rest of a source transaction, so one streaming for longer than a statement or transaction
    timeout was cancelled on every retry and never recorded; an idle session timeout ended the
    sink's and the catalog's connections between quiet writes (a reconnect, a warning and a resend
    each time). A lock held on the store holds the engine up instead (a second stop signal stops
    it at once).
    """
    version = conn.info.server_version
    for name, since in _TIMEOUTS.items():
        if version >= since:
            conn.execute(f"SET {name} = 0")


_COPY_COLUMNS = COLUMNS  # `_copy_text` writes in MutationRow's field order
_COPY_SQL = f"COPY flux.state_mutations ({', '.join(_COPY_COLUMNS)}) FROM STDIN"
_COPY_CHUNK = 1 << 20  # characters per copy.write(): bounds the text held on top of the rows


def _text(value: str | None) -> str:
    """A value in COPY text format: NULL is \\N; backslash, newline, CR and tab are escaped."""
    if value is None:
        return "\\N"
    if "\\" in value:  # common in JSON images (escaped quotes), so checked first
        value = value.replace("\\", "\\\\")
    if "\n" in value or "\r" in value or "\t" in value:
        value = value.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return value


def _array(names: Sequence[str] | None, cache: dict[tuple[str, ...], str]) -> str:
    """A text[] in COPY text format, every element quoted so that no name needs special-casing."""
    if names is None:
        return "\\N"
    key = names if names.__class__ is tuple else tuple(names)
    literal = cache.get(key)
    if literal is None:  # the same column lists repeat row after row
        quoted = ('"' + n.replace("\\", "\\\\").replace('"', '\\"') + '"' for n in names)
        literal = cache[key] = _text("{" + ",".join(quoted) + "}")
    return literal


def _copy_text(rows: Sequence[MutationRow]) -> Iterator[str]:
    """`rows` as COPY text-format lines (in `_COPY_COLUMNS` order), joined into chunks of about `_COPY_CHUNK`.

    Built here rather than by `copy.write_row`: psycopg's generic dumpers (its list dumper
    above all) cost about three times as much per row, and this loop bounds the engine's
    throughput on large transactions. Values that repeat row after row (request ids, contexts,
    names, table oids, a transaction's xid, LSN and time) are escaped once per call.
    """
    arrays: dict[tuple[str, ...], str] = {}
    relids: dict[int | None, str] = {}
    repeated: dict[str | None, str] = {None: "\\N"}
    last_lsn: str | None = None
    txn_text = ""
    lines: list[str] = []
    size = 0
    for r in rows:
        if r.commit_lsn is not last_lsn:  # one string object per source transaction
            last_lsn = r.commit_lsn
            txn_text = f"{r.xid}\t{last_lsn}\t{r.commit_time.isoformat()}\t"
        head = repeated.get(r.request_id), repeated.get(r.context), repeated.get(r.schema_name), repeated.get(r.table_name)
        if None in head:
            head = tuple(repeated.setdefault(v, _text(v)) for v in (r.request_id, r.context, r.schema_name, r.table_name))
        complete = r.old_complete
        line = "\t".join((
            *head, r.op, _text(r.row_key), _text(r.old), _text(r.new),
            "\\N" if complete is None else ("t" if complete else "f"),
            _array(r.missing_columns, arrays), _array(r.changed_columns, arrays), txn_text,
        )) + str(r.seq) + ("\t\\N\t" if r.old_row_key is None else f"\t{_text(r.old_row_key)}\t") \
            + (relids.get(r.relid) or relids.setdefault(r.relid, "\\N\n" if r.relid is None else f"{r.relid}\n"))
        lines.append(line)
        size += len(line)
        if size >= _COPY_CHUNK:
            yield "".join(lines)
            lines, size = [], 0
    if lines:
        yield "".join(lines)


class PostgresSink:
    """Writes into `flux.state_mutations` of a PostgreSQL database (usually the source itself).

    Rows stream through one COPY per sink transaction; progress is an upsert into `flux.cdc_progress` in the
    same transaction.
    """

    def __init__(self, *, dsn: str, connect_timeout: int = 10) -> None:
        self.dsn = dsn
        try:
            # UTF-8 as the stream: the images are written as JSON already encoded (the server
            # converts to a database's own encoding).
            self._conn = psycopg.connect(dsn, autocommit=False, connect_timeout=connect_timeout, application_name="flux-sink",
                                         client_encoding="UTF8", **dead_peer_options(dsn))
            # Flushed to this server's disk before the slot is acknowledged (exactly-once rests on it),
            # never waiting for a synchronous standby: with synchronous_standby_names = '*' the
            # engine's own walsender is one, and it acknowledges only after this commit (a deadlock).
            self._conn.execute("SET synchronous_commit = local")
            turn_off_timeouts(self._conn)
            self._conn.commit()
            self._autocommit_schema()
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Could not open the mutation store connection") from exc
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._cursor: psycopg.Cursor | None = None
        self._copy_context = None
        self._copy: psycopg.Copy | None = None

    def _autocommit_schema(self) -> None:
        self._conn.autocommit = True
        try:
            ensure_schema(self._conn)
        finally:
            self._conn.autocommit = False

    def load_progress(self, slot_name: str) -> Progress | None:
        try:
            # FOR SHARE waits out a previous consumer's commit still in flight (a killed engine's
            # backend may finish its COMMIT after the process died) and then reads what it wrote.
            # The placeholder row gives it a row to wait on before the first commit too: the
            # insert waits on that consumer's uncommitted insert of the same key.
            self._conn.execute(
                "INSERT INTO flux.cdc_progress (slot_name, commit_lsn, end_lsn) VALUES (%s, '0/0', '0/0')"
                " ON CONFLICT (slot_name) DO NOTHING",
                (slot_name,),
            )
            row = self._conn.execute(
                "SELECT commit_lsn::text, end_lsn::text, commit_time FROM flux.cdc_progress WHERE slot_name = %s FOR SHARE",
                (slot_name,),
            ).fetchone()
            self._conn.commit()
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Could not read the engine's progress", slot=slot_name) from exc
        if row is None or row[0] == "0/0":
            return None
        return Progress(slot_name, parse_lsn(row[0]), parse_lsn(row[1]), row[2])

    def write(self, rows: Sequence[MutationRow]) -> None:
        self.write_encoded(self.encode(rows))

    @staticmethod
    def encode(rows: Sequence[MutationRow]) -> EncodedRows:
        """Rows as COPY text, UTF-8 encoded."""
        chunks = tuple(chunk.encode() for chunk in _copy_text(rows))
        return EncodedRows(chunks, len(rows), rows[0].commit_lsn if rows else "")

    def write_encoded(self, encoded: EncodedRows) -> None:
        """Stream rows into the COPY of the current sink transaction, opening it if needed.

        The COPY stays open until commit (or a backfill), so the server ingests one batch
        while the engine decodes the next: the two run in parallel.
        """
        if not encoded.rows:
            return
        try:
            if self._copy is None:
                self._cursor = self._conn.cursor()
                self._copy_context = self._cursor.copy(_COPY_SQL)
                self._copy = self._copy_context.__enter__()
            for chunk in encoded.chunks:
                self._copy.write(chunk)
        except psycopg.Error as exc:
            raise _taken_over(exc) or from_psycopg(exc, "Could not write mutations", commit_lsn=encoded.first_commit_lsn) from exc

    def _finish_copy(self) -> None:
        """End the open COPY; waits for the server to have stored every row sent."""
        if self._copy is None:
            return
        context, cursor = self._copy_context, self._cursor
        self._copy = self._copy_context = self._cursor = None
        try:
            context.__exit__(None, None, None)
        finally:
            cursor.close()

    def backfill(self, backfill: Backfill) -> None:
        try:
            self._finish_copy()
            self._conn.execute(
                "UPDATE flux.state_mutations SET request_id = %s, context = %s::jsonb"
                " WHERE commit_lsn = %s::pg_lsn AND seq < %s",
                (backfill.request_id, backfill.context, backfill.commit_lsn, backfill.before_seq),
            )
        except psycopg.Error as exc:
            raise _taken_over(exc) or from_psycopg(exc, "Could not attach a request context", commit_lsn=backfill.commit_lsn) from exc

    def commit(self, progress: Progress, *, mutations: int) -> None:
        try:
            self._finish_copy()
            # Progress and COMMIT in one round trip: the server waits for the next command in between otherwise.
            with self._conn.pipeline():
                self._conn.execute(
                    """
                    INSERT INTO flux.cdc_progress AS p
                        (slot_name, commit_lsn, end_lsn, commit_time, mutations, consumer_host, consumer_pid, heartbeat_at, updated_at)
                    VALUES (%s, %s::pg_lsn, %s::pg_lsn, %s, %s, %s, %s, now(), now())
                    ON CONFLICT (slot_name) DO UPDATE SET
                        commit_lsn = excluded.commit_lsn, end_lsn = excluded.end_lsn, commit_time = excluded.commit_time,
                        mutations = p.mutations + excluded.mutations, consumer_host = excluded.consumer_host,
                        consumer_pid = excluded.consumer_pid, heartbeat_at = now(), updated_at = now()
                    -- Never backwards: an engine that stalled while another took the slot over must
                    -- not move the progress back when it wakes (the next start would redo changes).
                    WHERE p.end_lsn <= excluded.end_lsn
                    """,
                    (
                        progress.slot_name, format_lsn(progress.commit_lsn), format_lsn(progress.end_lsn),
                        progress.commit_time, mutations, self._host, self._pid,
                    ),
                )
                self._conn.commit()
        except psycopg.Error as exc:
            raise _taken_over(exc) or from_psycopg(exc, "Could not commit mutations", lsn=format_lsn(progress.commit_lsn)) from exc

    def rollback(self) -> None:
        context, self._copy, self._copy_context, self._cursor = self._copy_context, None, None, None
        try:
            if context is not None:  # abort the COPY (CopyFail) so that ROLLBACK can run
                abort = RuntimeError("flux sink rollback")
                context.__exit__(type(abort), abort, None)
        except (psycopg.Error, RuntimeError):
            pass
        try:
            self._conn.rollback()
        except psycopg.Error:
            pass  # a dead connection has nothing to roll back; the server discards the transaction

    def close(self) -> None:
        try:
            self._conn.close()
        except psycopg.Error:
            pass


def _taken_over(exc: psycopg.Error) -> FluxError | None:
    """A change already recorded, met on write: another engine recorded it (two consumers of one
    slot, one of them stalled while the other took over). Retryable: the reconnect reloads the
    progress and resumes past what is recorded."""
    if getattr(exc, "sqlstate", None) == "23505" and getattr(exc.diag, "constraint_name", None) == "state_mutations_pkey":
        return ConnectionLostError(
            "These changes are already recorded: another engine consumed this slot meanwhile",
            hint="Run one engine per slot (`flux cdc status` names the consumer); this one reloads its progress and goes on.",
            retryable=True)
    return None


class PostgresCatalog:
    """Catalog lookups for the assembler, on a separate autocommit connection."""

    def __init__(self, *, dsn: str, connect_timeout: int = 10) -> None:
        try:
            self._conn = psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout, application_name="flux-catalog",
                                         **dead_peer_options(dsn))
            turn_off_timeouts(self._conn)
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Could not open the catalog connection") from exc

    def primary_key(self, relation_id: int) -> tuple[str, ...] | None:
        try:
            rows = self._conn.execute(
                """
                SELECT a.attname FROM pg_index i
                JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                WHERE i.indrelid = %s AND i.indisprimary
                ORDER BY array_position(i.indkey::int2[], a.attnum)
                """,
                (relation_id,),
            ).fetchall()
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Could not read a primary key from the catalog", relation_id=relation_id) from exc
        return tuple(r[0] for r in rows) or None

    def require_engine_role(self, slot: str) -> None:
        """Refuse a role that could not stream the slot or record what it reads (`flux.cdc.roles`)."""
        try:
            require_engine_role(self._conn, slot=slot)
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Could not read the engine role's privileges", slot=slot) from exc

    def attached_publication(self, slot: str) -> str | None:
        """The publication `flux attach` recorded for `slot`, if any."""
        try:
            if not self._conn.execute("SELECT to_regclass('flux.attachments') IS NOT NULL").fetchone()[0]:
                return None
            row = self._conn.execute("SELECT publication_name FROM flux.attachments WHERE slot_name = %s", (slot,)).fetchone()
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Could not read the attachment", slot=slot) from exc
        return row[0] if row else None

    def wal_lsn(self) -> int:
        """The server's current WAL position."""
        try:
            return parse_lsn(self._conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Could not read the server's WAL position") from exc

    def is_partitioned(self, relation_id: int) -> bool:
        try:
            row = self._conn.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = %s", (relation_id,)).fetchone()
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Could not read a table's kind from the catalog", relation_id=relation_id) from exc
        return bool(row and row[0])

    def learn_types(self, types, type_oids: list[int]) -> None:
        try:
            rows = self._conn.execute(types.LEARN_QUERY, (type_oids,)).fetchall()
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Could not read types from the catalog") from exc
        for oid, category, element_oid, base_oid in rows:
            types.learn(int(oid), category=category, element_oid=int(element_oid), base_oid=int(base_oid))
        gone = sorted(set(type_oids) - {int(row[0]) for row in rows})
        if gone:  # the catalog is read now, not as of the change: a type dropped since is unknown
            log.warning("column types %s are no longer in the catalog (dropped since the change was written?): "
                        "their values are recorded as their text form", ", ".join(map(str, gone)))

    def close(self) -> None:
        try:
            self._conn.close()
        except psycopg.Error:
            pass
