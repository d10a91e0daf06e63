"""A randomized check that replaying `flux.state_mutations` in commit order rebuilds each captured table.

Each seed runs random transactions over four captured tables (an int primary key, a composite
one, none with REPLICA IDENTITY FULL, and a partitioned one): multi-row inserts, updates and
deletes, primary-key changes, TRUNCATE, NULLs, TOASTed values left alone by updates, a value of
each common type, and DDL between and inside transactions (ADD COLUMN with no default, a constant
or a volatile one, a generated column, DROP COLUMN, RENAME COLUMN, ALTER COLUMN TYPE int to bigint
or numeric and text to varchar, partitions created and attached). Now and then a transaction on
another connection writes one table and commits after one started later, a statement writes 700
rows (more than the engine holds before the sink takes them), a statement is rolled back to a
savepoint, and halfway through the engine is stopped and started again. Each stretch of a
transaction between two DDL statements is tagged with a request id of its own
(`flux.context.emit`), and the tables are read with `to_jsonb` at its end, in the image format the
README gives (the session set as the engine's walsender is).

The log is then replayed, stretch by stretch: an insert adds its new image, an update replaces
the row its old image names, a delete removes it, a truncate clears the table. After each stretch
the replayed tables must equal what was read. Each update's and delete's old image must be a row
the table held (REPLICA IDENTITY FULL: whole), `changed_columns` the columns whose value
differs between the images, `row_key` the key in the image and `old_row_key` the old image's key
when an update changed it. Every change is recorded under the request id of its stretch. The model follows the README's documented limits:
- DDL is not recorded (schema changes "apply from the next change on"): what ADD COLUMN, a
  volatile default, a type change or a rename does to existing rows is taken from the table as the
  DDL left it, read right after it;
- a TRUNCATE of one partition is not recorded: taken from the table read after it, as DDL;
- generated columns are not in the images (pgoutput before PostgreSQL 18): left out of the reads;
- an old row of a partitioned table whose non-key columns are all NULL is recorded as key-only;
- an UPDATE that moves a row to another partition is a delete and an insert.

`FLUX_REPLAY_SEEDS=N FLUX_REPLAY_SEED_FROM=S` runs seeds S to S+N-1 instead of the checked-in ones;
a failure names its seed and the statements it ran.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import flux.context
from tests.support import start_engine

SEED_FROM = int(os.environ.get("FLUX_REPLAY_SEED_FROM", "0"))
SEEDS = range(SEED_FROM, SEED_FROM + int(os.environ.get("FLUX_REPLAY_SEEDS", "3")))
TRANSACTIONS = 40

# The engine's walsender session (flux/cdc/values.py): the reads render values as the images do.
SESSION = ("SET TimeZone = 'UTC'", "SET IntervalStyle = iso_8601", "SET DateStyle = 'ISO, YMD'",
           "SET bytea_output = hex", "SET extra_float_digits = 3")
SETUP = (
    "CREATE TYPE mood AS ENUM ('sad', 'happy')",
    "CREATE SEQUENCE volatile_default",
    "CREATE DOMAIN amount AS numeric(20, 4) CHECK (VALUE >= 0)",
    "CREATE TABLE ip (id int PRIMARY KEY, a text, b int, n numeric, f float8, ts timestamptz, j jsonb, arr int[],"
    " tags text[], bt bytea, u uuid, e mood, iv interval, body text, g int GENERATED ALWAYS AS (id * 2) STORED,"
    " tl timestamp, d date, r real, tm time, tz timetz, js json, narr numeric[], tsarr timestamptz[], jarr jsonb[],"
    " barr bytea[], inet inet, rg int4range, am amount)",
    "CREATE TABLE cp (k1 int, k2 text, v text, w int, PRIMARY KEY (k1, k2))",
    "CREATE TABLE nk (a int, b text, c numeric)",
    "CREATE TABLE pt (id int PRIMARY KEY, v text, w int) PARTITION BY RANGE (id)",
    "CREATE TABLE pt_lo PARTITION OF pt FOR VALUES FROM (0) TO (10)",
    "CREATE TABLE pt_hi PARTITION OF pt FOR VALUES FROM (10) TO (20)",
)
KEYS = {"ip": ("id",), "cp": ("k1", "k2"), "nk": ("a",), "pt": ("id",)}  # nk has no primary key: rows are picked by a
PRIMARY = {"ip", "cp", "pt"}
COLUMNS = {  # the columns statements write, with their kind; DDL changes them
    "ip": {"a": "text", "b": "int", "n": "numeric", "f": "float", "ts": "ts", "j": "jsonb", "arr": "intarr",
           "tags": "textarr", "bt": "bytea", "u": "uuid", "e": "enum", "iv": "interval", "body": "text",
           "tl": "timestamp", "d": "date", "r": "real", "tm": "time", "tz": "timetz", "js": "json", "narr": "numarr",
           "tsarr": "tsarr", "jarr": "jsonbarr", "barr": "byteaarr", "inet": "inet", "rg": "range", "am": "amount"},
    "cp": {"v": "text", "w": "int"},
    "nk": {"b": "text", "c": "numeric"},
    "pt": {"v": "text", "w": "int"},
}
# Stored out of line (TOAST) and not compressible below the threshold: an update leaving it alone does not send it.
LONG = "".join(random.Random(0).choices("abcdefghijklmnopqrstuvwxyz0123456789", k=12_000))
LITERALS = {
    "int": ("NULL", "0", "7", "-3", "2147483000"),
    "bigint": ("NULL", "9007199254740993", "-1"),
    "numeric": ("NULL", "1.50", "'NaN'", "123456789012345678901234.567890", "-0.001", "'Infinity'", "0"),
    "text": ("NULL", "'x'", "''", "'q\"uote'", "'ü'", f"'{LONG}'"),
    "float": ("NULL", "0.1", "'NaN'", "'Infinity'", "'-Infinity'", "1e300", "1.5"),
    "ts": ("NULL", "'2024-03-10 09:22:31.5-05'", "'infinity'", "'-infinity'", "'1999-12-31 23:59:59+00'",
           "'0044-03-15 12:00:00+00 BC'", "'12345-01-01 00:00:00+00'"),
    "timestamp": ("NULL", "'2024-03-10 14:22:31.123456'", "'0044-03-15 12:00:00 BC'", "'infinity'"),
    "date": ("NULL", "'2024-02-29'", "'0044-03-15 BC'", "'-infinity'"),
    "jsonb": ("NULL", """'{"a": [1, null, "x"], "d": 1.50}'""", "'[]'", """'"s"'""", "'2.0'"),
    "intarr": ("NULL", "'{1,NULL,3}'", "'{}'", "'{{1,2},{3,4}}'"),
    "textarr": ("NULL", "ARRAY['a b', NULL, 'NULL', '']", "'{}'"),
    "bytea": ("NULL", "'\\x00ff10'::bytea", "''::bytea"),
    "uuid": ("NULL", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"),
    "enum": ("NULL", "'sad'", "'happy'"),
    "interval": ("NULL", "'1 day 2 hours'", "'-1 year 3 mons'", "'00:00:00.5'"),
    "real": ("NULL", "0.1", "1.1", "'NaN'", "'-Infinity'", "3.4e38"),
    "time": ("NULL", "'14:20:11.25'", "'24:00:00'"),
    "timetz": ("NULL", "'14:20:11+05:30'", "'00:00:00-08'"),
    "json": ("NULL", """'{"a": 1, "a": 2}'""", "' [1, 2.0e3, {\"k\": null}] '", """'"\\u00e9"'"""),
    "numarr": ("NULL", "'{1.50,NULL,NaN,123456789012345678901234.5}'", "'{}'", "'{Infinity,-Infinity}'"),
    "tsarr": ("NULL", "ARRAY['2024-02-29 23:59:59.5+00', NULL, 'infinity', '0044-03-15 12:00:00+00 BC']::timestamptz[]",),
    "jsonbarr": ("NULL", """ARRAY['{"k": [1]}'::jsonb, 'null'::jsonb, NULL]""",),
    "byteaarr": ("NULL", "ARRAY['\\xdead'::bytea, NULL, ''::bytea]",),
    "inet": ("NULL", "'10.1.2.3/16'", "'::1'"),
    "range": ("NULL", "'[1,5)'", "'empty'", "'(,3]'"),
    "amount": ("NULL", "12.5", "0", "99999999.9999"),
}
LITERALS["varchar"] = LITERALS["text"]
NUMBERS = {"int", "bigint", "numeric", "amount"}


class Generator:
    """Random statements over the tables as they are, read from the database where keys are needed."""

    def __init__(self, seed: int, conn: psycopg.Connection) -> None:
        self.r = random.Random(seed)
        self.conn = conn
        self.columns = {t: dict(c) for t, c in COLUMNS.items()}
        self.names = 0
        self.partitions = ["pt_lo", "pt_hi"]  # pt's partitions, each of ten ids from 0 on
        self.tables = sorted(KEYS)  # those statements may write: not one a concurrent transaction writes
        self.truncates = True  # not in a concurrent transaction: the other's reads would wait for its lock

    def literal(self, kind: str) -> str:
        return self.r.choice(LITERALS[kind])

    def live(self, table: str) -> list[tuple]:
        keys = ", ".join(KEYS[table])
        return self.conn.execute(f"SELECT DISTINCT {keys} FROM {table} ORDER BY {keys}").fetchall()

    def free_keys(self, table: str, n: int) -> list[tuple]:
        taken = set(self.live(table))
        candidates = {"ip": [(i,) for i in range(1, 30)], "pt": [(i,) for i in range(0, 10 * len(self.partitions))],
                      "cp": [(i, k) for i in range(1, 4) for k in ("x", "1", "")], "nk": [(i,) for i in (*range(1, 6), None)]}[table]
        free = [k for k in candidates if k not in taken or table == "nk"]
        return self.r.sample(free, min(n, len(free)))

    def where(self, table: str, key: tuple) -> str:
        return " AND ".join(f"{c} IS NOT DISTINCT FROM {sql(v)}" for c, v in zip(KEYS[table], key))

    def assignments(self, table: str) -> str:
        columns = self.r.sample(sorted(self.columns[table]), self.r.randint(1, min(3, len(self.columns[table]))))
        out = []
        for c in columns:
            kind = self.columns[table][c]
            if kind in NUMBERS and self.r.random() < 0.3:
                out.append(f"{c} = {c} + 1")
            elif self.r.random() < 0.1:  # written anew, unchanged
                out.append(f"{c} = {c}")
            else:
                out.append(f"{c} = {self.literal(kind)}")
        return ", ".join(out)

    def statement(self) -> str | None:
        table = self.r.choice(self.tables)
        kind = self.r.choices(["insert", "update", "update many", "rekey", "delete", "delete many", "truncate", "bulk"],
                              [6, 6, 2, 2, 2, 1, 1, 0.3])[0]
        if kind == "bulk" and "nk" not in self.tables or kind == "truncate" and not self.truncates:
            kind = "insert"
        if kind == "bulk":  # more rows than the engine holds before it hands them to the sink (500)
            return f"INSERT INTO nk (a, {self.r.choice(sorted(self.columns['nk']))}) SELECT i % 7, NULL FROM generate_series(1, 700) i"
        live = self.live(table)
        if not live and kind not in ("insert", "truncate"):
            kind = "insert"
        if kind == "insert":
            keys = self.free_keys(table, self.r.randint(1, 3))
            if not keys:
                return None
            columns = self.r.sample(sorted(self.columns[table]), self.r.randint(0, len(self.columns[table])))
            rows = [", ".join([*map(sql, key), *(self.literal(self.columns[table][c]) for c in columns)]) for key in keys]
            return f"INSERT INTO {table} ({', '.join([*KEYS[table], *columns])}) VALUES ({'), ('.join(rows)})"
        if kind == "update":
            return f"UPDATE {table} SET {self.assignments(table)} WHERE {self.where(table, self.r.choice(live))}"
        if kind == "update many":
            return f"UPDATE {table} SET {self.assignments(table)} WHERE {KEYS[table][0]} % 2 = {self.r.randint(0, 1)}"
        if kind == "rekey" and table != "nk":
            [target] = self.free_keys(table, 1) or [None]
            if target is None:
                return None
            sets = ", ".join(f"{c} = {sql(v)}" for c, v in zip(KEYS[table], target))
            extra = f", {self.assignments(table)}" if self.r.random() < 0.5 else ""
            return f"UPDATE {table} SET {sets}{extra} WHERE {self.where(table, self.r.choice(live))}"
        if kind in ("delete", "rekey"):
            return f"DELETE FROM {table} WHERE {self.where(table, self.r.choice(live))}"
        if kind == "delete many":
            return f"DELETE FROM {table} WHERE {KEYS[table][0]} % 3 = {self.r.randint(0, 2)}"
        tables = sorted({table, self.r.choice(self.tables)}) if self.r.random() < 0.3 else [table]
        return f"TRUNCATE {', '.join(tables)}"

    def unrecorded(self) -> str:
        """A statement the log does not record the effect of on existing rows: DDL, or a partition's TRUNCATE."""
        table = self.r.choice(self.tables)
        columns = self.columns[table]
        kind = self.r.choice(["add", "add default", "add volatile", "generated", "drop", "rename", "type",
                              "truncate partition", "new partition"])
        self.names += 1
        name = f"c{self.names}"
        if kind in ("truncate partition", "new partition") and "pt" not in self.tables:
            kind = "add"
        if kind == "truncate partition":
            return f"TRUNCATE {self.r.choice(self.partitions)}"
        if kind == "new partition":
            return self.new_partition(name)
        if kind == "generated":
            return f"ALTER TABLE {table} ADD COLUMN {name} int GENERATED ALWAYS AS ({KEYS[table][0]} + 1) STORED"
        if kind == "drop" and len(columns) > 1:
            dropped = self.r.choice(sorted(columns))
            del columns[dropped]
            return f"ALTER TABLE {table} DROP COLUMN {dropped}"
        if kind == "rename":
            old = self.r.choice(sorted(columns))
            columns[name] = columns.pop(old)
            return f"ALTER TABLE {table} RENAME COLUMN {old} TO {name}"
        retypable = sorted(c for c, k in columns.items() if k in ("int", "text"))
        if kind == "type" and retypable:
            column = self.r.choice(retypable)
            new = self.r.choice(["bigint", "numeric"]) if columns[column] == "int" else "varchar"
            columns[column] = new
            return f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {new}"
        added = self.r.choice(["int", "text", "numeric", "jsonb", "ts", "interval"])
        columns[name] = added
        constant = self.r.choice([v for v in LITERALS[added] if LONG not in v])  # pg_attribute, holding it, has no TOAST
        default = {"add default": f" DEFAULT {constant}",
                   "add volatile": f" DEFAULT nextval('volatile_default')::{'text' if added == 'text' else 'int'}"}.get(kind, "")
        if kind == "add volatile" and added != "text":
            columns[name] = "int"
            added = "int"
        return f"ALTER TABLE {table} ADD COLUMN {name} {'int' if added == 'int' else {'ts': 'timestamptz'}.get(added, added)}{default}"


    def new_partition(self, name: str) -> str:
        """CREATE ... PARTITION OF pt, or ATTACH of a table made with pt's columns in reverse order
        (its attribute numbers are not the root's, nor are they after a column of pt was dropped)."""
        low = 10 * len(self.partitions)
        self.partitions.append(f"pt_{name}")
        bounds = f"FOR VALUES FROM ({low}) TO ({low + 10})"
        columns = self.conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod), attgenerated <> '' FROM pg_attribute"
            " WHERE attrelid = 'pt'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum DESC").fetchall()
        if self.r.random() < 0.5 or any(generated for *_, generated in columns):
            return f"CREATE TABLE pt_{name} PARTITION OF pt {bounds}"
        definition = ", ".join(f"{c} {t}" + (" NOT NULL" if c == "id" else "") for c, t, _ in columns)
        return f"CREATE TABLE pt_{name} ({definition}); ALTER TABLE pt ATTACH PARTITION pt_{name} {bounds}"


def sql(value: Any) -> str:
    if value is None:
        return "NULL"
    return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"


def canonical(value: Any) -> Any:
    """A JSON value to compare: a number by its text (1.50 is not 1.5: numeric keeps its scale)."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, (Decimal, int)) and not isinstance(value, bool):
        return {"number": str(value)}
    return value


def load(text: str | None) -> Any:
    return None if text is None else canonical(json.loads(text, parse_float=Decimal))


def read_tables(conn: psycopg.Connection) -> dict[str, list[dict]]:
    """Each table's rows as `to_jsonb` gives them, without generated columns (not in the images)."""
    out = {}
    for table in KEYS:
        generated = [g for (g,) in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attgenerated <> '' AND NOT attisdropped",
            (table,)).fetchall()]
        rows = conn.execute(f"SELECT (to_jsonb(t) - %s::text[])::text FROM {table} t", (generated,)).fetchall()
        out[table] = [load(r) for (r,) in rows]
    return out


def sort_rows(rows: list[dict]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


class RolledBack(Exception):
    pass


def run(conn: psycopg.Connection, other: psycopg.Connection, seed: int,
        halfway: Callable[[], None]) -> tuple[list[tuple], list[str]]:
    """Run the seed's transactions. Returns the script to replay, in commit order: ("stretch", request
    id, tables read at its end) and ("unrecorded", tables read after it); and a transcript. Now and
    then a transaction on `other` writes one table while one on `conn` writes the others, and
    commits after it. `halfway` is called between two transactions halfway through."""
    gen = Generator(seed, conn)
    script: list[tuple] = []
    transcript: list[str] = []

    def stretch(connection: psycopg.Connection, rid: str, savepoints: bool) -> None:
        flux.context.emit(connection, rid)
        transcript.append(f"-- {rid}")
        for _ in range(gen.r.randint(1, 4)):
            statement = gen.statement()
            if statement is None:
                continue
            if savepoints and gen.r.random() < 0.1:  # in a savepoint rolled back: not recorded
                with pytest.raises(RolledBack), connection.transaction():
                    connection.execute(statement)
                    raise RolledBack
                transcript.append(f"{statement} -- rolled back to a savepoint")
                continue
            connection.execute(statement)
            transcript.append(statement)

    def unrecorded() -> None:
        statement = gen.unrecorded()
        conn.execute(statement)
        transcript.append(statement)
        script.append(("unrecorded", read_tables(conn)))

    for n in range(TRANSACTIONS):
        if n == TRANSACTIONS // 2:
            halfway()
        if gen.r.random() < 0.15:  # DDL between transactions, on its own
            unrecorded()
        concurrent = gen.r.choice(sorted(KEYS)) if gen.r.random() < 0.2 else None
        if concurrent:
            other.execute("BEGIN")
            gen.conn, gen.tables, gen.truncates = other, [concurrent], False
            stretch(other, f"t{n:02d}.other", savepoints=False)
            gen.conn, gen.tables, gen.truncates = conn, sorted(set(KEYS) - {concurrent}), True
        with conn.transaction():
            for k in range(gen.r.choices([1, 2, 3], [6, 2, 1])[0]):
                if k:
                    unrecorded()
                rid = f"t{n:02d}.{k}"
                stretch(conn, rid, savepoints=True)
                script.append(("stretch", rid, read_tables(conn)))
        if concurrent:
            other.execute("COMMIT")
            transcript.append(f"-- t{n:02d}.other commits")
            script.append(("stretch", f"t{n:02d}.other", read_tables(conn)))
            gen.tables = sorted(KEYS)
    return script, [t.replace(LONG, "LONG") for t in transcript]


def replay(log: list[dict], script: list[tuple]) -> list[str]:
    """Replay the log along the script; the disagreements found."""
    failures: list[str] = []
    by_request: dict[str, list[dict]] = {}
    for m in log:
        by_request.setdefault(m["request_id"], []).append(m)
    stretches = [step[1] for step in script if step[0] == "stretch"]
    for rid in sorted(set(by_request) - set(stretches), key=str):
        failures.append(f"{len(by_request[rid])} changes recorded under request {rid!r}, which wrote none")
    in_log = [m["request_id"] for i, m in enumerate(log) if i == 0 or log[i - 1]["request_id"] != m["request_id"]]
    if in_log != [rid for rid in stretches if rid in by_request]:  # commit order, each stretch's changes together
        failures.append(f"the log's order of requests {in_log}, their commit order {stretches}")
    state: dict[str, list[dict]] = {t: [] for t in KEYS}
    for step in script:
        if step[0] == "unrecorded":
            state = {t: list(rows) for t, rows in step[1].items()}
            continue
        _, rid, tables = step
        for i, m in enumerate(by_request.get(rid, [])):
            failures += apply(state, m, f"{rid} change {i} ({m['op']} {m['table']} {m['row_key']})")
        for table, rows in tables.items():
            got, want = sort_rows(state[table]), sort_rows(rows)
            if got != want:
                failures.append(f"after {rid}, {table}:\n  replayed, not in table: {[r for r in got if r not in want][:3]}"
                                f"\n  in table, not replayed: {[r for r in want if r not in got][:3]}")
                state[table] = list(rows)  # go on from the truth, to report later stretches on their own
    return failures


def apply(state: dict[str, list[dict]], m: dict, where: str) -> list[str]:
    rows = state[m["table"]]
    failures = []
    if m["missing_columns"] is not None:
        failures.append(f"{where}: missing_columns {m['missing_columns']}")
    if m["op"] == "truncate":
        rows.clear()
        return failures
    image = m["new"] if m["new"] is not None else m["old"]
    key = {c: image[c] for c in KEYS[m["table"]]} if m["table"] in PRIMARY else None
    if m["row_key"] != key:
        failures.append(f"{where}: row_key {m['row_key']}, the image's key {key}")
    moved = m["op"] == "update" and m["table"] in PRIMARY and any(m["old"][c] != m["new"][c] for c in KEYS[m["table"]])
    old_key = {c: m["old"][c] for c in KEYS[m["table"]]} if moved else None
    if m["old_row_key"] != old_key:
        failures.append(f"{where}: old_row_key {m['old_row_key']}, the old image's key {old_key}")
    if m["op"] == "insert":
        rows.append(m["new"])
        return failures
    old = m["old"]
    if m["old_complete"]:
        matches = [r for r in rows if r == old]
    else:  # documented: a partitioned table's old row whose non-key columns are all NULL is taken as key-only
        key = KEYS[m["table"]]
        matches = [r for r in rows if all(r.get(c) == old.get(c) for c in key)
                   and m["table"] == "pt" and all(v is None for c, v in r.items() if c not in key)]
    if not matches:
        failures.append(f"{where}: old image {old} (complete: {m['old_complete']}) is no row of the table")
        return failures
    rows.remove(matches[0])
    if m["op"] == "update":
        rows.append(m["new"])
        if m["changed_columns"] is not None:
            before = matches[0]
            changed = sorted(c for c in m["new"] if before.get(c) != m["new"][c])
            if sorted(m["changed_columns"]) != changed:
                failures.append(f"{where}: changed_columns {m['changed_columns']}, the images differ in {changed}")
    return failures


def recorded(conn: psycopg.Connection) -> list[dict]:
    rows = conn.execute(
        "SELECT request_id, table_name, op, row_key::text, old::text, new::text, old_complete, missing_columns,"
        " changed_columns, old_row_key::text FROM flux.state_mutations ORDER BY commit_lsn, seq").fetchall()
    keys = ("request_id", "table", "op", "row_key", "old", "new", "old_complete", "missing_columns", "changed_columns", "old_row_key")
    out = []
    for row in rows:
        m = dict(zip(keys, row))
        for k in ("row_key", "old", "new", "old_row_key"):
            m[k] = load(m[k])
        out.append(m)
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_replaying_the_log_rebuilds_every_table_after_every_transaction(dsn, conn, capture, seed):
    for statement in (*SETUP, *SESSION):
        conn.execute(statement)
    engines = [capture(tables=list(KEYS))]

    def restart() -> None:  # stopped and started again mid-stream: what it had not recorded, recorded once
        engines[-1].stop()
        engines.append(start_engine(dsn))

    try:
        with psycopg.connect(dsn, autocommit=True) as other:
            script, transcript = run(conn, other, seed, restart)
        engines[-1].caught_up()
    finally:
        engines[-1].stop()
    log = recorded(conn)
    assert len(log) >= TRANSACTIONS and {m["table"] for m in log} == set(KEYS), f"seed {seed} did little"
    failures = replay(log, script)
    assert not failures, (f"seed {seed}: {len(failures)} disagreements (rerun: FLUX_REPLAY_SEED_FROM={seed}"
                          f" FLUX_REPLAY_SEEDS=1)\n" + "\n".join(failures[:12]).replace(LONG, "LONG")
                          + "\n\nstatements:\n" + "\n".join(transcript))
