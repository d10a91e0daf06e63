"""Trace records off the response path: the batching writer.

The records it takes are redacted already: the gateway applies `flux.redaction` once to the whole
record (path, spans, tape, request, response, error), so no per-field rule can let a secret slip
through.

`TraceWriter` takes records from the gateway with `submit()` (never awaits; it encodes the
record, the one cost it puts before the response) and writes them in batches, one round trip
per batch. `close()` drains the queue. What a hard crash can lose: the records still queued, at
most `max_queue` and `max_queue_bytes`, typically the last `flush_interval` seconds of requests. A database that cannot take records now (down,
read-only, locked) keeps them queued and retried; a full queue drops new records with an error
log that counts them; it never slows responses down. `status()` says all of it for /_flux/health.

No record can stop the writer. A batch is one jsonb document, which PostgreSQL caps at 256 MB,
so a record over `MAX_RECORD_BYTES` is stored without its recording (a query can return
hundreds of megabytes), and batches are cut at `MAX_BATCH_BYTES`. A batch the database refuses
for what it holds rather than for its own state is written record by record, and a record
refused on its own is logged with its request id and counted in `failed`, never retried. A batch
cut off by a `statement_timeout` (common on production roles) is retried in halves, and later
batches stay that small for a while: records are never dropped for being slow to insert.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Protocol

import psycopg

from flux.errors import from_psycopg
from flux.pg.keepalive import dead_peer_options
from flux.pg.pooler import behind_pooler_async
from flux.store.traces import TraceRecord, encode_trace, insert_encoded_traces_async

log = logging.getLogger("flux.gateway")

MAX_RECORD_BYTES = 8 * 1024 * 1024
MAX_BATCH_BYTES = 32 * 1024 * 1024
CONNECT_TIMEOUT = 10  # seconds; a server that accepted and says nothing must not hold the writer for good
MAX_QUEUE_BYTES = 256 * 1024 * 1024  # what waits for the database, at most (with at most max_queue records)
SHRUNK_STRING_CHARS = 4096  # a record still over MAX_RECORD_BYTES without its recording keeps this much of each string
MAX_RECORD_DEPTH = 64  # a record part nested too deep to walk or encode keeps this many levels


STALL_LOG_SECONDS = 10.0  # a batch the database has not taken after this long is logged (a lock?), and again
# Refused for what a record holds (data exception, integrity, program limit, internal): find the
# record and leave it out. Anything else is about the database, not the records (unreachable,
# read-only after a failover, locked, out of disk, a privilege revoked): keep them and retry.
_RECORD_SQLSTATE_CLASSES = ("22", "23", "54", "XX")
_QUERY_CANCELED = "57014"  # statement_timeout, or an administrator's pg_cancel_backend
CANCELED_RECORD_HINT = ("a single trace record took longer than the statement_timeout of the gateway's role or "
                        "database: exempt that role with ALTER ROLE <role> SET statement_timeout = 0")
GROW_AFTER_BATCHES = 20  # batches written within a cut-down size before the size may double again


class TraceSink(Protocol):
    def submit(self, record: TraceRecord) -> None: ...

    def status(self) -> dict[str, Any]: ...


class TraceWriter:
    """Batches trace records into `flux.trace_requests` from one background task."""

    def __init__(self, dsn: str, *, batch_size: int = 500, flush_interval: float = 0.05, max_queue: int = 20_000,
                 max_queue_bytes: int = MAX_QUEUE_BYTES, connect_timeout: int = CONNECT_TIMEOUT) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        # Records encoded as they come (the writer would encode them on this same loop anyway), so
        # that what waits is bounded in bytes as well as in number: a record may be megabytes.
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=max_queue)
        self.max_queue_bytes = max_queue_bytes
        self.pending_bytes = 0  # of records submitted and not yet written or given up
        self._task: asyncio.Task | None = None
        self._closing = False
        self.written = 0
        self.batches = 0
        self.dropped = 0  # refused by a full queue
        self.failed = 0  # refused by the database on their own
        self.shrunk = 0  # stored without their recording, over MAX_RECORD_BYTES
        self._last_drop_log = 0.0
        self.last_error: str | None = None  # the last failure to write, cleared by the next write
        self._waiting_since: float | None = None  # monotonic time the batch in hand was first sent
        self.sending = 0  # records in a statement sent and not answered: a writer cut off now may still see them committed
        # At most this many records per statement: batch_size, halved at each statement the server
        # cancels (a statement_timeout), doubled again after GROW_AFTER_BATCHES written.
        self.batch_cap = batch_size
        self._written_at_cap = 0

    @property
    def pending(self) -> int:
        """Records submitted and not yet written or given up: queued, and the batch in flight."""
        return self._queue._unfinished_tasks  # type: ignore[attr-defined]  # done only once written

    def status(self) -> dict[str, Any]:
        """For /_flux/health: what waits, what was lost, and for how long the database has not taken records."""
        waiting = 0.0 if self._waiting_since is None else time.monotonic() - self._waiting_since
        return {"pending": self.pending, "pending_bytes": self.pending_bytes, "written": self.written, "dropped": self.dropped, "failed": self.failed,
                "waiting_seconds": round(waiting, 1), "last_error": self.last_error}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="flux-trace-writer")

    def submit(self, record: TraceRecord) -> None:
        try:
            encoded = self._encode(record)
        except Exception:  # noqa: BLE001 -- a Flux bug; never the response's failure
            self.failed += 1
            log.exception("trace of request %s could not be encoded: not stored", record.id, extra={"request_id": record.id})
            return
        if self._queue.full() or self.pending_bytes + len(encoded) > self.max_queue_bytes:
            self.dropped += 1
            if time.monotonic() - self._last_drop_log > 5:
                self._last_drop_log = time.monotonic()
                log.error("trace queue full (%d records, %d MB): %d trace records dropped so far (is the database "
                          "reachable?)", self._queue.qsize(), self.pending_bytes >> 20, self.dropped)
            return
        self._queue.put_nowait((record.id, encoded))
        self.pending_bytes += len(encoded)

    async def flushed(self) -> None:
        """Wait until everything submitted so far is written (for tests and the bench)."""
        await self._queue.join()

    async def close(self) -> None:
        """Write everything queued, then stop."""
        self._closing = True
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        if self.dropped:
            log.error("%d trace records were dropped because the queue was full", self.dropped)

    async def _run(self) -> None:
        conn: psycopg.AsyncConnection | None = None
        delay = 0.2
        while True:
            batch = [await self._queue.get()]
            if self._queue.qsize() < self.batch_size - 1 and not self._closing:
                # One timer per batch: a wait_for per record cost a task and a timer each, on the loop
                # that serves requests.
                await asyncio.sleep(self.flush_interval)
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            chunks: list[list[tuple[str, bytes]]] = [[]]
            size = 0
            for request_id, encoded in batch:
                if chunks[-1] and (size + len(encoded) > MAX_BATCH_BYTES or len(chunks[-1]) >= self.batch_cap):
                    chunks.append([])
                    size = 0
                chunks[-1].append((request_id, encoded))
                size += len(encoded)
            for chunk in chunks:
                pending = [chunk]
                while pending:
                    part = pending.pop()
                    if self._waiting_since is None:
                        self._waiting_since = time.monotonic()
                    try:
                        if conn is None or conn.closed:
                            conn = await self.connect()
                        await self._insert(conn, part)
                        self.written += len(part)
                        self.batches += 1
                        self._grow_batch_cap()
                        if self.last_error is not None:  # its failures were logged: say they are over
                            log.info("trace records are written again, after %.0fs (%d more queued)",
                                     time.monotonic() - (self._waiting_since or time.monotonic()), self._queue.qsize())
                        self._waiting_since = self.last_error = None
                        delay = 0.2
                    except psycopg.Error as exc:
                        if exc.sqlstate == _QUERY_CANCELED and len(part) > 1:
                            # The server answered (nothing to wait for): smaller statements, now and for a while.
                            self.batch_cap = max(1, len(part) // 2)
                            self._written_at_cap = 0
                            log.warning("%s; retrying its %d records %d at a time", from_psycopg(exc, "a trace batch was cancelled"),
                                        len(part), self.batch_cap)
                            pending.extend([part[len(part) // 2:], part[:len(part) // 2]])
                            continue
                        if not _about_the_records(exc):
                            self.last_error = str(from_psycopg(exc, "writing trace records failed"))
                            if exc.sqlstate == _QUERY_CANCELED:
                                self.last_error += f" ({CANCELED_RECORD_HINT})"
                            log.warning("%s; retrying %d records in %.1fs (%d more queued)", self.last_error, len(part),
                                        delay, self._queue.qsize())
                            if conn is not None:
                                await conn.close()
                                conn = None
                            pending.append(part)
                            await asyncio.sleep(delay)
                            delay = min(delay * 2, 10.0)
                            continue
                        # Refused for what the batch holds: find the record.
                        if len(part) > 1:
                            pending.extend([part[len(part) // 2:], part[:len(part) // 2]])
                            continue
                        self.failed += 1
                        # The database answered: it is not what the records wait for (/_flux/health).
                        self._waiting_since = None
                        log.error("%s; trace of request %s not stored", from_psycopg(exc, "writing a trace record failed"),
                                  part[0][0], extra={"request_id": part[0][0]})
            for _, encoded in batch:
                self.pending_bytes -= len(encoded)
                self._queue.task_done()

    async def connect(self) -> psycopg.AsyncConnection:
        """The writer's connection, which lives as long as the server. UTF-8: the records go as JSON
        already encoded (the server converts to its own). It finds a dead peer within about a minute
        (`flux.pg.keepalive`): behind a silent partition (a host gone in a failover) a batch sent on it
        waited for TCP to give up, about 15 minutes, while the queue filled and dropped records."""
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, client_encoding="UTF8",
                                                    connect_timeout=self.connect_timeout, **dead_peer_options(self.dsn))
        if await behind_pooler_async(conn):  # psycopg's statement prepared after 5 batches would go missing
            conn.prepare_threshold = None
        return conn

    def _grow_batch_cap(self) -> None:
        if self.batch_cap >= self.batch_size:
            return
        self._written_at_cap += 1
        if self._written_at_cap >= GROW_AFTER_BATCHES:
            self.batch_cap = min(self.batch_size, self.batch_cap * 2)
            self._written_at_cap = 0

    async def _insert(self, conn: psycopg.AsyncConnection, part: list[tuple[str, bytes]]) -> None:
        """One batch, saying every STALL_LOG_SECONDS while the database has not taken it (a lock on
        the table, a server that stopped answering): the queue grows meanwhile."""
        insert = asyncio.ensure_future(insert_encoded_traces_async(conn, [encoded for _, encoded in part]))
        self.sending = len(part)
        try:
            while not (await asyncio.wait({insert}, timeout=STALL_LOG_SECONDS))[0]:
                log.warning("%d trace records have waited %.0fs for the database to take them (a lock on "
                            "flux.trace_requests?); %d more queued", len(part), time.monotonic() - (self._waiting_since or 0),
                            self._queue.qsize())
        finally:
            insert.cancel()  # a no-op once done; the writer's own cancellation stops the statement too
            if insert.done():
                self.sending = 0
        insert.result()

    def _encode(self, record: TraceRecord) -> bytes:
        try:
            encoded = encode_trace(record)
        except (TypeError, ValueError, RecursionError):  # nested deeper than a JSON encoder goes (orjson: 254)
            log.warning("trace of request %s: what is nested deeper than %d levels is not recorded", record.id,
                        MAX_RECORD_DEPTH, extra={"request_id": record.id})
            record = dataclasses.replace(record, spans=cap_depth(record.spans), request=cap_depth(record.request),
                                         response=cap_depth(record.response), recording=cap_recording(record.recording))
            encoded = encode_trace(record)
        if len(encoded) <= MAX_RECORD_BYTES:
            return encoded
        self.shrunk += 1
        note = f"not stored: this trace was {len(encoded)} bytes, over the {MAX_RECORD_BYTES}-byte limit of a stored trace"
        log.warning("trace of request %s: %s", record.id, note, extra={"request_id": record.id})
        # Its other keys say what a replay needs besides the events (commit, incomplete, env): a few
        # hundred bytes, but for a COMMIT's error, which quotes the row, cut as the trace's error is.
        recording = record.recording and _shrink({**record.recording, "truncated": True, "omitted": note, "events": []})
        smaller = encode_trace(dataclasses.replace(record, recording=recording))
        if len(smaller) <= MAX_RECORD_BYTES:
            return smaller
        return encode_trace(dataclasses.replace(
            record, recording=recording, spans=_shrink(record.spans), request=_shrink(record.request),
            response=_shrink(record.response), error=_shrink(record.error)))


def _about_the_records(exc: psycopg.Error) -> bool:
    """Whether the database refused a batch for what its records hold, rather than for its own state."""
    if isinstance(exc, psycopg.OperationalError):
        return False
    return exc.sqlstate is None or exc.sqlstate[:2] in _RECORD_SQLSTATE_CLASSES


def cap_depth(value: Any, depth: int = MAX_RECORD_DEPTH) -> Any:
    """`value` with what is nested deeper than `depth` replaced by a note that says so."""
    if not isinstance(value, (dict, list)):
        return value
    if depth == 0:
        return f"[not recorded: nested deeper than {MAX_RECORD_DEPTH} levels]"
    if isinstance(value, dict):
        return {k: cap_depth(v, depth - 1) for k, v in value.items()}
    return [cap_depth(v, depth - 1) for v in value]


def cap_recording(recording: Any) -> Any:
    """A replay tape within MAX_RECORD_DEPTH levels: it stops before its first event nested deeper,
    and says `truncated`. cap_depth's note in place of a value would be handed to a replay as if the
    function had got it, on a tape that says it is whole."""
    if not isinstance(recording, dict) or not isinstance(recording.get("events"), list):
        return cap_depth(recording)
    capped = {key: cap_depth(value, MAX_RECORD_DEPTH - 1) for key, value in recording.items() if key != "events"}
    events = []
    for event in recording["events"]:
        if _deeper_than(event, MAX_RECORD_DEPTH - 2):  # the recording and its events list are two levels
            capped["truncated"] = True
            break
        events.append(event)
    capped["events"] = events
    return capped


def _deeper_than(value: Any, depth: int) -> bool:
    """Whether `value` nests lists and objects more than `depth` levels (cap_depth would change it);
    it walks no deeper than that."""
    if not isinstance(value, (dict, list)):
        return False
    if depth == 0:
        return True
    return any(_deeper_than(item, depth - 1) for item in (value.values() if isinstance(value, dict) else value))


def _shrink(value: Any) -> Any:
    """`value` with every long string cut to SHRUNK_STRING_CHARS, marked as cut."""
    if isinstance(value, str):
        return value if len(value) <= SHRUNK_STRING_CHARS else value[:SHRUNK_STRING_CHARS] + "…[cut]"
    if isinstance(value, dict):
        return {k: _shrink(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shrink(v) for v in value]
    return value
