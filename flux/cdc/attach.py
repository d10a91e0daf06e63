"""Attaching Flux to a PostgreSQL database Flux did not create, and detaching from it.

`attach()` checks the server (version, wal_level, role, free slots), then, in one transaction,
creates the `flux` schema, a publication for the chosen tables (never the `flux` schema) and
REPLICA IDENTITY FULL on them; then the pgoutput slot. Every step is idempotent: a second run
changes nothing. Replica identities it changed are recorded in `flux.replica_identity_changes`,
by table oid (which a rename keeps), so `detach()` restores exactly those.

Tables created later are handled by `flux.cdc.autocapture`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from flux.cdc import autocapture
from flux.cdc.locks import (
    DEFAULT_LOCK_TIMEOUT_S,
    BlockerWatch,
    LockBudget,
    LockRoom,
    bound_lock_waits,
    in_batches,
    lock_room,
    lock_up_front,
    own_waits,
    refuse_too_many_locks,
    with_lock_retries,
)
from flux.cdc.roles import check_detach_role, check_role, role_named_flux_warnings
from flux.cdc.publication import (
    SCHEMA_PUBLICATION_VERSION,
    TableRef,
    all_user_tables,
    captured_tables,
    not_full,
    partitions_of,
    publication_locks,
    published_tables,
    record_listed_tables,
    recorded_tables,
    rekey_a_restored_copys_records,
    restorable,
    resolve_tables,
    restore_identities,
    set_full_identities,
    still_there,
    sync_publication,
    user_schemas,
)
from flux.cdc.stream import consumer_of
from flux.errors import ConfigError, NotFoundError, PreflightError, from_psycopg
from flux.pg.pooler import behind_pooler
from flux.store.schema import (
    SCHEMA,
    SCHEMA_VERSION,
    TABLES,
    claim_relids,
    ensure_schema,
    schema_version,
    tables_not_fluxs,
    version_mismatch,
)

log = logging.getLogger("flux.cdc")

MIN_SERVER_VERSION = 140000
RETAINED_WAL_WARNING_BYTES = 1 << 30
NO_TRIGGER_WARNING = (
    "Not a superuser, so no event trigger: the running engine captures tables created later within "
    "about 10 s if its role owns them and the publication (this role, or a member of it; otherwise run "
    "`flux attach` again after creating tables), and writes to such a table before then are not captured."
)


@dataclass
class AttachResult:
    slot: str
    publication: str
    all_tables: bool
    tables: list[str]
    created: list[str] = field(default_factory=list)  # what this run created or changed
    replica_identity_changed: list[dict] = field(default_factory=list)  # table, previous, restored_by_detach
    replica_identity_restored: list[dict] = field(default_factory=list)  # table, restored: tables no longer captured
    warnings: list[str] = field(default_factory=list)

    @property
    def changed_anything(self) -> bool:
        return bool(self.created or self.replica_identity_changed or self.replica_identity_restored)


@dataclass
class DetachResult:
    slot: str
    publication: str
    dropped: list[str] = field(default_factory=list)
    restored: list[dict] = field(default_factory=list)
    data_dropped: bool = False
    warnings: list[str] = field(default_factory=list)


def connect(dsn: str) -> psycopg.Connection:
    conn = None
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="flux")
        # Through a pooler each statement may run on another server connection, which lacks what
        # psycopg prepared at a statement's fifth run (a lookup attach runs once per table).
        if behind_pooler(conn):
            conn.prepare_threshold = None
        return conn
    except psycopg.Error as exc:
        if conn is not None:
            conn.close()
        raise from_psycopg(exc, "Could not connect to the database", hint="Check the DSN, and that the server is running.") from exc


# -- checks -------------------------------------------------------------------------------


def require_server_version(version_num: int, version: str) -> None:
    if version_num < MIN_SERVER_VERSION:
        raise PreflightError(
            f"PostgreSQL 14 or newer is required, this server runs {version}",
            hint="pgoutput's 'messages' option, which carries the request id, appeared in PostgreSQL 14. Upgrade the server.",
            server_version=version,
        )


def check_server(conn: psycopg.Connection, *, slot: str) -> None:
    """Raise PreflightError with the exact fix for the first requirement the server misses (the
    role's are `check_role`'s)."""
    version_num, version = conn.execute("SELECT current_setting('server_version_num')::int, current_setting('server_version')").fetchone()
    require_server_version(version_num, version)
    standby, read_only, role = conn.execute(
        "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on', current_user").fetchone()
    if standby:
        raise PreflightError(
            "This server is a standby (in recovery), where nothing can be written",
            hint="Attach the primary: the flux schema, the publication and the tables' replica identities are written there.",
        )
    if read_only:  # autocommit: each statement's transaction starts as default_transaction_read_only says
        raise PreflightError(
            "Flux's session is read-only: default_transaction_read_only is on for its role or database",
            hint=f"If the database is to stay read-only for now, attach later. Otherwise, for Flux's role alone: ALTER ROLE "
                 f"{sql.Identifier(role).as_string(conn)} IN DATABASE {sql.Identifier(conn.info.dbname).as_string(conn)} "
                 "SET default_transaction_read_only = off;",
        )
    wal_level = conn.execute("SHOW wal_level").fetchone()[0]
    if wal_level != "logical":
        raise PreflightError(
            f"wal_level is '{wal_level}', logical decoding needs 'logical'",
            hint="Run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL "
            "(e.g. `systemctl restart postgresql` or `pg_ctl restart -D <datadir>`). A reload is not enough.",
            wal_level=wal_level,
        )
    exists = conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    if not exists:
        used, limit = conn.execute(
            "SELECT (SELECT count(*) FROM pg_replication_slots), current_setting('max_replication_slots')::int"
        ).fetchone()
        if used >= limit:
            inactive = [r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE NOT active").fetchall()]
            drop = f" or drop an unused one: SELECT pg_drop_replication_slot('{inactive[0]}');" if inactive else ""
            raise PreflightError(
                f"No free replication slot: {used} of max_replication_slots={limit} are in use",
                hint=f"Raise it (ALTER SYSTEM SET max_replication_slots = {limit + 4}; then restart PostgreSQL){drop}",
                slots_in_use=used,
                inactive_slots=", ".join(inactive) or None,
            )


# pgoutput publishes a partitioned table's changes under its own name (publish_via_partition_root,
# so that history follows the table rather than its partitions), and then leaves out a TRUNCATE of
# one of its partitions.
PARTITION_TRUNCATE_WARNING = (
    "{table} is partitioned: a TRUNCATE of one of its partitions is not recorded (PostgreSQL's pgoutput leaves it "
    "out); a TRUNCATE of {table} itself, and DELETEs, are."
)
PARTITIONS_TRUNCATE_WARNING = (
    "{count} captured tables are partitioned ({tables}): a TRUNCATE of one of their partitions is not recorded "
    "(PostgreSQL's pgoutput leaves it out); a TRUNCATE of the partitioned table itself, and DELETEs, are."
)
NAMED_IN_A_WARNING = 10  # tables a warning names, then how many more: a database may have thousands


def partition_truncate_warning(partitioned: list[TableRef]) -> list[str]:
    """One warning for all the partitioned tables captured, not one each."""
    if len(partitioned) <= 1:
        return [PARTITION_TRUNCATE_WARNING.format(table=table) for table in partitioned]
    named = ", ".join(map(str, partitioned[:NAMED_IN_A_WARNING]))
    more = f" and {len(partitioned) - NAMED_IN_A_WARNING} more" if len(partitioned) > NAMED_IN_A_WARNING else ""
    return [PARTITIONS_TRUNCATE_WARNING.format(count=len(partitioned), tables=named + more)]


def attach(
    dsn: str,
    *,
    tables: list[str] | None = None,
    all_tables: bool = False,
    slot: str = "flux",
    publication: str | None = None,  # None: the one this slot's attachment records, else "flux"
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    on_wait: Callable[[list[str]], None] | None = None,
) -> AttachResult:
    """`on_wait(lines)`: told which sessions the slot's creation waits for (it waits for every
    transaction running when it starts), after 2 s and whenever they change."""
    if tables and all_tables:  # "Choose what to capture" said to one who chose twice
        raise ConfigError("--tables and --all-tables exclude each other",
                          hint="Pass --tables a,b to capture those tables, or --all-tables for every table.")
    if not tables and not all_tables:
        raise ConfigError("Choose what to capture", hint="Pass --tables a,b or --all-tables.")
    with connect(dsn) as conn:
        own_waits(conn)
        check_server(conn, slot=slot)
        publication = _attached_publication(conn, slot, publication)
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        schema_mode = all_tables and superuser and conn.info.server_version >= SCHEMA_PUBLICATION_VERSION
        chosen = all_user_tables(conn, extensions=schema_mode) if all_tables else resolve_tables(conn, tables or [])
        check_role(conn, chosen)
        orphaned = _slot_lost_its_publication(conn, slot, publication)
        result = AttachResult(slot=slot, publication=publication, all_tables=all_tables, tables=[str(t) for t in chosen])
        try:
            # An older schema is upgraded outside the transaction below, so that its indexes are
            # built concurrently (the engine keeps writing); an upgrade stopped half-way is resumed.
            upgraded = schema_version(conn) is not None and ensure_schema(conn)
            budget = LockBudget(lock_timeout)
            room = lock_room(conn)
            staged = _prepare_in_batches(conn, result, chosen=chosen, schema_mode=schema_mode, room=room,
                                         lock_timeout=lock_timeout)

            def set_up() -> tuple[list[str], list[dict], list[dict], list[str]]:
                # One transaction: no instant where a table is half set up (e.g. moved from the
                # table list to a schema entry) and a write slips through uncaptured. Tried again
                # whole after a lock timeout: what a try collects is its own.
                created: list[str] = []
                identities: list[dict] = []
                restored: list[dict] = []
                warnings: list[str] = []
                with conn.transaction():
                    if ensure_schema(conn) or upgraded:
                        created.append("schema flux")
                    _check_names_are_flux(conn, slot, publication)
                    rekey_a_restored_copys_records(conn)
                    claim_relids(conn)  # a restored copy's log: the oids recorded from now on are this database's
                    bound_lock_waits(conn, lock_timeout)  # after the flux schema's own statements, which set theirs
                    autocapture.own_ddl(conn)
                    schemas = user_schemas(conn) if schema_mode else None
                    # A schema publication holds every table of its schemas, those created since `chosen` was read
                    # too (during the batches, or the lock tries: seconds): each is set FULL here with the rest.
                    publishing = all_user_tables(conn, extensions=True) if schema_mode else chosen
                    # Every table lock the try needs, before any change: the ALTERs below then wait for none.
                    parts = partitions_of(conn, publishing)
                    moved, to_restore = publication_locks(conn, publication, publishing, schemas=schemas, slot=slot)
                    to_full = not_full(conn, [p for ps in parts.values() for p in ps])
                    exclusive = to_full + to_restore
                    # ALTER PUBLICATION locks a partitioned table's partitions too, and a table leaving it its entry.
                    locked = set(exclusive) | {p for ps in partitions_of(conn, moved).values() for p in ps}
                    refuse_too_many_locks(room, len(locked) + len(moved), slot=slot, publication=publication,
                                          action=f"Attach {'stopped before its last step' if staged else 'changed nothing'}")
                    lock_up_front(conn, budget, exclusive, moved)
                    if schema_mode:  # and those created while this try waited for its locks (their ALTERs wait as it did)
                        schemas, parts = user_schemas(conn), partitions_of(conn, all_user_tables(conn, extensions=True))
                        publishing, to_full = list(parts), not_full(conn, [p for ps in parts.values() for p in ps])
                    else:  # locked now, those still there stay: ADD TABLE of one dropped since failed the whole attach
                        publishing = still_there(conn, publishing)
                    # Before the publication changes: the event trigger must not take a table left out
                    # (whose identity is restored below, an ALTER TABLE) for a listed one created again.
                    record_listed_tables(conn, slot, None if all_tables else chosen)
                    created += sync_publication(conn, publication, publishing, schemas=schemas, slot=slot,
                                                warnings=warnings, restored=restored)
                    identities += set_full_identities(conn, slot, to_full)
                    warnings += partition_truncate_warning([table for table in publishing if len(parts[table]) > 1])
                    _record_attachment(conn, slot, publication, all_tables)
                    if superuser:
                        trigger = autocapture.install_event_trigger(conn)
                        if trigger:
                            created.append(trigger)
                    elif all_tables:
                        warnings.append(NO_TRIGGER_WARNING)
                return created, identities, restored, warnings

            created, identities, restored, warnings = with_lock_retries(
                conn, set_up, action="Attach", command="flux attach", budget=budget,
                tables=lambda: _tables_touched(conn, slot, publication, chosen), slot=slot, publication=publication)
            result.created += created
            result.replica_identity_changed += identities
            result.replica_identity_restored += restored
            result.warnings += warnings
            existing = conn.execute("SELECT wal_status, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                                    (slot,)).fetchone()
            why = None
            if existing is not None and existing[0] == "lost":
                # Invalidated (max_slot_wal_keep_size): it can never be read again, and kept, attach
                # would say nothing changed while nothing is captured. What it lost is lost already.
                why = "PostgreSQL had invalidated it (max_slot_wal_keep_size)"
            elif existing is not None and orphaned:
                why = f"its publication {publication} had been dropped, and it cannot decode a change made meanwhile"
            if why:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            if existing is None or why:
                # Last: the slot's stream starts once the publication and identities exist.
                # Creating it waits for transactions already running to finish.
                with BlockerWatch(dsn, conn.info.backend_pid, on_wait) if on_wait else contextlib.nullcontext():
                    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
                result.created.append(f"replication slot {slot}" + (f" (replaces the old one: {why})" if why else ""))
                if why:  # `flux dev` and `flux serve --attach` show warnings only
                    result.warnings.append(f"Slot '{slot}' was replaced, as {why}: changes committed after {existing[1]} "
                                           "until now were not recorded. Capture starts over from now.")
                # A new slot starts where it is made: progress recorded for an earlier slot of that
                # name (a database restored on another server, a slot dropped by hand) would have
                # the engine start past changes to come.
                conn.execute("DELETE FROM flux.cdc_progress WHERE slot_name = %s", (slot,))
        except psycopg.Error as exc:
            hint = ("Nothing was changed. The attaching role needs REPLICATION, CREATE on the database and ownership of the "
                    "captured tables and their partitions (README, \"Least privilege\")." if exc.sqlstate == "42501" else None)
            raise from_psycopg(exc, "Attach failed", hint=hint, slot=slot, publication=publication) from exc
        result.warnings += slot_warnings(conn, slot) + role_named_flux_warnings(conn)
        return result


def _prepare_in_batches(conn: psycopg.Connection, result: AttachResult, *, chosen: list[TableRef], schema_mode: bool,
                        room: LockRoom, lock_timeout: float) -> bool:
    """Attach's work on more tables than a batch of the server's lock table allows (`LockRoom.batch`),
    done before its last transaction, batch by batch, each its own transaction and lock tries:
    REPLICA IDENTITY FULL on the tables and partitions not FULL yet, then the tables joining or
    leaving a table list's publication. A table joins it with its partitions FULL already, so none
    is published with a key-only identity, and the slot is still made last, once all is set up.
    What a batch did stays when a later one stops: `flux attach` again goes on from there, and
    `flux detach` undoes it (the attachment is recorded first). Nothing (False) when one batch holds it all."""
    slot, publication = result.slot, result.publication
    parts = partitions_of(conn, chosen)
    exclusive = not_full(conn, [p for ps in parts.values() for p in ps])
    published = set(published_tables(conn, publication))
    joining = [] if schema_mode else sorted(set(chosen) - published, key=str)
    # A schema publication's named tables leave it in the last transaction, which refuses if they are too many.
    leaving = [] if schema_mode else sorted(published - set(chosen), key=str)
    # A table leaving takes a lock for its publication entry too.
    weight = ({table: len(ps) for table, ps in parts.items()}
              | {table: 1 + len(ps) for table, ps in partitions_of(conn, leaving).items()})
    if len(exclusive) + sum(weight[t] for t in joining + leaving) <= room.batch:
        return False
    # A table joins or leaves the publication with all its partitions at once: one too big for that
    # is refused before the first batch.
    refuse_too_many_locks(room, max((weight[t] for t in joining + leaving), default=0), action="Attach changed nothing",
                          slot=slot, publication=publication)
    with conn.transaction():
        if ensure_schema(conn):
            result.created.append("schema flux")
        _check_names_are_flux(conn, slot, publication)
        rekey_a_restored_copys_records(conn)
        claim_relids(conn)
        record_listed_tables(conn, slot, None if result.all_tables else chosen)
        _record_attachment(conn, slot, publication, result.all_tables)
    steps: list[tuple[str, list[TableRef]]] = [("full", batch) for batch in in_batches(exclusive, lambda _: 1, room.batch)]
    steps += [("join", batch) for batch in in_batches(joining, weight.__getitem__, room.batch)]
    steps += [("leave", batch) for batch in in_batches(leaving, weight.__getitem__, room.batch)]
    target = set(published)
    counts = {"join": 0, "leave": 0}
    for number, (kind, batch) in enumerate(steps, start=1):
        target = target | set(batch) if kind == "join" else target - set(batch) if kind == "leave" else target
        budget = LockBudget(lock_timeout)

        def step(kind: str = kind, batch: list[TableRef] = batch, target: list[TableRef] = sorted(target, key=str),
                 budget: LockBudget = budget) -> tuple[list[str], list[dict], list[dict], list[str]]:
            created: list[str] = []
            identities: list[dict] = []
            restored: list[dict] = []
            warnings: list[str] = []
            with conn.transaction():
                bound_lock_waits(conn, lock_timeout)
                autocapture.own_ddl(conn)
                if kind == "full":
                    full = not_full(conn, batch)
                    lock_up_front(conn, budget, full)
                else:
                    # A schema the publication holds stays to the last transaction: dropped here, with the
                    # first batch, it left every table of it not joined yet uncaptured until its own batch.
                    moved, to_restore = publication_locks(conn, publication, target, schemas=None, slot=slot,
                                                          keep_schemas=True)
                    full = [] if kind == "leave" else not_full(conn, [p for ps in partitions_of(conn, batch).values() for p in ps])
                    lock_up_front(conn, budget, full + to_restore, moved)
                    target = still_there(conn, target)
                identities += set_full_identities(conn, slot, full)
                if kind != "full":
                    created += sync_publication(conn, publication, target, schemas=None, slot=slot, warnings=warnings,
                                                restored=restored, keep_schemas=True)
            return created, identities, restored, warnings

        created, identities, restored, warnings = with_lock_retries(
            conn, step, action=f"Attach's batch {number} of {len(steps)} (those before it are done and stay; `flux attach` "
            "again goes on from there)", command="flux attach", budget=budget, tables=lambda batch=batch: batch,
            slot=slot, publication=publication)
        # A table list of thousands: counted, not listed one line each.
        for line in created:
            if line.startswith(f"publication {publication}: added ") or line.startswith(f"publication {publication}: removed "):
                counts["join" if ": added " in line else "leave"] += 1
            elif line.startswith(f"publication {publication} ("):
                result.created.append(f"publication {publication}")
                counts["join"] += len(batch)
            else:
                result.created.append(line)
        result.replica_identity_changed += identities
        result.replica_identity_restored += restored
        result.warnings += warnings
    batches = {kind: sum(each == kind for each, _ in steps) for kind in counts}
    if counts["join"]:
        result.created.append(f"publication {publication}: added {counts['join']} tables, in {batches['join']} transactions")
    if counts["leave"]:
        result.created.append(f"publication {publication}: removed {counts['leave']} tables, in {batches['leave']} transactions")
    return True


def _tables_touched(conn: psycopg.Connection, slot: str, publication: str, chosen: list[TableRef]) -> list[TableRef]:
    """The tables attach or detach may lock: those chosen and published, their partitions, and those whose identity Flux changed."""
    tables = set(chosen) | set(captured_tables(conn, publication))
    if conn.execute("SELECT to_regclass('flux.replica_identity_changes') IS NOT NULL").fetchone()[0]:
        tables |= set(recorded_tables(conn, slot))
    # A table gone since is itself alone, which holders() then finds no lock on.
    return sorted({part for parts in partitions_of(conn, sorted(tables, key=str)).values() for part in parts}, key=str)


def _attached_publication(conn: psycopg.Connection, slot: str, asked: str | None) -> str:
    """The publication to attach through: the one the slot's attachment records (another would
    be left behind, published and never dropped), else `asked`, else "flux"."""
    recorded = conn.execute("SELECT to_regclass('flux.attachments') IS NOT NULL").fetchone()[0] and conn.execute(
        "SELECT publication_name FROM flux.attachments WHERE slot_name = %s", (slot,)).fetchone()
    if recorded and asked is not None and asked != recorded[0]:
        raise ConfigError(f"Slot {slot}'s attachment publishes through {recorded[0]}, not {asked}",
                          hint=f"Leave out --publication, or pass --publication {recorded[0]}; to publish through "
                               f"{asked} instead, `flux detach --slot {slot}` first.", slot=slot)
    return recorded[0] if recorded else asked or "flux"


def _slot_lost_its_publication(conn: psycopg.Connection, slot: str, publication: str) -> bool:
    """The attachment's slot exists and its publication does not (dropped by hand). pgoutput reads
    the publication as of each change, so that slot fails on every change made while it was
    missing, even once attach creates it again: the slot must be replaced, and not while read."""
    if not conn.execute("SELECT to_regclass('flux.attachments') IS NOT NULL").fetchone()[0]:
        return False
    row = conn.execute(
        "SELECT s.active FROM flux.attachments a JOIN pg_replication_slots s ON s.slot_name = a.slot_name"
        " AND s.database = current_database() WHERE a.slot_name = %s AND a.publication_name = %s"
        " AND NOT EXISTS (SELECT 1 FROM pg_publication p WHERE p.pubname = a.publication_name)",
        (slot, publication),
    ).fetchone()
    if row is not None and row[0]:
        raise PreflightError(
            f"Publication {publication} was dropped, and a consumer still reads slot {slot}",
            hint="Stop `flux cdc run` (or `flux dev`) first: it can record nothing more through that slot. Then run "
                 "`flux attach` again, which replaces the slot. Nothing was changed.", slot=slot, publication=publication)
    return row is not None


def _check_names_are_flux(conn: psycopg.Connection, slot: str, publication: str) -> None:
    """Refuse a slot or a publication of that name that Flux did not make here (another tool's:
    taking it over would change or drop what that tool reads), and a second attachment (one
    slot captures a database; two would record each change twice)."""
    other = conn.execute("SELECT slot_name FROM flux.attachments WHERE slot_name <> %s LIMIT 1", (slot,)).fetchone()
    if other is not None:
        raise PreflightError(
            f"This database is already attached, through slot {other[0]}",
            hint=f"One slot captures a database: run attach with --slot {other[0]}, or `flux detach --slot {other[0]}` first.",
            slot=slot,
        )
    mine = conn.execute("SELECT publication_name FROM flux.attachments WHERE slot_name = %s", (slot,)).fetchone()
    if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone() and (
            mine is None or mine[0] != publication):
        raise PreflightError(
            f"A publication named {publication} exists, and Flux did not make it",
            hint="Another tool may publish through it: pass --publication NAME to give Flux its own.",
            publication=publication,
        )
    existing = conn.execute("SELECT database, plugin FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    if existing is not None and (mine is None or existing != (conn.info.dbname, "pgoutput")):
        database, plugin = existing
        if database != conn.info.dbname and plugin == "pgoutput":  # most likely Flux's, of another database
            raise PreflightError(
                f"The server's replication slot {slot} is database {database}'s, not {conn.info.dbname}'s"
                " (slot names are per server)",
                hint="`flux attach --slot NAME` gives this database its own slot; `flux dev` and `flux serve`"
                     " always use slot flux, so serve this database with --no-engine beside `flux cdc run --slot NAME`.",
                slot=slot,
            )
        raise PreflightError(
            f"A replication slot named {slot} exists (database {database}, plugin {plugin}), and Flux did not make it here",
            hint="Another tool may read it: pass --slot NAME to give Flux its own.",
            slot=slot,
        )


def _record_attachment(conn: psycopg.Connection, slot: str, publication: str, all_tables: bool) -> None:
    previous = conn.execute("SELECT publication_name, all_tables FROM flux.attachments WHERE slot_name = %s", (slot,)).fetchone()
    if previous != (publication, all_tables):
        conn.execute(
            """
            INSERT INTO flux.attachments (slot_name, publication_name, all_tables) VALUES (%s, %s, %s)
            ON CONFLICT (slot_name) DO UPDATE SET publication_name = excluded.publication_name, all_tables = excluded.all_tables
            """,
            (slot, publication, all_tables),
        )


def detach(dsn: str, *, slot: str = "flux", publication: str | None = None, drop_data: bool = False,
           lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S) -> DetachResult:
    with connect(dsn) as conn:
        own_waits(conn)
        has_schema = conn.execute("SELECT to_regclass('flux.attachments') IS NOT NULL").fetchone()[0]
        version = schema_version(conn) if has_schema else None
        if version is not None and version > SCHEMA_VERSION:  # what a newer release set up, this one may undo only in part
            raise version_mismatch(version, doing="detaches")
        if drop_data and has_schema:
            _refuse_to_drop_tables_not_fluxs(conn)
        row = has_schema and conn.execute("SELECT publication_name FROM flux.attachments WHERE slot_name = %s", (slot,)).fetchone()
        if not row and drop_data and has_schema and not conn.execute("SELECT 1 FROM flux.attachments").fetchone():
            # Detached earlier with its data kept: nothing is captured any more, and --drop-data drops that data.
            # Its lock waits bounded as detach's are: behind a reader of what Flux recorded, the DROP would
            # queue the gateway's trace writes for as long as that reader ran.
            def drop_schema() -> None:
                with conn.transaction():
                    bound_lock_waits(conn, lock_timeout)
                    conn.execute("DROP SCHEMA flux CASCADE")

            try:
                with_lock_retries(conn, drop_schema, action="Detach", command="flux detach --drop-data",
                                  budget=LockBudget(lock_timeout), tables=_fluxs_tables, slot=slot)
            except psycopg.Error as exc:
                hint = "Run it as the role that ran `flux attach` (it owns the flux schema)." if exc.sqlstate == "42501" else None
                raise from_psycopg(exc, "Could not drop the flux schema", hint=hint) from exc
            return DetachResult(slot=slot, publication=publication or "", dropped=["schema flux (all recorded data)"],
                                data_dropped=True)
        if not row:  # never drop a slot or a publication Flux did not make
            hint = "`flux cdc status --slot NAME` shows an attachment; there is nothing of Flux's to detach here."
            left = conn.execute("SELECT plugin FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
                                (slot,)).fetchone()
            if left is not None:  # the flux schema dropped by hand, say: the slot still pins WAL
                hint = (f"A replication slot {slot} (plugin {left[0]}) exists here, which no attachment records (was the flux "
                        f"schema dropped?), and it keeps WAL until it is dropped. If it is Flux's and nothing reads it: "
                        f"SELECT pg_drop_replication_slot('{slot}'); and DROP PUBLICATION of its publication, by hand.")
            raise NotFoundError(f"No Flux attachment uses slot {slot} in this database", hint=hint, slot=slot)
        if publication is not None and publication != row[0]:
            raise ConfigError(f"Slot {slot}'s attachment publishes through {row[0]}, not {publication}",
                              hint=f"Leave out --publication, or pass --publication {row[0]}.")
        publication = row[0]
        result = DetachResult(slot=slot, publication=publication)
        try:
            # Slot names are per cluster: a copy of an attached database (CREATE DATABASE ... TEMPLATE)
            # holds the attachment's rows, but the slot is the original's, which must keep it.
            active = conn.execute("SELECT s.active_pid, r.application_name FROM pg_replication_slots s"
                                  " LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid"
                                  " WHERE s.slot_name = %s AND s.database = current_database()", (slot,)).fetchone()
            elsewhere = conn.execute("SELECT database FROM pg_replication_slots WHERE slot_name = %s"
                                     " AND database <> current_database()", (slot,)).fetchone()
            if elsewhere:
                result.warnings.append(f"Slot '{slot}' belongs to database {elsewhere[0]}, not this one (a copy of it?): "
                                       "left alone; this database's publication and identities are undone.")
            if active and active[0]:
                # active_pid is the server's walsender: name the engine's own pid and host, as status does.
                engine = consumer_of(active[1])
                who = (f"A Flux engine (pid {engine.pid} on {engine.host})" if engine
                       else f"A consumer ({active[1] or 'unnamed'}, served by walsender pid {active[0]})")
                raise PreflightError(
                    f"{who} is reading slot '{slot}'",
                    hint="Stop `flux cdc run` (or `flux dev`) first, then detach.",
                    slot=slot,
                )

            budget = LockBudget(lock_timeout)
            if has_schema:
                ensure_schema(conn)  # an older one is upgraded first: detach reads the records as this version keeps them
                with conn.transaction():
                    rekey_a_restored_copys_records(conn)
                check_detach_role(conn, restorable(conn, slot))
                _restore_in_batches(conn, result, lock_timeout=lock_timeout)

            def take_down() -> DetachResult:
                # All or nothing: a role refused one step (it does not own the publication or a table, or
                # may not replicate) leaves the attachment whole, rather than without its slot.
                done = DetachResult(slot=slot, publication=publication, dropped=list(result.dropped),
                                    restored=list(result.restored), warnings=list(result.warnings))
                with conn.transaction():
                    bound_lock_waits(conn, lock_timeout)
                    autocapture.own_ddl(conn)
                    # The tables whose identity is restored, all before the first ALTER (DROP PUBLICATION locks no
                    # table; it takes a lock for each table it names, not waited for: `_restore_in_batches`).
                    lock_up_front(conn, budget, restorable(conn, slot) if has_schema else [])
                    if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone():
                        conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(publication)))
                        done.dropped.append(f"publication {publication}")
                    if has_schema:
                        _forget_attachment(conn, slot, done, drop_data=drop_data)
                    if active:
                        # Last: dropping a slot is not undone by a rollback, so nothing may fail after it.
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                        done.dropped.insert(0, f"replication slot {slot}")
                return done

            # --drop-data drops the flux schema in the same transaction: a reader of it holds detach up too.
            result = with_lock_retries(conn, take_down, action="Detach", command="flux detach", budget=budget,
                                       tables=lambda: _tables_touched(conn, slot, publication, [])
                                       + (_fluxs_tables() if drop_data else []), slot=slot, publication=publication)
        except psycopg.Error as exc:
            hint = ("Run `flux detach` as the role that ran `flux attach` (it owns the publication, the flux schema and, "
                    "through its owner, the tables); nothing was changed." if exc.sqlstate == "42501" else None)
            raise from_psycopg(exc, "Detach failed", hint=hint, slot=slot) from exc
        return result


def _restore_in_batches(conn: psycopg.Connection, result: DetachResult, *, lock_timeout: float) -> None:
    """Detach's work, when its one transaction would take more locks than a batch of the server's
    lock table allows (`LockRoom.batch`): a table list's publication let go of its tables batch by
    batch (DROP PUBLICATION takes a lock for each table it names), each batch's identities restored
    in the same transaction, so that no table is still published once it is not FULL; then the
    publication dropped, and the other identities restored batch by batch; each batch its own
    transaction and lock tries. The last transaction (forget the attachment, drop the slot) follows
    as before. When a batch stops, what was done stays: `flux detach` again goes on from there (the
    slot, kept until then, captures only what its publication still holds). Nothing when one batch
    holds it all."""
    slot, publication = result.slot, result.publication
    room = lock_room(conn)
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone() is not None
    named = published_tables(conn, publication) if exists else []
    parts = partitions_of(conn, named)
    weight = {table: 2 + len(ps) for table, ps in parts.items()}  # its lock and its publication entry's, its partitions'
    if len(restorable(conn, slot)) + sum(weight.values()) <= room.batch:
        return
    # A table leaves the publication with all its partitions at once: one too big for that is refused first.
    refuse_too_many_locks(room, max(weight.values(), default=0), action="Detach changed nothing", slot=slot,
                          publication=publication)
    with conn.transaction():
        record_listed_tables(conn, slot, None)  # first: the event trigger would publish a listed table again at its ALTER
    leaving = in_batches(named, weight.__getitem__, room.batch)
    # A partition the list also names by itself is published until the last batch naming it, or its table, is done.
    last = {part: number for number, batch in enumerate(leaving, start=1) for table in batch for part in parts[table]}
    for number, batch in enumerate(leaving, start=1):
        _restore_batch(conn, result, batch, parts=[p for t in batch for p in parts[t] if last[p] == number],
                       lock_timeout=lock_timeout, action=f"Detach's batch {number} of {len(leaving)}")
    if exists:
        with conn.transaction():
            conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(publication)))
        result.dropped.append(f"publication {publication}")
    batches = in_batches(restorable(conn, slot), lambda _: 1, room.batch)
    for number, batch in enumerate(batches, start=1):
        _restore_batch(conn, result, [], parts=batch, lock_timeout=lock_timeout,
                       action=f"Detach's batch {number} of {len(batches)} restoring identities")


def _restore_batch(conn: psycopg.Connection, result: DetachResult, leaving: list[TableRef], *, parts: list[TableRef],
                   lock_timeout: float, action: str) -> None:
    """One of `_restore_in_batches`' transactions: `leaving` out of the publication, `parts` restored."""
    slot, publication = result.slot, result.publication
    budget = LockBudget(lock_timeout)

    def step() -> tuple[list[dict], list[str]]:
        restored: list[dict] = []
        warnings: list[str] = []
        with conn.transaction():
            bound_lock_waits(conn, lock_timeout)
            autocapture.own_ddl(conn)
            todo = restorable(conn, slot, parts)
            lock_up_front(conn, budget, todo, leaving)
            present = still_there(conn, leaving)  # locked now; one dropped since has left the publication already
            if present:
                conn.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                    sql.Identifier(publication), sql.SQL(", ").join(t.ident for t in present)))
            restore_identities(conn, slot, todo, result_list=restored, warnings=warnings)
        return restored, warnings

    restored, warnings = with_lock_retries(
        conn, step, action=f"{action} (those before it are done and stay; `flux detach` again goes on from there)",
        command="flux detach", budget=budget, tables=lambda: leaving + parts, slot=slot, publication=publication)
    result.restored += restored
    result.warnings += warnings


def _fluxs_tables() -> list[TableRef]:
    return [TableRef(SCHEMA, table) for table in TABLES]


def _refuse_to_drop_tables_not_fluxs(conn: psycopg.Connection) -> None:
    """DROP SCHEMA flux CASCADE would drop an application's tables made there too (by a role named
    flux, whose "$user" search_path puts them there), which no one asked for."""
    foreign = tables_not_fluxs(conn)
    if foreign:
        moves = " ".join(f"ALTER TABLE {name} SET SCHEMA public;" for name in foreign[:10])
        raise PreflightError(
            f"The flux schema holds {len(foreign)} table(s) Flux did not make, which --drop-data would drop with it: "
            + ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""),
            hint=f"Move them out first ({moves}), or drop them yourself, then run it again. Nothing was changed.",
        )


def _forget_attachment(conn: psycopg.Connection, slot: str, result: DetachResult, *, drop_data: bool) -> None:
    """The flux schema's part of detach: identities restored, the attachment forgotten, its data
    dropped with `drop_data` when no other attachment uses it."""
    record_listed_tables(conn, slot, None)  # first: restoring an identity below is an ALTER TABLE the trigger sees
    restore_identities(conn, slot, recorded_tables(conn, slot), result_list=result.restored, warnings=result.warnings)
    conn.execute("DELETE FROM flux.replica_identity_changes WHERE slot_name = %s", (slot,))  # and those of tables dropped
    conn.execute("DELETE FROM flux.attachments WHERE slot_name = %s", (slot,))
    conn.execute("DELETE FROM flux.cdc_progress WHERE slot_name = %s", (slot,))
    remaining = conn.execute("SELECT count(*) FROM flux.attachments").fetchone()[0]
    if not remaining and autocapture.drop_event_trigger(conn):
        result.dropped.append(f"event trigger {autocapture.EVENT_TRIGGER}")
    if drop_data:
        if remaining:
            result.warnings.append(f"Kept the flux schema: {remaining} other attachment(s) still use it.")
        else:
            conn.execute("DROP SCHEMA flux CASCADE")
            result.data_dropped = True
            result.dropped.append("schema flux (all recorded data)")


def slot_warnings(conn: psycopg.Connection, slot: str, *, retained_limit: int = RETAINED_WAL_WARNING_BYTES) -> list[str]:
    row = conn.execute(
        """
        SELECT s.active, pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, s.wal_status, r.sync_state,
               current_setting('synchronous_standby_names')
        FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
        WHERE s.slot_name = %s AND s.database = current_database()
        """,
        (slot,),
    ).fetchone()
    if row is None:
        return []
    active, retained, wal_status, sync_state, standby_names = row
    if wal_status == "lost":
        return [f"Slot '{slot}' was invalidated: PostgreSQL removed WAL it still needed (max_slot_wal_keep_size), so "
                "changes since the engine last kept up were not recorded, and none are now. `flux attach` again (or "
                "`flux detach` then `flux attach`) starts over with a new slot."]
    warnings = []
    if not active:
        warnings.append(
            f"Slot '{slot}' has no consumer: PostgreSQL keeps WAL from its position until one reads it. "
            "Run `flux cdc run` (or `flux dev`), or `flux detach` if Flux is no longer wanted."
        )
    if retained is not None and retained >= retained_limit:
        warnings.append(f"Slot '{slot}' retains {human_bytes(retained)} of WAL; the disk fills if this keeps growing.")
    if sync_state is not None and sync_state != "async":
        warnings.append(f"PostgreSQL counts Flux's engine as a synchronous standby (synchronous_standby_names = "
                        f"'{standby_names}'), so every commit here waits until Flux has recorded it. Name your standbys "
                        "in synchronous_standby_names instead of '*'; Flux's connection is named 'flux-cdc ...'.")
    if wal_status == "unreserved":
        warnings.append(f"Slot '{slot}' WAL status is 'unreserved': past max_slot_wal_keep_size, changes will be lost "
                        "unless the engine catches up.")
    return warnings


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
