"""The `flux` schema: the tables Flux records into, created idempotently.

This module owns the DDL and its version. It does not decide what is captured (that is
`flux.cdc.attach`) and it never touches user tables.

`state_mutations` is the mutation log: one row per row change. Its contract:
- `(commit_lsn, seq)` is the primary key: `seq` is the change's position in its transaction.
- `old` / `new` are typed JSON images. `old_complete` is false when the table was not
  REPLICA IDENTITY FULL and only the key columns of the old row are known; NULL when there
  is no old image (insert). `missing_columns` lists columns whose value is unknown in both
  images (an unchanged TOASTed value with no full old image).
- `changed_columns` is NULL when it cannot be known (old image incomplete).
- `old_row_key` is the old primary key of an UPDATE that changed it (`row_key` is the new one);
  NULL otherwise (v5).
- `relid` is the table's oid as the change's Relation message gave it (the partitioned root's
  for a partition), so that a table's history follows it across renames; NULL for changes
  recorded before v7. An oid names a table only while the table exists: PostgreSQL may give it
  to a new table once that one is dropped (see flux.store.queries on how readers guard that).
  And they are this database's oids only: a dump restored elsewhere has new oids throughout, the
  old ones naming other tables or none. `relids` in `flux.meta` says which of them are this
  database's (`claim_relids`).

Its indexes are chosen for write cost as much as for reads: the engine appends every row
change, so each index is paid for per row. History by row goes through `flux.row_hash()`, an
8-byte hash of (schema, table, key) rather than the jsonb key itself, and blame by table
through `flux.table_hash()`, an 8-byte hash of (schema, table) rather than two text columns
(v4; text keys compare by the database's collation). Readers recheck the exact names and key.
Both indexes are ascending and are scanned backwards for newest-first reads. The primary key is
`(commit_lsn, seq)`, the change's own identity; `id` is a convenience surrogate, increasing in
insert order, so a BRIN index serves it at almost no write cost (v4). Measured with COPY of
engine rows: v2's indexes cut server time per row by a quarter against v1's, and v4's by about
a tenth more against v2's.

`trace_requests` (v3) holds one trace per request the gateway served: its spans, redacted
request and response, and replay tape, keyed by request_id. The key is `COLLATE "C"` so that
an id-prefix `LIKE` is a range scan of the primary key. The CDC publication excludes the `flux`
schema, so writing traces never feeds the engine.

Versions: `flux.meta.schema_version`. `ensure_schema` creates the current version, or upgrades
an older one in place (`_MIGRATIONS`), under an advisory lock so concurrent starts do it once.
An upgrade builds its indexes CONCURRENTLY, step by idempotent step, so that it neither holds
the engine's and the gateway's writes back nor leaves anything half done that a re-run would not
finish. Not guaranteed: a catalog change (ADD COLUMN, the v4 primary-key swap) still takes ACCESS
EXCLUSIVE for a moment, and gives up after `_LOCK_TRIES` waits of LOCK_TIMEOUT behind a long
transaction (the next start tries again). Through a connection pooler (`flux.pg.pooler`) an
upgrade is refused: the session lock it holds across transactions would stay on whichever server
connection took it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psycopg
from psycopg import errors, pq

from flux.errors import ConfigError, PreflightError, SchemaVersionError, from_psycopg
from flux.pg.pooler import DIRECT_DSN_HINT, behind_pooler

log = logging.getLogger("flux.store")

SCHEMA = "flux"
SCHEMA_VERSION = 8
# Every table any version makes in it: anything else there is someone else's.
TABLES = ("meta", "state_mutations", "cdc_progress", "attachments", "replica_identity_changes", "trace_requests")

# jsonb_hash_extended and hashtextextended are the functions hash partitioning relies on, so
# their values are stable across PostgreSQL versions.
ROW_HASH = """
CREATE OR REPLACE FUNCTION flux.row_hash(schema_name text, table_name text, row_key jsonb) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN hashtextextended(table_name, jsonb_hash_extended(row_key, hashtextextended(schema_name, 0)));
"""

TABLE_HASH = """
CREATE OR REPLACE FUNCTION flux.table_hash(schema_name text, table_name text) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN hashtextextended(table_name, hashtextextended(schema_name, 0));
"""

# The log's indexes, by name: what follows `CREATE INDEX name`. A migration builds them
# CONCURRENTLY, the DDL of a new schema (an empty log) in its transaction.
INDEXES: dict[str, str] = {
    # History of one row, in order; readers also compare schema, table and row_key exactly.
    "state_mutations_row_hash_idx":
        "ON flux.state_mutations (flux.row_hash(schema_name, table_name, row_key), commit_lsn, seq)",
    # Everything one request did; text_pattern_ops also serves request-id prefix lookups.
    "state_mutations_request_idx":
        "ON flux.state_mutations (request_id text_pattern_ops) WHERE request_id IS NOT NULL",
    # Blame without a key: the latest changes of a table (scanned backwards); readers also compare the names (v4).
    "state_mutations_table_hash_idx":
        "ON flux.state_mutations (flux.table_hash(schema_name, table_name), commit_lsn, seq)",
    # Lookups by id: ids increase in insert order, so block ranges summarise them well (v4).
    "state_mutations_id_idx": "ON flux.state_mutations USING brin (id)",
    # v5: an UPDATE that changes the primary key also carries the old key, so that the history of
    # the old key ends with it. Few rows have one, so the index is partial and costs the engine
    # nothing per row otherwise.
    "state_mutations_old_row_hash_idx":
        "ON flux.state_mutations (flux.row_hash(schema_name, table_name, old_row_key), commit_lsn, seq)"
        " WHERE old_row_key IS NOT NULL",
    # v6: the truncates of a table, which a row's history lists after its first change. Without it
    # that lookup read every change of the table (or the whole log); truncates are rare, so the
    # partial index is nearly empty and costs the engine nothing per ordinary row.
    "state_mutations_truncate_idx":
        "ON flux.state_mutations (flux.table_hash(schema_name, table_name), commit_lsn, seq) WHERE op = 'truncate'",
    # v7: the names a table's oid was recorded under, and where each starts and ends, for history and
    # blame across a rename. One more entry per row, appended at the right end of its (oid, name)
    # as the table hash index's are at its name's; rows recorded before v7 are left out.
    "state_mutations_relid_idx":
        "ON flux.state_mutations (relid, flux.table_hash(schema_name, table_name), commit_lsn, seq) WHERE relid IS NOT NULL",
}

# Shared by the DDL and the v2 -> v3 migration (a new, empty table: built in its transaction).
TRACES = """
CREATE TABLE IF NOT EXISTS flux.trace_requests (
    id            text COLLATE "C" PRIMARY KEY,   -- the request_id (uuid4 text); "C" so prefix LIKE uses the PK
    tenant        text,                 -- NULL when the request was rejected before a tenant was known (401)
    function      text,                 -- NULL for 404 (no route)
    method        text NOT NULL,
    path          text NOT NULL,
    status        integer NOT NULL,
    duration_ms   double precision NOT NULL,
    started_at    timestamptz NOT NULL,
    error         text,                 -- one-line summary, NULL when ok
    spans         jsonb NOT NULL,       -- flat list of spans (below), parents before children
    request       jsonb NOT NULL,       -- {"headers": {...redacted}, "query": {...}, "ip": str|null, "body": <json|str|null>, ["body_encoding": "base64",] "body_truncated": bool, "body_bytes": int}
    response      jsonb NOT NULL,       -- {"headers": {...}, "body": ..., "body_truncated": bool, "body_bytes": int}
    recording     jsonb,                -- the replay tape (README); NULL when recording is off, the function never ran, or its run had no end of its own (a failure inside Flux, a stop that could not wait)
    code_version  text,                 -- sha256 of the function source, first 16 hex chars
    git_commit    text,                 -- HEAD commit of the project when it is a git repo
    replay_of     text,                 -- NULL; set by the replay engine later
    recorded_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS trace_requests_started_idx ON flux.trace_requests (started_at);
CREATE INDEX IF NOT EXISTS trace_requests_tenant_started_idx ON flux.trace_requests (tenant, started_at);
CREATE INDEX IF NOT EXISTS trace_requests_function_started_idx ON flux.trace_requests (function, started_at);
CREATE INDEX IF NOT EXISTS trace_requests_status_started_idx ON flux.trace_requests (status, started_at);
"""


# The log's own oid, and the first id recorded since the log had it: every `relid` from that id on is
# this database's. A dump restored elsewhere (or in another database) gives the log a new oid, so
# a reader sees that the relids it holds are another database's; `flux attach` there claims the
# log again, from its next id on. A copy by CREATE DATABASE ... TEMPLATE, pg_upgrade and a promoted
# standby keep the oids, the log's too.
RELIDS_KEY = "relids"
CLAIM_RELIDS = """
INSERT INTO flux.meta (key, value)
SELECT 'relids', jsonb_build_object('log', 'flux.state_mutations'::regclass::oid::bigint, 'from_id',
       coalesce(pg_sequence_last_value(pg_get_serial_sequence('flux.state_mutations', 'id')::regclass), 0) + 1)
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value WHERE flux.meta.value->'log' IS DISTINCT FROM EXCLUDED.value->'log'
"""


def claim_relids(conn: psycopg.Connection) -> None:
    """Take the table oids the log records from now on for this database's (see CLAIM_RELIDS); a
    no-op, which reads only `flux.meta`, where the log already has them."""
    if relids_from(conn) is None:
        conn.execute(CLAIM_RELIDS)


def relids_from(conn: psycopg.Connection) -> int | None:
    """The first id of the log whose `relid` is this database's oid; None when none is (the log was
    restored from a dump of another database, and `flux attach` has not run here since)."""
    row = conn.execute(
        "SELECT (value->>'from_id')::bigint FROM flux.meta WHERE key = %s"
        " AND (value->>'log')::bigint = 'flux.state_mutations'::regclass::oid::bigint", (RELIDS_KEY,)
    ).fetchone()
    return row[0] if row else None


@dataclass(frozen=True, slots=True)
class _Sql:
    """DDL run in a short transaction of its own: catalog changes, and locks taken briefly."""

    text: str


@dataclass(frozen=True, slots=True)
class _Index:
    """An index of INDEXES (or `body`), built CONCURRENTLY: the engine keeps writing meanwhile."""

    name: str
    body: str = ""
    unique: bool = False
    done: str = ""  # SQL: true when what the index is for is already in place (so it is not built again)


@dataclass(frozen=True, slots=True)
class _DropIndex:
    name: str


# v4's primary key, (commit_lsn, seq): its unique index is built concurrently under this name,
# then becomes the constraint (renamed to state_mutations_pkey) in a moment's lock.
_NEW_PKEY = "state_mutations_commit_lsn_seq_pkey"
_PKEY_DONE = (
    "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'flux.state_mutations'::regclass"
    " AND conname = 'state_mutations_pkey' AND pg_get_constraintdef(oid) = 'PRIMARY KEY (commit_lsn, seq)')"
)
_SWAP_PKEY = f"""
DO $$
BEGIN
    IF to_regclass('flux.{_NEW_PKEY}') IS NOT NULL THEN
        ALTER TABLE flux.state_mutations
            DROP CONSTRAINT IF EXISTS state_mutations_pkey,
            DROP CONSTRAINT IF EXISTS state_mutations_commit_lsn_seq_key,
            ADD CONSTRAINT state_mutations_pkey PRIMARY KEY USING INDEX {_NEW_PKEY};
    END IF;
END $$;
"""

# A record is keyed by the oid of the table its names name now (one renamed before the upgrade is no
# longer found by them, as before); one whose names name no table has nothing left to restore. Small
# table, one short transaction; done when the key is the oid.
_IDENTITIES_BY_OID = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'flux.replica_identity_changes'::regclass
                   AND contype = 'p' AND pg_get_constraintdef(oid) = 'PRIMARY KEY (slot_name, relid)') THEN
        ALTER TABLE flux.replica_identity_changes ADD COLUMN IF NOT EXISTS relid oid;
        UPDATE flux.replica_identity_changes r SET relid = c.oid
        FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind IN ('r', 'p')
        WHERE n.nspname = r.schema_name AND c.relname = r.table_name;
        DELETE FROM flux.replica_identity_changes WHERE relid IS NULL;
        ALTER TABLE flux.replica_identity_changes
            DROP CONSTRAINT replica_identity_changes_pkey,
            ADD CONSTRAINT replica_identity_changes_pkey PRIMARY KEY (slot_name, relid);
    END IF;
END $$;
"""


@dataclass(frozen=True, slots=True)
class _EventTriggerFunction:
    """The event trigger's function (`flux.cdc.autocapture`), brought up to date if installed: an
    older one writes the records of `replica_identity_changes` as an older version kept them."""


# Each version's steps, in order. Every step is idempotent, so an upgrade interrupted anywhere
# (the version is bumped only after its last step) is resumed by the next start.
_MIGRATIONS: dict[int, tuple[_Sql | _Index | _DropIndex | _EventTriggerFunction, ...]] = {
    # v1 indexed the jsonb key itself and the table by DESC order.
    2: (_Sql(ROW_HASH), _Index("state_mutations_row_hash_idx"), _Index("state_mutations_request_idx"),
        _Index("state_mutations_table_lsn_idx", "ON flux.state_mutations (schema_name, table_name, commit_lsn, seq)"),
        _DropIndex("state_mutations_row_idx"), _DropIndex("state_mutations_table_idx")),
    # v3 records traces.
    3: (_Sql(TRACES),),
    # v4 makes the log cheaper to write: hashed table index, (commit_lsn, seq) as the primary key.
    4: (_Sql(TABLE_HASH), _Index("state_mutations_table_hash_idx"), _Index("state_mutations_id_idx"),
        _Index(_NEW_PKEY, "ON flux.state_mutations (commit_lsn, seq)", unique=True, done=_PKEY_DONE), _Sql(_SWAP_PKEY),
        _DropIndex("state_mutations_table_lsn_idx")),
    # v5 records the old key of a key-changing UPDATE (a nullable column: a catalog change only).
    5: (_Sql("ALTER TABLE flux.state_mutations ADD COLUMN IF NOT EXISTS old_row_key jsonb"),
        _Index("state_mutations_old_row_hash_idx")),
    # v6 indexes truncates, for row histories, and traces by status: `flux requests --status 418`
    # (or a class no recent request had) read every trace.
    6: (_Index("state_mutations_truncate_idx"),
        _Index("trace_requests_status_started_idx", "ON flux.trace_requests (status, started_at)")),
    # v7 records the table's oid (a nullable column: a catalog change only), and indexes it.
    7: (_Sql("ALTER TABLE flux.state_mutations ADD COLUMN IF NOT EXISTS relid oid"), _Sql(CLAIM_RELIDS),
        _Index("state_mutations_relid_idx")),
    # v8 keys the replica identities Flux changed by the table's oid: by name, a table renamed while
    # attached was not found by detach, and stayed FULL.
    8: (_Sql(_IDENTITIES_BY_OID), _EventTriggerFunction()),
}

DDL = """
CREATE SCHEMA IF NOT EXISTS flux;

CREATE TABLE IF NOT EXISTS flux.meta (
    key   text PRIMARY KEY,
    value jsonb NOT NULL
);

CREATE TABLE IF NOT EXISTS flux.state_mutations (
    id              bigint GENERATED ALWAYS AS IDENTITY,
    request_id      text,
    context         jsonb,
    schema_name     text NOT NULL,
    table_name      text NOT NULL,
    op              text NOT NULL CHECK (op IN ('insert', 'update', 'delete', 'truncate')),
    row_key         jsonb,
    old             jsonb,
    new             jsonb,
    old_complete    boolean,
    missing_columns text[],
    changed_columns text[],
    xid             bigint NOT NULL,
    commit_lsn      pg_lsn NOT NULL,
    commit_time     timestamptz NOT NULL,
    seq             integer NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    old_row_key     jsonb,
    relid           oid,
    CONSTRAINT state_mutations_pkey PRIMARY KEY (commit_lsn, seq)
);

{functions}
{indexes}

-- The engine's progress, written in the same transaction as the mutations it covers.
CREATE TABLE IF NOT EXISTS flux.cdc_progress (
    slot_name        text PRIMARY KEY,
    commit_lsn       pg_lsn NOT NULL,
    end_lsn          pg_lsn NOT NULL,
    commit_time      timestamptz,
    mutations        bigint NOT NULL DEFAULT 0,
    consumer_host    text,
    consumer_pid     integer,
    heartbeat_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- What `flux attach` set up, so that `flux detach` can undo exactly that.
CREATE TABLE IF NOT EXISTS flux.attachments (
    slot_name        text PRIMARY KEY,
    publication_name text NOT NULL,
    all_tables       boolean NOT NULL,
    attached_at      timestamptz NOT NULL DEFAULT now()
);

-- Replica identities Flux changed, with the setting to restore on detach. By the table's oid (v8),
-- which a rename or SET SCHEMA keeps; the names are the table's when Flux last set it FULL.
CREATE TABLE IF NOT EXISTS flux.replica_identity_changes (
    slot_name        text NOT NULL,
    schema_name      text NOT NULL,
    table_name       text NOT NULL,
    previous         text NOT NULL,       -- d (default), n (nothing), i (index), f (full)
    previous_index   text,                -- index name when previous = 'i'
    changed_at       timestamptz NOT NULL DEFAULT now(),
    relid            oid NOT NULL,
    PRIMARY KEY (slot_name, relid)
);

{traces}
""".replace("{functions}", ROW_HASH + TABLE_HASH) \
   .replace("{indexes}", "".join(f"CREATE INDEX IF NOT EXISTS {name} {body};\n" for name, body in INDEXES.items())) \
   .replace("{traces}", TRACES)


def schema_version(conn: psycopg.Connection) -> int | None:
    """The recorded schema version, or None when there is no `flux` schema."""
    if not conn.execute("SELECT to_regclass('flux.meta') IS NOT NULL").fetchone()[0]:
        return None
    row = conn.execute("SELECT value::text FROM flux.meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 1


def version_mismatch(version: int, *, doing: str = "runs") -> SchemaVersionError:
    """The error of a command that does not upgrade (`doing`: what it would do) on a schema of
    another version than this Flux's; and of every command on a newer one."""
    if version > SCHEMA_VERSION:
        return SchemaVersionError(
            f"The flux schema is version {version}, newer than this Flux understands ({SCHEMA_VERSION})",
            hint="Upgrade Flux on this machine to the version that upgraded the schema, from its source as the README installs it "
                 "(pip install -e . in an up-to-date checkout).", schema_version=version,
        )
    # A newer CLI than the deployment's (a support engineer's) is the usual case: upgrading from it
    # would keep the deployment's processes from starting again, so that is said.
    return SchemaVersionError(
        f"The flux schema is version {version}, older than this Flux's ({SCHEMA_VERSION}), which {doing} only once the "
        "schema is upgraded", schema_version=version,
        hint=f"Use the Flux release that runs against this database (schema version {version}). Or upgrade the schema with "
             "this Flux: `flux attach` as the role that owns the flux schema, or a start of `flux cdc run` or `flux serve`; "
             "Flux processes of the older release keep running, but refuse to start again on it.",
    )


def ensure_schema(conn: psycopg.Connection) -> bool:
    """Create the `flux` schema and tables, or upgrade them. Returns True when anything changed.

    On a connection that is not in a transaction, an upgrade builds its indexes CONCURRENTLY: the
    engine and the gateway keep writing meanwhile, and readers keep reading. A stronger lock is
    taken only for a catalog change, for a moment (a try waits at most LOCK_TIMEOUT for it, so
    that writes never queue behind a long wait). In a caller's transaction it cannot: there the
    indexes are built in that transaction, holding the log's writes back for as long as that takes.
    """
    # The tables every version has: a schema with them is upgraded, never re-created, so tables
    # a later version added (trace_requests) come from its migration and the version is bumped.
    existed = conn.execute(
        "SELECT to_regclass('flux.state_mutations') IS NOT NULL AND to_regclass('flux.cdc_progress') IS NOT NULL"
        " AND to_regclass('flux.attachments') IS NOT NULL AND to_regclass('flux.replica_identity_changes') IS NOT NULL"
    ).fetchone()[0]
    if existed:
        return _upgrade(conn)
    with conn.transaction():
        # Serialize concurrent first runs; CREATE ... IF NOT EXISTS alone races on catalogs.
        conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK})")
        _refuse_a_schema_not_fluxs(conn)
        conn.execute(DDL)
        conn.execute(
            "INSERT INTO flux.meta (key, value) VALUES ('schema_version', %s::jsonb) ON CONFLICT (key) DO NOTHING",
            (str(SCHEMA_VERSION),),
        )
        claim_relids(conn)
    return True


def _refuse_a_schema_not_fluxs(conn: psycopg.Connection) -> None:
    """A `flux` schema holding objects but none of Flux's tables is the application's own: Flux's
    tables would be created among its tables (and `flux detach --drop-data` drops the schema)."""
    row = conn.execute(
        """
        SELECT n.nspowner::regrole::text,
               (SELECT count(*) FROM pg_class c WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S'))
               + (SELECT count(*) FROM pg_proc p WHERE p.pronamespace = n.oid)
               + (SELECT count(*) FROM pg_type t WHERE t.typnamespace = n.oid AND t.typrelid = 0 AND t.typcategory <> 'A')
        FROM pg_namespace n WHERE n.nspname = %s AND to_regclass('flux.meta') IS NULL
          AND to_regclass('flux.state_mutations') IS NULL
        """,
        (SCHEMA,),
    ).fetchone()
    if row is not None and row[1]:
        raise PreflightError(
            f"This database has a schema named {SCHEMA} (owner {row[0]}, {row[1]} object(s)) that is not Flux's: Flux keeps "
            f"its own tables in a schema of that name, and would mix them with yours",
            hint=f"Flux's schema name is fixed: rename yours (ALTER SCHEMA {SCHEMA} RENAME TO ...; and the code that uses "
                 "it), or attach Flux to another database. Nothing was changed.", schema=SCHEMA)


_LOCK = "hashtext('flux.schema')"
LOCK_TIMEOUT = "2s"
_LOCK_TRIES = 30  # a catalog change that waited this many times LOCK_TIMEOUT gives up (and is retried at the next start)


def _upgrade(conn: psycopg.Connection) -> bool:
    version = schema_version(conn)
    assert version is not None
    if version > SCHEMA_VERSION:
        raise version_mismatch(version)
    if version == SCHEMA_VERSION:
        return False
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        with conn.transaction():
            conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK})")
            return _migrate(conn, concurrently=False)
    autocommit = conn.autocommit
    conn.autocommit = True
    try:
        if behind_pooler(conn):
            raise ConfigError(
                f"The flux schema is version {version}; this Flux upgrades it to {SCHEMA_VERSION}, which it cannot do through "
                "a connection pooler (PgBouncer?): the upgrade holds a lock across transactions, which the pooler does not "
                "keep", hint=f"{DIRECT_DSN_HINT} Run `flux attach`, or this command, once that way; then start it through "
                "the pooler again.", schema_version=version)
        # A session lock, taken by polling: a session waiting in pg_advisory_lock() holds a snapshot,
        # which a CREATE INDEX CONCURRENTLY of the holder would wait for in turn.
        _take_upgrade_lock(conn, version)
        timeouts = _turn_off_timeouts(conn)
        try:
            return _migrate(conn, concurrently=True)
        finally:
            for name, value in timeouts.items():
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
            conn.execute(f"SELECT pg_advisory_unlock({_LOCK})")
    finally:
        conn.autocommit = autocommit


# Timeouts a role or database may set for its applications (the gateway's role, say), with the
# server version that has each.
_TIMEOUTS = {"statement_timeout": 0, "lock_timeout": 0, "transaction_timeout": 170000}


def _turn_off_timeouts(conn: psycopg.Connection) -> dict[str, str]:
    """Turn the applications' timeouts off for this session, returning their values to restore: an index
    build takes as long as the log is large, and waits for every transaction running when it starts, so
    one cancelled it midway, leaving its index INVALID (written by every insert, used by no read), and
    every start after did the same. The catalog changes bound their lock waits themselves."""
    version = conn.info.server_version
    values = {name: conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]
              for name, since in _TIMEOUTS.items() if version >= since}
    for name in values:
        conn.execute(f"SET {name} = 0")
    return values


UPGRADE_WAIT_LOG_EVERY = 30.0  # seconds between the lines saying this start still waits


def _take_upgrade_lock(conn: psycopg.Connection, version: int) -> None:
    """Take the upgrade's session lock, saying (as a warning: `flux attach` shows only those) who
    holds it when it is not free at once, and every UPGRADE_WAIT_LOG_EVERY seconds after: an
    upgrade of a large log by another start can take minutes, during which this one looked hung."""
    started = time.monotonic()
    next_say = 0.0
    while not conn.execute(f"SELECT pg_try_advisory_lock({_LOCK})").fetchone()[0]:
        waited = time.monotonic() - started
        if waited >= next_say:
            holder = advisory_lock_holder(conn, _LOCK)
            who = "another session"
            if holder:
                pid, application, address, _ = holder
                about = ", ".join(part for part in (application, address and f"from {address}") if part)
                who = f"the session of pid {pid}" + (f" ({about})" if about else "")
            log.warning("%s %s to finish upgrading the flux schema from v%d to v%d; this start goes on when it is done",
                        f"still waiting ({waited:.0f} s) for" if waited >= 1 else "waiting for", who, version, SCHEMA_VERSION)
            next_say = waited + UPGRADE_WAIT_LOG_EVERY
        time.sleep(0.2)


def advisory_lock_holder(conn: psycopg.Connection, key_sql: str) -> tuple[int, str | None, str | None, int | None] | None:
    """The other session holding the session advisory lock whose bigint key `key_sql` (SQL, a constant
    of the caller's) gives: its pid, application, address and how long ago its last statement began."""
    return conn.execute(
        # client_addr is NULL for a local socket, and for another role's session without pg_read_all_stats
        "SELECT a.pid, nullif(a.application_name, ''), host(a.client_addr),"
        " extract(epoch FROM now() - a.query_start)::bigint"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.pid <> pg_backend_pid()"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        f" AND ((l.classid::bigint << 32) | l.objid::bigint) = ({key_sql})::bigint"
    ).fetchone()


def _migrate(conn: psycopg.Connection, *, concurrently: bool) -> bool:
    version = schema_version(conn)  # a concurrent start may have upgraded while we waited
    assert version is not None
    if version < SCHEMA_VERSION:
        log.info("upgrading the flux schema from v%d to v%d", version, SCHEMA_VERSION)
    for target in range(version + 1, SCHEMA_VERSION + 1):
        for step in _MIGRATIONS[target]:
            _run(conn, step, concurrently=concurrently)
        if target == SCHEMA_VERSION:
            # A new column and a new expression index have no statistics until an analyze, which
            # autovacuum starts only after a tenth of the log more is written; until then the planner
            # guesses, and read row histories by scanning the whole log (1.4 s at 5 million rows).
            # Before the last bump, so that an upgrade stopped during it runs it again at the next start.
            conn.execute("ANALYZE flux.state_mutations, flux.trace_requests")
        conn.execute(
            "INSERT INTO flux.meta (key, value) VALUES ('schema_version', %s::jsonb)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (str(target),),
        )
    return version < SCHEMA_VERSION


def _run(conn: psycopg.Connection, step: _Sql | _Index | _DropIndex | _EventTriggerFunction, *, concurrently: bool) -> None:
    how = "CONCURRENTLY " if concurrently else ""
    if isinstance(step, _EventTriggerFunction):
        from flux.cdc.autocapture import update_trigger_function  # the capture layer owns it; store imports no cdc at load

        with conn.transaction():
            update_trigger_function(conn)
    elif isinstance(step, _DropIndex):
        conn.execute(f"DROP INDEX {how}IF EXISTS flux.{step.name}")
    elif isinstance(step, _Index):
        if step.done and conn.execute(step.done).fetchone()[0]:
            return
        valid = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (f"flux.{step.name}",)
        ).fetchone()
        if valid is not None and not valid[0]:
            # What an interrupted concurrent build leaves: INVALID, not used by reads, but still
            # written by every insert. IF NOT EXISTS would keep it; it is built anew.
            conn.execute(f"DROP INDEX {how}flux.{step.name}")
        unique = "UNIQUE " if step.unique else ""
        conn.execute(f"CREATE {unique}INDEX {how}IF NOT EXISTS {step.name} {step.body or INDEXES[step.name]}")
    elif not concurrently:
        conn.execute(step.text)
    else:
        for attempt in range(1, _LOCK_TRIES + 1):
            try:
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                    conn.execute(step.text)
                return
            except errors.LockNotAvailable as exc:
                if attempt == _LOCK_TRIES:
                    raise from_psycopg(
                        exc, "Could not upgrade the flux schema: a long transaction holds its tables",
                        hint="Find it in pg_stat_activity and let it end, then start again: the upgrade resumes where it stopped.",
                        retryable=True,
                    ) from exc
                time.sleep(0.5)


def tables_not_fluxs(conn: psycopg.Connection) -> list[str]:
    """Tables (and materialized views) in the flux schema that Flux did not make: an application's,
    which dropping the schema would drop with it."""
    rows = conn.execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'm') AND NOT c.relispartition AND c.relname <> ALL (%s) ORDER BY 1",
        (SCHEMA, list(TABLES)),
    ).fetchall()
    return [r[0] for r in rows]


def drop_schema(conn: psycopg.Connection) -> None:
    conn.execute("DROP SCHEMA IF EXISTS flux CASCADE")
