from __future__ import annotations

import itertools
import json
import shlex
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import flux.context
from flux.cdc.attach import attach
from flux.errors import AmbiguousError, ConfigError, NotFoundError
from flux.store.names import parse_table
from flux.store.queries import (
    resolve_request_id,
    row_blame,
    row_history,
    table_blame,
)
from flux.store.retention import prune
from flux.store.schema import ensure_schema
from tests.support import record_pending

T0 = datetime(2026, 3, 10, 14, 20, 11, tzinfo=timezone.utc)
_tx = itertools.count(1)


def record(
    conn: psycopg.Connection,
    table: str,
    op: str,
    *,
    schema: str = "public",
    request_id: str | None = None,
    function: str | None = None,
    key: dict | None = None,
    old: dict | str | None = None,
    new: dict | str | None = None,
    old_complete: bool | None = None,
    changed: list[str] | None = None,
    seq: int = 0,
    tx: int | None = None,
    old_key: dict | None = None,
    relid: int | None = None,
) -> int:
    """Write one mutation as the engine would: each call its own transaction unless `tx` is given.

    Images may be given as JSON text, to carry numerics no Python float could.
    """
    n = tx if tx is not None else next(_tx)
    if op in ("update", "delete") and old_complete is None:
        old_complete = True
    if op == "update" and changed is None and isinstance(old, dict) and isinstance(new, dict) and old_complete:
        changed = [c for c in new if old.get(c) != new[c]]
    context = {"request_id": request_id, "function": function} if request_id else None
    conn.execute(
        "INSERT INTO flux.state_mutations (request_id, context, schema_name, table_name, op, row_key, old, new,"
        " old_complete, changed_columns, xid, commit_lsn, commit_time, seq, old_row_key, relid)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::pg_lsn, %s, %s, %s, %s)",
        (
            request_id, _j(context), schema, table, op, _j(key), _j(old), _j(new), old_complete, changed,
            1000 + n, f"0/{n * 0x100:X}", T0 + timedelta(seconds=n), seq, _j(old_key), relid,
        ),
    )
    return n


def _j(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


@pytest.fixture
def log(conn: psycopg.Connection) -> psycopg.Connection:
    """A database with the mutation log. Tests create their tables as public.X: ensure_schema made
    schema `flux`, which the default search_path ("$user", public) now puts first."""
    ensure_schema(conn)
    return conn


def ops(history) -> list[tuple[str, str | None]]:
    return [(m.op, m.request_id) for m in history.mutations]


# -- history -----------------------------------------------------------------------------------


def test_history_of_single_pk_row_matches_id_recorded_as_number(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY, email text, plan text)")
    record(log, "users", "insert", request_id="r1", key={"id": 42}, new={"id": 42, "email": "a@x", "plan": "free"})
    record(log, "users", "insert", request_id="r2", key={"id": 7}, new={"id": 7, "email": "b@x", "plan": "free"})
    h = row_history(log, "public", "users", id_value="42")
    assert h.match == {"id": "42"} and h.matched_on == "row_key"
    assert ops(h) == [("insert", "r1")]
    assert h.mutations[0].new == {"id": 42, "email": "a@x", "plan": "free"}


def test_history_matches_id_recorded_as_string(log):
    log.execute("CREATE TABLE public.docs (slug text PRIMARY KEY, body text)")
    record(log, "docs", "insert", request_id="r1", key={"slug": "007"}, new={"slug": "007", "body": "x"})
    assert ops(row_history(log, "public", "docs", id_value="007")) == [("insert", "r1")]


def test_history_is_oldest_first_and_limit_keeps_newest(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY, plan text)")
    record(log, "users", "insert", request_id="r1", key={"id": 1}, new={"id": 1, "plan": "a"})
    for i, plan in enumerate(["b", "c", "d"], start=2):
        record(log, "users", "update", request_id=f"r{i}", key={"id": 1}, old={"id": 1, "plan": "x"}, new={"id": 1, "plan": plan})
    assert [r for _, r in ops(row_history(log, "public", "users", id_value="1"))] == ["r1", "r2", "r3", "r4"]
    limited = row_history(log, "public", "users", id_value="1", limit=2)
    assert [r for _, r in ops(limited)] == ["r3", "r4"]
    assert limited.total == 4


def test_history_orders_changes_within_one_transaction_by_seq(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY, plan text)")
    tx = next(_tx)
    record(log, "users", "update", request_id="second", key={"id": 1}, old={"id": 1, "plan": "a"}, new={"id": 1, "plan": "b"}, tx=tx, seq=1)
    record(log, "users", "insert", request_id="first", key={"id": 1}, new={"id": 1, "plan": "a"}, tx=tx, seq=0)
    assert [r for _, r in ops(row_history(log, "public", "users", id_value="1"))] == ["first", "second"]


def test_history_with_composite_key_via_key(log):
    log.execute("CREATE TABLE public.members (org int, id text, role text, PRIMARY KEY (org, id))")
    record(log, "members", "insert", request_id="r1", key={"org": 1, "id": "a"}, new={"org": 1, "id": "a", "role": "x"})
    record(log, "members", "insert", request_id="r2", key={"org": 2, "id": "a"}, new={"org": 2, "id": "a", "role": "y"})
    h = row_history(log, "public", "members", key={"id": "a", "org": "2"})
    assert h.match == {"org": "2", "id": "a"}
    assert ops(h) == [("insert", "r2")]


WIDE = "CREATE TABLE public.wide (c1 int, c2 int, c3 int, c4 int, c5 int, c6 int, c7 int, v text, PRIMARY KEY (c1, c2, c3, c4, c5, c6, c7))"
WIDE_KEY = {f"c{i}": str(i) for i in range(1, 8)}


def test_history_finds_a_key_of_seven_numeric_columns(log):
    log.execute(WIDE)
    record(log, "wide", "insert", request_id="r1", key={f"c{i}": i for i in range(1, 8)}, new={"v": "a"})
    record(log, "wide", "insert", request_id="other", key={**{f"c{i}": i for i in range(1, 7)}, "c7": 8}, new={"v": "b"})
    assert ops(row_history(log, "public", "wide", key=WIDE_KEY)) == [("insert", "r1")]


def test_history_of_a_wide_key_spans_a_change_of_a_key_columns_type(log):
    """c1 was text, then became int: the row's key was recorded in both forms."""
    log.execute(WIDE)
    record(log, "wide", "insert", request_id="as text", key={"c1": "1", **{f"c{i}": i for i in range(2, 8)}}, new={"v": "a"})
    record(log, "wide", "update", request_id="as int", key={f"c{i}": i for i in range(1, 8)}, old={"v": "a"}, new={"v": "b"})
    assert ops(row_history(log, "public", "wide", key=WIDE_KEY)) == [("insert", "as text"), ("update", "as int")]


def test_history_of_a_wide_key_marks_the_update_that_changed_it(log):
    log.execute(WIDE)
    record(log, "wide", "insert", request_id="r1", key={f"c{i}": i for i in range(1, 8)}, new={"v": "a"})
    record(log, "wide", "update", request_id="r2", key={f"c{i}": i + 1 for i in range(1, 8)},
           old_key={f"c{i}": i for i in range(1, 8)}, old={"v": "a"}, new={"v": "a"})
    h = row_history(log, "public", "wide", key=WIDE_KEY)
    assert [(m.request_id, m.key_change) for m in h.mutations] == [("r1", None), ("r2", "out")]


UUID = "7f3b1c2e-9a4d-4e8b-b1c2-3d4e5f6a7b8c"


@pytest.mark.parametrize("given", ["7f3b1c2e9a4d4e8bb1c23d4e5f6a7b8c", "{7F3B1C2E-9A4D-4E8B-B1C2-3D4E5F6A7B8C}",
                                   "7f3b-1c2e-9a4d-4e8b-b1c2-3d4e-5f6a-7b8c", "{7f3b1c2e9a4d4e8bb1c23d4e5f6a7b8c}"])
def test_history_finds_a_uuid_key_given_in_any_form_postgres_reads(log, given):
    assert log.execute("SELECT %s::uuid::text", (given,)).fetchone()[0] == UUID
    log.execute("CREATE TABLE public.docs (id uuid PRIMARY KEY)")
    record(log, "docs", "insert", request_id="r1", key={"id": UUID}, new={"id": UUID})
    assert ops(row_history(log, "public", "docs", id_value=given)) == [("insert", "r1")]


@pytest.mark.parametrize("given", ["2026-01-02 03:04:05.5+00", "2026-01-02T03:04:05.500Z", "2026-01-02 05:04:05.5+02:00"])
def test_history_finds_a_timestamptz_key_as_psql_prints_it_or_in_another_zone(conn, capture, given):
    conn.execute("CREATE TABLE public.ticks (at timestamptz PRIMARY KEY, v text)")
    running = capture(tables=["ticks"])
    conn.execute("INSERT INTO ticks VALUES ('2026-01-02 03:04:05.5+00', 'one')")
    running.caught_up()
    history = row_history(conn, "public", "ticks", id_value=given)
    assert [m.op for m in history.mutations] == ["insert"] and history.key == {"at": "2026-01-02T03:04:05.5+00:00"}


@pytest.mark.parametrize("given", ["t", "TRUE", "yes", "on"])
def test_history_finds_a_boolean_key_as_psql_prints_it(conn, capture, given):
    conn.execute("CREATE TABLE public.flags (on_ boolean PRIMARY KEY, v text)")
    running = capture(tables=["flags"])
    conn.execute("INSERT INTO flags VALUES (true, 'one'), (false, 'two')")
    running.caught_up()
    assert [m.new for m in row_history(conn, "public", "flags", id_value=given).mutations] == [{"on_": True, "v": "one"}]


def test_history_with_id_on_composite_key_says_to_use_key(log):
    log.execute("CREATE TABLE public.members (org int, id text, PRIMARY KEY (org, id))")
    record(log, "members", "insert", key={"org": 1, "id": "a"}, new={"org": 1, "id": "a"})
    with pytest.raises(ConfigError) as err:
        row_history(log, "public", "members", id_value="a")
    assert "--key org=... --key id=..." in err.value.hint


def test_history_of_table_without_primary_key_matches_images(log):
    log.execute("CREATE TABLE public.events (name text, n numeric)")
    record(log, "events", "insert", request_id="r1", new={"name": "a", "n": 1})
    record(log, "events", "insert", request_id="r2", new={"name": "b", "n": 1})
    record(log, "events", "delete", request_id="r3", old={"name": "a", "n": 1.0})
    h = row_history(log, "public", "events", key={"name": "a", "n": "1"})
    assert h.matched_on == "images"
    assert ops(h) == [("insert", "r1"), ("delete", "r3")]


def test_history_falls_back_to_recorded_key_when_table_is_gone(log):
    record(log, "gone", "insert", request_id="r1", key={"uid": 5}, new={"uid": 5})
    h = row_history(log, "public", "gone", id_value="5")
    assert h.match == {"uid": "5"} and ops(h) == [("insert", "r1")]


def test_history_shows_delete_then_reinsert(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY, plan text)")
    record(log, "users", "insert", request_id="r1", key={"id": 1}, new={"id": 1, "plan": "a"})
    record(log, "users", "delete", request_id="r2", key={"id": 1}, old={"id": 1, "plan": "a"})
    record(log, "users", "insert", request_id="r3", key={"id": 1}, new={"id": 1, "plan": "b"})
    assert ops(row_history(log, "public", "users", id_value="1")) == [("insert", "r1"), ("delete", "r2"), ("insert", "r3")]


def test_history_includes_truncates_after_the_rows_first_change_only(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY)")
    record(log, "users", "truncate", request_id="before")
    record(log, "users", "insert", request_id="r1", key={"id": 1}, new={"id": 1})
    record(log, "users", "truncate", request_id="t1")
    record(log, "other", "truncate", request_id="elsewhere")
    assert ops(row_history(log, "public", "users", id_value="1")) == [("insert", "r1"), ("truncate", "t1")]


def test_history_of_quoted_schema_and_table_with_spaces_and_non_ascii(log):
    log.execute('CREATE SCHEMA "my schema"; CREATE TABLE "my schema"."Tábla x" (id int PRIMARY KEY)')
    record(log, "Tábla x", "insert", schema="my schema", request_id="r1", key={"id": 1}, new={"id": 1})
    schema, table = parse_table('"my schema"."Tábla x"')
    assert ops(row_history(log, schema, table, id_value="1")) == [("insert", "r1")]


def test_history_keeps_30_digit_numerics_exact(log):
    log.execute("CREATE TABLE public.acct (id int PRIMARY KEY, bal numeric, big numeric)")
    record(log, "acct", "insert", key={"id": 1},
           new='{"id": 1, "bal": 12345678901234567890.1234567891, "big": 123456789012345678901234567890}')
    new = row_history(log, "public", "acct", id_value="1").mutations[0].new
    assert new["bal"] == Decimal("12345678901234567890.1234567891")
    assert new["big"] == Decimal("123456789012345678901234567890")


def test_history_in_a_database_capturing_nothing_says_how_to_start(log):
    log.execute("CREATE TABLE public.quiet (id int PRIMARY KEY)")
    with pytest.raises(NotFoundError) as err:
        row_history(log, "public", "quiet", id_value="1")
    assert "Nothing is captured" in err.value.hint and "flux attach --tables quiet" in err.value.hint


def test_history_of_a_table_left_out_of_capture_says_it_is_not_captured(log, dsn):
    log.execute("CREATE TABLE public.quiet (id int PRIMARY KEY); CREATE TABLE public.loud (id int PRIMARY KEY)")
    attach(dsn, tables=["loud"])
    with pytest.raises(NotFoundError) as err:
        row_history(log, "public", "quiet", id_value="1")
    assert err.value.hint.startswith("quiet is not captured") and "flux attach --tables" in err.value.hint


def test_history_of_a_captured_table_without_changes_says_it_is_captured(log, dsn):
    log.execute("CREATE TABLE public.quiet (id int PRIMARY KEY)")
    attach(dsn, tables=["quiet"])
    with pytest.raises(NotFoundError) as err:
        row_history(log, "public", "quiet", id_value="1")
    assert err.value.hint.startswith("quiet is captured (publication flux)") and "flux cdc status" in err.value.hint


def test_history_of_a_flux_table_says_flux_never_captures_its_own(log):
    with pytest.raises(NotFoundError) as err:
        row_history(log, "flux", "state_mutations", id_value="1")
    assert "never captures" in err.value.hint


def test_history_of_a_partition_points_to_its_partitioned_table(log):
    """Changes are published, and recorded, under the partitioned table."""
    log.execute("CREATE TABLE public.parted (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)")
    log.execute("CREATE TABLE public.parted_eu PARTITION OF public.parted FOR VALUES IN ('eu')")
    record(log, "parted", "insert", key={"id": 1, "region": "eu"}, new={"id": 1, "region": "eu"})
    with pytest.raises(NotFoundError) as err:
        row_history(log, "public", "parted_eu", key={"id": "1", "region": "eu"})
    assert "partition" in err.value.hint and "flux state history parted" in err.value.hint


def test_history_of_unknown_row_points_to_blame(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY)")
    record(log, "users", "insert", key={"id": 1}, new={"id": 1})
    with pytest.raises(NotFoundError) as err:
        row_history(log, "public", "users", id_value="2")
    assert "flux state blame users" in err.value.hint


def test_history_suggests_the_mixed_case_name(log):
    log.execute('CREATE TABLE public."Users" (id int PRIMARY KEY)')
    record(log, "Users", "insert", key={"id": 1}, new={"id": 1})
    with pytest.raises(NotFoundError) as err:
        row_history(log, "public", "users", id_value="1")
    assert '"Users"' in err.value.hint


def test_history_of_a_table_only_in_another_schema_suggests_it(log):
    log.execute("CREATE SCHEMA sales; CREATE TABLE sales.orders (id int PRIMARY KEY)")
    record(log, "orders", "insert", schema="sales", key={"id": 1}, new={"id": 1})
    with pytest.raises(NotFoundError) as err:
        row_history(log, "public", "orders", id_value="1")
    assert "'sales.orders'" in err.value.hint


def test_history_by_a_column_a_table_without_primary_key_lacks_names_its_columns(log):
    log.execute("CREATE TABLE public.events (kind int, note text)")
    record(log, "events", "insert", new={"kind": 1, "note": "a"})
    with pytest.raises(NotFoundError) as err:
        row_history(log, "public", "events", key={"knd": "1"})
    assert "It has no column knd (its columns: kind, note)." in err.value.hint


def test_history_without_flux_schema_says_to_attach(conn):
    with pytest.raises(NotFoundError) as err:
        row_history(conn, "public", "users", id_value="1")
    assert "flux attach" in err.value.hint


# -- blame -------------------------------------------------------------------------------------


def test_blame_attributes_each_column_to_the_request_that_last_set_it(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY, email text, plan text)")
    record(log, "users", "insert", request_id="r1", function="create_user", key={"id": 1}, new={"id": 1, "email": "a", "plan": "free"})
    record(log, "users", "update", request_id="r2", function="upgrade", key={"id": 1},
           old={"id": 1, "email": "a", "plan": "free"}, new={"id": 1, "email": "a", "plan": "pro"})
    record(log, "users", "update", request_id="r3", function="rename", key={"id": 1},
           old={"id": 1, "email": "a", "plan": "pro"}, new={"id": 1, "email": "b", "plan": "pro"})
    b = row_blame(log, "public", "users", id_value="1")
    by = {c.column: (c.value, c.set_by.request_id, c.set_by.function) for c in b.columns}
    assert by == {"id": (1, "r1", "create_user"), "email": ("b", "r3", "rename"), "plan": ("pro", "r2", "upgrade")}
    assert not b.deleted and b.last.request_id == "r3"


def test_blame_without_full_old_image_uses_value_changes(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY, plan text)")
    record(log, "users", "insert", request_id="r1", key={"id": 1}, new={"id": 1, "plan": "a"})
    record(log, "users", "update", request_id="r2", key={"id": 1}, old={"id": 1}, old_complete=False, new={"id": 1, "plan": "a"})
    record(log, "users", "update", request_id="r3", key={"id": 1}, old={"id": 1}, old_complete=False, new={"id": 1, "plan": "b"})
    by = {c.column: c.set_by.request_id for c in row_blame(log, "public", "users", id_value="1").columns}
    assert by == {"id": "r1", "plan": "r3"}


def test_blame_of_deleted_row_names_the_deleter(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY, plan text)")
    record(log, "users", "insert", request_id="r1", key={"id": 1}, new={"id": 1, "plan": "a"})
    record(log, "users", "delete", request_id="r2", function="purge", key={"id": 1}, old={"id": 1, "plan": "a"})
    b = row_blame(log, "public", "users", id_value="1")
    assert b.deleted and b.deleted_by.request_id == "r2" and b.deleted_by.function == "purge"
    assert {c.column: c.value for c in b.columns} == {"id": 1, "plan": "a"}


def test_blame_of_truncated_row_is_deleted_by_the_truncate(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY)")
    record(log, "users", "insert", request_id="r1", key={"id": 1}, new={"id": 1})
    record(log, "users", "truncate", request_id="t")
    b = row_blame(log, "public", "users", id_value="1")
    assert b.deleted and b.deleted_by.op == "truncate" and b.deleted_by.request_id == "t"


def test_blame_of_a_row_deleted_before_a_truncate_names_its_delete(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY)")
    record(log, "users", "insert", request_id="r1", key={"id": 1}, new={"id": 1})
    record(log, "users", "delete", request_id="r2", key={"id": 1}, old={"id": 1})
    record(log, "users", "truncate", request_id="t")
    b = row_blame(log, "public", "users", id_value="1")
    assert b.deleted and (b.deleted_by.op, b.deleted_by.request_id) == ("delete", "r2")
    assert b.last.request_id == "t"  # the truncate is still the row's latest change, as history lists it


def test_blame_of_a_key_moved_away_before_a_truncate_says_where_it_moved(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY)")
    record(log, "users", "insert", request_id="r1", key={"id": 1}, new={"id": 1})
    record(log, "users", "update", request_id="r2", key={"id": 2}, old_key={"id": 1}, old={"id": 1}, new={"id": 2})
    record(log, "users", "truncate", request_id="t")
    b = row_blame(log, "public", "users", id_value="1")
    assert b.deleted and b.deleted_by.request_id == "r2" and b.moved_to == {"id": 2}


def _moved_twice(log) -> None:
    """users 1 is inserted and upgraded, becomes 2 (r3), is renamed, then becomes 3 (r5)."""
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY, email text, plan text)")
    record(log, "users", "insert", request_id="r1", key={"id": 1}, new={"id": 1, "email": "a", "plan": "free"})
    record(log, "users", "update", request_id="r2", key={"id": 1},
           old={"id": 1, "email": "a", "plan": "free"}, new={"id": 1, "email": "a", "plan": "pro"})
    record(log, "users", "update", request_id="r3", key={"id": 2}, old_key={"id": 1},
           old={"id": 1, "email": "a", "plan": "pro"}, new={"id": 2, "email": "a", "plan": "pro"})
    record(log, "users", "update", request_id="r4", key={"id": 2},
           old={"id": 2, "email": "a", "plan": "pro"}, new={"id": 2, "email": "b", "plan": "pro"})
    record(log, "users", "update", request_id="r5", key={"id": 3}, old_key={"id": 2},
           old={"id": 2, "email": "b", "plan": "pro"}, new={"id": 3, "email": "b", "plan": "pro"})


def test_history_of_each_key_holds_the_update_that_changed_it_marked_out_or_in(log):
    _moved_twice(log)
    first = row_history(log, "public", "users", id_value="1")
    assert [(m.request_id, m.key_change) for m in first.mutations] == [("r1", None), ("r2", None), ("r3", "out")]
    assert first.mutations[-1].row_key == {"id": 2} and first.mutations[-1].old_row_key == {"id": 1}
    middle = row_history(log, "public", "users", id_value="2")
    assert [(m.request_id, m.key_change) for m in middle.mutations] == [("r3", "in"), ("r4", None), ("r5", "out")]


def test_blame_by_an_old_key_says_the_row_moved_and_where(log):
    _moved_twice(log)
    b = row_blame(log, "public", "users", id_value="1")
    assert b.deleted and b.deleted_by.request_id == "r3" and b.moved_to == {"id": 2}
    assert {c.column: c.value for c in b.columns} == {"id": 1, "email": "a", "plan": "pro"}


def test_blame_by_the_current_key_follows_the_row_back_through_its_key_changes(log):
    _moved_twice(log)
    b = row_blame(log, "public", "users", id_value="3")
    assert not b.deleted and b.moved_to is None and b.last.request_id == "r5"
    by = {c.column: (c.value, c.set_by.request_id) for c in b.columns}
    assert by == {"id": (3, "r5"), "email": ("b", "r4"), "plan": ("pro", "r2")}


def test_table_blame_lists_recent_rows_once_with_last_writer(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY, plan text)")
    record(log, "users", "insert", request_id="r1", key={"id": 1}, new={"id": 1, "plan": "a"})
    record(log, "users", "insert", request_id="r2", key={"id": 2}, new={"id": 2, "plan": "a"})
    record(log, "users", "update", request_id="r3", key={"id": 1}, old={"id": 1, "plan": "a"}, new={"id": 1, "plan": "b"})
    rows = table_blame(log, "public", "users")
    assert [(r.row_key, r.writer.request_id, r.writer.op) for r in rows] == [({"id": 1}, "r3", "update"), ({"id": 2}, "r2", "insert")]
    assert [r.row_key for r in table_blame(log, "public", "users", limit=1)] == [{"id": 1}]


def test_table_blame_orders_by_lsn_not_by_its_text(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY)")
    record(log, "users", "insert", request_id="at 0/F00", key={"id": 1}, new={"id": 1}, tx=0xF)
    record(log, "users", "insert", request_id="at 0/1000", key={"id": 2}, new={"id": 2}, tx=0x10)
    assert [r.writer.request_id for r in table_blame(log, "public", "users")] == ["at 0/1000", "at 0/F00"]


def test_table_blame_stops_at_a_truncate(log):
    log.execute("CREATE TABLE public.users (id int PRIMARY KEY)")
    record(log, "users", "insert", request_id="r1", key={"id": 1}, new={"id": 1})
    record(log, "users", "truncate", request_id="t")
    record(log, "users", "insert", request_id="r2", key={"id": 2}, new={"id": 2})
    rows = table_blame(log, "public", "users")
    assert [(r.writer.op, r.writer.request_id) for r in rows] == [("insert", "r2"), ("truncate", "t")]


def test_table_blame_lists_a_row_whose_key_changed_under_its_new_key_only(log):
    _moved_twice(log)
    rows = table_blame(log, "public", "users")
    assert [(r.row_key, r.writer.request_id, r.moved_from) for r in rows] == [({"id": 3}, "r5", {"id": 2})]


def test_table_blame_lists_a_row_inserted_under_a_key_another_row_left(log):
    _moved_twice(log)
    record(log, "users", "insert", request_id="r6", key={"id": 1}, new={"id": 1, "email": "c", "plan": "free"})
    assert [(r.row_key, r.writer.request_id) for r in table_blame(log, "public", "users")] == [({"id": 1}, "r6"), ({"id": 3}, "r5")]


def test_table_blame_lists_a_numeric_key_rewritten_with_another_scale_once(conn, capture):
    conn.execute("CREATE TABLE public.prices (id numeric PRIMARY KEY, v text)")
    running = capture(tables=["prices"])
    conn.execute("INSERT INTO prices VALUES (2.5, 'a')")
    conn.execute("UPDATE prices SET id = 2.50 WHERE id = 2.5")  # the same key, which PostgreSQL keeps as written
    running.caught_up()
    rows = table_blame(conn, "public", "prices")
    assert [(str(r.row_key["id"]), r.writer.op) for r in rows] == [("2.50", "update")]


def test_blame_of_a_renamed_column_does_not_say_it_was_set_before_the_recorded_history(conn, capture):
    conn.execute("CREATE TABLE public.notes (id int PRIMARY KEY, body text, title text)")
    running = capture(tables=["notes"])
    conn.execute("INSERT INTO notes VALUES (1, 'b1', 't1')")
    conn.execute("ALTER TABLE notes RENAME COLUMN title TO headline")
    conn.execute("UPDATE notes SET body = 'b2'")
    running.caught_up()
    blame = {c.column: c for c in row_blame(conn, "public", "notes", id_value="1").columns}
    # Set by the insert (as title), which the update cannot tell: that update or an earlier change.
    assert blame["headline"].set_by is not None and blame["headline"].set_by.op == "update"
    assert not blame["headline"].certain


def test_blame_does_not_credit_a_value_to_a_change_that_did_not_set_it_when_the_history_lacks_the_one_that_did(conn, capture):
    """Renamed a to b and back: history of a follows none of b's changes (README), so blame of a sees
    the insert set v to 'x', then an update whose old row holds v = 'y' leave it alone."""
    conn.execute("CREATE TABLE public.a (id int PRIMARY KEY, v text, w text)")
    running = capture(tables=["a"])
    conn.execute("INSERT INTO a VALUES (1, 'x', 'w0')")
    conn.execute("ALTER TABLE a RENAME TO b")
    conn.execute("UPDATE b SET v = 'y'")
    conn.execute("ALTER TABLE b RENAME TO a")
    conn.execute("UPDATE a SET w = 'w1'")
    running.caught_up()
    blame = {c.column: c for c in row_blame(conn, "public", "a", id_value="1").columns}
    assert [m.recorded_as for m in row_history(conn, "public", "a", id_value="1").mutations] == ["a", "a"]
    # Set by b's update, which this history lacks: this update or an earlier change, never the insert.
    assert (blame["v"].value, blame["v"].set_by.op, blame["v"].certain) == ("y", "update", False)
    assert (blame["w"].set_by.op, blame["w"].certain) == ("update", True)
    assert (blame["id"].set_by.op, blame["id"].certain) == ("insert", True)


def test_blame_lists_an_unchanged_toasted_column_it_never_saw_as_unknown(conn, capture):
    conn.execute("CREATE TABLE public.docs (id int PRIMARY KEY, body text, hits int)")
    conn.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")  # stored out of line: TOASTed
    conn.execute("INSERT INTO docs VALUES (1, repeat('y', 5000), 0)")
    running = capture(tables=["docs"])
    conn.execute("ALTER TABLE docs REPLICA IDENTITY DEFAULT")  # old rows by key only: TOAST left out
    conn.execute("UPDATE docs SET hits = 1")
    running.caught_up()
    body = {c.column: c for c in row_blame(conn, "public", "docs", id_value="1").columns}["body"]
    assert (body.known, body.value, body.set_by) == (False, None, None)


def test_blame_of_a_column_first_seen_null_after_it_was_unknown_shows_its_value(log):
    log.execute("CREATE TABLE public.docs (id int PRIMARY KEY, body text)")
    record(log, "docs", "update", request_id="r1", key={"id": 1}, old={"id": 1}, old_complete=False, new={"id": 1})
    log.execute("UPDATE flux.state_mutations SET missing_columns = '{body}'")
    record(log, "docs", "update", request_id="r2", key={"id": 1}, old={"id": 1}, old_complete=False,
           new={"id": 1, "body": None})
    body = {c.column: c for c in row_blame(log, "public", "docs", id_value="1").columns}["body"]
    assert (body.known, body.value, body.set_by.request_id, body.certain) == (True, None, "r2", False)


def test_blame_of_values_that_match_two_rows_of_a_table_without_primary_key_is_ambiguous(conn, capture):
    conn.execute("CREATE TABLE public.events (kind int, note text)")
    running = capture(tables=["events"])
    conn.execute("INSERT INTO events VALUES (1, 'one'), (1, 'uno')")
    running.caught_up()
    with pytest.raises(AmbiguousError) as err:
        row_blame(conn, "public", "events", key={"kind": "1"})
    assert "matches 2 rows" in str(err.value) and "note" in err.value.hint
    assert row_blame(conn, "public", "events", key={"kind": "1", "note": "uno"}).columns[1].value == "uno"


def test_blame_of_values_one_row_left_and_another_took_is_not_ambiguous(conn, capture):
    conn.execute("CREATE TABLE public.events (kind int, note text)")
    running = capture(tables=["events"])
    conn.execute("INSERT INTO events VALUES (1, 'first')")
    conn.execute("UPDATE events SET kind = 2 WHERE note = 'first'")
    conn.execute("INSERT INTO events VALUES (1, 'second')")
    running.caught_up()
    b = row_blame(conn, "public", "events", key={"kind": "1"})
    assert {c.column: c.value for c in b.columns} == {"kind": 1, "note": "second"} and not b.deleted


def test_blame_of_a_row_that_took_values_another_left_keeps_none_of_its_writers(conn, capture):
    conn.execute("CREATE TABLE public.events (kind int, note text)")
    running = capture(tables=["events"])
    for rid, statement in [("r1", "INSERT INTO events VALUES (1, 'one')"), ("r2", "INSERT INTO events VALUES (3, 'two')"),
                           ("r3", "UPDATE events SET kind = 2 WHERE note = 'one'"),
                           ("r4", "UPDATE events SET kind = 1 WHERE note = 'two'")]:
        with flux.context.request(conn, rid) as req:
            req.execute(statement)
    running.caught_up()
    b = row_blame(conn, "public", "events", key={"kind": "1"})
    # note 'two' was set before the trail of kind = 1 that this row began (r2, under kind = 3), not by r1's row
    assert {c.column: (c.value, c.set_by.request_id if c.set_by else None) for c in b.columns} == {
        "kind": (1, "r4"), "note": ("two", None)}


# -- request ids -------------------------------------------------------------------------------


def test_request_id_prefix_resolves_when_unique(log):
    record(log, "users", "insert", request_id="4f9a3b2c-1111", key={"id": 1}, new={"id": 1})
    record(log, "users", "insert", request_id="550e8400-2222", key={"id": 2}, new={"id": 2})
    assert resolve_request_id(log, "4f9a") == "4f9a3b2c-1111"
    assert resolve_request_id(log, "req:550e8400") == "550e8400-2222"


def test_request_id_prefix_ambiguous_lists_candidates(log):
    record(log, "users", "insert", request_id="abc-1", key={"id": 1}, new={"id": 1})
    record(log, "users", "insert", request_id="abc-2", key={"id": 2}, new={"id": 2})
    with pytest.raises(AmbiguousError) as err:
        resolve_request_id(log, "abc")
    assert "abc-1" in str(err.value) and "abc-2" in str(err.value)


def test_request_id_exact_match_wins_over_longer_ids(log):
    record(log, "users", "insert", request_id="abc", key={"id": 1}, new={"id": 1})
    record(log, "users", "insert", request_id="abcd", key={"id": 2}, new={"id": 2})
    assert resolve_request_id(log, "abc") == "abc"


def test_request_id_prefix_without_match_is_not_found(log):
    record(log, "users", "insert", request_id="abc", key={"id": 1}, new={"id": 1})
    with pytest.raises(NotFoundError):
        resolve_request_id(log, "zz")


def test_an_empty_request_id_says_what_to_give(log):
    with pytest.raises(ConfigError) as err:
        resolve_request_id(log, "req:")
    assert "flux requests" in err.value.hint


def test_request_id_prefix_treats_like_wildcards_literally(log):
    record(log, "users", "insert", request_id="a_c", key={"id": 1}, new={"id": 1})
    record(log, "users", "insert", request_id="abc", key={"id": 2}, new={"id": 2})
    assert resolve_request_id(log, "a_") == "a_c"


def test_history_finds_a_row_recorded_without_key_by_its_key_column_of_then(conn, dsn):
    conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, v text)")
    attach(dsn, tables=["t"])
    conn.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    conn.execute("ALTER TABLE t RENAME COLUMN id TO uid")  # before the engine reads the inserts: no key in the catalog
    record_pending(dsn)
    history = row_history(conn, "public", "t", key={"id": "1"})
    assert history.matched_on == "images"
    assert [(m.op, m.row_key, m.new) for m in history.mutations] == [("insert", None, {"id": 1, "v": "a"})]
    assert {c.column: c.value for c in row_blame(conn, "public", "t", key={"id": "2"}).columns} == {"id": 2, "v": "b"}


def test_history_of_a_dropped_table_recorded_without_key_says_why_id_has_nothing_to_match(conn, dsn):
    conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, v text)")
    attach(dsn, tables=["t"])
    conn.execute("INSERT INTO t VALUES (1, 'a')")
    conn.execute("DROP TABLE t")
    record_pending(dsn)
    with pytest.raises(ConfigError, match="Table t no longer exists, and its changes were recorded without a primary key"):
        row_history(conn, "public", "t", id_value="1")
    assert [m.new for m in row_history(conn, "public", "t", key={"id": "1"}).mutations] == [{"id": 1, "v": "a"}]


def _insert_into_a_then_rename_it_b(conn, capture) -> None:
    """Table a, captured, gets row 1 and is renamed b; the engine has recorded all of it."""
    conn.execute("CREATE TABLE public.a (id int PRIMARY KEY)")
    running = capture(tables=["a"])
    conn.execute("INSERT INTO a VALUES (1)")
    conn.execute("ALTER TABLE a RENAME TO b")
    running.caught_up()


def test_history_of_a_renamed_table_not_changed_since_has_the_changes_under_its_former_name(conn, capture):
    _insert_into_a_then_rename_it_b(conn, capture)
    assert [(m.op, m.recorded_as) for m in row_history(conn, "public", "b", id_value="1").mutations] == [("insert", "a")]
    assert [(c.row_key, c.writer.recorded_as) for c in table_blame(conn, "public", "b")] == [({"id": 1}, "a")]


def test_a_renamed_table_recorded_without_its_oid_and_not_changed_since_points_to_its_former_name(conn, capture):
    _insert_into_a_then_rename_it_b(conn, capture)
    conn.execute("UPDATE flux.state_mutations SET relid = NULL")  # as recorded before schema v7
    with pytest.raises(NotFoundError) as err:
        row_history(conn, "public", "b", id_value="1")
    assert err.value.hint.startswith("b is captured (publication flux)")
    assert "if the table was renamed since, its earlier changes are under its former name" in err.value.hint


@pytest.mark.parametrize(("create", "recorded", "suggested"), [
    ("CREATE TABLE archive.t (id int PRIMARY KEY)", "t", "did you mean 'archive.t'?"),  # moved to archive since
    ('CREATE TABLE public."T" (id int PRIMARY KEY)', "t", """Did you mean '"T"'?"""),  # another case
])
def test_a_name_whose_changes_were_all_pruned_says_so_beside_the_table_it_suggests(log, create, recorded, suggested):
    """README (Retention): a table with no change left says so in its hint, whatever else it says."""
    log.execute("CREATE SCHEMA archive")
    log.execute(create)
    record(log, recorded, "insert", key={"id": 1}, new={"id": 1})
    prune(log, older_than=timedelta(days=1), traces=False)  # T0 is long before
    with pytest.raises(NotFoundError) as err:
        row_history(log, "public", "t", id_value="1")
    assert suggested in err.value.hint and " UTC were deleted by retention." in err.value.hint


def test_a_partitioned_table_renamed_while_the_engine_streams_is_recorded_under_its_former_name_until_described_again(
        conn, capture):
    """README (Known limits): pgoutput describes a partitioned table once per partition and session."""
    conn.execute("CREATE TABLE public.pt (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE public.pt_lo PARTITION OF public.pt FOR VALUES FROM (0) TO (10)")
    conn.execute("CREATE TABLE public.pt_hi PARTITION OF public.pt FOR VALUES FROM (10) TO (20)")
    running = capture(tables=["pt"])
    conn.execute("INSERT INTO pt VALUES (1, 'a')")
    running.caught_up()
    conn.execute("ALTER TABLE pt RENAME TO pt2")
    conn.execute("UPDATE pt2 SET v = 'b' WHERE id = 1")  # pt_lo, described before the rename
    conn.execute("INSERT INTO pt2 VALUES (12, 'c')")  # pt_hi's first change: described with the new name
    conn.execute("UPDATE pt2 SET v = 'd' WHERE id = 1")
    running.caught_up()
    history = row_history(conn, "public", "pt2", id_value="1")
    assert [(m.op, m.recorded_as) for m in history.mutations] == [("insert", "pt"), ("update", "pt"), ("update", "pt2")]
    blame = {c.column: c.set_by.recorded_as for c in row_blame(conn, "public", "pt2", id_value="1").columns}
    assert blame == {"id": "pt", "v": "pt2"}


def test_history_follows_a_table_back_through_each_of_its_renames_and_schemas(conn, capture):
    conn.execute("CREATE SCHEMA archive")
    conn.execute("CREATE TABLE public.a (id int PRIMARY KEY, v int)")
    running = capture(all_tables=True)
    conn.execute("INSERT INTO a VALUES (1, 0)")
    conn.execute("ALTER TABLE a RENAME TO b")
    conn.execute("UPDATE b SET v = 1")
    conn.execute("ALTER TABLE b SET SCHEMA archive")
    conn.execute("TRUNCATE archive.b")
    conn.execute("INSERT INTO archive.b VALUES (1, 2)")
    running.caught_up()
    history = row_history(conn, "archive", "b", id_value="1")
    assert [(m.op, m.recorded_as) for m in history.mutations] == [
        ("insert", "a"), ("update", "b"), ("truncate", "archive.b"), ("insert", "archive.b")]
    assert {c.column: (c.value, c.set_by.recorded_as) for c in row_blame(conn, "archive", "b", id_value="1").columns} == {
        "id": (1, "archive.b"), "v": (2, "archive.b")}


def test_history_suggests_a_name_holding_a_quote_as_the_shell_reads_it_back(log):
    """The suggestion was put in quotes by hand: a name with a quote in it ended them early."""
    log.execute("""CREATE TABLE public."O'Hara" (id int PRIMARY KEY)""")
    record(log, "O'Hara", "insert", key={"id": 1}, new={"id": 1})
    with pytest.raises(NotFoundError) as err:
        row_history(log, "public", "o'hara", id_value="1")
    suggested = err.value.hint.removeprefix("Did you mean ").split("? ")[0]
    assert shlex.split(suggested) == ['"O\'Hara"'], err.value.hint
