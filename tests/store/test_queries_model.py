"""A randomized, model-based check of the mutation log's read side against the real engine.

Each seed generates a sequence of transactions over five captured tables (an int primary key, a
composite one, a numeric one, none, and a partitioned table), each transaction attributed to a
request id with `flux.context` (a few to none, some nesting another request, a few rolled back).
They run against PostgreSQL, the engine records them, and what `row_history`, `row_blame`,
`table_blame` and `explain` (`flux why`: the rows it lists, their counts, the history command
under each) return is compared with a Python model of what each should be, for every row ever
touched and every request. The model follows the README's semantics, its Known limits included:
a TRUNCATE of one partition is not recorded, an UPDATE that moves a row to another partition is a
delete and an insert, an old row of a partitioned table whose non-key columns are all NULL is
recorded as key-only, a truncate is in the history of every row its table had changed before it,
and a row without a primary key is followed only while its images hold the values asked for.

The checked-in seeds run in CI. `FLUX_STATE_SEEDS=N FLUX_STATE_SEED_FROM=S` runs seeds S to S+N-1
instead, to search by hand; a failure names its seed and the transactions it ran.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import flux.context
from flux.cli.trace import history_hint
from flux.errors import FluxError, NotFoundError
from flux.store.queries import Writer, resolve_request_id, row_blame, row_history, table_blame
from flux.store.why import explain, request_mutations

SEED_FROM = int(os.environ.get("FLUX_STATE_SEED_FROM", "0"))
SEEDS = range(SEED_FROM, SEED_FROM + int(os.environ.get("FLUX_STATE_SEEDS", "6")))
TRANSACTIONS = 50

COLUMNS = {
    "ip": ("id", "a", "b"),
    "cp": ("k1", "k2", "v"),
    "nk": ("a", "b"),
    "pt": ("id", "v"),
    "nm": ("id", "v"),
}
KEYS = {"ip": ("id",), "cp": ("k1", "k2"), "nk": ("a",), "pt": ("id",), "nm": ("id",)}  # nk: no primary key; rows told apart by a
PRIMARY = {"ip", "cp", "pt", "nm"}
SETUP = (
    "CREATE TABLE ip (id int PRIMARY KEY, a text, b int)",
    "CREATE TABLE cp (k1 int, k2 text, v text, PRIMARY KEY (k1, k2))",
    "CREATE TABLE nk (a int, b text)",
    "CREATE TABLE pt (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)",
    "CREATE TABLE pt_lo PARTITION OF pt FOR VALUES FROM (0) TO (10)",
    "CREATE TABLE pt_hi PARTITION OF pt FOR VALUES FROM (10) TO (20)",
    "CREATE TABLE nm (id numeric PRIMARY KEY, v text)",
)
# A value stored out of line (TOAST): an update that leaves it alone does not send it again.
LONG = "".join(random.Random(0).choices("abcdefghijklmnopqrstuvwxyz0123456789", k=12_000))
TEXTS = ("x", "y", "zz", "", None, LONG)


@dataclass
class Event:
    """One row change the log should hold, in commit order."""

    index: int
    table: str
    op: str
    rid: str | None
    key: dict[str, Any] | None = None  # row_key: None for nk and for a truncate
    old_key: dict[str, Any] | None = None
    old: dict[str, Any] | None = None
    new: dict[str, Any] | None = None

    @property
    def key_only(self) -> bool:
        """Documented (README, capture of partitions): an old row of a partitioned table whose non-key
        columns are all NULL is taken for one that logged only its key, and recorded as such."""
        return self.table == "pt" and self.old is not None and all(self.old[c] is None for c in self.old if c != "id")

    @property
    def recorded_old(self) -> dict[str, Any] | None:
        return {"id": self.old["id"]} if self.key_only else self.old

    @property
    def changed(self) -> tuple[str, ...] | None:
        if self.op == "truncate" or self.key_only:
            return None
        if self.op in ("insert", "delete"):
            return COLUMNS[self.table]
        return tuple(c for c in COLUMNS[self.table] if differs(self.old[c], self.new[c]))


@dataclass
class Blame:
    """What blame of one row (by its key, for nk by its a) should say."""

    columns: dict[str, tuple[Any, int | None]]  # column -> (value, index of the event that set it)
    last: int
    deleted_by: int | None = None
    moved_to: dict[str, Any] | None = None


@dataclass
class Model:
    rows: dict[str, dict[tuple, dict[str, Any]]] = field(default_factory=lambda: {t: {} for t in COLUMNS})
    blame: dict[tuple[str, tuple], Blame] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    touched: dict[str, set[tuple]] = field(default_factory=lambda: {t: set() for t in COLUMNS})

    # -- what a change does to the model ------------------------------------------------------

    def event(self, table: str, op: str, rid: str | None, **images: Any) -> Event:
        e = Event(len(self.events), table, op, rid, **images)
        self.events.append(e)
        return e

    def insert(self, table: str, row: dict[str, Any], rid: str | None) -> None:
        key = ident(table, row)
        self.rows[table][key] = row
        e = self.event(table, "insert", rid, key=row_key(table, row), new=dict(row))
        self.touched[table].add(key)
        self.blame[(table, key)] = Blame({c: (v, e.index) for c, v in row.items()}, last=e.index)

    def update(self, table: str, key: tuple, values: dict[str, Any], rid: str | None) -> None:
        old = self.rows[table].pop(key)
        new = {**old, **values}
        new_key = ident(table, new)
        if table == "pt" and partition(old["id"]) != partition(new["id"]):
            # Documented: a move to another partition is recorded as a delete and an insert.
            self.delete(table, key, rid, row=old)
            self.insert(table, new, rid)
            return
        self.rows[table][new_key] = new
        moved = new_key != key and table in PRIMARY
        e = self.event(table, "update", rid, key=row_key(table, new), old=dict(old), new=dict(new),
                       old_key=row_key(table, old) if moved else None)
        self.touched[table].add(new_key)
        before = self.blame[(table, key)]
        columns = {c: ((new[c], e.index) if differs(old[c], new[c]) else before.columns[c]) for c in new}
        if moved:
            self.blame[(table, key)] = Blame(before.columns, last=e.index, deleted_by=e.index, moved_to=row_key(table, new))
        elif new_key != key:
            # Without a primary key a row is followed only while its images hold the values asked for
            # (README): the trail of `key` ends at this update, as it left the row; that of `new_key`
            # starts here, the columns it did not change set before that trail.
            self.blame[(table, key)] = Blame(columns, last=e.index)
            columns = {c: (new[c], e.index if differs(old[c], new[c]) else None) for c in new}
        self.blame[(table, new_key)] = Blame(columns, last=e.index)

    def delete(self, table: str, key: tuple, rid: str | None, row: dict[str, Any] | None = None) -> None:
        old = row if row is not None else self.rows[table].pop(key)
        e = self.event(table, "delete", rid, key=row_key(table, old), old=dict(old))
        b = self.blame[(table, key)]
        self.blame[(table, key)] = Blame(b.columns, last=e.index, deleted_by=e.index)

    def truncate(self, table: str, rid: str | None) -> None:
        self.rows[table].clear()
        e = self.event(table, "truncate", rid)
        for (t, key), b in self.blame.items():
            if t == table:
                self.blame[(t, key)] = Blame(b.columns, last=e.index, deleted_by=b.deleted_by if b.deleted_by is not None else e.index,
                                             moved_to=b.moved_to)

    def truncate_partition(self, low: bool) -> None:
        """Not recorded (README, Known limits): the rows go, the log and blame know nothing of it."""
        for key in [k for k in self.rows["pt"] if (k[0] < 10) == low]:
            del self.rows["pt"][key]

    def sql_name(self, table: str) -> str:
        """The table's name in SQL now (a model of renames names it otherwise)."""
        return table

    def partition_name(self, low: bool) -> str:
        return f"pt_{'lo' if low else 'hi'}"

    # -- what the log should answer ------------------------------------------------------------

    def history(self, table: str, key: tuple) -> list[Event]:
        """A row's changes: those of its key (before or after an update), then the table's truncates
        after its first change; for nk, the changes whose old or new image holds its a."""
        mine = [e for e in self.events if e.table == table and e.op != "truncate" and key in self._keys_of(e)]
        first = mine[0].index
        truncates = [e for e in self.events if e.table == table and e.op == "truncate" and e.index > first]
        return sorted(mine + truncates, key=lambda e: e.index)

    def _keys_of(self, e: Event) -> set[tuple]:
        return {ident(e.table, image) for image in (e.old, e.new) if image is not None}

    def table_blame(self, table: str) -> list[tuple[dict | None, int, dict | None]]:
        """(row_key, writer, moved_from) of the rows `flux state blame TABLE` lists, newest first: a
        row of a primary-key table once, at its last change, unless a later change moved it away;
        every change of a table without one; back to the last truncate, itself included."""
        events = [e for e in self.events if e.table == table]
        cut = max((e.index for e in events if e.op == "truncate"), default=-1)
        listed: list[Event] = [e for e in events if e.index >= cut]
        if table in PRIMARY:
            last: dict[tuple, Event] = {}
            for e in listed:
                if e.op == "truncate":
                    continue
                last[ident(table, e.key)] = e
                if e.old_key is not None:
                    last.pop(ident(table, e.old_key), None)  # the row has left this key
            listed = [e for e in listed if e.op == "truncate" or last.get(ident(table, e.key)) is e]
        return [(e.key, e.index, e.old_key) for e in reversed(listed)]


def differs(old: Any, new: Any) -> bool:
    """A column changed: its value, or how it is written (numeric 1 to 1.0, which PostgreSQL keeps)."""
    return old != new or str(old) != str(new)


def partition(id_: int) -> str:
    return "lo" if id_ < 10 else "hi"


def ident(table: str, row: dict[str, Any]) -> tuple:
    return tuple(row[c] for c in KEYS[table])


def row_key(table: str, row: dict[str, Any]) -> dict[str, Any] | None:
    return {c: row[c] for c in KEYS[table]} if table in PRIMARY else None


# -- the generator -----------------------------------------------------------------------------


class Generator:
    """Random single-row statements, applied to the model and returned as SQL to run."""

    def __init__(self, seed: int, tables: tuple[str, ...] = tuple(COLUMNS)) -> None:
        self.r = random.Random(seed)
        self.tables = tables

    def new_key(self, model: Model, table: str) -> dict[str, Any] | None:
        live = model.rows[table]
        candidates = {
            "ip": [{"id": i} for i in range(1, 9)],
            # text that reads as a number, a boolean or JSON's null: --key tries each form, the text's matches
            "cp": [{"k1": i, "k2": k} for i in range(1, 4) for k in ("x", "1", "", "null", "t")],
            "nk": [{"a": i} for i in (*range(1, 7), None)],
            "pt": [{"id": i} for i in (*range(1, 6), *range(11, 16))],
            # exact, with the scale as written (2.50 is recorded so, and found as 2.5 too)
            "nm": [{"id": Decimal(d)} for d in ("0.1", "1", "2.50", "10", "100.000", "12345678901234567890.123")],
        }[table]
        free = [k for k in candidates if ident(table, k) not in live]
        return self.r.choice(free) if free else None

    def values(self, table: str) -> dict[str, Any]:
        t = lambda: self.r.choice(TEXTS)  # noqa: E731
        return {"ip": lambda: {"a": t(), "b": self.r.choice((0, 1, 7, None))}, "cp": lambda: {"v": t()},
                "nk": lambda: {"b": t()}, "pt": lambda: {"v": t()},
                "nm": lambda: {"v": t()}}[table]()

    def step(self, model: Model, rid: str | None) -> list[tuple[str, tuple]]:
        """One operation on the model; the statements that do it."""
        table = self.r.choice(self.tables)
        live = model.rows[table]
        kind = self.r.choices(["insert", "update", "rekey", "delete", "reinsert", "churn", "truncate", "partition"],
                              [5, 5, 2, 2, 1, 1, 0.3, 0.3])[0]
        if kind in ("update", "rekey", "delete", "reinsert", "churn") and not live:
            kind = "insert"
        if kind == "partition" and table != "pt":
            kind = "truncate"
        if kind == "insert":
            key = self.new_key(model, table)
            if key is None:
                return []
            row = {**key, **self.values(table)}
            row = {c: row[c] for c in COLUMNS[table]}
            model.insert(table, row, rid)
            return [_insert(model.sql_name(table), row)]
        if kind == "truncate":  # sometimes of two tables in one statement: one truncate recorded for each
            tables = [table] + ([self.r.choice([t for t in self.tables if t != table])] if self.r.random() < 0.3 else [])
            for t in tables:
                model.truncate(t, rid)
            return [(f"TRUNCATE {', '.join(map(model.sql_name, tables))}", ())]
        if kind == "partition":
            low = self.r.random() < 0.5
            model.truncate_partition(low)
            return [(f"TRUNCATE {model.partition_name(low)}", ())]
        key = self.r.choice(sorted(live, key=repr))
        where = dict(zip(KEYS[table], key))
        if kind in ("update", "churn"):
            out = []
            for _ in range(1 if kind == "update" else self.r.randint(2, 3)):
                values = self.values(table)
                model.update(table, key, values, rid)
                out.append(_update(model.sql_name(table), values, where))
            return out
        if kind == "rekey" and table == "nm" and self.r.random() < 0.4:  # the same key, written with one more digit
            text = str(where["id"])
            values = {"id": Decimal(text + ("0" if "." in text else ".0"))}
            model.update(table, key, values, rid)
            return [_update(model.sql_name(table), values, where)]
        if kind == "rekey":
            target = self.new_key(model, table)
            if target is None:
                return []
            moved = {c: v for c, v in target.items() if v != where[c]} or target
            values = {**moved, **(self.values(table) if self.r.random() < 0.5 else {})}
            model.update(table, key, values, rid)
            return [_update(model.sql_name(table), values, where)]
        row = dict(live[key])
        model.delete(table, key, rid)
        statements = [_delete(model.sql_name(table), where)]
        if kind == "reinsert":
            again = {**row, **self.values(table)}
            model.insert(table, again, rid)
            statements.append(_insert(model.sql_name(table), again))
        return statements


def _insert(table: str, row: dict[str, Any]) -> tuple[str, tuple]:
    columns = ", ".join(row)
    return f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * len(row))})", tuple(row.values())


def _update(table: str, values: dict[str, Any], where: dict[str, Any]) -> tuple[str, tuple]:
    sets = ", ".join(f"{c} = %s" for c in values)
    return f"UPDATE {table} SET {sets} WHERE {_where(where)}", (*values.values(), *where.values())


def _delete(table: str, where: dict[str, Any]) -> tuple[str, tuple]:
    return f"DELETE FROM {table} WHERE {_where(where)}", tuple(where.values())


def _where(where: dict[str, Any]) -> str:
    return " AND ".join(f"{c} IS NOT DISTINCT FROM %s" for c in where)  # nk's a may be NULL


def _short(params: tuple) -> tuple:
    return tuple("LONG" if p == LONG else p for p in params)


class RolledBack(Exception):
    pass


# A statement to run: SQL and its parameters, and for a statement whose rows the model learns from
# its RETURNING (a multi-row statement changes rows in an order only PostgreSQL knows, which is the
# order of the log), what applies them to the model.
Statement = tuple[str, tuple] | tuple[str, tuple, Callable[[list[tuple]], None]]


def run(conn: psycopg.Connection, seed: int, gen: Generator | None = None, model: Model | None = None,
        between: Callable[[int, Model], list[str]] | None = None) -> tuple[Model, list[str], list[str]]:
    """Run the seed's transactions; the model of what committed, the requests that rolled back, and a
    transcript to show on failure. A transaction is one request, or none (no context), or one
    rolled back; or a request with another nested in it (`flux.context.request` in a savepoint),
    which commits or rolls back alone, the outer request's later changes its own again. Each
    operation is generated and run in turn; `between(n, model)` runs before transaction n, outside
    any, and returns what it did for the transcript."""
    gen, model = gen or Generator(seed), model or Model()
    rolled_back: list[str] = []
    transcript: list[str] = []

    def steps(rid: str | None, what: str) -> None:
        done: list[Statement] = []
        for _ in range(gen.r.randint(1, 3)):
            for statement in gen.step(model, rid):
                rows = conn.execute(statement[0], statement[1])
                if len(statement) > 2:
                    statement[2](rows.fetchall())
                done.append(statement)
        transcript.append(f"-- {what} {rid}\n" + "\n".join(f"{s[0]} {_short(s[1])}" for s in done))

    for n in range(TRANSACTIONS):
        if between is not None:
            transcript += between(n, model)
        kind = gen.r.choices(["request", "no context", "rollback", "nested", "nested rollback", "late context"],
                             [8, 1, 1, 1, 1, 1])[0]
        rid = None if kind == "no context" else f"req-{seed}-{n:03d}"
        inner_rid = f"req-{seed}-{n:03d}-inner"
        before = copy.deepcopy(model)
        if rid is None:
            with conn.transaction():
                steps(rid, kind)
            continue
        if kind == "late context":  # changes before a transaction's first message take it too
            with conn.transaction():
                steps(rid, kind)
                flux.context.emit(conn, rid, function="late")
                steps(rid, "then")
            continue
        try:
            with flux.context.request(conn, rid, function=f"f{n % 3}"):
                steps(rid, kind)
                if kind.startswith("nested"):
                    before_inner = copy.deepcopy(model)
                    try:
                        with flux.context.request(conn, inner_rid, function="inner"):
                            steps(inner_rid, "inner")
                            if kind == "nested rollback":
                                raise RolledBack
                    except RolledBack:
                        model = before_inner
                        rolled_back.append(inner_rid)
                    steps(rid, "then")
                if kind == "rollback":
                    raise RolledBack
        except RolledBack:
            rolled_back.append(rid)
            model = before
    return model, rolled_back, transcript


# -- the comparison ----------------------------------------------------------------------------


def _key_change(e: Event, key: tuple) -> str | None:
    """As history marks an update that changed the primary key: "out" of the key asked for, or "in"."""
    if e.old_key is None:
        return None
    return "out" if ident(e.table, e.old_key) == key else "in"


def _hint_arguments(command: str) -> dict[str, Any]:
    """The row of a `flux state history TABLE --id V` or `... --key C=V ...` command, as the shell splits it."""
    words = shlex.split(command)[4:]
    if words[0] == "--id":
        return {"id_value": words[1]}
    return {"key": dict(word.split("=", 1) for word in words[1::2])}


def _arguments(table: str, key: tuple) -> dict[str, Any]:
    given = {c: "null" if v is None else str(v) for c, v in zip(KEYS[table], key)}
    return {"id_value": given["id"]} if len(KEYS[table]) == 1 and table in PRIMARY else {"key": given}


@pytest.mark.parametrize("seed", SEEDS)
def test_history_blame_and_why_agree_with_a_model_of_random_transactions(dsn, conn, capture, seed):
    for statement in SETUP:
        conn.execute(statement)
    running = capture(tables=list(COLUMNS))
    model, rolled_back, transcript = run(conn, seed)
    running.caught_up()
    assert {e.table for e in model.events} == set(COLUMNS) and len(model.events) >= TRANSACTIONS, "the seed did little"
    failures: list[str] = []

    check = functools.partial(compare, failures)

    # The log as a whole: one row per model event, in commit order. Writers are then named by position.
    recorded = conn.execute(
        "SELECT commit_lsn::text, seq, table_name, op, request_id, row_key::text, old_row_key::text, old::text, new::text,"
        " changed_columns FROM flux.state_mutations ORDER BY commit_lsn, seq"
    ).fetchall()
    recorded = [(*r[:5], *(None if j is None else json.loads(j, parse_float=Decimal) for j in r[5:9]), r[9]) for r in recorded]
    position = {(lsn, seq): i for i, (lsn, seq, *_) in enumerate(recorded)}
    check("the log", [tuple(r[2:9]) + (tuple(r[9]) if r[9] is not None else None,) for r in recorded],
          [(e.table, e.op, e.rid, e.key, e.old_key, e.recorded_old, e.new, e.changed) for e in model.events])
    assert not failures, _report(seed, transcript, failures)

    def at(w: Writer | None) -> int | None:
        return None if w is None else position[(w.commit_lsn, w.seq)]

    def row(table: str, key: tuple) -> None:
        name = f"{table} {dict(zip(KEYS[table], key))}"
        history = row_history(conn, "public", table, **_arguments(table, key))
        want_history = [e.index for e in model.history(table, key)]
        check(f"history {name}", [(position[(m.commit_lsn, m.seq)], m.key_change, m.op, m.request_id, m.row_key, m.old_row_key,
                                   m.old, m.new, m.changed_columns) for m in history.mutations],
              [(e.index, _key_change(e, key), e.op, e.rid, e.key, e.old_key, e.recorded_old, e.new, e.changed)
               for e in model.history(table, key)])
        recorded_key = dict(zip(KEYS[table], key)) if table in PRIMARY else None
        check(f"history {name} key", (history.key, history.total, history.pruned_before), (recorded_key, len(want_history), None))
        newest = row_history(conn, "public", table, limit=2, **_arguments(table, key))
        check(f"history {name} --limit 2", ([position[(m.commit_lsn, m.seq)] for m in newest.mutations], newest.total),
              (want_history[-2:], len(want_history)))
        want = model.blame[(table, key)]
        blame = row_blame(conn, "public", table, **_arguments(table, key))
        check(f"blame {name}", ({c.column: (c.value, at(c.set_by)) for c in blame.columns}, at(blame.last),
                                at(blame.deleted_by), blame.moved_to),
              (want.columns, want.last, want.deleted_by, want.moved_to))
        check(f"blame {name} key", (blame.key, blame.deleted), (recorded_key, want.deleted_by is not None))
        check(f"blame {name} certain and known", [(c.certain, c.known) for c in blame.columns],
              [(True, True)] * len(blame.columns))

    for table, keys in model.touched.items():
        for key in sorted(keys, key=repr):
            try:
                row(table, key)
            except FluxError as exc:  # every row is known to the log: an error is a disagreement too
                failures.append(f"{table} {dict(zip(KEYS[table], key))}: {exc!r}")
        listed = table_blame(conn, "public", table, limit=1000)
        want_listed = model.table_blame(table)
        check(f"table blame {table}", [(r.row_key, at(r.writer), r.moved_from) for r in listed], want_listed)
        check(f"table blame {table} rows", [r.row for r in listed],
              [(e.new if e.new is not None else e.recorded_old) for e in (model.events[i] for _, i, _ in want_listed)])
        check(f"table blame {table} --limit 3", [(r.row_key, at(r.writer), r.moved_from)
                                                 for r in table_blame(conn, "public", table, limit=3)], want_listed[:3])

    for rid in sorted({e.rid for e in model.events if e.rid is not None}):
        mine = [e for e in model.events if e.rid == rid]
        why = explain(conn, rid, rows=1000)  # an inner request's id starts with its outer one's: the whole id wins
        check(f"why {rid}", (why.request_id, [(r.table, r.op, r.row_key, r.changed_columns) for r in why.mutations]),
              (rid, [(e.table, e.op, e.key, e.changed) for e in mine]))
        for i, row in enumerate(why.mutations):  # the command printed under each row finds its change
            if row.row_key is not None:
                found = row_history(conn, "public", row.table, **_hint_arguments(history_hint(row)))
                check(f"why {rid} row {i}: {history_hint(row)}", mine[i].index in [position[(m.commit_lsn, m.seq)]
                                                                                   for m in found.mutations], True)
        counts: dict[str, dict[str, int]] = {}
        for e in mine:
            counts.setdefault(e.table, {}).setdefault(e.op, 0)
            counts[e.table][e.op] += 1
        check(f"why {rid} tables", (why.mutation_count, [(t.table, t.rows, t.ops) for t in why.tables]),
              (len(mine), [(t, sum(ops.values()), ops) for t, ops in counts.items()]))
    for rid in rolled_back:
        check(f"why {rid} (rolled back)", request_mutations(conn, rid), [])
        with pytest.raises(NotFoundError):
            resolve_request_id(conn, rid)
    assert not failures, _report(seed, transcript, failures)


def compare(failures: list[str], what: str, got: Any, want: Any) -> None:
    """A disagreement unless `got` is `want`: of two lists, the first few items from the first that differs."""
    if got == want:
        return
    if isinstance(got, list) and isinstance(want, list):
        first = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        what, got, want = f"{what} (from item {first})", got[first:first + 3], want[first:first + 3]
    failures.append(f"{what}:\n  flux:  {got}\n  model: {want}".replace(LONG, "LONG"))


def _report(seed: int, transcript: list[str], failures: list[str], variables: str = "FLUX_STATE") -> str:
    return (f"seed {seed}: {len(failures)} disagreements (rerun: {variables}_SEED_FROM={seed} {variables}_SEEDS=1)\n"
            + "\n".join(failures[:15]) + "\n\ntransactions:\n" + "\n".join(transcript))
