"""Following a table back across renames: the earlier names its changes were recorded under.

From schema v7 on, a change is recorded with its table's oid (`relid`) as well as its name, so
the changes recorded under a table's earlier names can be found by its current oid. An oid is the
table's only while it exists, though: PostgreSQL gives a dropped table's oid to a new table once
its OID counter comes round to it again, and a database restored from a dump has new oids
throughout, its old ones naming other tables or none. Nothing in the log tells such a new table
from a renamed one, so earlier names are followed back one at a time, and only while each name's
changes with the oid end before those of the name after it begin (a table has one name at a
time; two names of one oid at once are two tables); the first name that breaks this ends the
walk. And only oids recorded in this database are followed (`flux.store.schema.relids_from`).

Not guaranteed: a table created, in this database, with the oid of one dropped before (after the
OID counter came round) is taken for it renamed; readers mark every change recorded under another
name with that name. Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from flux.store.schema import relids_from


@dataclass(frozen=True, slots=True)
class Names:
    """Where a table's changes are recorded: under its name, and under its earlier names with its oid."""

    relid: int | None  # the table's oid now; None when there is no such table
    earlier: tuple[tuple[str, str], ...] = ()  # (schema, table), newest first


NO_NAMES = Names(None)

# The names an oid was recorded under, each with its first and last change, through the relid index:
# one descent per name (a loose index scan), whatever the number of changes.
OID_NAMES = """
WITH RECURSIVE hashes(h) AS (
    (SELECT flux.table_hash(schema_name, table_name) FROM flux.state_mutations WHERE relid = %(relid)s
      ORDER BY flux.table_hash(schema_name, table_name) LIMIT 1)
    UNION ALL
    SELECT (SELECT flux.table_hash(schema_name, table_name) FROM flux.state_mutations
             WHERE relid = %(relid)s AND flux.table_hash(schema_name, table_name) > hashes.h
             ORDER BY flux.table_hash(schema_name, table_name) LIMIT 1)
      FROM hashes WHERE hashes.h IS NOT NULL
)
SELECT f.schema_name, f.table_name, f.commit_lsn - '0/0'::pg_lsn, f.seq, l.commit_lsn - '0/0'::pg_lsn, l.seq, f.id
  FROM hashes
 CROSS JOIN LATERAL (
    SELECT schema_name, table_name, commit_lsn, seq, id FROM flux.state_mutations
     WHERE relid = %(relid)s AND flux.table_hash(schema_name, table_name) = hashes.h
     ORDER BY commit_lsn, seq LIMIT 1) f
 CROSS JOIN LATERAL (
    SELECT commit_lsn, seq FROM flux.state_mutations
     WHERE relid = %(relid)s AND flux.table_hash(schema_name, table_name) = hashes.h
     ORDER BY commit_lsn DESC, seq DESC LIMIT 1) l
"""


def table_names(conn: psycopg.Connection, schema: str, table: str) -> Names:
    """The table's oid, and the earlier names its changes were recorded under with that oid.

    Followed back one name at a time, newest first, while each name's changes with the oid all
    come before the first of the name after it (see above), and only through oids recorded in this
    database (`relids_from`): a name whose first change with the oid is older ends the walk. Two
    names of one oid sharing a table hash (64 bits) would be taken for one; the names are those of
    its first change.
    """
    row = conn.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (schema, table),
    ).fetchone()
    if row is None:
        return NO_NAMES
    relid = int(row[0])
    since = relids_from(conn)
    if since is None:
        return Names(relid)
    spans = conn.execute(OID_NAMES, {"relid": relid}).fetchall()
    bound = min(((first, seq) for s, t, first, seq, *_ in spans if (s, t) == (schema, table)), default=None)
    earlier: list[tuple[str, str]] = []
    for s, t, first, first_seq, last, last_seq, first_id in sorted(spans, key=lambda r: (r[4], r[5]), reverse=True):
        if (s, t) == (schema, table):
            continue
        if bound is not None and (last, last_seq) >= bound or first_id < since:
            break  # changes under this name after the later name's began, or another database's oid: not this table
        earlier.append((s, t))
        bound = (first, first_seq)
    return Names(relid, tuple(earlier))


def renamed_to(conn: psycopg.Connection, schema: str, table: str) -> tuple[str, str] | None:
    """For a name no table has now: the table that had it, by the oid of its latest change, when that
    table's walk back through its earlier names (`table_names`) reaches this one; else None."""
    if conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p'))", (schema, table),
    ).fetchone()[0]:
        return None
    row = conn.execute(
        "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p') AND c.oid = ("
        "   SELECT relid FROM flux.state_mutations WHERE flux.table_hash(schema_name, table_name) = flux.table_hash(%s, %s)"
        "      AND schema_name = %s AND table_name = %s ORDER BY commit_lsn DESC, seq DESC LIMIT 1)",
        (schema, table, schema, table),
    ).fetchone()
    if row is None or (schema, table) not in table_names(conn, row[0], row[1]).earlier:
        return None
    return row[0], row[1]
