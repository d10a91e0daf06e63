"""End-to-end schema changes while the engine runs: DDL between writes, and tables or
partitions created after `attach --all-tables` (captured through the event trigger)."""

from __future__ import annotations

import time

import psycopg

from flux.cdc.publication import captured_tables
from tests.support import mutations, record_pending


def images(dsn: str, table: str) -> list[tuple[str, dict | None, dict | None]]:
    return [(m["op"], m["old"], m["new"]) for m in mutations(dsn, table)]


# -- DDL between writes ---------------------------------------------------------------------


def test_added_column_appears_in_images_from_the_next_change_on(dsn, conn, capture):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
    running = capture(tables=["t"])
    conn.execute("INSERT INTO t VALUES (1, 'x')")
    running.caught_up()
    conn.execute("ALTER TABLE t ADD COLUMN b int DEFAULT 5")  # no rewrite: old rows read b from the default
    conn.execute("UPDATE t SET a = 'y'")
    conn.execute("INSERT INTO t VALUES (2, 'z', 6)")
    running.caught_up()
    assert images(dsn, "t") == [
        ("insert", None, {"id": 1, "a": "x"}),
        ("update", {"id": 1, "a": "x", "b": 5}, {"id": 1, "a": "y", "b": 5}),
        ("insert", None, {"id": 2, "a": "z", "b": 6}),
    ]


def test_dropped_column_disappears_from_images_from_the_next_change_on(dsn, conn, capture):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, a text, b int)")
    running = capture(tables=["t"])
    conn.execute("INSERT INTO t VALUES (1, 'x', 1)")
    running.caught_up()
    conn.execute("ALTER TABLE t DROP COLUMN a")
    conn.execute("UPDATE t SET b = 2")
    running.caught_up()
    assert images(dsn, "t") == [
        ("insert", None, {"id": 1, "a": "x", "b": 1}),
        ("update", {"id": 1, "b": 1}, {"id": 1, "b": 2}),
    ]


def test_renamed_columns_use_the_new_name_from_the_next_change_on(dsn, conn, capture):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
    running = capture(tables=["t"])
    conn.execute("INSERT INTO t VALUES (1, 'x')")
    running.caught_up()
    conn.execute("ALTER TABLE t RENAME COLUMN a TO b")
    conn.execute("ALTER TABLE t RENAME COLUMN id TO key")
    conn.execute("UPDATE t SET b = 'y'")
    running.caught_up()
    insert, update = mutations(dsn, "t")
    assert (insert["new"], insert["row_key"]) == ({"id": 1, "a": "x"}, {"id": 1})
    assert (update["old"], update["new"], update["row_key"]) == ({"key": 1, "b": "x"}, {"key": 1, "b": "y"}, {"key": 1})
    assert update["changed_columns"] == ["b"]


def test_altered_column_type_converts_with_the_new_type_from_the_next_change_on(dsn, conn, capture):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, qty text, price int)")
    running = capture(tables=["t"])
    conn.execute("INSERT INTO t VALUES (1, '42', 3)")
    running.caught_up()
    conn.execute("ALTER TABLE t ALTER COLUMN qty TYPE int USING qty::int, ALTER COLUMN price TYPE numeric(30, 20)")
    conn.execute("UPDATE t SET qty = qty + 1")
    running.caught_up()
    assert images(dsn, "t") == [
        ("insert", None, {"id": 1, "qty": "42", "price": 3}),
        ("update", {"id": 1, "qty": 42, "price": 3}, {"id": 1, "qty": 43, "price": 3}),
    ]
    [_, update] = mutations(dsn, "t")
    assert str(update["new"]["price"]) == "3.00000000000000000000"


def test_ddl_inside_a_transaction_changes_the_images_of_the_changes_after_it(dsn, conn, capture):
    conn.execute("CREATE TYPE status AS ENUM ('new', 'done')")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
    running = capture(tables=["t"])
    with psycopg.connect(dsn) as c:
        c.execute("INSERT INTO t VALUES (1, 'x')")
        c.execute("ALTER TABLE t ADD COLUMN s status[], DROP COLUMN a")
        c.execute("INSERT INTO t VALUES (2, '{new,done}')")
    running.caught_up()
    assert images(dsn, "t") == [
        ("insert", None, {"id": 1, "a": "x"}),
        ("insert", None, {"id": 2, "s": ["new", "done"]}),
    ]


def test_row_key_is_null_not_wrong_when_the_key_column_was_renamed_before_the_engine_read_the_change(dsn, conn, capture):
    # The primary key is read from the catalog when the change is processed, not as of the change.
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
    running = capture(tables=["t"])
    running.caught_up()
    running.stop()
    conn.execute("INSERT INTO t VALUES (1, 'x')")
    conn.execute("ALTER TABLE t RENAME COLUMN id TO key")
    conn.execute("INSERT INTO t VALUES (2, 'y')")
    record_pending(dsn)
    assert [(m["new"], m["row_key"]) for m in mutations(dsn, "t")] == [
        ({"id": 1, "a": "x"}, None),
        ({"key": 2, "a": "y"}, {"key": 2}),
    ]


# -- tables created after attach ------------------------------------------------------------


def test_table_created_after_attach_all_tables_is_captured_from_its_creating_transaction(dsn, conn, capture):
    running = capture(all_tables=True)
    with psycopg.connect(dsn) as c:
        c.execute('CREATE TABLE "Late table" (id int PRIMARY KEY, v text)')
        c.execute("""INSERT INTO "Late table" VALUES (1, 'born with the table')""")
    conn.execute("""UPDATE "Late table" SET v = 'later'""")
    running.caught_up()
    assert images(dsn, "Late table") == [
        ("insert", None, {"id": 1, "v": "born with the table"}),
        ("update", {"id": 1, "v": "born with the table"}, {"id": 1, "v": "later"}),  # FULL identity: complete old image
    ]
    assert mutations(dsn, "Late table")[1]["old_complete"] is True


def test_partition_created_after_attach_all_tables_is_captured_under_its_root(dsn, conn, capture):
    conn.execute("CREATE TABLE logs (day date NOT NULL, id int NOT NULL, msg text, PRIMARY KEY (day, id)) PARTITION BY RANGE (day)")
    conn.execute("CREATE TABLE logs_2024 PARTITION OF logs FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    running = capture(all_tables=True)
    with psycopg.connect(dsn) as c:
        c.execute("CREATE TABLE logs_2025 PARTITION OF logs FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
        c.execute("INSERT INTO logs VALUES ('2025-06-01', 1, 'new partition')")
    conn.execute("UPDATE logs SET msg = 'changed' WHERE id = 1")
    running.caught_up()
    rows = mutations(dsn)
    assert {m["table"] for m in rows} == {"logs"}
    assert [(m["op"], m["row_key"], m["old_complete"]) for m in rows] == [
        ("insert", {"day": "2025-06-01", "id": 1}, None),
        ("update", {"day": "2025-06-01", "id": 1}, True),
    ]
    assert rows[1]["old"] == {"day": "2025-06-01", "id": 1, "msg": "new partition"}


def test_partition_created_after_attach_of_its_root_gets_full_old_images(dsn, conn, capture):
    conn.execute("CREATE TABLE logs (day date NOT NULL, id int NOT NULL, msg text, PRIMARY KEY (day, id)) PARTITION BY RANGE (day)")
    running = capture(tables=["logs"])
    conn.execute("CREATE TABLE logs_2025 PARTITION OF logs FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    conn.execute("INSERT INTO logs VALUES ('2025-06-01', 1, 'x')")
    conn.execute("UPDATE logs SET msg = 'y'")
    running.caught_up()
    update = mutations(dsn, "logs")[1]
    assert (update["old"], update["old_complete"]) == ({"day": "2025-06-01", "id": 1, "msg": "x"}, True)


def test_table_created_with_create_table_as_after_attach_all_tables_captures_its_rows(dsn, conn, capture):
    running = capture(all_tables=True)
    conn.execute("CREATE TABLE copied AS SELECT g AS id, 'row ' || g AS v FROM generate_series(1, 3) g")
    conn.execute("UPDATE copied SET v = 'changed' WHERE id = 1")
    running.caught_up()
    assert [(op, (new or old)["id"]) for op, old, new in images(dsn, "copied")] == [
        ("insert", 1), ("insert", 2), ("insert", 3), ("update", 1),
    ]


def test_a_listed_table_replaced_by_a_rename_is_captured_again_under_its_name(dsn, conn, capture):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t VALUES (1, 'a')")
    running = capture(tables=["t"], reconcile_interval=0.1)
    with psycopg.connect(dsn) as c:  # an online schema change's swap, in one transaction
        c.execute("CREATE TABLE t_new (LIKE t INCLUDING ALL)")
        c.execute("ALTER TABLE t_new ADD COLUMN w int")
        c.execute("INSERT INTO t_new SELECT *, 0 FROM t")
        c.execute("ALTER TABLE t RENAME TO t_old")
        c.execute("ALTER TABLE t_new RENAME TO t")
        c.execute("DROP TABLE t_old")
    deadline = time.monotonic() + 15
    while [str(t) for t in captured_tables(conn, "flux")] != ["public.t"]:
        assert time.monotonic() < deadline, "the engine did not capture the new t"
        time.sleep(0.05)
    conn.execute("UPDATE t SET v = 'after the swap'")
    running.caught_up()
    assert images(dsn, "t") == [("update", {"id": 1, "v": "a", "w": 0}, {"id": 1, "v": "after the swap", "w": 0})]
