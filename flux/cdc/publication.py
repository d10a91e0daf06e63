"""The database objects capture is made of: which tables, the publication, replica identities.

Small idempotent operations on one connection, used by `attach`, `detach` and
`autocapture`. They do not check prerequisites (that is `attach.check_server`) and do not
create the slot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import psycopg
from psycopg import sql

from flux.errors import ConfigError, NotFoundError
from flux.store.names import split_table_name
from flux.store.schema import SCHEMA, relids_from

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast", SCHEMA)
# FOR TABLES IN SCHEMA (PostgreSQL 15+) publishes tables from the moment they exist,
# rows of CREATE TABLE AS included; it needs a superuser.
SCHEMA_PUBLICATION_VERSION = 150000


@dataclass(frozen=True)
class TableRef:
    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


def resolve_tables(conn: psycopg.Connection, names: list[str]) -> list[TableRef]:
    found: list[TableRef] = []
    for name in names:
        schema, table = split_table_name(name)
        row = conn.execute(
            """
            SELECT n.nspname, c.relname, c.relpersistence FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
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
        if row[2] != "p":
            ident = sql.Identifier(row[0], row[1]).as_string(conn)
            raise ConfigError(
                f"{row[0]}.{row[1]} is {'UNLOGGED' if row[2] == 'u' else 'TEMPORARY'}: PostgreSQL writes none of its changes "
                "to the WAL, so they cannot be captured",
                hint=f"ALTER TABLE {ident} SET LOGGED, or leave it out of --tables." if row[2] == "u"
                else "Leave it out of --tables.",
                table=name,
            )
        found.append(TableRef(row[0], row[1]))
    return sorted(set(found), key=str)


# An extension's own table (PostGIS's spatial_ref_sys): the extension's, not the application's,
# and owned by whoever installed it (often a superuser), so an attaching role cannot capture it.
NOT_AN_EXTENSIONS = ("NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass"
                     " AND d.objid = c.oid AND d.deptype = 'e')")


def all_user_tables(conn: psycopg.Connection, *, extensions: bool = False) -> list[TableRef]:
    """Ordinary and partitioned tables outside system schemas and `flux`, and without `extensions`
    not an extension's (a schema publication holds those anyway); partitions come via their root."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p'
          AND n.nspname <> ALL (%s) AND n.nspname NOT LIKE 'pg\\_temp%%' AND n.nspname NOT LIKE 'pg\\_toast%%'
          AND (%s OR """ + NOT_AN_EXTENSIONS + """)
        ORDER BY 1, 2
        """,
        (list(SYSTEM_SCHEMAS), extensions),
    ).fetchall()
    return [TableRef(s, t) for s, t in rows]


def published_tables(conn: psycopg.Connection, publication: str) -> list[TableRef]:
    """Tables named in the publication one by one (not those published through a schema)."""
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


def _listed_key(slot: str) -> str:
    return f"listed_tables:{slot}"


def record_listed_tables(conn: psycopg.Connection, slot: str, tables: list[TableRef] | None) -> None:
    """Remember, in `flux.meta`, the tables an attachment with a table list captures (None: it
    has none). A publication holds a table by oid, so one dropped and created again, or replaced
    by a rename (an online schema change's swap), would drop out of capture without a word;
    by the names the user gave, `listed_tables_not_captured` finds it again."""
    if tables is None:
        conn.execute("DELETE FROM flux.meta WHERE key = %s", (_listed_key(slot),))
        return
    conn.execute(
        "INSERT INTO flux.meta (key, value) VALUES (%s, %s::jsonb) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        (_listed_key(slot), json.dumps([[t.schema, t.name] for t in tables])),
    )


def listed_tables_not_captured(conn: psycopg.Connection, slot: str, publication: str) -> list[TableRef]:
    """Tables of the attachment's list that exist but are not in its publication: created again
    (or renamed into place) since attach."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM flux.meta m CROSS JOIN LATERAL jsonb_array_elements(m.value) e
        JOIN pg_namespace n ON n.nspname = e->>0 JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = e->>1
        WHERE m.key = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p'
          AND NOT EXISTS (SELECT 1 FROM pg_publication_tables pt
                          WHERE pt.pubname = %s AND pt.schemaname = n.nspname AND pt.tablename = c.relname)
        ORDER BY 1, 2
        """,
        (_listed_key(slot), publication),
    ).fetchall()
    return [TableRef(s, t) for s, t in rows]


def not_owned(conn: psycopg.Connection, tables: list[TableRef], *, partitions: bool = True) -> list[tuple[str, str, str]]:
    """(schema, table, owner) of each of `tables`, and with `partitions` of their partitions (which
    attach sets FULL too), that the current role neither owns nor is a member of the owner of."""
    if not tables:
        return []
    return conn.execute(
        partition_trees("SELECT r.oid FROM unnest(%s::text[], %s::text[]) AS t(s, r) JOIN pg_namespace rn ON rn.nspname = t.s"
                        " JOIN pg_class r ON r.relnamespace = rn.oid AND r.relname = t.r") + """
        SELECT DISTINCT n.nspname, c.relname, pg_get_userbyid(c.relowner)
        FROM tree JOIN pg_class c ON c.oid = tree.relid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT pg_has_role(current_user, c.relowner, 'USAGE') AND (%s OR tree.level = 0)
        ORDER BY 1, 2
        """,
        ([t.schema for t in tables], [t.name for t in tables], partitions),
    ).fetchall()


def partition_trees(roots: str) -> str:
    """SQL: `WITH RECURSIVE tree(root, relid, level)`, each relation whose oid the query `roots`
    gives and its partitions at every level. Read in pg_inherits, which locks nothing:
    pg_partition_tree() takes an ACCESS SHARE lock on every partition, held to the end of the
    transaction (an entry of the server's lock table each, flux.cdc.locks.LockRoom), and waits
    for one that another session holds ACCESS EXCLUSIVE."""
    return ("WITH RECURSIVE tree(root, relid, level) AS (SELECT r.oid, r.oid, 0 FROM (" + roots + ") AS r(oid)"
            " UNION ALL SELECT tree.root, i.inhrelid, tree.level + 1 FROM tree JOIN pg_inherits i ON i.inhparent = tree.relid"
            " JOIN pg_class p ON p.oid = i.inhrelid WHERE p.relispartition) ")


def with_partitions(conn: psycopg.Connection, table: TableRef) -> list[TableRef]:
    """`table` and its partitions, at every level, the table first."""
    rows = conn.execute(
        partition_trees("SELECT %s::regclass::oid") + """
        SELECT n.nspname, c.relname FROM tree
        JOIN pg_class c ON c.oid = tree.relid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p')
        ORDER BY tree.level, 1, 2
        """,
        (sql.Identifier(table.schema, table.name).as_string(conn),),
    ).fetchall()
    return [TableRef(s, t) for s, t in rows] or [table]


def partitions_of(conn: psycopg.Connection, tables: list[TableRef]) -> dict[TableRef, list[TableRef]]:
    """`with_partitions` of each of `tables`, in one round trip (a database may have thousands); a
    table that does not exist has itself alone."""
    found: dict[TableRef, list[TableRef]] = {}
    if tables:
        for root_schema, root_name, schema, name in conn.execute(
            partition_trees("SELECT to_regclass(name) FROM unnest(%s::text[]) AS name WHERE to_regclass(name) IS NOT NULL") + """
            SELECT rn.nspname, r.relname, n.nspname, c.relname FROM tree
            JOIN pg_class r ON r.oid = tree.root JOIN pg_namespace rn ON rn.oid = r.relnamespace
            JOIN pg_class c ON c.oid = tree.relid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p')
            ORDER BY 1, 2, tree.level, 3, 4
            """,
            ([sql.Identifier(t.schema, t.name).as_string(conn) for t in tables],),
        ).fetchall():
            found.setdefault(TableRef(root_schema, root_name), []).append(TableRef(schema, name))
    return {table: found.get(table) or [table] for table in tables}


def user_schemas(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        """
        SELECT nspname FROM pg_namespace
        WHERE nspname <> ALL (%s) AND nspname NOT LIKE 'pg\\_%%' ORDER BY 1
        """,
        (list(SYSTEM_SCHEMAS),),
    ).fetchall()
    return [r[0] for r in rows]


def published_schemas(conn: psycopg.Connection, publication: str) -> list[str]:
    if conn.info.server_version < SCHEMA_PUBLICATION_VERSION:
        return []
    rows = conn.execute(
        """
        SELECT n.nspname FROM pg_publication p JOIN pg_publication_namespace pn ON pn.pnpubid = p.oid
        JOIN pg_namespace n ON n.oid = pn.pnnspid WHERE p.pubname = %s ORDER BY 1
        """,
        (publication,),
    ).fetchall()
    return [r[0] for r in rows]


def set_full_identity(conn: psycopg.Connection, slot: str, table: TableRef) -> dict | None:
    """REPLICA IDENTITY FULL on `table`, recording what it was. None when it already was FULL."""
    return (set_full_identities(conn, slot, [table]) or [None])[0]


# By the table's oid, which a rename or SET SCHEMA keeps: by name, detach did not find a table renamed
# while attached, and left it FULL. Not FULL although recorded: changed by hand since Flux set FULL;
# detach restores that, the last choice made.
_RECORD = """
INSERT INTO flux.replica_identity_changes (slot_name, relid, schema_name, table_name, previous, previous_index)
SELECT %s, * FROM unnest(%s::oid[], %s::text[], %s::text[], %s::text[], %s::text[])
ON CONFLICT (slot_name, relid) DO UPDATE
SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name, previous = EXCLUDED.previous,
    previous_index = EXCLUDED.previous_index, changed_at = now()
"""

# One statement for all the ALTERs: while they run, the transaction holds every one of its tables
# ACCESS EXCLUSIVE, and a round trip each made that seconds for a few thousand tables.
_FULL_IN_TURN = """
DO $flux$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT e->>0 AS schema_name, e->>1 AS table_name
             FROM jsonb_array_elements(current_setting('flux.full_list')::jsonb) WITH ORDINALITY AS l(e, i) ORDER BY i LOOP
        EXECUTE format('ALTER TABLE %I.%I REPLICA IDENTITY FULL', t.schema_name, t.table_name);
    END LOOP;
END
$flux$
"""


def set_full_identities(conn: psycopg.Connection, slot: str, tables: list[TableRef]) -> list[dict]:
    """REPLICA IDENTITY FULL on each of `tables`, recording what it was, in a few round trips whatever
    their number; the changes made, in the order of `tables` (one FULL already is left out)."""
    tables = list(dict.fromkeys(tables))  # a partition listed itself and under its table: its record inserted once
    if not tables:
        return []
    rows = conn.execute(
        """
        SELECT c.oid, t.s, t.r, c.relreplident, (SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                                                 WHERE i.indrelid = c.oid AND i.indisreplident)
        FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS t(s, r, i)
        JOIN pg_namespace n ON n.nspname = t.s JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.r
        WHERE c.relkind IN ('r', 'p') AND c.relreplident <> 'f'
        ORDER BY t.i
        """,
        ([t.schema for t in tables], [t.name for t in tables]),
    ).fetchall()
    if not rows:
        return []
    forget_dropped(conn, slot)
    conn.execute(_RECORD, (slot, *([row[i] for row in rows] for i in range(5))))
    conn.execute("SELECT set_config('flux.full_list', %s, true)", (json.dumps([[r[1], r[2]] for r in rows]),))
    conn.execute(_FULL_IN_TURN)
    return [{"table": str(TableRef(schema, name)), "previous": identity_name(current, index), "restored_by_detach": True}
            for _, schema, name, current, index in rows]


def forget_dropped(conn: psycopg.Connection, slot: str) -> None:
    """Forget the records of tables dropped since: nothing is left to restore, and PostgreSQL may give
    their oid to a new table (once its 32-bit counter comes round), which detach would then alter."""
    conn.execute("DELETE FROM flux.replica_identity_changes r WHERE r.slot_name = %s AND NOT EXISTS"
                 " (SELECT 1 FROM pg_class c WHERE c.oid = r.relid AND c.relkind IN ('r', 'p'))", (slot,))


def rekey_a_restored_copys_records(conn: psycopg.Connection) -> None:
    """In a database restored from a dump, the records' oids are the original database's: other
    tables here, or none, which detach would alter or miss. Their names are then what is left to go
    by, as before v8: each record is moved to the oid of the table its names name now (of a slot's
    records naming one table, the newest), the others forgotten. Nothing where the log's oids are this
    database's (`relids_from`: a copy by CREATE DATABASE ... TEMPLATE keeps them). Before `claim_relids`."""
    if relids_from(conn) is not None:
        return
    conn.execute(
        """
        WITH recorded AS (DELETE FROM flux.replica_identity_changes RETURNING *)
        INSERT INTO flux.replica_identity_changes (slot_name, relid, schema_name, table_name, previous, previous_index, changed_at)
        SELECT DISTINCT ON (r.slot_name, c.oid) r.slot_name, c.oid, r.schema_name, r.table_name, r.previous, r.previous_index,
               r.changed_at
        FROM recorded r JOIN pg_namespace n ON n.nspname = r.schema_name
        JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = r.table_name AND c.relkind IN ('r', 'p')
        ORDER BY r.slot_name, c.oid, r.changed_at DESC
        """
    )


def recorded_tables(conn: psycopg.Connection, slot: str, *, schemas: list[str] | None = None) -> list[TableRef]:
    """The tables whose identity Flux changed, by the names they have now (those in `schemas`, or all);
    one dropped since is not there."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM flux.replica_identity_changes r
        JOIN pg_class c ON c.oid = r.relid AND c.relkind IN ('r', 'p') JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE r.slot_name = %s AND (%s::text[] IS NULL OR n.nspname = ANY (%s::text[]))
        ORDER BY 1, 2
        """,
        (slot, schemas, schemas),
    ).fetchall()
    return [TableRef(s, t) for s, t in rows]


def still_there(conn: psycopg.Connection, tables: list[TableRef]) -> list[TableRef]:
    """Those of `tables` that exist, in their order: one dropped or renamed away while attach ran
    (between its batches, or while a try waited for a lock) is no longer there to publish."""
    if not tables:
        return []
    rows = conn.execute(
        """
        SELECT t.s, t.r FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS t(s, r, i)
        JOIN pg_namespace n ON n.nspname = t.s JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.r
        WHERE c.relkind IN ('r', 'p') ORDER BY t.i
        """,
        ([t.schema for t in tables], [t.name for t in tables]),
    ).fetchall()
    return [TableRef(s, t) for s, t in rows]


def not_full(conn: psycopg.Connection, tables: list[TableRef]) -> list[TableRef]:
    """Those of `tables` whose identity is not FULL: the ones `set_full_identity` alters."""
    rows = conn.execute(
        """
        SELECT t.s, t.r FROM unnest(%s::text[], %s::text[]) AS t(s, r)
        JOIN pg_namespace n ON n.nspname = t.s JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.r
        WHERE c.relkind IN ('r', 'p') AND c.relreplident <> 'f'
        ORDER BY 1, 2
        """,
        ([t.schema for t in tables], [t.name for t in tables]),
    ).fetchall()
    return [TableRef(s, t) for s, t in rows]


def restorable(conn: psycopg.Connection, slot: str, tables: list[TableRef] | None = None) -> list[TableRef]:
    """Of the tables whose identity Flux changed (`tables` of them, or all), those `restore_identity`
    alters: still FULL, and with the recorded index, if any, still there. By the names they have now."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM flux.replica_identity_changes r
        JOIN pg_class c ON c.oid = r.relid AND c.relkind IN ('r', 'p') JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE r.slot_name = %s AND c.relreplident = 'f'
          AND (r.previous <> 'i' OR EXISTS (SELECT 1 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                                            WHERE i.indrelid = c.oid AND ic.relname = r.previous_index))
          AND (%s::text[] IS NULL OR (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[])))
        ORDER BY 1, 2
        """,
        (slot, None if tables is None else [str(t) for t in tables],
         [t.schema for t in tables or []], [t.name for t in tables or []]),
    ).fetchall()
    return [TableRef(s, t) for s, t in rows]


def identity_name(code: str, index: str | None) -> str:
    return {"d": "DEFAULT", "n": "NOTHING", "f": "FULL", "i": f"USING INDEX {index}"}.get(code, code)


def publication_locks(conn: psycopg.Connection, publication: str, chosen: list[TableRef], *, schemas: list[str] | None,
                      slot: str, keep_schemas: bool = False) -> tuple[list[TableRef], list[TableRef]]:
    """The tables `sync_publication` (same arguments) will lock, so that they are locked up front:
    those it adds to or drops from the publication by name (SHARE UPDATE EXCLUSIVE; a schema's
    tables are not locked), and those whose identity it restores (ACCESS EXCLUSIVE)."""
    if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone() is None:
        return ([] if schemas else list(chosen)), []
    current = set(published_tables(conn, publication))
    wanted = set() if schemas else set(chosen)
    current_schemas = set(published_schemas(conn, publication))
    kept_schemas = current_schemas if keep_schemas else set(schemas or [])
    restored = {part for table, parts in partitions_of(conn, sorted(current - wanted, key=str)).items()
                if table.schema not in kept_schemas for part in parts}
    dropped_schemas = sorted(current_schemas - kept_schemas)
    if dropped_schemas:
        restored |= set(recorded_tables(conn, slot, schemas=dropped_schemas))
    if restored:
        restored -= {part for parts in partitions_of(conn, chosen).values() for part in parts}
    return sorted(current ^ wanted, key=str), restorable(conn, slot, sorted(restored, key=str))


def sync_publication(
    conn: psycopg.Connection, publication: str, chosen: list[TableRef], *, schemas: list[str] | None, slot: str,
    warnings: list[str] | None = None, restored: list[dict] | None = None, keep_schemas: bool = False,
) -> list[str]:
    """Make the publication publish exactly `chosen`, or with `schemas` those whole schemas; with
    `keep_schemas`, name exactly `chosen` and leave the schemas it publishes as they are (attach's
    batches: its last transaction changes those).

    Returns what changed. Tables no longer published get their replica identity restored (listed
    in `restored`; what cannot be restored is said in `warnings`).
    """
    restored = restored if restored is not None else []
    changes: list[str] = []
    name = sql.Identifier(publication)
    exists = conn.execute("SELECT pubviaroot FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    if exists is None:
        if schemas:
            what = sql.SQL("FOR TABLES IN SCHEMA {}").format(sql.SQL(", ").join(map(sql.Identifier, schemas)))
            described = f"schemas {', '.join(schemas)}"
        elif chosen:
            what = sql.SQL("FOR TABLE {}").format(sql.SQL(", ").join(t.ident for t in chosen))
            described = f"{len(chosen)} tables"
        else:
            what, described = sql.SQL(""), "no tables yet"
        conn.execute(sql.SQL("CREATE PUBLICATION {} {} WITH (publish_via_partition_root = true)").format(name, what))
        return [f"publication {publication} ({described})"]
    if not exists[0]:
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(name))
        changes.append(f"publication {publication}: publish_via_partition_root = true")
    every_op = conn.execute("SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = %s",
                            (publication,)).fetchone()[0]
    if not every_op:  # someone narrowed it: changes it leaves out would be lost without a word
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')").format(name))
        changes.append(f"publication {publication}: publish = insert, update, delete, truncate")
    current = set(published_tables(conn, publication))
    wanted = set() if schemas else set(chosen)
    current_schemas = set(published_schemas(conn, publication))
    wanted_schemas = current_schemas if keep_schemas else set(schemas or [])
    dropped_schemas = sorted(current_schemas - wanted_schemas)
    # Still captured, as a chosen table or one of its partitions: its identity stays FULL.
    keep = ({part for parts in partitions_of(conn, chosen).values() for part in parts} if current - wanted or dropped_schemas
            else set())
    for table in sorted(wanted - current, key=str):
        conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(name, table.ident))
        changes.append(f"publication {publication}: added {table}")
    for table in sorted(current - wanted, key=str):
        conn.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(name, table.ident))
        if table.schema not in wanted_schemas:  # else still published through its schema
            for part in with_partitions(conn, table):  # its partitions were set FULL with it
                if part not in keep:
                    restore_identity(conn, slot, part, result_list=restored, warnings=warnings)
            changes.append(f"publication {publication}: removed {table}")
    for schema in sorted(wanted_schemas - current_schemas):
        conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLES IN SCHEMA {}").format(name, sql.Identifier(schema)))
        changes.append(f"publication {publication}: added schema {schema}")
    for schema in dropped_schemas:
        conn.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLES IN SCHEMA {}").format(name, sql.Identifier(schema)))
        changes.append(f"publication {publication}: removed schema {schema}")
        # Its tables no longer captured get back the identity they had before Flux.
        for table in recorded_tables(conn, slot, schemas=[schema]):
            if table not in keep:
                restore_identity(conn, slot, table, result_list=restored, warnings=warnings)
    return changes


# One statement for all the ALTERs, as _FULL_IN_TURN; each in a block of its own (a savepoint), so
# that one PostgreSQL refuses is said and left FULL. A privilege or a lock timeout is the caller's.
_RESTORE_IN_TURN = """
DO $flux$
DECLARE
    t record;
    failed jsonb := '[]';
BEGIN
    FOR t IN SELECT e->>0 AS schema_name, e->>1 AS table_name, e->>2 AS clause, i
             FROM jsonb_array_elements(current_setting('flux.restore_list')::jsonb) WITH ORDINALITY AS l(e, i) ORDER BY i LOOP
        BEGIN
            EXECUTE format('ALTER TABLE %I.%I REPLICA IDENTITY ', t.schema_name, t.table_name) || t.clause;
        EXCEPTION WHEN insufficient_privilege OR lock_not_available THEN
            RAISE;
        WHEN OTHERS THEN
            failed := failed || jsonb_build_array(jsonb_build_array(t.i, SQLERRM));
        END;
    END LOOP;
    PERFORM set_config('flux.restore_failed', failed::text, true);
END
$flux$
"""


def restore_identity(conn: psycopg.Connection, slot: str, table: TableRef, *, result_list: list[dict],
                     warnings: list[str] | None = None) -> None:
    """`restore_identities` of one table."""
    restore_identities(conn, slot, [table], result_list=result_list, warnings=warnings)


def restore_identities(conn: psycopg.Connection, slot: str, tables: list[TableRef], *, result_list: list[dict],
                       warnings: list[str] | None = None) -> None:
    """Give each of `tables` (by the names they have now) back the identity recorded before Flux set
    FULL, and forget the record.

    Only Flux's own setting is undone: a table whose identity was changed by hand since is left
    as it is, and so is one whose earlier index is gone (an ALTER refused there would fail the
    whole detach, for good). Each is said in `warnings`. Run in a transaction. Four round trips
    whatever the number of tables: the transaction holds them all ACCESS EXCLUSIVE meanwhile.
    """
    if not tables:
        return
    rows = conn.execute(
        """
        SELECT c.oid, t.s, t.r, r.previous, r.previous_index, c.relreplident,
               (SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                WHERE i.indrelid = c.oid AND i.indisreplident),
               EXISTS (SELECT 1 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                       WHERE i.indrelid = c.oid AND ic.relname = r.previous_index)
        FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS t(s, r, i)
        JOIN pg_namespace n ON n.nspname = t.s
        JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.r AND c.relkind IN ('r', 'p')
        JOIN flux.replica_identity_changes r ON r.slot_name = %s AND r.relid = c.oid
        ORDER BY t.i
        """,
        ([t.schema for t in tables], [t.name for t in tables], slot),
    ).fetchall()
    if not rows:
        return
    notes = warnings if warnings is not None else []
    to_alter: list[tuple[TableRef, str, str]] = []  # the table, its clause, what it was
    for _, schema, name, previous, index, current, current_index, index_exists in rows:
        table = TableRef(schema, name)
        was = identity_name(previous, index)
        if current != "f":
            notes.append(f"{table}: REPLICA IDENTITY was changed to {identity_name(current, current_index)} since Flux set "
                         f"FULL; left as it is (before attach it was {was}).")
        elif previous == "i" and not index_exists:
            notes.append(f"{table}: left REPLICA IDENTITY FULL: before attach it was {was}, and that index no longer exists. "
                         f"Choose one: ALTER TABLE {table.ident.as_string(conn)} REPLICA IDENTITY DEFAULT;")
        else:
            clause = {"d": sql.SQL("DEFAULT"), "n": sql.SQL("NOTHING"), "f": sql.SQL("FULL"),
                      "i": sql.SQL("USING INDEX {}").format(sql.Identifier(index or ""))}[previous]
            to_alter.append((table, clause.as_string(conn), was))
    if to_alter:
        conn.execute("SELECT set_config('flux.restore_list', %s, true)",
                     (json.dumps([[t.schema, t.name, clause] for t, clause, _ in to_alter]),))
        conn.execute(_RESTORE_IN_TURN)
        refused = dict(json.loads(conn.execute("SELECT current_setting('flux.restore_failed')").fetchone()[0]))
        for number, (table, _, was) in enumerate(to_alter, start=1):
            if number in refused:
                notes.append(f"{table}: left REPLICA IDENTITY FULL: PostgreSQL refused {was} ({refused[number]}).")
            else:
                result_list.append({"table": str(table), "restored": was})
    conn.execute("DELETE FROM flux.replica_identity_changes WHERE slot_name = %s AND relid = ANY (%s::oid[])",
                 (slot, [r[0] for r in rows]))


def captured_tables(conn: psycopg.Connection, publication: str) -> list[TableRef]:
    """Every table the publication publishes, named or through a schema (roots, not partitions)."""
    rows = conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1, 2", (publication,)
    ).fetchall()
    return [TableRef(s, t) for s, t in rows]
