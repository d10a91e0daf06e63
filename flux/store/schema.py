"""The `flux` schema: the tables Flux records into, created idempotently.

This module owns the DDL and its version. It does not decide what is captured (that is
`flux.cdc.attach`) and it never touches user tables.

`state_mutations` is the mutation log: one row per row change. Its contract:
- `(commit_lsn, seq)` is unique: `seq` is the change's position in its transaction.
- `old` / `new` are typed JSON images. `old_complete` is false when the table was not
  REPLICA IDENTITY FULL and only the key columns of the old row are known; NULL when there
  is no old image (insert). `missing_columns` lists columns whose value is unknown in both
  images (an unchanged TOASTed value with no full old image).
- `changed_columns` is NULL when it cannot be known (old image incomplete).
"""

from __future__ import annotations

import psycopg

SCHEMA = "flux"
SCHEMA_VERSION = 1

DDL = """
CREATE SCHEMA IF NOT EXISTS flux;

CREATE TABLE IF NOT EXISTS flux.meta (
    key   text PRIMARY KEY,
    value jsonb NOT NULL
);

CREATE TABLE IF NOT EXISTS flux.state_mutations (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
    CONSTRAINT state_mutations_commit_lsn_seq_key UNIQUE (commit_lsn, seq)
);

-- History of one row: by table and key, newest first.
CREATE INDEX IF NOT EXISTS state_mutations_row_idx
    ON flux.state_mutations (schema_name, table_name, row_key, commit_lsn DESC, seq DESC);
-- Blame without a key: the latest changes of a table.
CREATE INDEX IF NOT EXISTS state_mutations_table_idx
    ON flux.state_mutations (schema_name, table_name, commit_lsn DESC, seq DESC);
-- Everything one request did; text_pattern_ops also serves request-id prefix lookups.
CREATE INDEX IF NOT EXISTS state_mutations_request_idx
    ON flux.state_mutations (request_id text_pattern_ops) WHERE request_id IS NOT NULL;

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

-- Replica identities Flux changed, with the setting to restore on detach.
CREATE TABLE IF NOT EXISTS flux.replica_identity_changes (
    slot_name        text NOT NULL,
    schema_name      text NOT NULL,
    table_name       text NOT NULL,
    previous         text NOT NULL,       -- d (default), n (nothing), i (index), f (full)
    previous_index   text,                -- index name when previous = 'i'
    changed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot_name, schema_name, table_name)
);
"""


def ensure_schema(conn: psycopg.Connection) -> bool:
    """Create the `flux` schema and tables if missing. Returns True when anything was created."""
    existed = conn.execute(
        "SELECT to_regclass('flux.state_mutations') IS NOT NULL AND to_regclass('flux.cdc_progress') IS NOT NULL"
        " AND to_regclass('flux.attachments') IS NOT NULL AND to_regclass('flux.replica_identity_changes') IS NOT NULL"
    ).fetchone()[0]
    if existed:
        return False
    with conn.transaction():
        # Serialize concurrent first runs; CREATE ... IF NOT EXISTS alone races on catalogs.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('flux.schema'))")
        conn.execute(DDL)
        conn.execute(
            "INSERT INTO flux.meta (key, value) VALUES ('schema_version', %s::jsonb) ON CONFLICT (key) DO NOTHING",
            (str(SCHEMA_VERSION),),
        )
    return True


def drop_schema(conn: psycopg.Connection) -> None:
    conn.execute("DROP SCHEMA IF EXISTS flux CASCADE")
