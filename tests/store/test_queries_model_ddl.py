"""The randomized read-side check of `test_queries_model`, with tables renamed, moved to another
schema, dropped and created again, and their names taken by new tables; multi-row statements;
`flux prune`; and the CLI's `--json` and text for the same rows.

The random transactions of `test_queries_model` (over tables with an int, a composite and a
numeric primary key, and a partitioned one) run here too, with statements that change several
rows at once (an INSERT of several rows, an UPDATE or DELETE of several, an UPDATE moving keys, a
partitioned table's rows into the other partition), whose order in the log the model learns from
their RETURNING. Between transactions, and inside some, a table is renamed (to a new name or
back to one it had) or moved to the other schema; between transactions, one is dropped and created
again under its name, or renamed and a new table created under its old name. (The partitioned
table is only dropped and created again, or renamed for a new one to take its name: renamed while
written, it is recorded under its former name for a while, as Known limits says, for as long as
PostgreSQL keeps its description.) Half the seeds then prune the log at a transaction in the middle.

The model follows the README ("Known limits", "Retention"): a change is recorded under the name
its table had then, with its oid; `history N` and `blame N` of an existing table take every change
recorded as N (of any table of that name: one dropped and created again shares the name's history)
and those recorded under its earlier names with its oid, followed back one name at a time while
each name's changes with the oid end before the next name's begin; of a name no table has, only
the changes recorded so, with the name of the table that had it when the walk back from it reaches
this one. After a prune, history starts at the first kept change and blame shows values set before
the cutoff as set before the recorded history, both with the cutoff when the row's kept changes do
not start with its insert; a row with no change left is not found, and its hint says why.

`FLUX_STATE_DDL_SEEDS=N FLUX_STATE_DDL_SEED_FROM=S` runs seeds S to S+N-1 instead.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from typer.testing import CliRunner

from flux.cli.state import app
from flux.cli.trace import history_hint
from flux.errors import FluxError, NotFoundError
from flux.store.names import format_table
from flux.store.queries import Writer, row_blame, row_history, table_blame
from flux.store.retention import prune, pruned_before
from flux.store.why import explain, request_mutations
from tests.store.test_queries_model import (
    COLUMNS, KEYS, Event, Generator, Model, _arguments, _hint_arguments, _key_change, _report, compare, differs,
    ident, run,
)

SEED_FROM = int(os.environ.get("FLUX_STATE_DDL_SEED_FROM", "0"))
SEEDS = range(SEED_FROM, SEED_FROM + int(os.environ.get("FLUX_STATE_DDL_SEEDS", "6")))
TABLES = ("ip", "cp", "pt", "nm")  # with a primary key: a row is followed by it across renames
# Each table's key index named apart: SET SCHEMA moves it along, and refuses a name taken there.
CREATE = {
    "ip": ("CREATE TABLE {name} (id int CONSTRAINT k{n} PRIMARY KEY, a text, b int)",),
    "cp": ("CREATE TABLE {name} (k1 int, k2 text, v text, CONSTRAINT k{n} PRIMARY KEY (k1, k2))",),
    "pt": ("CREATE TABLE {name} (id int CONSTRAINT k{n} PRIMARY KEY, v text) PARTITION BY RANGE (id)",
           "CREATE TABLE public.pt{n}_lo PARTITION OF {name} FOR VALUES FROM (0) TO (10)",
           "CREATE TABLE public.pt{n}_hi PARTITION OF {name} FOR VALUES FROM (10) TO (20)"),
    "nm": ("CREATE TABLE {name} (id numeric CONSTRAINT k{n} PRIMARY KEY, v text)",),
}
SCHEMAS = ("public", "s2")
Name = tuple[str, str]


def sql_name(name: Name) -> str:
    return f"{name[0]}.{name[1]}"  # always qualified: the search path puts the role's own schema first


@dataclass
class Placed(Event):
    """A change, with the name its table had when it was made and which table it was (its oid)."""

    name: Name = ("public", "")
    oid: int = 0


@dataclass
class Catalog(Model):
    """The model of `test_queries_model`, each table under a name that renames change, and a new
    table (a new oid) for one dropped and created again. Each of TABLES is the latest table of its
    kind; `retired` holds tables renamed away for a new one to take their name, no longer written."""

    place: dict[str, Name] = field(default_factory=lambda: {t: ("public", t) for t in TABLES})
    oid: dict[str, int] = field(default_factory=lambda: {t: i for i, t in enumerate(TABLES)})
    names_of: dict[int, list[Name]] = field(default_factory=lambda: {i: [("public", t)] for i, t in enumerate(TABLES)})
    retired: dict[int, Name] = field(default_factory=dict)
    tables_made: int = len(TABLES)

    def event(self, table: str, op: str, rid: str | None, **images: Any) -> Event:
        e = Placed(len(self.events), table, op, rid, **images, name=self.place[table], oid=self.oid[table])
        self.events.append(e)
        return e

    def sql_name(self, table: str) -> str:
        return sql_name(self.place[table])

    def partition_name(self, low: bool) -> str:
        return f"public.pt{self.oid['pt']}_{'lo' if low else 'hi'}"

    def existing(self) -> dict[Name, int]:
        return {**{n: o for o, n in self.retired.items()}, **{n: self.oid[t] for t, n in self.place.items()}}

    def fresh(self, table: str, schema: str) -> Name:
        used = {n for names in self.names_of.values() for n in names}
        return next((schema, f"{table}_{i}") for i in range(1, 1000) if (schema, f"{table}_{i}") not in used)

    # -- DDL: the SQL that does it, the model changed ------------------------------------------

    def rename(self, table: str, to: Name) -> list[str]:
        statement = f"ALTER TABLE {self.sql_name(table)} RENAME TO {to[1]}"
        self._move(table, to)
        return [statement]

    def set_schema(self, table: str) -> list[str]:
        schema, name = self.place[table]
        to = (SCHEMAS[1 - SCHEMAS.index(schema)], name)
        if to in self.existing():
            return []
        statement = f"ALTER TABLE {self.sql_name(table)} SET SCHEMA {to[0]}"
        self._move(table, to)
        return [statement]

    def _move(self, table: str, to: Name) -> None:
        self.place[table] = to
        self.names_of[self.oid[table]].append(to)

    def recreate(self, table: str, *, keep_old_as: Name | None = None) -> list[str]:
        """The table dropped (or renamed `keep_old_as`) and a new one created under its name, empty."""
        name = self.place[table]
        if keep_old_as is None:
            first = [f"DROP TABLE {sql_name(name)}"]
        else:
            first = [f"ALTER TABLE {sql_name(name)} RENAME TO {keep_old_as[1]}"]
            self.retired[self.oid[table]] = keep_old_as
            self.names_of[self.oid[table]].append(keep_old_as)
        self.oid[table], self.tables_made = self.tables_made, self.tables_made + 1
        self.names_of[self.oid[table]] = [name]
        self.rows[table].clear()
        return first + [s.format(name=sql_name(name), n=self.oid[table]) for s in CREATE[table]]


# -- what the log should answer, by name ---------------------------------------------------------


def earlier_names(events: list[Placed], name: Name, existing: dict[Name, int]) -> list[Name]:
    """The README's walk: back from `name`, one name of its oid at a time, while that name's changes
    with the oid all end before the first of the name after it."""
    if name not in existing:
        return []
    spans: dict[Name, tuple[int, int]] = {}
    for e in events:
        if e.oid == existing[name]:
            first, _ = spans.get(e.name, (e.index, e.index))
            spans[e.name] = (first, e.index)
    bound = spans[name][0] if name in spans else None
    out = []
    for other, (first, last) in sorted(spans.items(), key=lambda kv: kv[1][1], reverse=True):
        if other == name:
            continue
        if bound is not None and last >= bound:
            break
        out.append(other)
        bound = first
    return out


def view(events: list[Placed], name: Name, existing: dict[Name, int]) -> list[Placed]:
    """The changes `history`, `blame` and `blame TABLE` of `name` read: all recorded as it, and
    those of its oid recorded under its earlier names."""
    earlier = set(earlier_names(events, name, existing))
    return [e for e in events if e.name == name or e.name in earlier and e.oid == existing[name]]


def renamed_to(events: list[Placed], name: Name, existing: dict[Name, int]) -> Name | None:
    if name in existing:
        return None
    latest = [e for e in events if e.name == name][-1]
    now = next((n for n, o in existing.items() if o == latest.oid), None)
    return now if now is not None and name in earlier_names(events, now, existing) else None


def history(events: list[Placed], key: tuple) -> list[Placed]:
    mine = [e for e in events if e.op != "truncate" and key in {ident(e.table, i) for i in (e.old, e.new) if i is not None}]
    if not mine:
        return []
    return sorted(mine + [e for e in events if e.op == "truncate" and e.index > mine[0].index], key=lambda e: e.index)


@dataclass
class RowState:
    """Blame of one key: column -> (value, writer, certain)."""

    columns: dict[str, tuple[Any, Placed | None, bool]]
    last: Placed
    deleted_by: Placed | None = None
    moved_to: dict[str, Any] | None = None


def replay(events: list[Placed]) -> dict[tuple, RowState]:
    """Blame of every key of one name's changes, as the README says: a column's writer is the change
    that last set it, through key changes; an insert starts a row over; a value no kept change set
    was set before the recorded history."""
    rows: dict[tuple, RowState] = {}
    for e in events:
        if e.op == "truncate":
            for k, r in rows.items():
                rows[k] = RowState(r.columns, e, r.deleted_by or e, r.moved_to if r.deleted_by else None)
            continue
        if e.op == "insert":
            rows[ident(e.table, e.new)] = RowState({c: (v, e, True) for c, v in e.new.items()}, e)
            continue
        before = rows.get(ident(e.table, e.old))
        if e.op == "delete" or e.old_key is not None:
            kept = before.columns if before is not None else {c: (v, None, True) for c, v in e.recorded_old.items()}
            rows[ident(e.table, e.old)] = RowState(kept, e, e, e.key if e.old_key is not None else None)
            if e.op == "delete":
                continue
        if before is None or before.deleted_by is not None and e.old_key is None:
            # nothing known of the row before: unchanged columns were set before the recorded history
            # (an old row known by its key only cannot tell which columns changed)
            columns = {c: (v, e, False) if e.key_only else (v, e, True) if differs(e.old[c], v) else (v, None, True)
                       for c, v in e.new.items()}
        else:  # a value the update left alone that is not the one the history left was set by a change it lacks
            columns = {c: (v, e, True) if differs(e.old[c], v) else
                       (v, e, False) if not e.key_only and before.columns[c][0] != e.old[c] else before.columns[c]
                       for c, v in e.new.items()}
        rows[ident(e.table, e.new)] = RowState(columns, e)
    return rows


def listed(events: list[Placed]) -> list[Placed]:
    """The changes `blame TABLE` lists, newest first: each key's last, back to the last truncate."""
    cut = max((e.index for e in events if e.op == "truncate"), default=-1)
    since = [e for e in events if e.index >= cut]
    last: dict[tuple, Placed] = {}
    for e in since:
        if e.op != "truncate":
            last[ident(e.table, e.key)] = e
            if e.old_key is not None:
                last.pop(ident(e.table, e.old_key), None)
    return [e for e in reversed(since) if e.op == "truncate" or last.get(ident(e.table, e.key)) is e]


# -- the generator -------------------------------------------------------------------------------


class DdlGenerator(Generator):
    """`test_queries_model`'s operations, and multi-row statements and renames among them."""

    def step(self, model: Catalog, rid: str | None) -> list:
        roll = self.r.random()
        table = self.r.choice(TABLES)
        if roll < 0.04 and table != "pt":
            return self.rename(model, table)
        if roll < 0.06 and table != "pt":
            return [(s, ()) for s in model.set_schema(table)]
        if roll < 0.22:
            return self.multi(model, table, rid)
        return super().step(model, rid)

    def rename(self, model: Catalog, table: str) -> list:
        schema = model.place[table][0]
        back = [n for n in model.names_of[model.oid[table]] if n[0] == schema and n not in model.existing()]
        to = self.r.choice(back) if back and self.r.random() < 0.4 else model.fresh(table, schema)
        return [(s, ()) for s in model.rename(table, to)]

    def ddl(self, model: Catalog, table: str) -> list[str]:
        """Between transactions: what a migration does to a table."""
        kind = self.r.choices(["rename", "schema", "recreate", "reuse"], [3, 2, 2, 2] if table != "pt" else [0, 0, 1, 1])[0]
        if kind == "rename":
            return [s for s, _ in self.rename(model, table)]
        if kind == "schema":
            return model.set_schema(table)
        if kind == "recreate":
            return model.recreate(table)
        return model.recreate(table, keep_old_as=model.fresh(table, model.place[table][0]))

    def multi(self, model: Catalog, table: str, rid: str | None) -> list:
        """One statement changing several rows; the model takes them in the order of its RETURNING,
        which is the order PostgreSQL changed them in, and the log's."""
        keys, live, name = KEYS[table], model.rows[table], model.sql_name(table)
        returning = f" RETURNING {', '.join(keys)}"
        kind = self.r.choice(["insert", "update", "delete", "shift"])
        if kind == "insert" or not live:
            rows: dict[tuple, dict] = {}
            for _ in range(self.r.randint(2, 4)):
                key = self.new_key(model, table)
                if key is not None and ident(table, key) not in rows:
                    row = {**key, **self.values(table)}
                    rows[ident(table, key)] = {c: row[c] for c in COLUMNS[table]}
            if not rows:
                return []
            values = ", ".join("(" + ", ".join(["%s"] * len(COLUMNS[table])) + ")" for _ in rows)

            def inserted(returned: list[tuple]) -> None:
                for r in returned:
                    model.insert(table, rows[r], rid)
            return [(f"INSERT INTO {name} ({', '.join(COLUMNS[table])}) VALUES {values}{returning}",
                     tuple(v for row in rows.values() for v in row.values()), inserted)]
        chosen = self.r.sample(sorted(live, key=repr), min(len(live), self.r.randint(2, 4)))
        if kind == "shift":  # keys moved by an expression: ip's up by 100, pt's into the other partition
            step = {"ip": 100, "pt": 10}.get(table)
            chosen = [k for k in chosen if step and k[0] < step and (k[0] + step,) not in live]
            if not chosen:
                return []
            where = f"id IN ({', '.join(['%s'] * len(chosen))})"

            def shifted(returned: list[tuple]) -> None:
                for (new,) in returned:
                    model.update(table, (new - step,), {"id": new}, rid)
            return [(f"UPDATE {name} SET id = id + {step} WHERE {where}{returning}", tuple(k[0] for k in chosen), shifted)]
        where = f"({', '.join(keys)}) IN ({', '.join('(' + ', '.join(['%s'] * len(keys)) + ')' for _ in chosen)})"
        params = tuple(v for k in chosen for v in k)
        if kind == "delete":
            def deleted(returned: list[tuple]) -> None:
                for r in returned:
                    model.delete(table, r, rid)
            return [(f"DELETE FROM {name} WHERE {where}{returning}", params, deleted)]
        values = self.values(table)

        def updated(returned: list[tuple]) -> None:
            for r in returned:
                model.update(table, r, values, rid)
        sets = ", ".join(f"{c} = %s" for c in values)
        return [(f"UPDATE {name} SET {sets} WHERE {where}{returning}", (*values.values(), *params), updated)]


# -- the test ------------------------------------------------------------------------------------


def _cli(dsn: str, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--database", dsn])


def _cli_row(name: Name, table: str, key: tuple) -> list[str]:
    arguments = _arguments(table, key)
    row = ["--id", arguments["id_value"]] if "id_value" in arguments else [f"--key={c}={v}" for c, v in arguments["key"].items()]
    return [format_table(*name), *row]


@pytest.mark.parametrize("seed", SEEDS)
def test_history_blame_and_why_follow_renames_multi_row_statements_and_prune(dsn, conn, capture, seed):
    conn.execute("CREATE SCHEMA s2")
    conn.execute("CREATE TABLE s2.anchor (id int PRIMARY KEY)")  # --all-tables publishes its schema
    model = Catalog()
    for table in TABLES:
        for statement in CREATE[table]:
            conn.execute(statement.format(name=f"public.{table}", n=model.oid[table]))
    running = capture(all_tables=True)
    gen = DdlGenerator(seed, TABLES)
    oids: dict[int, int] = {}  # the model's tables -> their oids
    cut: dict[str, Any] = {}
    middle, pruning = 20, seed % 2 == 1

    def learn_oids(m: Catalog) -> None:
        for table in TABLES:
            oids.setdefault(m.oid[table], conn.execute("SELECT %s::regclass::oid::int", (m.sql_name(table),)).fetchone()[0])

    def between(n: int, m: Catalog) -> list[str]:
        learn_oids(m)
        done: list[str] = []
        if pruning and n == middle:  # a gap in commit times to cut the log at
            time.sleep(0.1)
            cut.update(at=conn.execute("SELECT clock_timestamp()").fetchone()[0], events=len(m.events))
            time.sleep(0.1)
        if gen.r.random() < 0.2:
            table = gen.r.choice(TABLES)
            running.caught_up()  # a table dropped before the engine read its changes has no key in them (README)
            for statement in gen.ddl(m, table):
                conn.execute(statement)
                done.append(statement)
            learn_oids(m)
        return ["-- between\n" + "\n".join(done)] if done else []

    model, rolled_back, transcript = run(conn, seed, gen, model, between)
    running.caught_up()
    events: list[Placed] = model.events  # type: ignore[assignment]
    assert len(events) >= 40 and any(e.name != ("public", e.table) for e in events), "the seed did little"
    kept = events
    if pruning:
        since_cut = conn.execute("SELECT now() - %s::timestamptz", (cut["at"],)).fetchone()[0]
        prune(conn, older_than=since_cut, traces=False)
        kept = events[cut["events"]:]
    cutoff = pruned_before(conn).mutations
    existing = model.existing()
    failures: list[str] = []
    check = functools.partial(compare, failures)
    recorded = conn.execute("SELECT schema_name, table_name, relid, op, request_id, row_key::text FROM flux.state_mutations"
                            " ORDER BY commit_lsn, seq").fetchall()
    check("the log", [(s, t, relid, op, rid, json.loads(k, parse_float=Decimal) if k else None) for s, t, relid, op, rid, k in recorded],
          [(*e.name, oids[e.oid], e.op, e.rid, e.key) for e in kept])
    assert not failures, _report(seed, transcript, failures, "FLUX_STATE_DDL")
    lsns = conn.execute("SELECT commit_lsn::text, seq FROM flux.state_mutations ORDER BY commit_lsn, seq").fetchall()
    at_lsn = {lsn: e.index for lsn, e in zip(lsns, kept)}

    def at(w: Writer | None) -> int | None:
        return None if w is None else at_lsn[(w.commit_lsn, w.seq)]

    def index(e: Placed | None) -> int | None:
        return None if e is None else e.index

    names = sorted({e.name for e in events} | set(existing))
    cli_rows: list[tuple[Name, str, tuple]] = []
    for name in names:
        mine, everything = view(kept, name, existing), view(events, name, existing)
        if not mine and not everything:
            continue
        table = (mine or everything)[0].table
        moved_to = renamed_to(kept, name, existing) if mine else None
        blames = replay(mine)
        keys = sorted({ident(table, i) for e in everything for i in (e.old, e.new) if i is not None}, key=repr)
        for key in keys:
            label = f"{format_table(*name)} {dict(zip(KEYS[table], key))}"
            want = history(mine, key)
            try:
                got = row_history(conn, *name, **_arguments(table, key))
            except NotFoundError as exc:
                if want:
                    failures.append(f"history {label}: {exc!r}")
                elif cutoff is not None and "deleted by retention" not in (exc.hint or ""):
                    failures.append(f"history {label}: the hint does not say changes were pruned: {exc.hint}")
                continue
            except FluxError as exc:
                failures.append(f"history {label}: {exc!r}")
                continue
            if not want:
                failures.append(f"history {label}: found {len(got.mutations)} changes the model has none of")
                continue
            check(f"history {label}", [(at_lsn[(m.commit_lsn, m.seq)], m.op, m.request_id, m.key_change, m.recorded_as)
                                       for m in got.mutations],
                  [(e.index, e.op, e.rid, _key_change(e, key), format_table(*e.name)) for e in want])
            pruned = cutoff if cutoff and want[0].op != "insert" else None
            check(f"history {label} renamed_to, pruned_before", (got.renamed_to, got.pruned_before),
                  (format_table(*moved_to) if moved_to else None, pruned))
            newest = row_history(conn, *name, limit=2, **_arguments(table, key))
            check(f"history {label} --limit 2", ([at_lsn[(m.commit_lsn, m.seq)] for m in newest.mutations], newest.total,
                                                 newest.pruned_before),
                  ([e.index for e in want[-2:]], len(want), pruned if len(want) <= 2 else None))
            state = blames[key]
            try:
                blame = row_blame(conn, *name, **_arguments(table, key))
            except FluxError as exc:
                failures.append(f"blame {label}: {exc!r}")
                continue
            check(f"blame {label}", ({c.column: (c.value, at(c.set_by), c.certain) for c in blame.columns}, at(blame.last),
                                     at(blame.deleted_by), blame.moved_to, blame.renamed_to),
                  ({c: (v, index(w), sure) for c, (v, w, sure) in state.columns.items()}, state.last.index,
                   index(state.deleted_by), state.moved_to, format_table(*moved_to) if moved_to else None))
            check(f"blame {label} recorded_as", {c.column: c.set_by.recorded_as for c in blame.columns if c.set_by},
                  {c: format_table(*w.name) for c, (_, w, _) in state.columns.items() if w})
            unset = any(w is None for _, w, _ in state.columns.values())
            check(f"blame {label} pruned_before", blame.pruned_before, cutoff if cutoff and unset else None)
            if key == keys[min(len(keys) - 1, seed % 3)]:  # one row of each name through the CLI
                cli_rows.append((name, table, key))
        if not mine:
            continue
        try:
            got_listed = table_blame(conn, *name, limit=1000)
        except FluxError as exc:
            failures.append(f"table blame {format_table(*name)}: {exc!r}")
            continue
        want_listed = listed(mine)
        check(f"table blame {format_table(*name)}", [(r.row_key, at(r.writer), r.moved_from, r.writer.recorded_as, r.row)
                                                     for r in got_listed],
              [(e.key, e.index, e.old_key, format_table(*e.name), e.new if e.new is not None else e.recorded_old)
               for e in want_listed])

    for rid in sorted({e.rid for e in kept if e.rid is not None}):
        mine = [e for e in kept if e.rid == rid]
        why = explain(conn, rid, rows=1000)
        check(f"why {rid}", [(r.schema, r.table, r.op, r.row_key) for r in why.mutations],
              [(*e.name, e.op, e.key) for e in mine])
        for row, e in zip(why.mutations, mine):  # the command printed under each row finds its change
            if row.row_key is not None:
                found = row_history(conn, row.schema, row.table, **_hint_arguments(history_hint(row)))
                check(f"why {rid}: {history_hint(row)}", e.index in [at_lsn[(m.commit_lsn, m.seq)] for m in found.mutations], True)

    for name, table, key in cli_rows:
        check_cli(dsn, name, table, key, kept, existing, cutoff, failures)
    for rid in rolled_back:
        check(f"why {rid} (rolled back)", request_mutations(conn, rid), [])
    assert not failures, _report(seed, transcript, failures, "FLUX_STATE_DDL")


def check_cli(dsn: str, name: Name, table: str, key: tuple, kept: list[Placed], existing: dict[Name, int],
              cutoff: Any, failures: list[str]) -> None:
    """`flux state history` and `blame` of the row, and `blame TABLE`: their --json says what the
    library does, and their text shows each change, its earlier name and what the README says."""
    label = f"{format_table(*name)} {dict(zip(KEYS[table], key))}"
    mine = view(kept, name, existing)
    want = history(mine, key)
    moved_to = renamed_to(kept, name, existing)
    args = _cli_row(name, table, key)

    def fail(what: str, got: Any, wanted: Any) -> None:
        compare(failures, f"cli {what} {label}", got, wanted)

    data = json.loads(_cli(dsn, "history", *args, "--json").stdout)
    fail("history --json", ([(m["op"], m["request_id"], m["recorded_as"], m["key_change"]) for m in data["mutations"]],
                            data["renamed_to"], data["pruned_before"] is not None),
         ([(e.op, e.rid, format_table(*e.name), _key_change(e, key)) for e in want],
          format_table(*moved_to) if moved_to else None, bool(cutoff) and want[0].op != "insert"))
    text = _cli(dsn, "history", *args).output
    earlier = list(dict.fromkeys(format_table(*e.name) for e in want if e.name != name))
    alive, again = False, 0
    for e in want:
        again += e.op == "insert" and alive
        alive = e.op in ("insert", "update") and _key_change(e, key) != "out"
    fail("history text", (text.count("(recorded as "), " ".join(text.split()).count(
        f"under its earlier name{'s' if len(earlier) > 1 else ''} {', '.join(earlier)} (the table") if earlier else 0,
        text.count("primary key changed to"), text.count("primary key changed from"), text.count("truncated (every row"),
        text.count("- deleted"), text.count("no recorded change removed the earlier row"),
        f"the table was renamed {format_table(*moved_to)} since" in text if moved_to else False,
        "were deleted by retention" in text, "first recorded change is not its insert" in text),
         (sum(e.name != name for e in want), 1 if earlier else 0, sum(_key_change(e, key) == "out" for e in want),
          sum(_key_change(e, key) == "in" for e in want), sum(e.op == "truncate" for e in want),
          sum(e.op == "delete" for e in want), again, bool(moved_to), bool(cutoff) and want[0].op != "insert",
          not cutoff and want[0].op in ("update", "delete") and _key_change(want[0], key) is None))
    state = replay(mine)[key]
    data = json.loads(_cli(dsn, "blame", *args, "--json").stdout)
    fail("blame --json", ({c["column"]: (c["set_by"] or {}).get("recorded_as") for c in data["columns"]},
                          data["deleted"], (data["deleted_by"] or {}).get("op"), data["renamed_to"]),
         ({c: format_table(*w.name) if w else None for c, (_, w, _) in state.columns.items()},
          state.deleted_by is not None, state.deleted_by.op if state.deleted_by else None,
          format_table(*moved_to) if moved_to else None))
    text = _cli(dsn, "blame", *args).output
    writers = [w for w in (state.deleted_by, *(w for _, w, _ in state.columns.values())) if w is not None]
    how = None if state.deleted_by is None else "truncated" if state.deleted_by.op == "truncate" else \
        "moved" if state.moved_to is not None else "deleted"
    fail("blame text", (text.count("(recorded as "), text.count("(set before the recorded history)"),
                        how is not None and f"  {how}  " in text),
         (sum(w.name != name for w in writers), sum(w is None for _, w, _ in state.columns.values()), how is not None))
    rows = listed(mine)
    text = _cli(dsn, "blame", format_table(*name), "--limit", "1000").output
    lines = [line for line in text.splitlines() if line.startswith("  20")]
    fail("blame TABLE text", (len(lines), sum("(recorded as " in line for line in lines),
                              sum("(moved from " in line for line in lines)),
         (len(rows), sum(e.name != name for e in rows), sum(e.old_key is not None for e in rows)))
