"""The CDC engine: one loop that reads, assembles, writes and acknowledges.

    run():  connect → resume from stored progress → loop { read frame → decode → assemble
            → write batch → commit with progress → acknowledge } → on failure back off, reconnect

Delivery is exactly once in `flux.state_mutations`:
- mutations and progress commit in one sink transaction;
- the server hears a flush LSN only after that commit has completed (the sink commits on a
  worker thread, `PipelinedSink`, while this loop goes on reading and decoding);
- after any restart, transactions whose commit LSN is not newer than the stored progress are
  skipped (the server resends from its confirmed position, which may be older).

Rows stream into one open COPY per sink transaction, at most `WRITE_ROWS` held in memory, so a
huge source transaction needs bounded memory and becomes visible atomically at its commit.

Of two engines on one slot, one streams and the other stands by (`flux.cdc.standby`), taking
over when the slot frees.

Decoding and assembling run on the engine's thread; COPY formatting and the sink's round trips
on the sink's worker thread (one GIL: they overlap where the worker waits on the server). The
server's walsender and the sink's backend work in their own processes.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from flux import STOP_SIGNALS
from flux.cdc import pgoutput as pg
from flux.cdc.assembler import Assembler, MutationRow, TransactionEnd
from flux.cdc.pipelined import Durable, PipelinedSink
from flux.cdc.sink import PostgresCatalog, PostgresSink, Progress
from flux.cdc.standby import wait_while_held
from flux.cdc.stream import ReplicationStream, new_consumer_token
from flux.cdc.wire import Keepalive, format_lsn, parse_frame, xlogdata
from flux.errors import ConnectionLostError, DecodeError, FluxError, SlotHeldError, StreamError, from_psycopg
from flux.pg.tls import certificate_refused
from flux.signals import received as held_signal

log = logging.getLogger("flux.cdc")

# Rows handed to the sink's open COPY at a time: small enough that the server ingests while
# the engine decodes, large enough to amortize the call.
WRITE_ROWS = 500
PROGRESS_LOG_INTERVAL = 10.0  # seconds between "recorded N mutations" log lines while busy
DURABLE_POLL = 0.01  # seconds an idle read waits while a sink commit is in flight, to acknowledge it soon
FLUSH_TIMEOUT = 60.0  # seconds a clean stop waits for the sink's last commits
# Seconds a session must stream before its failure counts as a new one (backoff from the start),
# unless it recorded something: one that fails right after every open without recording anything
# (a store refusing the first write) backs off as if it never opened.
STABLE_SESSION = 10.0


@dataclass(frozen=True)
class EngineConfig:
    dsn: str
    slot: str = "flux"
    publication: str | None = None  # None: the one `flux attach` recorded for the slot, else "flux"
    batch_rows: int = 10_000  # rows per sink commit under load; also caps rows queued for the sink
    max_commit_delay: float = 0.2  # seconds a finished source transaction may wait for a sink commit to start, none being in flight
    status_interval: float = 5.0  # seconds between standby status updates
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    reconcile_interval: float = 10.0  # seconds between idle checks for tables and partitions created since attach
    standby_interval: float = 1.0  # seconds between looks at a slot another Flux engine holds


@dataclass
class EngineStats:
    transactions: int = 0
    mutations: int = 0
    skipped_transactions: int = 0
    reconnects: int = 0
    last_commit_time: datetime | None = None
    confirmed_lsn: int = 0


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.stats = EngineStats()
        self._stop = threading.Event()
        self.state = "starting"
        self.holder: tuple[int, str] | None = None  # pid and host of the engine holding the slot, while this one stands by
        self.consumer_token = new_consumer_token()  # names its replication connections, as its own, in every session

    def stop(self) -> None:
        """Ask `run()` to flush what is complete and return. Safe from any thread or signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        """The first signal stops after a flush of what is complete (up to FLUSH_TIMEOUT, waiting on
        the store: a lock someone holds on it holds the stop too); a second one stops at once.
        Either way nothing is lost: what the store has not committed is rolled back with its
        connection, and the slot, never confirmed past it, sends it again on the next start."""
        if self.stopping:
            log.warning("stopping at once: what is not committed is recorded on the next start")
            raise KeyboardInterrupt
        log.info("stopping: committing what is complete (a second signal stops at once)")
        self.stop()

    def status(self) -> dict[str, Any]:
        """What this engine does now: `state` is starting, active (it streams the slot), standby
        (another Flux engine does: `holder` names it), retrying (after an error) or stopped."""
        holder = None if self.holder is None else {"pid": self.holder[0], "host": self.holder[1]}
        return {"state": self.state, "slot": self.config.slot, "holder": holder}

    def run(self, *, install_signal_handlers: bool = True) -> EngineStats:
        """Consume until stopped, reconnecting with capped exponential backoff; while another Flux
        engine holds the slot, standing by (`flux.cdc.standby`) without a warning."""
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._on_stop_signal)
            if held_signal() is not None:  # it came while `flux cdc run` started (flux.signals)
                log.info("stopping: %s arrived while starting", signal.Signals(held_signal()).name)
                self.stop()
        delay = self.config.backoff_initial
        last_logged = 0.0
        try:
            while not self.stopping:
                delay, last_logged = self._session(delay, last_logged)
        finally:
            self.state = "stopped"
        return self.stats

    def _session(self, delay: float, last_logged: float) -> tuple[float, float]:
        """One session, from open to its end; the backoff and the time of the last warning after it."""
        session = _Session(self.config, self.stats, self._stop, self.consumer_token)
        opened_at, recorded_before = None, self.stats.mutations
        try:
            if self.state == "standby":
                wait_while_held(self.config.dsn, self.config.slot, self._stop, interval=self.config.standby_interval)
                if self.stopping:
                    return delay, last_logged
            session.open()
            if self.state == "standby":
                log.info("took over slot %s from the Flux engine of pid %d on %s", self.config.slot, *self.holder)
            self.state, self.holder = "active", None
            opened_at = time.monotonic()
            session.consume()
        except SlotHeldError as exc:
            session.close(flush=False)
            holder = (exc.context["holder_pid"], exc.context["holder_host"])
            if (self.state, self.holder) != ("standby", holder):  # said once per holder; then a debug line per look
                log.info("standing by: slot %s is held by the Flux engine of pid %d on %s; this engine takes over when "
                         "it frees", self.config.slot, *holder)
            else:
                log.debug("slot %s was taken again by the Flux engine of pid %d on %s; standing by", self.config.slot, *holder)
            self.state, self.holder = "standby", holder
            return self.config.backoff_initial, last_logged
        except FluxError as exc:
            if not exc.retryable:
                session.close(flush=False)
                raise
            # No retry makes a certificate acceptable: said once, not retried forever as if the server were down.
            refused = certificate_refused(self.config.dsn, exc.__cause__) if isinstance(exc, ConnectionLostError) else None
            if refused is not None:
                session.close(flush=False)
                raise refused from exc
            self.stats.reconnects += 1
            if self.state != "standby":  # a standby keeps waiting for the slot once the database is back
                self.state = "retrying"
            now = time.monotonic()
            if opened_at is not None and (now - opened_at >= STABLE_SESSION or self.stats.mutations > recorded_before):
                delay = self.config.backoff_initial
            if now - last_logged > 10 or delay <= self.config.backoff_initial:  # rate-limit repeated errors
                log.warning("%s; reconnecting in %.1fs%s", exc, delay, f" (hint: {exc.hint})" if exc.hint else "")
                last_logged = now
            session.close(flush=False)
            self._stop.wait(delay)
            return min(delay * 2, self.config.backoff_max), last_logged
        except BaseException:
            session.close(flush=False)
            raise
        session.close(flush=True)
        return delay, last_logged


class _Session:
    """One connection's worth of consuming: state here is discarded on reconnect."""

    def __init__(self, config: EngineConfig, stats: EngineStats, stop: threading.Event, consumer_token: str) -> None:
        self.config = config
        self.consumer_token = consumer_token
        self.stats = stats
        self._stop = stop
        self.sink: PipelinedSink | None = None
        self.catalog: PostgresCatalog | None = None
        self.stream: ReplicationStream | None = None
        self.assembler: Assembler | None = None
        self.progress: Progress | None = None
        self.skipping = False
        self.buffer: list[MutationRow] = []
        self.write_rows = min(config.batch_rows, WRITE_ROWS)
        self.uncommitted_rows = 0  # written or buffered since the last sink commit
        self.pending_end: TransactionEnd | None = None  # last source transaction ended but not yet handed to the sink to commit
        self.pending_since = 0.0
        self.confirmed = 0  # flush LSN the server may forget up to
        self.durable = Durable(None, 0)  # the sink's last completed commit, as the engine last saw it
        self.received = 0
        self.last_status = 0.0
        self.last_reconcile = time.monotonic()
        self.txn_written_without_context = 0
        self.last_progress_log = time.monotonic()
        self.logged_mutations = stats.mutations

    def open(self) -> None:
        cfg = self.config
        self.catalog = PostgresCatalog(dsn=cfg.dsn)
        # Before anything reads or writes: a missing privilege is one line with its GRANT now, not a
        # stop hours later on the rare statement that needs it.
        self.catalog.require_engine_role(cfg.slot)
        # Queue at most one batch: a sink slower than the stream holds the engine back, not its memory.
        self.sink = PipelinedSink(PostgresSink(dsn=cfg.dsn), max_queued_rows=cfg.batch_rows)
        self.progress = self.sink.load_progress(cfg.slot)
        start = self.progress.end_lsn if self.progress else 0
        if start > (current := self.catalog.wal_lsn()):
            # Asked to start there, the server would take it as confirmed: every change up to it
            # (gigabytes of this server's WAL to come) would be skipped unrecorded.
            raise StreamError(
                f"The progress recorded for slot {cfg.slot} ({format_lsn(start)}) is ahead of this server's WAL "
                f"({format_lsn(current)}): the database was restored or copied from another server",
                hint=f"Start capture over on this server: `flux detach --slot {cfg.slot}`, then `flux attach` "
                     "(recorded mutations are kept).", slot=cfg.slot)
        self.confirmed = start
        self.assembler = Assembler(catalog=self.catalog)
        # Read at each connection, not once at start: a server not up yet is retried like any other.
        publication = cfg.publication or self.catalog.attached_publication(cfg.slot) or "flux"
        self.stream = ReplicationStream(dsn=cfg.dsn, slot=cfg.slot, publication=publication, start_lsn=start,
                                          consumer_token=self.consumer_token)
        self.stream.open()
        log.info("streaming slot %s from %s", cfg.slot, format_lsn(start))

    def consume(self) -> None:
        assert self.stream is not None and self.assembler is not None and self.sink is not None
        # Locals: this loop runs once per message.
        handlers, sink, assembler, read, decode = self._handlers, self.sink, self.assembler, self.stream.read, pg.decode
        batch_rows, max_delay = self.config.batch_rows, self.config.max_commit_delay
        status_interval = self.config.status_interval
        idle_wait = min(0.5, status_interval)
        stop, monotonic = self._stop, time.monotonic
        while not stop.is_set():
            # Group commit: one sink commit in flight at a time. What finishes meanwhile waits and
            # goes in the next one, handed over as soon as the one in flight is durable.
            if sink.durable is not self.durable:
                self._on_durable(sink.durable)
                if self.pending_end is not None:
                    self._commit()
            if sink.pending_commits:
                wait = DURABLE_POLL  # read on, and look at the commit in flight again soon
            elif self.pending_end is not None and not assembler.in_transaction:
                wait = 0.0  # a finished transaction can be committed right away: poll, do not wait
            else:  # inside an open transaction its COMMIT must arrive first (no busy loop)
                wait = idle_wait
            raw = read(wait)
            now = monotonic()
            if raw is None:
                if self.pending_end is not None and not sink.pending_commits:
                    self._commit()
                self._maybe_status(now)
                self._maybe_reconcile(now)
                continue
            data = xlogdata(raw)
            if data is not None:
                lsn, payload = data
                if lsn > self.received:
                    self.received = lsn
                msg = decode(payload, lsn=lsn)
                handler = handlers.get(msg.__class__)
                if handler is not None:  # Origin and Type carry nothing the log needs
                    handler(msg)
                if self.pending_end is not None and (
                    self.uncommitted_rows >= batch_rows or (now - self.pending_since >= max_delay and not sink.pending_commits)
                ):
                    self._commit()
                if now - self.last_status >= status_interval:
                    self._maybe_status(now)
                continue
            frame = parse_frame(raw)
            if isinstance(frame, Keepalive):
                self.received = max(self.received, frame.wal_end)
                # The walsender sends one each time it catches up, which under steady writes is
                # after nearly every transaction: committing on each would mean one sink commit
                # per source transaction. Idleness is caught by an empty read instead.
                if self.pending_end is not None and not sink.pending_commits and (
                    frame.reply_requested or now - self.pending_since >= max_delay
                ):
                    self._commit()
                self._maybe_status(now, force=self._advance_if_idle() or frame.reply_requested)
                continue
            raise DecodeError("XLogData or keepalive expected", first_byte=raw[0])

    @property
    def _handlers(self) -> dict[type, Callable[[Any], None]]:
        return {
            pg.Insert: self._on_insert, pg.Update: self._on_update, pg.Delete: self._on_delete,
            pg.Begin: self._on_begin, pg.Commit: self._on_commit, pg.Relation: self.assembler.relation,
            pg.LogicalMessage: self._on_message, pg.Truncate: self._on_truncate,
        }

    def _on_insert(self, msg: pg.Insert) -> None:
        if not self.skipping:
            self._add(self.assembler.insert(msg))

    def _on_update(self, msg: pg.Update) -> None:
        if not self.skipping:
            self._add(self.assembler.update(msg))

    def _on_delete(self, msg: pg.Delete) -> None:
        if not self.skipping:
            self._add(self.assembler.delete(msg))

    def _on_begin(self, msg: pg.Begin) -> None:
        self.assembler.begin(msg)
        self.skipping = self.progress is not None and msg.final_lsn <= self.progress.commit_lsn
        self.txn_written_without_context = 0

    def _on_commit(self, msg: pg.Commit) -> None:
        end = self.assembler.commit(msg)
        if self.skipping:
            self.stats.skipped_transactions += 1
            self.skipping = False
            if self._nothing_in_flight():
                self.confirmed = max(self.confirmed, end.end_lsn)
            return
        self.stats.transactions += 1
        self.stats.last_commit_time = end.commit_time
        if self.pending_end is None:
            self.pending_since = time.monotonic()
        self.pending_end = end

    def _on_message(self, msg: pg.LogicalMessage) -> None:
        if self.skipping:
            return
        backfill = self.assembler.message(msg)
        if backfill is not None:
            for row in self.buffer:
                if row.commit_lsn == backfill.commit_lsn and row.seq < backfill.before_seq:
                    row.request_id, row.context = backfill.request_id, backfill.context
            if self.txn_written_without_context:
                self.sink.backfill(backfill)

    def _on_truncate(self, msg: pg.Truncate) -> None:
        if not self.skipping:
            for row in self.assembler.truncate(msg):
                self._add(row)

    def _add(self, row: MutationRow) -> None:
        buffer = self.buffer
        buffer.append(row)
        self.uncommitted_rows += 1
        if len(buffer) >= self.write_rows:
            self._write_buffer()

    def _write_buffer(self) -> None:
        assert self.sink is not None
        if self.buffer:
            if self.assembler is not None and self.assembler.in_transaction:
                self.txn_written_without_context += sum(1 for r in self.buffer if r.request_id is None and r.context is None)
            self.sink.write(self.buffer)
            self.buffer = []

    def _commit(self) -> None:
        """Hand the sink the commit of every finished source transaction; `_on_durable` acknowledges it."""
        assert self.sink is not None and self.pending_end is not None
        if self.assembler is not None and self.assembler.in_transaction:
            return  # rows of the open transaction are in the sink transaction too; wait for its COMMIT
        self._write_buffer()
        end = self.pending_end
        self.progress = Progress(self.config.slot, end.commit_lsn, end.end_lsn, end.commit_time)
        self.sink.commit(self.progress, mutations=self.uncommitted_rows)
        self.pending_end = None
        self.uncommitted_rows = 0

    def _on_durable(self, durable: Durable) -> None:
        """A sink commit completed: the server may now forget what it covered."""
        self.stats.mutations += durable.mutations - self.durable.mutations
        self.durable = durable
        if durable.progress is not None:
            self.confirmed = max(self.confirmed, durable.progress.end_lsn)
        self._advance_if_idle()
        self._maybe_status(time.monotonic(), force=True)

    def _advance_if_idle(self) -> bool:
        """With nothing in flight, everything the server has sent is recorded or not published, so
        it need not be kept: confirm up to the server's last position (no pinned WAL when idle)."""
        if self.received > self.confirmed and self._nothing_in_flight():
            self.confirmed = self.received
            return True
        return False

    def _nothing_in_flight(self) -> bool:
        """No change received is waiting to be recorded: all of it has committed, or none was published."""
        assert self.assembler is not None and self.sink is not None
        return not self.assembler.in_transaction and self.pending_end is None and not self.buffer and not self.sink.pending_commits

    def _maybe_status(self, now: float, *, force: bool = False) -> None:
        if self.stream is None or not self.stream.is_open:
            return
        if force or now - self.last_status >= self.config.status_interval:
            self.stream.send_status(written=max(self.received, self.confirmed), flushed=self.confirmed)
            self.stats.confirmed_lsn = self.confirmed
            self.last_status = now
            if now - self.last_progress_log >= PROGRESS_LOG_INTERVAL and self.stats.mutations != self.logged_mutations:
                # Progress on long work (a backlog drain) without a line per transaction.
                rate = (self.stats.mutations - self.logged_mutations) / max(now - self.last_progress_log, 1e-9)
                log.info("recorded %d mutation%s (%.0f/s), confirmed %s", self.stats.mutations, "" if self.stats.mutations == 1 else "s",
                         rate, format_lsn(self.confirmed))
                self.logged_mutations = self.stats.mutations
                self.last_progress_log = now

    def _maybe_reconcile(self, now: float) -> None:
        if now - self.last_reconcile < self.config.reconcile_interval:
            return
        self.last_reconcile = now
        from flux.cdc.autocapture import reconcile_new_tables

        try:
            added = reconcile_new_tables(self.config.dsn, slot=self.config.slot)
        except psycopg.Error as exc:  # not every query in there is wrapped
            error = from_psycopg(exc, "Could not check for new tables", slot=self.config.slot)
            if isinstance(error, ConnectionLostError):
                raise error from exc  # retried with the rest of the session
            # Capturing new tables is a side task: refused (a privilege), it must not stop the capture
            # of every other table. Tried again next round.
            log.warning("%s", error)
            return
        for name in added:
            log.info("now capturing new table %s", name)

    def close(self, *, flush: bool) -> None:
        """Release connections. With `flush`, finished transactions are committed and acknowledged
        first, except those sharing a sink transaction with one still open: all of that is rolled
        back and resent on the next start."""
        if flush and self.sink is not None:
            try:
                if self.assembler is not None and self.assembler.in_transaction:
                    log.info("stopping mid-transaction: its rows will be resent on the next start")
                elif self.pending_end is not None:
                    self._commit()
                self._on_durable(self.sink.wait_durable(FLUSH_TIMEOUT))
            except FluxError as exc:
                log.warning("could not flush on stop: %s", exc)
        if self.sink is not None:
            self.sink.close()
        if self.catalog is not None:
            self.catalog.close()
        if self.stream is not None:
            self.stream.close()
