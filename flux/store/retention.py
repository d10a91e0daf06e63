"""Retention: deleting what Flux recorded before a cutoff (`flux prune`).

Both logs only grow: one trace row per request, one mutation row per row change. `prune`
deletes the rows older than a cutoff in batches, each its own short transaction, so that the
gateway's trace writer and the CDC engine, which append meanwhile, never wait on it for long,
and an interrupted prune keeps what it has done.

How old is decided:
- a trace by its `started_at`, through `trace_requests_started_idx`;
- a mutation by its transaction's commit time. There is no index on `commit_time`, but commit
  order is LSN order, so commit times rise with `commit_lsn`, the primary key's first column: a
  binary search over the key finds the first LSN at or past the cutoff, and everything before it
  goes, in batches that end between transactions (its rows share one commit LSN). Commit times
  of concurrent transactions can be a few microseconds out of LSN order; the cut follows the LSN.
- "now" is the database server's clock; the cutoff is returned in UTC.

Before deleting from a log it records the cutoff in `flux.meta` (`pruned_before`), so that
readers (`flux why`, `flux trace`, `flux state`) can say "deleted by retention" rather than
imply that something was never recorded.

One prune runs at a time per database (an advisory lock; another is refused with InUseError).
Through a connection pooler (PgBouncer in transaction mode), where a session lock would stay on
whichever server connection took it, each batch takes the lock in its own transaction instead:
two prunes started together there are told apart batch by batch.

What it does not do: it does not VACUUM (autovacuum reclaims the space in time; a manual
`VACUUM flux.state_mutations` returns it at once), and it does not touch user tables or the
replication slot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg

from flux.cdc.roles import missing_grants, prune_needs
from flux.cdc.wire import format_lsn
from flux.errors import ConfigError, DatabaseError, FluxError, InUseError, NotFoundError, from_psycopg
from flux.pg.pooler import behind_pooler
from flux.project import Retention
from flux.store.schema import SCHEMA_VERSION, advisory_lock_holder, schema_version, version_mismatch

log = logging.getLogger("flux.retention")

DEFAULT_BATCH_ROWS = 5_000
# SELECT too: a DELETE with a WHERE reads the rows it deletes, and the cutoff's upsert reads flux.meta.
_GRANTS = ("A prune deletes from flux.trace_requests and flux.state_mutations and records its cutoff in flux.meta: "
           "run it as the role that ran `flux attach`, or GRANT USAGE ON SCHEMA flux TO <role>; GRANT SELECT, DELETE "
           "ON flux.trace_requests, flux.state_mutations TO <role>; GRANT SELECT, INSERT, UPDATE ON flux.meta TO <role>;"
           " --dry-run only reads.")
_LOCK = "flux.prune"
_TRY_XACT_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext(%s))"

# (what, deleted so far, to delete in all): called after each batch
Progress = Callable[[str, int, int], None]


@dataclass
class PruneResult:
    cutoff: datetime
    dry_run: bool
    traces: int | None  # deleted (or, for a dry run, to delete); None when not asked for
    mutations: int | None
    seconds: float
    stopped: bool = False  # `stop` was set before it finished: what is left goes next time


def prune(
    conn: psycopg.Connection,
    *,
    older_than: timedelta,
    traces: bool = True,
    mutations: bool = True,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    dry_run: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> PruneResult:
    """Delete traces and mutations older than `older_than`; `conn` must be in autocommit mode.
    Once `stop` is set, it returns after the batch in hand, with what it has deleted and
    `stopped` set."""
    check_arguments(older_than=older_than, traces=traces, mutations=mutations, batch_rows=batch_rows)
    _require_grants(conn, traces=traces, mutations=mutations, dry_run=dry_run)
    version = schema_version(conn)
    if version is None:
        raise NotFoundError("This database has no flux schema: nothing was recorded here",
                            hint="Check --database (or FLUX_DATABASE_URL).")
    if version != SCHEMA_VERSION:
        raise version_mismatch(version, doing="prunes")
    started = time.monotonic()
    pooled = behind_pooler(conn)
    if pooled:  # each statement may run on another server connection, which lacks what psycopg prepared
        conn.prepare_threshold = None
    if not _try_lock(conn, pooled):
        raise _running(conn)
    timeouts = {} if pooled else _turn_off_timeouts(conn)
    try:
        # The database's clock, in UTC: psycopg gives a timestamptz in the session's TimeZone.
        cutoff = conn.execute("SELECT now() - %s::interval", (older_than,)).fetchone()[0].astimezone(timezone.utc)
        result = PruneResult(cutoff=cutoff, dry_run=dry_run, traces=None, mutations=None, seconds=0.0)
        stop = stop or threading.Event()
        batches = _Batches(conn, batch_rows, progress, stop, pooled)
        if traces:
            result.traces = _prune_traces(cutoff, dry_run, batches)
        if mutations:
            result.mutations = 0 if batches.stopping() else _prune_mutations(cutoff, dry_run, batches)
        result.stopped = batches.stopped
    except psycopg.errors.InsufficientPrivilege as exc:
        raise from_psycopg(exc, "Pruning failed", hint=_GRANTS) from exc
    finally:
        if not conn.closed and not pooled:  # a lost session has released its lock, and its error is the one to report
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (_LOCK,))
            for name, value in timeouts.items():
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    result.seconds = round(time.monotonic() - started, 3)
    return result


# Timeouts a database or role may set for its applications. A prune's batches are short, but a
# transaction larger than a batch goes in one statement, and a count for the progress bars scans a
# whole log: under a statement_timeout the same statement was cancelled at every run, and no prune
# ever got past that transaction again. Its statements lock only rows nobody else writes.
_TIMEOUTS = ("statement_timeout", "transaction_timeout")  # the second: PostgreSQL 17 and later


def _turn_off_timeouts(conn: psycopg.Connection) -> dict[str, str]:
    """Turn the timeouts off for this session; what they were, to set back."""
    was = {}
    for name in _TIMEOUTS:
        value = conn.execute("SELECT current_setting(%s, true)", (name,)).fetchone()[0]
        if value is not None and value != "0":
            conn.execute("SELECT set_config(%s, '0', false)", (name,))
            was[name] = value
    return was


def _try_lock(conn: psycopg.Connection, pooled: bool) -> bool:
    """The prune's lock: a session lock held to the end, or through a pooler (`flux.pg.pooler`), where
    a session lock would stay on the server connection that took it and the unlock would run on
    another, one in this transaction only (each batch takes it again: `_Batches`)."""
    if pooled:
        with conn.transaction():
            return conn.execute(_TRY_XACT_LOCK, (_LOCK,)).fetchone()[0]
    return conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (_LOCK,)).fetchone()[0]


def check_arguments(*, older_than: timedelta, traces: bool, mutations: bool, batch_rows: int) -> None:
    """What `prune` refuses before it touches the database (the CLI checks it before connecting:
    a mistyped flag is exit 2 whether or not the server answers)."""
    if older_than <= timedelta(0):
        raise ConfigError("The retention period must be positive", hint="Give a duration such as 30d or 12h.")
    if not traces and not mutations:
        raise ConfigError("Nothing to prune", hint="Leave out --no-traces or --no-mutations.")
    if batch_rows < 1:
        raise ConfigError(f"--batch-rows {batch_rows} is not a positive number of rows", hint="The default is 5000.")


def _require_grants(conn: psycopg.Connection, *, traces: bool, mutations: bool, dry_run: bool) -> None:
    """Checked before anything is deleted or recorded: a role that could delete traces but not
    mutations deleted the traces, recorded a mutations cutoff it never pruned at (readers then
    said of kept changes that they were deleted by retention), and only then was refused."""
    needs = prune_needs(traces=traces, mutations=mutations)
    if dry_run:
        needs = {table: ("SELECT",) for table in needs}
    grants = missing_grants(conn, needs)
    if grants:
        role = conn.execute("SELECT current_user").fetchone()[0]
        raise DatabaseError(f"Role '{role}' may not {'count what a prune deletes' if dry_run else 'prune'}: it lacks "
                            "privileges on the flux schema", role=role, sqlstate="42501",
                            hint="As the role that ran `flux attach` (it owns the flux schema) run: " + " ".join(grants)
                                 + ("" if dry_run else " --dry-run only reads."))


def _running(conn: psycopg.Connection) -> InUseError:
    """Refused: another session holds the prune's lock; named, as it may be a server's `[retention]` pass."""
    try:
        holder = advisory_lock_holder(conn, f"hashtext('{_LOCK}')")
    except psycopg.Error:  # only a courtesy
        holder = None
    who = ""
    if holder is not None:
        pid, application, client, seconds = holder
        where = f" from {client}" if client else ""
        who = f" (pid {pid}, {application or 'no application name'}{where}, its last statement began {seconds} s ago)"
    return InUseError(f"Another `flux prune` is running on this database{who}",
                      hint="Wait for it to finish; running two at once only makes them compete. A `flux serve` or "
                           "`flux dev` with [retention] prunes on its own, every hour.")


def _prune_traces(cutoff: datetime, dry_run: bool, batches: _Batches) -> int:
    count = "SELECT count(*) FROM flux.trace_requests WHERE started_at < %s"
    if dry_run:
        return batches.conn.execute(count, (cutoff,)).fetchone()[0]
    if not batches.conn.execute("SELECT EXISTS (SELECT FROM flux.trace_requests WHERE started_at < %s)", (cutoff,)).fetchone()[0]:
        batches._report("traces", 0, 0)  # nothing to delete, so no cutoff to record (`_record_cutoff`)
        return 0
    _record_cutoff(batches.conn, "traces", cutoff)
    return batches.delete("traces", count, """
        DELETE FROM flux.trace_requests WHERE id IN (
            SELECT id FROM flux.trace_requests WHERE started_at < %s ORDER BY started_at LIMIT %s)
        """, cutoff)


def _prune_mutations(cutoff: datetime, dry_run: bool, batches: _Batches) -> int:
    conn = batches.conn
    cut = first_lsn_at_or_after(conn, cutoff, or_past_newest=True)
    if cut is None:  # nothing recorded at all
        return 0
    count = "SELECT count(*) FROM flux.state_mutations WHERE commit_lsn < %s::pg_lsn"
    if dry_run:
        return conn.execute(count, (cut,)).fetchone()[0]
    if not conn.execute("SELECT EXISTS (SELECT FROM flux.state_mutations WHERE commit_lsn < %s::pg_lsn)", (cut,)).fetchone()[0]:
        return 0  # nothing to delete, so no cutoff to record (`_record_cutoff`)
    _record_cutoff(conn, "mutations", cutoff)
    return batches.delete_transactions(count, cut)


@dataclass(frozen=True)
class Pruned:
    """The latest cutoff each log has been pruned at (None: never): what was recorded before it
    may be gone. Readers use it to say "deleted by retention" rather than "never recorded"."""

    traces: datetime | None = None
    mutations: datetime | None = None


def pruned_before(conn: psycopg.Connection) -> Pruned:
    row = conn.execute(
        "SELECT (value->>'traces')::timestamptz, (value->>'mutations')::timestamptz FROM flux.meta"
        " WHERE key = 'pruned_before'").fetchone()
    if row is None:
        return Pruned()
    return Pruned(*(t.astimezone(timezone.utc) if t is not None else None for t in row))


def _record_cutoff(conn: psycopg.Connection, what: str, cutoff: datetime) -> None:
    # Before the first batch, so that an interrupted prune is covered too; never moved back. Only
    # by a prune that has something to delete: readers tell the user that what was recorded
    # before the cutoff was deleted by retention, which a prune that found nothing older (the
    # first passes of [retention] in a young database) has not done.
    conn.execute("""
        INSERT INTO flux.meta AS m (key, value) VALUES ('pruned_before', jsonb_build_object(%(what)s::text, %(cutoff)s::timestamptz))
        ON CONFLICT (key) DO UPDATE SET value = m.value || jsonb_build_object(%(what)s::text,
            greatest((m.value->>%(what)s::text)::timestamptz, %(cutoff)s::timestamptz))
        """, {"what": what, "cutoff": cutoff})


def first_lsn_at_or_after(conn: psycopg.Connection, cutoff: datetime, *, or_past_newest: bool = False) -> str | None:
    """The commit LSN of the first recorded transaction committed at or after `cutoff`, or None
    when there is none: a binary search over the primary key (index probes, about two per bit of
    the LSN range), since commit times rise with commit LSNs. With `or_past_newest`, when every
    recorded transaction is older, the LSN just past the newest of them as this read it (None only
    for an empty log): a transaction the engine records meanwhile comes after it, and stays."""
    probe = """
        SELECT commit_lsn - '0/0'::pg_lsn, commit_time FROM flux.state_mutations
        WHERE commit_lsn >= '0/0'::pg_lsn + %s::numeric ORDER BY commit_lsn LIMIT 1
    """
    lowest, highest = conn.execute(
        "SELECT min(commit_lsn) - '0/0'::pg_lsn, max(commit_lsn) - '0/0'::pg_lsn FROM flux.state_mutations").fetchone()
    if highest is None:
        return None
    answer, committed = conn.execute(probe, (highest,)).fetchone()
    if committed < cutoff:
        return format_lsn(int(highest) + 1) if or_past_newest else None
    answer, low, high = int(answer), int(lowest), int(answer)  # rows in [low, high) are not known yet
    while low < high:
        middle = (low + high) // 2
        lsn, committed = conn.execute(probe, (middle,)).fetchone()  # one exists: `answer` >= middle
        lsn = int(lsn)
        if lsn >= high:  # no row in [middle, high)
            high = middle
        elif committed < cutoff:  # neither it nor any row before it
            low = lsn + 1
        else:
            answer = high = lsn
    return format_lsn(answer)


@dataclass
class _Batches:
    conn: psycopg.Connection
    rows: int
    progress: Progress | None
    stop: threading.Event
    pooled: bool = False  # through a pooler: each batch takes the lock in its own transaction (`_try_lock`)
    stopped: bool = False  # a delete loop ended because `stop` was set

    def _delete(self, sql: str, params: object) -> int:
        if not self.pooled:
            return self.conn.execute(sql, params).rowcount
        with self.conn.transaction():
            if not self.conn.execute(_TRY_XACT_LOCK, (_LOCK,)).fetchone()[0]:
                raise _running(self.conn)
            for name in _TIMEOUTS:  # for this transaction only: the server connection is shared (`_TIMEOUTS`)
                self.conn.execute("SELECT set_config(%s, '0', true) WHERE current_setting(%s, true) IS NOT NULL",
                                  (name, name))
            return self.conn.execute(sql, params).rowcount

    def delete(self, what: str, count: str, delete: str, bound: object) -> int:
        """Run `delete` (its parameters: `bound`, then the batch size) until a batch comes back short."""
        total = self._total(count, bound)
        deleted = 0
        while not self.stopping():
            batch = self._delete(delete, (bound, self.rows))
            deleted += batch
            self._report(what, deleted, total)
            if batch < self.rows:
                break
        return deleted

    def delete_transactions(self, count: str, cut: str) -> int:
        """Delete the mutations before the LSN `cut`, whole transactions per batch: a batch ends
        before the transaction its row `rows + 1` belongs to, so no reader (and no interrupted
        prune) ever sees part of a transaction gone. A transaction larger than a batch goes alone,
        in one statement. Each batch starts at the previous one's end, so the primary key's scan
        never walks back over the entries of rows already deleted (dead until vacuumed)."""
        total = self._total(count, cut)
        deleted, low = 0, "0/0"
        while not self.stopping():
            first, end = self.conn.execute("""
                SELECT min(commit_lsn)::text, (SELECT commit_lsn FROM flux.state_mutations
                    WHERE commit_lsn >= %(low)s::pg_lsn AND commit_lsn < %(cut)s::pg_lsn
                    ORDER BY commit_lsn, seq OFFSET %(rows)s LIMIT 1)::text
                FROM flux.state_mutations WHERE commit_lsn >= %(low)s::pg_lsn AND commit_lsn < %(cut)s::pg_lsn
                """, {"low": low, "cut": cut, "rows": self.rows}).fetchone()
            if first is None:
                break
            # Up to the transaction row `rows + 1` is in; that transaction alone when it is the first.
            end = cut if end is None else end
            op = "<=" if end == first else "<"
            deleted += self._delete(
                f"DELETE FROM flux.state_mutations WHERE commit_lsn >= %s::pg_lsn AND commit_lsn {op} %s::pg_lsn",
                (first, end))
            self._report("mutations", deleted, total)
            if end == cut:
                break
            low = end
        return deleted

    def stopping(self) -> bool:
        self.stopped = self.stopped or self.stop.is_set()
        return self.stopped

    def _total(self, count: str, bound: object) -> int:
        # Counted only when someone watches: a count is a scan of an index, long on a large log.
        return self.conn.execute(count, (bound,)).fetchone()[0] if self.progress is not None else 0

    def _report(self, what: str, deleted: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, deleted, max(total, deleted))


# `[retention]` in flux.toml: `flux serve` and `flux dev` prune this often, the first time soon
# after they start (not at once: start-up has enough to do).
KEEP_EVERY_S = 3600.0
KEEP_FIRST_AFTER_S = 60.0


async def keep(dsn: str, current: Callable[[], Retention], *, every_s: float = KEEP_EVERY_S,
               first_after_s: float = KEEP_FIRST_AFTER_S) -> None:
    """Apply `current()` (the project's retention, re-read each time: a reload may change it)
    until cancelled. Each pass runs on a worker thread with its own connection. A pass that fails
    is logged and tried again next time; one that finds another prune running (another server of
    the same database) leaves the work to it."""
    await asyncio.sleep(first_after_s)
    while True:
        retention = current()
        for what, period in (("traces", retention.traces), ("mutations", retention.mutations)):
            if period is None:
                continue
            stop = threading.Event()
            opened: list[psycopg.Connection] = []
            try:
                result = await asyncio.to_thread(_prune_one, dsn, what, period, stop, opened)
            except asyncio.CancelledError:
                # The server stops: the pass ends now, not once a statement waiting on a lock (or a
                # slow server) lets it; the batch in hand rolls back.
                stop.set()
                await asyncio.to_thread(_cancel, opened)  # off the loop: a cancel waits up to 5 s for an unanswering server
                raise
            except InUseError:
                log.debug("another prune is running on this database; %s left to it", what)
                continue
            except (FluxError, psycopg.Error) as exc:
                hint = f" (hint: {exc.hint})" if isinstance(exc, FluxError) and exc.hint else ""
                log.warning("pruning %s failed, tried again in %.0f s: %s%s", what, every_s, exc, hint)
                continue
            except Exception:  # a bug in Flux: said, and tried again, never the end of retention for good
                log.exception("pruning %s failed unexpectedly, tried again in %.0f s", what, every_s)
                continue
            deleted = result.traces if what == "traces" else result.mutations
            if deleted:
                log.info("deleted %d %s recorded before %s", deleted, what, f"{result.cutoff:%Y-%m-%d %H:%M:%S} UTC")
        await asyncio.sleep(every_s)


def _prune_one(dsn: str, what: str, period: timedelta, stop: threading.Event,
               opened: list[psycopg.Connection]) -> PruneResult:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="flux-retention") as conn:
        opened.append(conn)
        if stop.is_set():  # cancelled while connecting: _cancel found no connection to cancel
            raise InUseError("The server is stopping")  # nobody waits for this pass's result any more
        return prune(conn, older_than=period, traces=what == "traces", mutations=what == "mutations", stop=stop)


def _cancel(opened: list[psycopg.Connection]) -> None:
    for conn in opened:
        try:
            conn.cancel_safe(timeout=5)
        except (psycopg.Error, OSError) as exc:  # the statement then ends when the server lets it
            log.debug("could not cancel the pass in hand: %s", exc)
