"""Keeping capture complete as the schema grows: tables, schemas and partitions created later.

Two mechanisms, the first preferred:
- an event trigger (superuser only), which acts inside the DDL's own transaction: it publishes
  a new table for `--all-tables` attachments (on PostgreSQL 15+ the publication covers whole
  schemas, so even the rows of CREATE TABLE AS are captured) and a table created again (or
  renamed) in the place of a listed one, adds new schemas, and gives REPLICA IDENTITY FULL to
  new tables and to partitions of any captured table;
- `reconcile()`, which the engine runs every few seconds when idle, for roles that cannot own an
  event trigger, and for a table of an attachment's list that was dropped and created again (or
  replaced by a rename). Changes to a table in the seconds before it runs are not captured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from flux.cdc.locks import (
    ENGINE_LOCK_TIMEOUT_S,
    MAX_NAMED,
    LockBudget,
    bound_lock_waits,
    holders,
    holding_transactions,
    lock_up_front,
    own_waits,
)
from flux.cdc.publication import (
    SCHEMA_PUBLICATION_VERSION,
    TableRef,
    all_user_tables,
    listed_tables_not_captured,
    not_full,
    partition_trees,
    published_schemas,
    published_tables,
    set_full_identity,
    user_schemas,
    with_partitions,
)

log = logging.getLogger("flux.cdc")

EVENT_TRIGGER = "flux_capture_new_tables"

_TRIGGER_FUNCTION = """
CREATE OR REPLACE FUNCTION flux.capture_new_tables() RETURNS event_trigger
LANGUAGE plpgsql
-- Runs for every role's DDL: as its (superuser) owner, so that an application role can still
-- create tables, with a fixed search_path so that nothing it calls can be shadowed.
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    obj record;
    att record;
    rel record;
    published boolean;
BEGIN
    -- Flux's own attach, detach and capture set up (or undo) capture themselves (own_ddl below).
    IF current_setting('flux.own_ddl', true) = 'on' THEN
        RETURN;
    END IF;
    FOR obj IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF obj.object_type = 'schema' AND obj.command_tag = 'CREATE SCHEMA' THEN
            FOR att IN SELECT a.publication_name FROM flux.attachments a WHERE a.all_tables AND EXISTS (
                    SELECT 1 FROM pg_publication p JOIN pg_publication_namespace pn ON pn.pnpubid = p.oid
                    WHERE p.pubname = a.publication_name) LOOP
                EXECUTE format('ALTER PUBLICATION %I ADD TABLES IN SCHEMA %I', att.publication_name,
                               (SELECT nspname FROM pg_namespace WHERE oid = obj.objid));
            END LOOP;
        ELSIF obj.object_type = 'table' THEN
            -- The new table; for ALTER TABLE (e.g. ATTACH PARTITION) the partitions below it. Read in
            -- pg_inherits, by index: a join with pg_partition_tree() read all of pg_class, 10 ms for every
            -- CREATE or ALTER TABLE of a database of 3,000 tables, and locked every partition.
            FOR rel IN
                WITH RECURSIVE t(relid, level) AS (
                    SELECT obj.objid, 0
                    UNION ALL SELECT i.inhrelid, t.level + 1 FROM t JOIN pg_inherits i ON i.inhparent = t.relid
                    JOIN pg_class p ON p.oid = i.inhrelid WHERE p.relispartition)
                SELECT c.oid, c.relispartition, c.relreplident, n.nspname, c.relname
                FROM t JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
                  AND n.nspname NOT IN ('flux', 'pg_catalog', 'information_schema')
                  AND (obj.command_tag <> 'ALTER TABLE' OR t.level > 0
                       -- a table renamed into the place of a listed one (an online schema change's swap)
                       OR (NOT c.relispartition AND EXISTS (
                               SELECT 1 FROM flux.attachments a JOIN flux.meta m ON m.key = 'listed_tables:' || a.slot_name
                               WHERE m.value @> jsonb_build_array(jsonb_build_array(n.nspname::text, c.relname::text))
                                 AND EXISTS (SELECT 1 FROM pg_publication p WHERE p.pubname = a.publication_name)
                                 AND NOT EXISTS (SELECT 1 FROM pg_publication_tables pt WHERE pt.pubname = a.publication_name
                                                 AND pt.schemaname = n.nspname AND pt.tablename = c.relname))))
            LOOP
                FOR att IN SELECT * FROM flux.attachments LOOP
                    -- Captured as itself or through any of its ancestors: a listed table may be a partition
                    -- (--tables p1), whose own new partitions its root, not listed, did not make FULL.
                    published := EXISTS (SELECT 1 FROM pg_partition_ancestors(rel.oid) a
                                         JOIN pg_class ac ON ac.oid = a.relid JOIN pg_namespace an ON an.oid = ac.relnamespace
                                         JOIN pg_publication_tables pt ON pt.pubname = att.publication_name
                                          AND pt.schemaname = an.nspname AND pt.tablename = ac.relname);
                    IF NOT published AND NOT rel.relispartition AND (att.all_tables OR EXISTS (
                            -- a listed table created again: the publication held the old one by oid
                            SELECT 1 FROM flux.meta m WHERE m.key = 'listed_tables:' || att.slot_name
                            AND m.value @> jsonb_build_array(jsonb_build_array(rel.nspname::text, rel.relname::text)))) THEN
                        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I.%I', att.publication_name, rel.nspname, rel.relname);
                        published := true;
                    END IF;
                    IF published AND rel.relreplident <> 'f' THEN
                        -- The identity it has now, by oid (flux.cdc.publication.set_full_identity).
                        INSERT INTO flux.replica_identity_changes
                            (slot_name, relid, schema_name, table_name, previous, previous_index)
                        VALUES (att.slot_name, rel.oid, rel.nspname, rel.relname, rel.relreplident,
                                (SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                                 WHERE i.indrelid = rel.oid AND i.indisreplident))
                        ON CONFLICT (slot_name, relid) DO UPDATE
                        SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name,
                            previous = EXCLUDED.previous, previous_index = EXCLUDED.previous_index, changed_at = now();
                        EXECUTE format('ALTER TABLE %I.%I REPLICA IDENTITY FULL', rel.nspname, rel.relname);
                        rel.relreplident := 'f';
                    END IF;
                END LOOP;
            END LOOP;
        END IF;
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    -- Never fail the user's DDL: the engine's reconcile pass captures the table later.
    RAISE WARNING 'flux: could not set up capture for new objects: %', SQLERRM;
END
$fn$;
"""


def own_ddl(conn: psycopg.Connection) -> None:
    """In the current transaction, the event trigger leaves Flux's ALTER TABLEs alone: attach,
    detach and the engine's capture do what it would do themselves, and its look at the catalogs
    (10 ms each among 3,000 tables) ran for every table they alter, while they held every one of
    those tables ACCESS EXCLUSIVE: a detach of 3,000 tables took 30 s, all of them locked throughout."""
    conn.execute("SELECT set_config('flux.own_ddl', 'on', true)")


def update_trigger_function(conn: psycopg.Connection) -> None:
    """The installed trigger's function brought to this version's form (a schema upgrade's step, as
    `flux cdc run` or `flux serve` may upgrade before `flux attach` runs again); none installed, nothing.
    A role that may not replace it leaves it: it then warns at each DDL it cannot act on, and the
    engine captures in its stead, until `flux attach` runs as its owner."""
    row = conn.execute("SELECT pg_has_role(current_user, p.proowner, 'USAGE') FROM pg_proc p"
                       " WHERE p.oid = to_regprocedure('flux.capture_new_tables()')").fetchone()
    if row is None:
        return
    if row[0]:
        conn.execute(_TRIGGER_FUNCTION)
    else:
        log.warning("the event trigger's function flux.capture_new_tables() is an older version's, which this role may not "
                    "replace: run `flux attach` again as its owner (a superuser)")


def install_event_trigger(conn: psycopg.Connection) -> str | None:
    """Install the trigger if missing, and its function in this version's form in any case.
    Returns a description of what it created, or None."""
    conn.execute(_TRIGGER_FUNCTION)  # CREATE OR REPLACE: an older attach's function is brought up to date
    if conn.execute("SELECT 1 FROM pg_event_trigger WHERE evtname = %s", (EVENT_TRIGGER,)).fetchone():
        return None
    tags = ["CREATE TABLE", "CREATE TABLE AS", "SELECT INTO", "ALTER TABLE"]
    if conn.info.server_version >= SCHEMA_PUBLICATION_VERSION:
        tags.append("CREATE SCHEMA")
    conn.execute(
        sql.SQL("CREATE EVENT TRIGGER {} ON ddl_command_end WHEN TAG IN ({}) EXECUTE FUNCTION flux.capture_new_tables()").format(
            sql.Identifier(EVENT_TRIGGER), sql.SQL(", ").join(map(sql.Literal, tags))
        )
    )
    return f"event trigger {EVENT_TRIGGER} (captures tables and partitions created later)"


def drop_event_trigger(conn: psycopg.Connection) -> bool:
    if not conn.execute("SELECT 1 FROM pg_event_trigger WHERE evtname = %s", (EVENT_TRIGGER,)).fetchone():
        return False
    conn.execute(sql.SQL("DROP EVENT TRIGGER {}").format(sql.Identifier(EVENT_TRIGGER)))
    conn.execute("DROP FUNCTION IF EXISTS flux.capture_new_tables()")
    return True


def reconcile(conn: psycopg.Connection, *, slot: str) -> list[str]:
    """Capture what appeared since attach without the trigger. Returns what it changed."""
    if not conn.execute("SELECT to_regclass('flux.attachments')").fetchone()[0]:
        return []
    row = conn.execute("SELECT publication_name, all_tables FROM flux.attachments WHERE slot_name = %s", (slot,)).fetchone()
    if row is None:
        return []
    publication, all_tables = row
    changed: list[str] = []
    # Partitions created or attached later need FULL identity too, whatever the attach mode.
    for schema, name in conn.execute(
        """
        -- By oid, not by a ::regclass cast of the name: that lookup needs USAGE on the table's
        -- schema, which an engine role that reads no application table does not have.
        """ + partition_trees("SELECT rc.oid FROM pg_publication_tables pt JOIN pg_namespace rn ON rn.nspname = pt.schemaname"
                              " JOIN pg_class rc ON rc.relnamespace = rn.oid AND rc.relname = pt.tablename WHERE pt.pubname = %s") + """
        SELECT DISTINCT n.nspname, c.relname FROM tree
        JOIN pg_class c ON c.oid = tree.relid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE tree.level > 0 AND c.relkind IN ('r', 'p') AND c.relreplident <> 'f'
        """,
        (publication,),
    ).fetchall():
        table = TableRef(schema, name)
        _try(conn, changed, f"REPLICA IDENTITY FULL on {table}", lambda t=table: set_full_identity(conn, slot, t), table)
    if not all_tables:
        # A listed table dropped and created again, or replaced by a rename, is a new table the
        # publication does not hold: captured again by its name.
        for table in listed_tables_not_captured(conn, slot, publication):
            _try(conn, changed, str(table), lambda t=table: _capture(conn, slot, publication, t), table)
        return changed
    schemas = published_schemas(conn, publication)
    if schemas:  # schema mode: new schemas, and FULL identity for tables the trigger did not see
        for schema in sorted(set(user_schemas(conn)) - set(schemas)):
            statement = sql.SQL("ALTER PUBLICATION {} ADD TABLES IN SCHEMA {}").format(sql.Identifier(publication), sql.Identifier(schema))
            _try(conn, changed, f"schema {schema}", lambda st=statement: conn.execute(st))
        # Tables Flux never touched (none recorded) and not FULL were created since: a user's
        # deliberate change to a table attach set up is left alone.
        for schema, name in conn.execute(
            """
            SELECT pt.schemaname, pt.tablename FROM pg_publication_tables pt
            JOIN pg_namespace n ON n.nspname = pt.schemaname JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
            WHERE pt.pubname = %s AND c.relreplident <> 'f' AND NOT EXISTS (
                SELECT 1 FROM flux.replica_identity_changes r WHERE r.slot_name = %s AND r.relid = c.oid)
            """,
            (publication, slot),
        ).fetchall():
            table = TableRef(schema, name)
            _try(conn, changed, f"REPLICA IDENTITY FULL on {table}", lambda t=table: _full_identity(conn, slot, t), table)
        return changed
    for table in sorted(set(all_user_tables(conn)) - set(published_tables(conn, publication)), key=str):
        _try(conn, changed, str(table), lambda t=table: _capture(conn, slot, publication, t), table)
    return changed


# A new table and all its partitions in one transaction, their locks taken up front (flux.cdc.locks):
# the publication then never holds the table with a partition not FULL yet (whose updates would be
# recorded key-only), and a refusal (a busy partition, a privilege) leaves nothing half-changed for
# the next pass. Locking partition by partition, one transaction each, would hold no table while
# waiting at all, but would leave partitions FULL under a table that is not captured; the up-front
# wait gives up before deadlock_timeout, so an application's transaction is never the one aborted.
def _full_identity(conn: psycopg.Connection, slot: str, table: TableRef) -> None:
    parts = with_partitions(conn, table)
    lock_up_front(conn, LockBudget(ENGINE_LOCK_TIMEOUT_S), not_full(conn, parts))
    for part in parts:
        set_full_identity(conn, slot, part)


def _capture(conn: psycopg.Connection, slot: str, publication: str, table: TableRef) -> None:
    parts = with_partitions(conn, table)
    exclusive = not_full(conn, parts)
    lock_up_front(conn, LockBudget(ENGINE_LOCK_TIMEOUT_S), exclusive, [] if table in exclusive else [table])
    for part in parts:
        set_full_identity(conn, slot, part)
    conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), table.ident))


WARN_AGAIN_S = 600.0
_warned: dict[tuple[str, str], float] = {}  # (what, why) -> when it was last logged as a warning
# what -> the transactions that held its table when a try gave way. The next passes do not queue
# behind them again: each try stops the table's other queries for as long as it waits, and behind
# a transaction of an hour, a try every pass stopped them a second in every ten, all hour long.
_gave_way_to: dict[str, set[str]] = {}


def _try(conn: psycopg.Connection, changed: list[str], what: str, action: Callable[[], object], table: TableRef | None = None) -> None:
    """One reconcile step in its own transaction: a table dropped meanwhile, or not ours, is
    logged and retried next round rather than stopping the engine."""
    try:
        if table is not None and what in _gave_way_to:
            if _gave_way_to[what] & holding_transactions(conn, with_partitions(conn, table)):
                log.debug("not capturing %s yet: a transaction it gave way to still holds the table", what)
                return
            del _gave_way_to[what]
        with conn.transaction():
            bound_lock_waits(conn, ENGINE_LOCK_TIMEOUT_S)
            own_ddl(conn)
            action()
        changed.append(what)
    except psycopg.Error as exc:
        why = str(exc).strip().splitlines()[0]
        repeat_key = (what, why)  # the holders below change every pass: not part of what counts as said already
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            try:
                parts = with_partitions(conn, table) if table is not None else []
                held = holders(conn, parts)
                if table is not None:
                    _gave_way_to[what] = holding_transactions(conn, parts)
            except psycopg.Error:  # dropped since, or in a schema this role may not look up by name
                held = []
            if table is None:  # a schema step (ALTER PUBLICATION ... ADD TABLES IN SCHEMA)
                why = (f"another transaction holds a lock this step needs, and waiting longer than {ENGINE_LOCK_TIMEOUT_S:g} s "
                       "would hold other queries up behind it")
            else:
                why = (f"another transaction holds the table, and waiting longer than {ENGINE_LOCK_TIMEOUT_S:g} s would stop its "
                       f"other queries behind the engine's ALTER ({'; '.join(held[:MAX_NAMED]) or 'it has ended since'})")
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            why += (" (to capture it, the engine's role must own it and the publication, as a member of the role that "
                    "ran `flux attach` does; otherwise run `flux attach` again, as that role, after creating tables)")
        # Retried every pass (about 10 s); said again only every WARN_AGAIN_S, not with each retry.
        now = time.monotonic()
        if now - _warned.get(repeat_key, -WARN_AGAIN_S) >= WARN_AGAIN_S:
            _warned[repeat_key] = now
            log.warning("cannot capture %s yet: %s", what, why)
        else:
            log.debug("cannot capture %s yet: %s", what, why)


def reconcile_new_tables(dsn: str, *, slot: str) -> list[str]:
    """`reconcile` on a connection of its own (the engine calls this when idle), free of the timeouts
    set for the database's applications, as the engine's other sessions are: a statement_timeout
    under the lock bound cancelled a wait, which then did not count as giving way."""
    from flux.cdc.attach import connect

    with connect(dsn) as conn:
        own_waits(conn)
        return reconcile(conn, slot=slot)
