"""Attaching Flux to a PostgreSQL database Flux did not create, and detaching from it.

`attach()` checks the server (version, wal_level, role, free slots), then creates the `flux`
schema, a publication for the chosen tables (never the `flux` schema), REPLICA IDENTITY FULL
on those tables, and the pgoutput slot. Every step is idempotent: a second run changes
nothing. What it changed is recorded in `flux.replica_identity_changes`, so `detach()` restores
exactly that.

With `all_tables`, tables created later are captured too: by an event trigger when the role
is a superuser (in the creating transaction, so no write is missed), otherwise by the
engine's periodic `reconcile_new_tables()` (writes in the first seconds may be missed;
`attach` says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from flux.errors import ConfigError, NotFoundError, PreflightError, from_psycopg
from flux.store.queries import split_table_name
from flux.store.schema import SCHEMA, ensure_schema

log = logging.getLogger("flux.cdc")

MIN_SERVER_VERSION = 140000
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast", SCHEMA)
RETAINED_WAL_WARNING_BYTES = 1 << 30
EVENT_TRIGGER = "flux_capture_new_tables"


@dataclass(frozen=True)
class TableRef:
    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


@dataclass
class AttachResult:
    slot: str
    publication: str
    all_tables: bool
    tables: list[str]
    created: list[str] = field(default_factory=list)  # what this run created or changed
    replica_identity_changed: list[dict] = field(default_factory=list)  # table, previous, restored_by_detach
    warnings: list[str] = field(default_factory=list)

    @property
    def changed_anything(self) -> bool:
        return bool(self.created or self.replica_identity_changed)


@dataclass
class DetachResult:
    slot: str
    publication: str
    dropped: list[str] = field(default_factory=list)
    restored: list[dict] = field(default_factory=list)
    data_dropped: bool = False
    warnings: list[str] = field(default_factory=list)


def connect(dsn: str) -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="flux")
    except psycopg.Error as exc:
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
    """Raise PreflightError with the exact fix for the first requirement the server misses."""
    version_num, version = conn.execute("SELECT current_setting('server_version_num')::int, current_setting('server_version')").fetchone()
    require_server_version(version_num, version)
    wal_level = conn.execute("SHOW wal_level").fetchone()[0]
    if wal_level != "logical":
        raise PreflightError(
            f"wal_level is '{wal_level}', logical decoding needs 'logical'",
            hint="Run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL "
            "(e.g. `systemctl restart postgresql` or `pg_ctl restart -D <datadir>`). A reload is not enough.",
            wal_level=wal_level,
        )
    user, is_super, can_replicate = conn.execute(
        "SELECT current_user, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not (is_super or can_replicate):
        raise PreflightError(
            f"Role '{user}' may not use replication",
            hint=f'As a superuser run: ALTER ROLE "{user}" WITH REPLICATION;',
            role=user,
        )
    if not conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()[0]:
        raise PreflightError(
            f"Role '{user}' may not create schemas or publications in this database",
            hint=f'As the database owner run: GRANT CREATE ON DATABASE "<db>" TO "{user}";',
            role=user,
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


def check_ownership(conn: psycopg.Connection, tables: list[TableRef]) -> None:
    if not tables:
        return
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname, pg_get_userbyid(c.relowner)
        FROM unnest(%s::text[], %s::text[]) AS t(s, r)
        JOIN pg_namespace n ON n.nspname = t.s
        JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.r
        WHERE NOT pg_has_role(current_user, c.relowner, 'USAGE')
        """,
        ([t.schema for t in tables], [t.name for t in tables]),
    ).fetchall()
    if rows:
        listed = ", ".join(f"{s}.{r} (owner {o})" for s, r, o in rows[:10])
        owner = rows[0][2]
        raise PreflightError(
            f"Setting REPLICA IDENTITY and publishing needs table ownership; the current role does not own: {listed}",
            hint=f'Grant membership in the owning role (GRANT "{owner}" TO current_user) or attach as the owner.',
            tables=len(rows),
        )


# -- table selection ----------------------------------------------------------------------


def resolve_tables(conn: psycopg.Connection, names: list[str]) -> list[TableRef]:
    found: list[TableRef] = []
    for name in names:
        schema, table = split_table_name(name)
        row = conn.execute(
            """
            SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relname = %s AND c.relkind IN ('r', 'p')
              AND (n.nspname = %s OR (%s::text IS NULL AND n.oid = ANY (current_schemas(false)::regnamespace[])))
            ORDER BY array_position(current_schemas(false), n.nspname::name) LIMIT 1
            """,
            (table, schema, schema),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"No table {name!r} in this database", hint="Check the name; qualify it as SCHEMA.TABLE if needed.", table=name)
        if row[0] == SCHEMA:
            raise ConfigError("Flux never captures its own schema", hint="Choose tables outside the 'flux' schema.", table=name)
        found.append(TableRef(row[0], row[1]))
    return sorted(set(found), key=str)


def all_user_tables(conn: psycopg.Connection) -> list[TableRef]:
    """Ordinary and partitioned tables outside system schemas and `flux`; partitions come via their root."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p'
          AND n.nspname <> ALL (%s) AND n.nspname NOT LIKE 'pg\\_temp%%' AND n.nspname NOT LIKE 'pg\\_toast%%'
        ORDER BY 1, 2
        """,
        (list(SYSTEM_SCHEMAS),),
    ).fetchall()
    return [TableRef(s, t) for s, t in rows]


def published_tables(conn: psycopg.Connection, publication: str) -> list[TableRef]:
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_publication p
        JOIN pg_publication_rel pr ON pr.prpubid = p.oid
        JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE p.pubname = %s ORDER BY 1, 2
        """,
        (publication,),
    ).fetchall()
    return [TableRef(s, t) for s, t in rows]


def _with_partitions(conn: psycopg.Connection, table: TableRef) -> list[TableRef]:
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_partition_tree(%s::regclass) t
        JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p')
        """,
        (sql.Identifier(table.schema, table.name).as_string(conn),),
    ).fetchall()
    return [TableRef(s, t) for s, t in rows] or [table]


# -- attach / detach ----------------------------------------------------------------------


def _set_full_identity(conn: psycopg.Connection, slot: str, table: TableRef) -> dict | None:
    """REPLICA IDENTITY FULL on `table`, recording what it was. None when it already was FULL."""
    current, index = conn.execute(
        """
        SELECT c.relreplident, (SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                                WHERE i.indrelid = c.oid AND i.indisreplident)
        FROM pg_class c WHERE c.oid = %s::regclass
        """,
        (sql.Identifier(table.schema, table.name).as_string(conn),),
    ).fetchone()
    if current == "f":
        return None
    conn.execute(
        """
        INSERT INTO flux.replica_identity_changes (slot_name, schema_name, table_name, previous, previous_index)
        VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING
        """,
        (slot, table.schema, table.name, current, index),
    )
    conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(table.ident))
    return {"table": str(table), "previous": _identity_name(current, index), "restored_by_detach": True}


def _identity_name(code: str, index: str | None) -> str:
    return {"d": "DEFAULT", "n": "NOTHING", "f": "FULL", "i": f"USING INDEX {index}"}.get(code, code)


def attach(
    dsn: str,
    *,
    tables: list[str] | None = None,
    all_tables: bool = False,
    slot: str = "flux",
    publication: str = "flux",
) -> AttachResult:
    if bool(tables) == bool(all_tables):
        raise ConfigError("Choose what to capture", hint="Pass --tables a,b or --all-tables.")
    with connect(dsn) as conn:
        check_server(conn, slot=slot)
        chosen = all_user_tables(conn) if all_tables else resolve_tables(conn, tables or [])
        check_ownership(conn, chosen)
        result = AttachResult(slot=slot, publication=publication, all_tables=all_tables, tables=[str(t) for t in chosen])
        try:
            if ensure_schema(conn):
                result.created.append("schema flux")
            _sync_publication(conn, publication, chosen, result, slot=slot)
            for table in chosen:
                for part in _with_partitions(conn, table):
                    change = _set_full_identity(conn, slot, part)
                    if change:
                        result.replica_identity_changed.append(change)
            previous = conn.execute("SELECT publication_name, all_tables FROM flux.attachments WHERE slot_name = %s", (slot,)).fetchone()
            if previous != (publication, all_tables):
                conn.execute(
                    """
                    INSERT INTO flux.attachments (slot_name, publication_name, all_tables) VALUES (%s, %s, %s)
                    ON CONFLICT (slot_name) DO UPDATE SET publication_name = excluded.publication_name, all_tables = excluded.all_tables
                    """,
                    (slot, publication, all_tables),
                )
            if all_tables:
                _install_event_trigger(conn, result)
            if not conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone():
                # Created last: the slot's stream starts after the publication and identities exist.
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
                result.created.append(f"replication slot {slot}")
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Attach failed", slot=slot, publication=publication) from exc
        result.warnings += slot_warnings(conn, slot)
        return result


def _sync_publication(conn: psycopg.Connection, publication: str, chosen: list[TableRef], result: AttachResult, *, slot: str) -> None:
    exists = conn.execute("SELECT pubviaroot FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    if exists is None:
        if chosen:
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)").format(
                    sql.Identifier(publication), sql.SQL(", ").join(t.ident for t in chosen)
                )
            )
        else:
            conn.execute(sql.SQL("CREATE PUBLICATION {} WITH (publish_via_partition_root = true)").format(sql.Identifier(publication)))
        result.created.append(f"publication {publication} ({len(chosen)} tables)")
        return
    if not exists[0]:
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(sql.Identifier(publication)))
        result.created.append(f"publication {publication}: publish_via_partition_root = true")
    current = set(published_tables(conn, publication))
    wanted = set(chosen)
    for table in sorted(wanted - current, key=str):
        conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), table.ident))
        result.created.append(f"publication {publication}: added {table}")
    for table in sorted(current - wanted, key=str):
        conn.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(sql.Identifier(publication), table.ident))
        result.created.append(f"publication {publication}: removed {table}")
        _restore_identity(conn, slot, table, result_list=[])


_EVENT_FUNCTION = """
CREATE OR REPLACE FUNCTION flux.capture_new_table() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    obj record;
    att record;
    rel record;
BEGIN
    FOR obj IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE object_type IN ('table') LOOP
        SELECT c.oid, c.relispartition, c.relreplident, c.relpersistence, n.nspname, c.relname
          INTO rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = obj.objid;
        IF rel IS NULL OR rel.nspname IN ('flux', 'pg_catalog', 'information_schema') OR rel.relpersistence <> 'p' THEN
            CONTINUE;
        END IF;
        FOR att IN SELECT * FROM flux.attachments WHERE all_tables LOOP
            IF rel.relreplident <> 'f' THEN
                INSERT INTO flux.replica_identity_changes (slot_name, schema_name, table_name, previous)
                VALUES (att.slot_name, rel.nspname, rel.relname, rel.relreplident) ON CONFLICT DO NOTHING;
            END IF;
            IF NOT rel.relispartition AND NOT EXISTS (
                SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                WHERE p.pubname = att.publication_name AND pr.prrelid = rel.oid) THEN
                EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I.%I', att.publication_name, rel.nspname, rel.relname);
            END IF;
        END LOOP;
        IF rel.relreplident <> 'f' AND EXISTS (SELECT 1 FROM flux.attachments WHERE all_tables) THEN
            EXECUTE format('ALTER TABLE %I.%I REPLICA IDENTITY FULL', rel.nspname, rel.relname);
        END IF;
    END LOOP;
END
$fn$;
"""


def _install_event_trigger(conn: psycopg.Connection, result: AttachResult) -> None:
    if conn.execute("SELECT 1 FROM pg_event_trigger WHERE evtname = %s", (EVENT_TRIGGER,)).fetchone():
        return
    if not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
        result.warnings.append(
            "Not a superuser, so no event trigger: new tables are added by the running engine within about 10 s, "
            "and writes to a new table before then are not captured."
        )
        return
    conn.execute(_EVENT_FUNCTION)
    conn.execute(
        sql.SQL(
            "CREATE EVENT TRIGGER {} ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')"
            " EXECUTE FUNCTION flux.capture_new_table()"
        ).format(sql.Identifier(EVENT_TRIGGER))
    )
    result.created.append(f"event trigger {EVENT_TRIGGER} (captures tables created later)")


def reconcile_new_tables(dsn: str, *, slot: str) -> list[str]:
    """For an --all-tables attachment: publish tables that appeared since. Returns what it added."""
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT publication_name, all_tables FROM flux.attachments WHERE slot_name = %s", (slot,)
        ).fetchone() if conn.execute("SELECT to_regclass('flux.attachments')").fetchone()[0] else None
        if not row or not row[1]:
            return []
        publication = row[0]
        # Partitions attached after attach (ATTACH PARTITION) need FULL identity too.
        for schema, name in conn.execute(
            """
            SELECT n.nspname, c.relname FROM pg_publication p
            JOIN pg_publication_rel pr ON pr.prpubid = p.oid
            CROSS JOIN LATERAL pg_partition_tree(pr.prrelid) t
            JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE p.pubname = %s AND t.level > 0 AND c.relkind IN ('r', 'p') AND c.relreplident <> 'f'
            """,
            (publication,),
        ).fetchall():
            try:
                _set_full_identity(conn, slot, TableRef(schema, name))
            except psycopg.Error as exc:
                log.warning("cannot set REPLICA IDENTITY FULL on partition %s.%s: %s", schema, name, str(exc).strip().splitlines()[0])
        missing = sorted(set(all_user_tables(conn)) - set(published_tables(conn, publication)), key=str)
        added = []
        for table in missing:
            try:
                with conn.transaction():
                    for part in _with_partitions(conn, table):
                        _set_full_identity(conn, slot, part)
                    conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), table.ident))
                added.append(str(table))
            except psycopg.Error as exc:  # dropped meanwhile, or not ours: say so, try again next round
                log.warning("cannot capture new table %s yet: %s", table, str(exc).strip().splitlines()[0])
        return added


def _restore_identity(conn: psycopg.Connection, slot: str, table: TableRef, *, result_list: list[dict]) -> None:
    row = conn.execute(
        "SELECT previous, previous_index FROM flux.replica_identity_changes WHERE slot_name = %s AND schema_name = %s AND table_name = %s",
        (slot, table.schema, table.name),
    ).fetchone()
    if row is None:
        return
    previous, index = row
    exists = conn.execute("SELECT to_regclass(%s)", (sql.Identifier(table.schema, table.name).as_string(conn),)).fetchone()[0]
    if exists:
        clause = {
            "d": sql.SQL("DEFAULT"),
            "n": sql.SQL("NOTHING"),
            "f": sql.SQL("FULL"),
            "i": sql.SQL("USING INDEX {}").format(sql.Identifier(index or "")),
        }[previous]
        conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(table.ident, clause))
        result_list.append({"table": str(table), "restored": _identity_name(previous, index)})
    conn.execute(
        "DELETE FROM flux.replica_identity_changes WHERE slot_name = %s AND schema_name = %s AND table_name = %s",
        (slot, table.schema, table.name),
    )


def detach(dsn: str, *, slot: str = "flux", publication: str | None = None, drop_data: bool = False) -> DetachResult:
    with connect(dsn) as conn:
        has_schema = conn.execute("SELECT to_regclass('flux.attachments') IS NOT NULL").fetchone()[0]
        if publication is None and has_schema:
            row = conn.execute("SELECT publication_name FROM flux.attachments WHERE slot_name = %s", (slot,)).fetchone()
            publication = row[0] if row else None
        publication = publication or "flux"
        result = DetachResult(slot=slot, publication=publication)
        try:
            active = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            if active and active[0]:
                raise PreflightError(
                    f"A consumer is reading slot '{slot}' (pid {active[0]})",
                    hint="Stop `flux cdc run` (or `flux dev`) first, then detach.",
                    slot=slot,
                )
            if active:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                result.dropped.append(f"replication slot {slot}")
            if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone():
                conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(publication)))
                result.dropped.append(f"publication {publication}")
            if has_schema:
                for schema, table in conn.execute(
                    "SELECT schema_name, table_name FROM flux.replica_identity_changes WHERE slot_name = %s ORDER BY 1, 2", (slot,)
                ).fetchall():
                    _restore_identity(conn, slot, TableRef(schema, table), result_list=result.restored)
                conn.execute("DELETE FROM flux.attachments WHERE slot_name = %s", (slot,))
                conn.execute("DELETE FROM flux.cdc_progress WHERE slot_name = %s", (slot,))
                remaining = conn.execute("SELECT count(*) FROM flux.attachments WHERE all_tables").fetchone()[0]
                if not remaining and conn.execute("SELECT 1 FROM pg_event_trigger WHERE evtname = %s", (EVENT_TRIGGER,)).fetchone():
                    conn.execute(sql.SQL("DROP EVENT TRIGGER {}").format(sql.Identifier(EVENT_TRIGGER)))
                    result.dropped.append(f"event trigger {EVENT_TRIGGER}")
                if drop_data:
                    others = conn.execute("SELECT count(*) FROM flux.attachments").fetchone()[0]
                    if others:
                        result.warnings.append(f"Kept the flux schema: {others} other attachment(s) still use it.")
                    else:
                        conn.execute("DROP SCHEMA flux CASCADE")
                        result.data_dropped = True
                        result.dropped.append("schema flux (all recorded data)")
        except psycopg.Error as exc:
            raise from_psycopg(exc, "Detach failed", slot=slot) from exc
        return result


def slot_warnings(conn: psycopg.Connection, slot: str, *, retained_limit: int = RETAINED_WAL_WARNING_BYTES) -> list[str]:
    row = conn.execute(
        """
        SELECT active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, wal_status
        FROM pg_replication_slots WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if row is None:
        return []
    active, retained, wal_status = row
    warnings = []
    if not active:
        warnings.append(
            f"Slot '{slot}' has no consumer: PostgreSQL keeps all WAL from its position until one reads it. "
            "Run `flux cdc run` (or `flux dev`), or `flux detach` if Flux is no longer wanted."
        )
    if retained is not None and retained >= retained_limit:
        warnings.append(f"Slot '{slot}' retains {_human_bytes(retained)} of WAL; the disk fills if this keeps growing.")
    if wal_status in ("unreserved", "lost"):
        warnings.append(f"Slot '{slot}' WAL status is '{wal_status}': changes may be lost (max_slot_wal_keep_size).")
    return warnings


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
