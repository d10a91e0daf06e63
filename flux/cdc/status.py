"""`flux cdc status`: the slot's health and the engine's progress, read from the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from flux.cdc.attach import connect, slot_warnings
from flux.cdc.publication import NOT_AN_EXTENSIONS, SYSTEM_SCHEMAS, listed_tables_not_captured, partition_trees
from flux.cdc.standby import standbys
from flux.cdc.stream import consumer_of
from flux.errors import NotFoundError
from flux.store.schema import SCHEMA_VERSION, schema_version, version_mismatch


@dataclass
class CdcStatus:
    slot: str
    database: str
    slot_exists: bool
    active: bool = False
    consumer_running: bool = False
    consumer_pid: int | None = None  # the engine's process, as its replication connection names it
    consumer_host: str | None = None
    consumer_application: str | None = None  # that connection's application_name, whoever the consumer is
    walsender_pid: int | None = None  # the server process streaming to it
    standbys: list[dict[str, Any]] = field(default_factory=list)  # {pid, host} of Flux engines waiting to take over
    confirmed_lsn: str | None = None
    current_lsn: str | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    lag_is_upper_bound: bool = False  # lag_seconds is the age of the newest recorded commit, not a measure
    # How long ago the newest recorded transaction committed. While the engine catches up, the
    # server's measure (lag_seconds) counts only from when it decoded the WAL, so it reads low.
    last_commit_age_seconds: float | None = None
    retained_wal_bytes: int | None = None
    wal_status: str | None = None
    publication: str | None = None
    publication_exists: bool | None = None  # False: dropped by hand, nothing is captured
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
                   extract(epoch FROM r.flush_lag)::float8, r.application_name
            FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
            WHERE s.slot_name = %s AND s.database = current_database()
            """,
            (slot,),
        ).fetchone()
        has_schema = conn.execute("SELECT to_regclass('flux.cdc_progress') IS NOT NULL").fetchone()[0]
        version = schema_version(conn) if has_schema else None
        if version is not None and version > SCHEMA_VERSION:  # what a newer release records, this one may misread
            raise version_mismatch(version)
        if row is None and not has_schema:
            raise NotFoundError(
                f"Flux is not attached to database '{database}' (no slot '{slot}')",
                hint="Run `flux attach --tables ...` or `flux attach --all-tables` first.",
                slot=slot,
            )
        if row is not None:
            status.slot_exists = True
            (status.active, status.walsender_pid, status.confirmed_lsn, status.lag_bytes,
             status.retained_wal_bytes, status.wal_status, flush_lag, status.consumer_application) = row
            status.consumer_running = bool(status.active)
            named = consumer_of(status.consumer_application)
            if status.consumer_running and named:
                status.consumer_pid, status.consumer_host = named.pid, named.host
            status.lag_seconds = flush_lag
            status.standbys = [{"pid": pid, "host": host} for pid, host in standbys(conn, slot)]
        if has_schema:
            attached = conn.execute("SELECT publication_name FROM flux.attachments WHERE slot_name = %s", (slot,)).fetchone()
            if attached:
                status.publication = attached[0]
                status.publication_exists = bool(conn.execute(
                    "SELECT 1 FROM pg_publication WHERE pubname = %s", (attached[0],)).fetchone())
                status.published_tables = conn.execute(
                    "SELECT count(*) FROM pg_publication_tables WHERE pubname = %s", (attached[0],)
                ).fetchone()[0]
            progress = conn.execute(
                "SELECT mutations, commit_lsn::text, commit_time, updated_at,"
                " extract(epoch FROM now() - commit_time)::float8"
                " FROM flux.cdc_progress WHERE slot_name = %s",
                (slot,),
            ).fetchone()
            if progress:
                (status.mutations_recorded, status.last_commit_lsn, status.last_commit_time,
                 status.last_recorded_at, age) = progress
                status.last_commit_age_seconds = age
                behind = age if status.lag_bytes else None
                if status.lag_seconds is None and behind is not None:
                    # No walsender measure (no consumer, or none reported since the WAL it is behind on
                    # was written): the age of the newest recorded commit bounds the lag.
                    status.lag_seconds = behind
                    status.lag_is_upper_bound = True
        if status.lag_seconds is None and status.lag_bytes == 0:
            status.lag_seconds = 0.0
        if status.wal_status == "lost":  # it will never catch up: a time behind would read as if it might
            status.lag_seconds, status.lag_is_upper_bound = None, False
        status.warnings = slot_warnings(conn, slot)
        if version is not None and version < SCHEMA_VERSION:
            status.warnings.append(
                f"The flux schema is version {version}, older than this Flux's ({SCHEMA_VERSION}): an older Flux records here, "
                "or this one's engine has not started yet. A start of this Flux's engine or gateway, or `flux attach`, upgrades "
                "it; Flux processes of the older release then refuse to start again on it.")
        if status.publication_exists is False and status.slot_exists:  # without a slot, what it says below is the fix
            status.warnings.append(
                f"Publication '{status.publication}' does not exist (dropped by hand?): nothing is captured, and slot "
                f"'{slot}' cannot decode the changes made since, even once it exists again. `flux attach` again "
                "re-creates it and replaces the slot.")
        elif has_schema and status.publication is not None:
            status.warnings += capture_gaps(conn, slot, status.publication)
        if not status.slot_exists:
            elsewhere = conn.execute("SELECT database FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            status.warnings.append(
                f"Slot '{slot}' belongs to database {elsewhere[0]}, not {database}: nothing is being captured here (a copy "
                f"of an attached database?). `flux attach --slot NAME` with a name of this database's own starts capture."
                if elsewhere else f"Slot '{slot}' does not exist: nothing is being captured. Run `flux attach`.")
        return status


_GAPS_SHOWN = 10
# The publication's tables and their partitions, without locking them (partition_trees).
_PUBLISHED_TREES = partition_trees("SELECT r.oid FROM pg_publication_tables pt JOIN pg_namespace rn ON rn.nspname = pt.schemaname"
                                   " JOIN pg_class r ON r.relnamespace = rn.oid AND r.relname = pt.tablename WHERE pt.pubname = %s")


def _some(names: list[str]) -> str:
    """The first _GAPS_SHOWN of `names`, and how many more there are."""
    more = f" and {len(names) - _GAPS_SHOWN} more" if len(names) > _GAPS_SHOWN else ""
    return ", ".join(names[:_GAPS_SHOWN]) + more


def capture_gaps(conn: psycopg.Connection, slot: str, publication: str) -> list[str]:
    """What the attachment should capture and does not: tables that `--all-tables` left out (the
    engine re-checks every few seconds, but cannot take a table its role does not own), listed
    tables created again since attach (the same, for a table list), UNLOGGED
    tables and partitions in its scope, and captured tables or partitions whose old rows are
    logged by key only (identity not FULL)."""
    all_tables = conn.execute("SELECT all_tables FROM flux.attachments WHERE slot_name = %s", (slot,)).fetchone()
    warnings = []
    if all_tables and all_tables[0]:
        missing = conn.execute(
            """
            SELECT format('%%I.%%I', n.nspname, c.relname), pg_get_userbyid(c.relowner),
                   -- the engine's role is the one that attached: the publication's owner
                   pg_has_role((SELECT pubowner FROM pg_publication WHERE pubname = %s), c.relowner, 'USAGE')
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p'
              AND n.nspname <> ALL (%s) AND n.nspname NOT LIKE 'pg\\_%%' AND """ + NOT_AN_EXTENSIONS + """
              AND NOT EXISTS (SELECT 1 FROM pg_publication_tables pt
                              WHERE pt.pubname = %s AND pt.schemaname = n.nspname AND pt.tablename = c.relname)
            ORDER BY 1
            """,
            (publication, list(SYSTEM_SCHEMAS), publication),
        ).fetchall()
        if missing:
            listed = _some([f"{name} (owner {owner})" for name, owner, _ in missing])
            not_owned = [name for name, _, owned in missing if not owned]
            why = (" The role Flux attached as does not own "
                   + ("them" if len(not_owned) == len(missing) else f"{len(not_owned)} of them")
                   + ": make it the owner (ALTER TABLE ... OWNER TO ...), or attach as the owner.") if not_owned else \
                  " The engine adds new tables within seconds; run `flux attach --all-tables` if these stay."
            warnings.append(f"{len(missing)} table(s) are not captured, so their changes are not recorded: {listed}.{why}")
    if all_tables and not all_tables[0]:
        gone = listed_tables_not_captured(conn, slot, publication)
        if gone:
            listed = _some([str(t) for t in gone])
            warnings.append(
                f"{len(gone)} listed table(s) were created again since attach (dropped and re-created, or replaced by a "
                f"rename), so their changes are not recorded: {listed}. The engine captures them again within "
                "seconds if its role owns them and the publication; otherwise run `flux attach --tables ...` again.")
    # PostgreSQL writes no WAL for an UNLOGGED table, so nothing decodes its changes: a table
    # `--all-tables` would capture, or a partition of a captured table (neither of which
    # PostgreSQL stops from being UNLOGGED), loses every change without a word.
    unlogged = conn.execute(
        """
        SELECT format('%%I.%%I', n.nspname, c.relname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'u' AND (
            (%s AND NOT c.relispartition AND n.nspname <> ALL (%s) AND n.nspname NOT LIKE 'pg\\_%%')
            OR c.oid IN (""" + _PUBLISHED_TREES + """ SELECT relid FROM tree))
        ORDER BY 1
        """,
        (bool(all_tables and all_tables[0]), list(SYSTEM_SCHEMAS), publication),
    ).fetchall()
    if unlogged:
        listed = _some([name for (name,) in unlogged])
        warnings.append(f"{len(unlogged)} table(s) or partition(s) are UNLOGGED: PostgreSQL writes none of their changes to "
                        f"the WAL, so none are recorded: {listed}. `ALTER TABLE ... SET LOGGED` to capture them.")
    key_only = conn.execute(
        """
        """ + _PUBLISHED_TREES + """
        SELECT DISTINCT format('%%I.%%I', n.nspname, c.relname)
        FROM tree JOIN pg_class c ON c.oid = tree.relid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND c.relreplident <> 'f'
        ORDER BY 1
        """,
        (publication,),
    ).fetchall()
    if key_only:
        listed = _some([name for (name,) in key_only])
        warnings.append(f"{len(key_only)} captured table(s) are not REPLICA IDENTITY FULL, so their old rows are recorded "
                        f"by key only: {listed}. `flux attach` sets FULL (it needs to own them).")
    return warnings
