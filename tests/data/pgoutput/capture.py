"""Regenerate the captured pgoutput payloads in this folder from a real PostgreSQL server.

    .venv/bin/python tests/data/pgoutput/capture.py                # throwaway local cluster
    .venv/bin/python tests/data/pgoutput/capture.py --dsn URL      # an existing server (wal_level=logical, superuser)

For each case below it creates a fresh database, a publication and a pgoutput slot, runs the
case's transactions, and reads the messages back with `pg_logical_slot_peek_binary_changes`
(proto_version 1, messages on). Each `<case>.json` records the server version, the SQL, the
OIDs of the tables and types involved, and every message as hex with its LSN and xid.

LSNs, xids and OIDs differ from one capture to the next; tests compare them with the values
recorded in the same file, and everything else (names, values, kinds) with constants.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

HERE = Path(__file__).resolve().parent
PEEK = (
    "SELECT lsn::text, xid::text::bigint, data FROM pg_logical_slot_peek_binary_changes("
    "'capture', NULL, NULL, 'proto_version', '1', 'publication_names', 'pub', 'messages', 'true')"
)
# md5-chained hex: incompressible enough that pglz gives up and the value is stored out of line.
TOASTED_TEXT = (
    "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 256) AS i)"  # 8 KiB
)


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    setup: list[str]
    transactions: list[list[str]]  # each inner list runs as one transaction
    relations: list[str] = field(default_factory=list)  # schema.table names whose OIDs to record
    types: list[str] = field(default_factory=list)  # schema.type names whose OIDs to record
    session: list[str] = field(default_factory=list)  # run before the transactions, outside them
    teardown: list[str] = field(default_factory=list)


CASES = [
    Case(
        name="insert_update_delete",
        description="REPLICA IDENTITY DEFAULT: insert with a NULL, update without and with a key change, delete.",
        setup=[
            "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, note varchar(20), price numeric(10,2))",
            "CREATE PUBLICATION pub FOR TABLE items",
        ],
        transactions=[
            ["INSERT INTO items VALUES (1, 'crème brûlée', NULL, 4.50)"],
            ["UPDATE items SET note = 'dessert' WHERE id = 1"],
            ["UPDATE items SET id = 2 WHERE id = 1"],
            ["DELETE FROM items WHERE id = 2"],
        ],
        relations=["public.items"],
    ),
    Case(
        name="replica_identity_full",
        description="REPLICA IDENTITY FULL: update and delete carry the whole old row ('O').",
        setup=[
            "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance bigint)",
            "ALTER TABLE accounts REPLICA IDENTITY FULL",
            "INSERT INTO accounts VALUES (7, 'ada', 100)",
            "CREATE PUBLICATION pub FOR TABLE accounts",
        ],
        transactions=[
            ["UPDATE accounts SET balance = 250 WHERE id = 7"],
            ["DELETE FROM accounts WHERE id = 7"],
        ],
        relations=["public.accounts"],
    ),
    Case(
        name="truncate",
        description="TRUNCATE of two tables with RESTART IDENTITY CASCADE, then a plain TRUNCATE.",
        setup=[
            "CREATE TABLE parents (id serial PRIMARY KEY)",
            "CREATE TABLE children (id serial PRIMARY KEY, parent_id int REFERENCES parents)",
            "CREATE PUBLICATION pub FOR TABLE parents, children",
        ],
        transactions=[
            ["TRUNCATE parents, children RESTART IDENTITY CASCADE"],
            ["TRUNCATE children"],
        ],
        relations=["public.parents", "public.children"],
    ),
    Case(
        name="messages",
        description="A non-transactional logical message, then a transactional one inside a transaction.",
        setup=["CREATE PUBLICATION pub FOR ALL TABLES"],
        transactions=[
            # PG 15 does not flush WAL after a non-transactional message and the peek reads only
            # flushed WAL; the commit of the transactional message after it flushes both.
            ["SELECT pg_logical_emit_message(false, 'flux.audit', '\\x00ff'::bytea || 'tail'::bytea)"],
            ["SELECT pg_logical_emit_message(true, 'flux', '{\"request_id\": \"x\"}')"],
        ],
    ),
    Case(
        name="enum_type",
        description="A column of a user-defined enum type makes pgoutput send a Type message before the Relation.",
        setup=[
            "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
            "CREATE TABLE people (id int PRIMARY KEY, mood mood)",
            "CREATE PUBLICATION pub FOR TABLE people",
        ],
        transactions=[["INSERT INTO people VALUES (1, 'happy')"]],
        relations=["public.people"],
        types=["public.mood"],
    ),
    Case(
        name="unchanged_toast",
        description="An out-of-line TOASTed text value, then an update that leaves it alone ('u').",
        setup=[
            "CREATE TABLE docs (id int PRIMARY KEY, body text, revision int)",
            "CREATE PUBLICATION pub FOR TABLE docs",
        ],
        transactions=[
            [f"INSERT INTO docs VALUES (1, {TOASTED_TEXT}, 1)"],
            ["UPDATE docs SET revision = 2 WHERE id = 1"],
        ],
        relations=["public.docs"],
    ),
    Case(
        name="origin",
        description="A transaction replayed under a replication origin: Begin is followed by an Origin message.",
        setup=[
            "CREATE TABLE events (id int PRIMARY KEY)",
            "CREATE PUBLICATION pub FOR TABLE events",
            "SELECT pg_replication_origin_create('flux_capture')",
        ],
        session=["SELECT pg_replication_origin_session_setup('flux_capture')"],
        transactions=[
            [
                "SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2024-01-02 03:04:05+00')",
                "INSERT INTO events VALUES (1)",
            ]
        ],
        teardown=[
            "SELECT pg_replication_origin_session_reset()",
            "SELECT pg_replication_origin_drop('flux_capture')",
        ],
        relations=["public.events"],
    ),
]


def capture(conn: psycopg.Connection, case: Case) -> dict:
    """Run `case` on `conn` (autocommit, fresh database) and return the fixture document."""
    for sql in case.setup:
        conn.execute(sql)
    conn.execute("SELECT pg_create_logical_replication_slot('capture', 'pgoutput')")
    try:
        for sql in case.session:
            conn.execute(sql)
        for statements in case.transactions:
            with conn.transaction():
                for sql in statements:
                    conn.execute(sql)
        rows = conn.execute(PEEK).fetchall()
    finally:
        for sql in case.teardown:
            conn.execute(sql)
        conn.execute("SELECT pg_drop_replication_slot('capture')")
    return {
        "generated_by": "tests/data/pgoutput/capture.py",
        "server_version": conn.execute("SHOW server_version").fetchone()[0],
        "case": case.name,
        "description": case.description,
        "setup": case.setup,
        "transactions": case.transactions,
        "relations": {name: _oid(conn, "regclass", name) for name in case.relations},
        "types": {name: _oid(conn, "regtype", name) for name in case.types},
        "messages": [{"lsn": lsn, "xid": xid, "hex": bytes(data).hex()} for lsn, xid, data in rows],
    }


def _oid(conn: psycopg.Connection, kind: str, name: str) -> int:
    return conn.execute(f"SELECT %s::{kind}::oid::bigint", (name,)).fetchone()[0]


def capture_all(dsn: str, out_dir: Path) -> list[Path]:
    written = []
    with psycopg.connect(dsn, autocommit=True) as admin:
        for case in CASES:
            dbname = f"capture_{case.name}_{uuid.uuid4().hex[:8]}"
            admin.execute(f'CREATE DATABASE "{dbname}"')
            try:
                case_dsn = make_conninfo(dsn, dbname=dbname)
                with psycopg.connect(case_dsn, autocommit=True) as conn:
                    document = capture(conn, case)
            finally:
                admin.execute(f'DROP DATABASE "{dbname}"')
            path = out_dir / f"{case.name}.json"
            path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="superuser DSN of a server with wal_level=logical; default: a throwaway cluster")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    if args.dsn:
        paths = capture_all(args.dsn, args.out)
    else:
        from flux.pg.cluster import Cluster

        state_dir = Path(tempfile.mkdtemp(prefix="flux-capture-"))
        os.chmod(state_dir, 0o755)
        cluster = Cluster(state_dir=state_dir, settings={"fsync": "off"})
        try:
            paths = capture_all(cluster.start().dsn, args.out)
        finally:
            cluster.destroy()
            state_dir.rmdir()
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
