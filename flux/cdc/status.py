"""`flux cdc status`: the slot's health and the engine's progress, read from the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from flux.cdc.attach import connect, slot_warnings
from flux.errors import NotFoundError


@dataclass
class CdcStatus:
    slot: str
    database: str
    slot_exists: bool
    active: bool = False
    consumer_pid: int | None = None
    consumer_running: bool = False
    confirmed_lsn: str | None = None
    current_lsn: str | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    lag_is_upper_bound: bool = False  # lag_seconds is the age of the newest recorded commit, not a measure
    retained_wal_bytes: int | None = None
    wal_status: str | None = None
    publication: str | None = None
    published_tables: int | None = None
    mutations_recorded: int = 0
    last_commit_lsn: str | None = None
    last_commit_time: datetime | None = None
    last_recorded_at: datetime | None = None
    warnings: list[str] = field(default_factory=list)


def cdc_status(dsn: str, *, slot: str = "flux") -> CdcStatus:
    with connect(dsn) as conn:
        database, current = conn.execute("SELECT current_database(), pg_current_wal_lsn()::text").fetchone()
        status = CdcStatus(slot=slot, database=database, slot_exists=False, current_lsn=current)
        row = conn.execute(
            """
            SELECT s.active, s.active_pid, s.confirmed_flush_lsn::text,
                   pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
                   pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, s.wal_status,
                   extract(epoch FROM r.flush_lag)::float8
            FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
            WHERE s.slot_name = %s
            """,
            (slot,),
        ).fetchone()
        has_schema = conn.execute("SELECT to_regclass('flux.cdc_progress') IS NOT NULL").fetchone()[0]
        if row is None and not has_schema:
            raise NotFoundError(
                f"Flux is not attached to database '{database}' (no slot '{slot}')",
                hint="Run `flux attach --tables ...` or `flux attach --all-tables` first.",
                slot=slot,
            )
        if row is not None:
            status.slot_exists = True
            (status.active, status.consumer_pid, status.confirmed_lsn, status.lag_bytes,
             status.retained_wal_bytes, status.wal_status, flush_lag) = row
            status.consumer_running = bool(status.active)
            status.lag_seconds = flush_lag
        if has_schema:
            attached = conn.execute("SELECT publication_name FROM flux.attachments WHERE slot_name = %s", (slot,)).fetchone()
            if attached:
                status.publication = attached[0]
                status.published_tables = conn.execute(
                    "SELECT count(*) FROM pg_publication_tables WHERE pubname = %s", (attached[0],)
                ).fetchone()[0]
            progress = conn.execute(
                "SELECT mutations, commit_lsn::text, commit_time, updated_at,"
                " CASE WHEN %s::bigint > 0 THEN extract(epoch FROM now() - commit_time)::float8 END"
                " FROM flux.cdc_progress WHERE slot_name = %s",
                (status.lag_bytes or 0, slot),
            ).fetchone()
            if progress:
                (status.mutations_recorded, status.last_commit_lsn, status.last_commit_time,
                 status.last_recorded_at, behind) = progress
                if status.lag_seconds is None and behind is not None:
                    # No walsender measure (no consumer, or none reported since the WAL it is behind on
                    # was written): the age of the newest recorded commit bounds the lag.
                    status.lag_seconds = behind
                    status.lag_is_upper_bound = True
        if status.lag_seconds is None and status.lag_bytes == 0:
            status.lag_seconds = 0.0
        status.warnings = slot_warnings(conn, slot)
        if not status.slot_exists:
            status.warnings.append(f"Slot '{slot}' does not exist: nothing is being captured. Run `flux attach`.")
        return status
