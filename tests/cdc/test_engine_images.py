"""End-to-end row images: what a real write through the real engine records in `old`, `new`,
`old_complete`, `missing_columns`, `changed_columns` and `row_key`.

Images are read back with `tests.support.mutations`, which parses JSON floats as `Decimal`,
so a numeric that was stored as a float would show its rounding here.
"""

from __future__ import annotations

import os
from decimal import Decimal

import psycopg

from tests.support import mutations

THIRTY_DIGITS = "123456789012345678901234.567890"  # 30 significant digits: beyond any float




def write(dsn: str, *statements: str, params: tuple | None = None) -> None:
    """Run `statements` in one source transaction."""
    with psycopg.connect(dsn) as c:
        for statement in statements:
            c.execute(statement, params if "%s" in statement else None)


def only(dsn: str, table: str) -> dict:
    [m] = mutations(dsn, table)
    return m


def key_only_change(conn: psycopg.Connection, capture, table: str, key_only: str, statement: str) -> dict:
    """The one mutation `statement` records on captured `table` once `key_only` (the table, or a
    partition of it) logs its old rows by key only, as after a user undid what attach set."""
    running = capture(tables=[table])
    conn.execute(f"ALTER TABLE {key_only} REPLICA IDENTITY DEFAULT")
    write(running.dsn, statement)
    running.caught_up()
    return only(running.dsn, table)


def partitioned_m(conn: psycopg.Connection, *regions: str) -> None:
    """Table m partitioned by region, one partition m_<region> and one row (region, n, 10 n) per region."""
    conn.execute("CREATE TABLE m (region text, id int, v int, PRIMARY KEY (region, id)) PARTITION BY LIST (region)")
    for n, region in enumerate(regions, 1):
        conn.execute(f"CREATE TABLE m_{region} PARTITION OF m FOR VALUES IN ('{region}')")
        conn.execute("INSERT INTO m VALUES (%s, %s, %s)", (region, n, 10 * n))


# -- typed values ---------------------------------------------------------------------------


def test_integers_and_floats_are_json_numbers_and_numeric_keeps_all_its_digits(dsn, conn, capture):
    conn.execute(
        "CREATE TABLE nums (id int PRIMARY KEY, i2 smallint, i8 bigint, f4 real, f8 double precision,"
        " n numeric, n_scaled numeric(40, 6), n_nan numeric, f_inf double precision)"
    )
    running = capture(tables=["nums"])
    write(dsn, f"INSERT INTO nums VALUES (1, -7, 9007199254740993, 1.5, 0.1, {THIRTY_DIGITS}, -{THIRTY_DIGITS}, 'NaN', 'Infinity')")
    running.caught_up()
    new = only(dsn, "nums")["new"]
    assert new == {
        "id": 1, "i2": -7, "i8": 9007199254740993, "f4": Decimal("1.5"), "f8": Decimal("0.1"),
        "n": Decimal(THIRTY_DIGITS), "n_scaled": Decimal("-" + THIRTY_DIGITS), "n_nan": "NaN", "f_inf": "Infinity",
    }
    assert str(new["n"]) == THIRTY_DIGITS


def test_bool_is_json_boolean_and_json_and_jsonb_are_nested_values(dsn, conn, capture):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, yes bool, no bool, j json, jb jsonb)")
    running = capture(tables=["docs"])
    # "C:\\u0000" is an escaped backslash and "u0000", not the U+0000 that jsonb refuses
    document = r'{"a": [1, {"b": null, "c": "x"}], "d": 1.000000000000000000000000000001, "e": true, "f": "C:\\u0000"}'
    write(dsn, "INSERT INTO docs VALUES (1, true, false, %s::json, %s::jsonb)", params=(document, document))
    running.caught_up()
    new = only(dsn, "docs")["new"]
    expected = {"a": [1, {"b": None, "c": "x"}], "d": Decimal("1.000000000000000000000000000001"), "e": True, "f": "C:\\u0000"}
    assert new == {"id": 1, "yes": True, "no": False, "j": expected, "jb": expected}


def test_json_value_that_jsonb_would_refuse_is_kept_as_its_text(dsn, conn, capture):
    # The json type accepts these, jsonb (the image column) does not: nesting them would stop the sink.
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, nul json, lone_surrogate json, huge json, emoji json)")
    running = capture(tables=["docs"])
    values = (r'{"a": "\u0000"}', r'["\ud800"]', "[1e200000]", r'"\ud83d\ude00"')
    write(dsn, "INSERT INTO docs VALUES (1, %s, %s, %s, %s)", params=values)
    running.caught_up()
    new = only(dsn, "docs")["new"]
    assert new == {"id": 1, "nul": values[0], "lone_surrogate": values[1], "huge": values[2], "emoji": "\U0001F600"}


def test_arrays_are_lists_of_typed_elements_with_nulls_and_nesting(dsn, conn, capture):
    conn.execute(
        "CREATE TABLE arrs (id int PRIMARY KEY, ints int[], texts text[], grid int[][], nums numeric[],"
        " docs jsonb[], stamps timestamptz[], empty int[], shifted int[])"
    )
    running = capture(tables=["arrs"])
    write(
        dsn,
        "INSERT INTO arrs VALUES (1, '{1,NULL,3}', ARRAY['a b', 'NULL', '', 'q\"uote', NULL, 'c,d'], '{{1,2},{3,4}}',"
        f" '{{{THIRTY_DIGITS},NULL}}', ARRAY['{{\"k\": [1]}}'::jsonb, 'null'::jsonb],"
        " ARRAY['2024-02-29 23:59:59.5+00'::timestamptz], '{}', '[0:1]={7,8}')",
    )
    running.caught_up()
    new = only(dsn, "arrs")["new"]
    assert new == {
        "id": 1,
        "ints": [1, None, 3],
        "texts": ["a b", "NULL", "", 'q"uote', None, "c,d"],
        "grid": [[1, 2], [3, 4]],
        "nums": [Decimal(THIRTY_DIGITS), None],
        "docs": [{"k": [1]}, None],
        "stamps": ["2024-02-29T23:59:59.5+00:00"],
        "empty": [],
        "shifted": [7, 8],
    }


def test_timestamps_are_iso_8601_and_dates_and_intervals_are_text(dsn, conn, capture):
    conn.execute("CREATE TABLE times (id int PRIMARY KEY, ts timestamp, tstz timestamptz, d date, iv interval, forever timestamptz)")
    running = capture(tables=["times"])
    write(
        dsn,
        "SET TIME ZONE 'America/New_York'",  # the writer's zone must not leak into the image
        "INSERT INTO times VALUES (1, '2024-03-10 14:22:31.123456', '2024-03-10 09:22:31-05', '2024-03-10',"
        " '1 day 2 hours', 'infinity')",
    )
    running.caught_up()
    new = only(dsn, "times")["new"]
    assert new == {
        "id": 1,
        "ts": "2024-03-10T14:22:31.123456",
        "tstz": "2024-03-10T14:22:31+00:00",
        "d": "2024-03-10",
        "iv": "P1DT2H",
        "forever": "infinity",
    }


def test_bytea_is_hex_text(dsn, conn, capture):
    conn.execute("CREATE TABLE blobs (id int PRIMARY KEY, data bytea, blobs bytea[])")
    running = capture(tables=["blobs"])
    write(dsn, "INSERT INTO blobs VALUES (1, '\\x00ff10'::bytea, ARRAY['\\xdead'::bytea, NULL])")
    running.caught_up()
    assert only(dsn, "blobs")["new"] == {"id": 1, "data": "\\x00ff10", "blobs": ["\\xdead", None]}


def test_enum_and_uuid_are_text_and_a_domain_converts_like_its_base_type(dsn, conn, capture):
    conn.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    conn.execute("CREATE DOMAIN amount AS numeric(40, 6) CHECK (VALUE >= 0)")
    conn.execute("CREATE DOMAIN flags AS bool[]")
    conn.execute(
        "CREATE TABLE typed (id uuid PRIMARY KEY, m mood, moods mood[], a amount, amounts amount[], f flags)"
    )
    running = capture(tables=["typed"])
    write(
        dsn,
        f"INSERT INTO typed VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', '{{sad,NULL,happy}}', {THIRTY_DIGITS},"
        f" ARRAY[{THIRTY_DIGITS}, 0]::amount[], '{{t,f}}')",
    )
    running.caught_up()
    m = only(dsn, "typed")
    assert m["new"] == {
        "id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "m": "happy",
        "moods": ["sad", None, "happy"],
        "a": Decimal(THIRTY_DIGITS),
        "amounts": [Decimal(THIRTY_DIGITS), Decimal("0.000000")],
        "f": [True, False],
    }
    assert m["row_key"] == {"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}


def test_null_values_are_json_null_in_both_images(dsn, conn, capture):
    conn.execute("CREATE TABLE sparse (id int PRIMARY KEY, note text, n numeric, doc jsonb, tags text[])")
    running = capture(tables=["sparse"])
    write(dsn, "INSERT INTO sparse (id) VALUES (1)")
    write(dsn, "UPDATE sparse SET note = 'x'")
    running.caught_up()
    insert, update = mutations(dsn, "sparse")
    nulls = {"id": 1, "note": None, "n": None, "doc": None, "tags": None}
    assert insert["new"] == nulls
    assert update["old"] == nulls
    assert update["new"] == {**nulls, "note": "x"}
    assert update["changed_columns"] == ["note"]


# -- full images ----------------------------------------------------------------------------


def test_update_and_delete_record_full_old_and_new_images(dsn, conn, capture):
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, email text, plan text, balance numeric)")
    conn.execute("INSERT INTO accounts VALUES (1, 'a@example.com', 'free', 10.50)")
    running = capture(tables=["accounts"])
    write(dsn, "UPDATE accounts SET plan = 'pro', balance = balance - 0.25")
    write(dsn, "DELETE FROM accounts")
    running.caught_up()
    update, delete = mutations(dsn, "accounts")
    before = {"id": 1, "email": "a@example.com", "plan": "free", "balance": Decimal("10.50")}
    after = {"id": 1, "email": "a@example.com", "plan": "pro", "balance": Decimal("10.25")}
    assert (update["op"], update["old"], update["new"], update["old_complete"]) == ("update", before, after, True)
    assert update["changed_columns"] == ["plan", "balance"]
    assert update["missing_columns"] is None
    assert (delete["op"], delete["old"], delete["new"], delete["old_complete"]) == ("delete", after, None, True)
    assert delete["row_key"] == {"id": 1}


def test_update_of_the_primary_key_keys_the_row_by_its_new_key(dsn, conn, capture):
    conn.execute("CREATE TABLE renumbered (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO renumbered VALUES (1, 'x')")
    running = capture(tables=["renumbered"])
    write(dsn, "UPDATE renumbered SET id = 2")
    running.caught_up()
    m = only(dsn, "renumbered")
    assert (m["old"], m["new"], m["row_key"], m["changed_columns"]) == ({"id": 1, "v": "x"}, {"id": 2, "v": "x"}, {"id": 2}, ["id"])


# -- TOAST ----------------------------------------------------------------------------------


def big_text(n: int = 1 << 20) -> str:
    """n characters that pglz cannot compress below the TOAST threshold."""
    return os.urandom(n // 2).hex()


def test_unchanged_toasted_value_is_filled_from_the_full_old_image(dsn, conn, capture):
    conn.execute("CREATE TABLE files (id int PRIMARY KEY, name text, body text)")
    body = big_text()
    conn.execute("INSERT INTO files VALUES (1, 'a.txt', %s)", (body,))
    running = capture(tables=["files"])
    write(dsn, "UPDATE files SET name = 'b.txt'")
    running.caught_up()
    m = only(dsn, "files")
    assert m["old"] == {"id": 1, "name": "a.txt", "body": body}
    assert m["new"] == {"id": 1, "name": "b.txt", "body": body}
    assert (m["old_complete"], m["missing_columns"], m["changed_columns"]) == (True, None, ["name"])


def test_changed_toasted_value_is_recorded_old_and_new(dsn, conn, capture):
    conn.execute("CREATE TABLE files (id int PRIMARY KEY, name text, body text)")
    before, after = big_text(), big_text()
    conn.execute("INSERT INTO files VALUES (1, 'a.txt', %s)", (before,))
    running = capture(tables=["files"])
    write(dsn, "UPDATE files SET body = %s", params=(after,))
    running.caught_up()
    m = only(dsn, "files")
    assert (m["old"]["body"], m["new"]["body"]) == (before, after)
    assert (m["old_complete"], m["missing_columns"], m["changed_columns"]) == (True, None, ["body"])


# -- values too large for a jsonb image --------------------------------------------------------


def test_the_image_size_cap_fits_in_jsonb_in_the_worst_case(conn):
    """The cap is what keeps a huge value from failing its sink transaction on every retry: an
    image of that size whose jsonb is largest for its text (an array of zeros: 2 bytes of JSON,
    12 of jsonb, and an element of the parse tree each) must be a valid jsonb."""
    from flux.cdc.assembler import MAX_IMAGE_BYTES

    count = (MAX_IMAGE_BYTES - len('{"a":[]}') + 1) // 2
    text = '{"a":[' + ",".join(["0"] * count) + "]}"
    assert len(text) <= MAX_IMAGE_BYTES
    assert conn.execute("SELECT pg_column_size(%s::text::jsonb)", (text,)).fetchone()[0] > 5 * MAX_IMAGE_BYTES


def test_a_value_too_large_for_an_image_is_left_out_listed_missing_and_logged(dsn, conn, capture, monkeypatch, caplog):
    from flux.cdc import assembler

    monkeypatch.setattr(assembler, "MAX_IMAGE_BYTES", 50_000)
    conn.execute("CREATE TABLE files (id int PRIMARY KEY, name text, body text, notes text)")
    body, notes = big_text(80_000), big_text(30_000)
    conn.execute("INSERT INTO files VALUES (1, 'a.txt', %s, %s)", (body, notes))
    running = capture(tables=["files"])
    write(dsn, "UPDATE files SET name = 'b.txt'", "INSERT INTO files VALUES (2, 'small', 's', 'n')")
    running.caught_up()
    big, small = mutations(dsn, "files")
    assert big["old"] == {"id": 1, "name": "a.txt", "notes": notes}  # only the largest column had to go
    assert big["new"] == {"id": 1, "name": "b.txt", "notes": notes}
    assert (big["missing_columns"], big["changed_columns"], big["row_key"]) == (["body"], ["name"], {"id": 1})
    assert small["new"] == {"id": 2, "name": "small", "body": "s", "notes": "n"} and small["missing_columns"] is None
    [warning] = [r.getMessage() for r in caplog.records if "too large for a jsonb image" in r.getMessage()]
    assert "public.files" in warning and '{"id":1}' in warning and "column body" in warning


def test_a_type_dropped_before_the_engine_reads_the_change_is_recorded_as_text_with_a_warning(dsn, conn, capture, caplog):
    conn.execute("CREATE DOMAIN posint AS int CHECK (VALUE > 0)")
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, qty posint)")
    running = capture(tables=["orders"])
    # A type swap in one migration: the insert's row was written with the domain, gone at commit.
    write(dsn, "INSERT INTO orders VALUES (1, 42)", "ALTER TABLE orders ALTER qty TYPE int", "DROP DOMAIN posint")
    running.caught_up()
    assert only(dsn, "orders")["new"] == {"id": 1, "qty": "42"}
    assert any("no longer in the catalog" in r.getMessage() for r in caplog.records)


# -- primary-key changes ------------------------------------------------------------------------


def test_an_update_that_changes_the_primary_key_records_the_old_key_too(dsn, conn, capture):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
    conn.execute("INSERT INTO users VALUES (1, 'a')")
    running = capture(tables=["users"])
    write(dsn, "UPDATE users SET id = 2", "UPDATE users SET email = 'b'")
    running.caught_up()
    moved, renamed = mutations(dsn, "users")
    assert (moved["row_key"], moved["old_row_key"], moved["changed_columns"]) == ({"id": 2}, {"id": 1}, ["id"])
    assert (renamed["row_key"], renamed["old_row_key"]) == ({"id": 2}, None)


def test_an_update_keeping_a_numeric_key_is_not_a_key_change_with_or_without_full_identity(dsn, conn, capture):
    conn.execute("CREATE TABLE prices (id numeric PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE rates (id numeric PRIMARY KEY, v text)")
    conn.execute("INSERT INTO prices VALUES (1.5, 'a')")
    conn.execute("INSERT INTO rates VALUES (1.0, 'a')")
    running = capture(tables=["prices", "rates"])
    conn.execute("ALTER TABLE prices REPLICA IDENTITY DEFAULT")
    write(dsn, "UPDATE prices SET v = 'b'", "UPDATE rates SET id = 1.00")  # the same key value, written anew
    running.caught_up()
    assert [m["old_row_key"] for m in mutations(dsn)] == [None, None]


def test_a_key_change_without_full_identity_records_the_old_key_from_the_key_image(dsn, conn, capture):
    conn.execute("CREATE TABLE users (a int, b text, email text, PRIMARY KEY (a, b))")
    conn.execute("INSERT INTO users VALUES (1, 'x', 'e')")
    m = key_only_change(conn, capture, "users", "users", "UPDATE users SET b = 'y'")
    assert (m["row_key"], m["old_row_key"], m["old_complete"]) == ({"a": 1, "b": "y"}, {"a": 1, "b": "x"}, False)


# -- key-only old images (identity no longer FULL) -------------------------------------------


def test_update_without_full_identity_records_key_only_old_image_marked_incomplete(dsn, conn, capture):
    conn.execute("CREATE TABLE plans (id int PRIMARY KEY, name text, price int)")
    conn.execute("INSERT INTO plans VALUES (1, 'free', 0)")
    m = key_only_change(conn, capture, "plans", "plans", "UPDATE plans SET price = 5")  # the user undid what attach set
    assert (m["old"], m["new"]) == ({"id": 1}, {"id": 1, "name": "free", "price": 5})
    assert (m["old_complete"], m["changed_columns"], m["missing_columns"]) == (False, None, None)
    assert m["row_key"] == {"id": 1}


def test_a_table_set_back_from_full_identity_is_warned_of_in_the_engine_log_once(dsn, conn, capture, caplog):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t VALUES (1, 'a')")
    running = capture(tables=["t"])
    write(dsn, "UPDATE t SET v = 'full'")
    running.caught_up()
    assert not [r for r in caplog.records if "not FULL" in r.getMessage()]
    conn.execute("ALTER TABLE t REPLICA IDENTITY DEFAULT")
    write(dsn, "UPDATE t SET v = 'key only'")
    conn.execute("ALTER TABLE t ADD COLUMN w int")  # another DDL: the Relation comes again, still DEFAULT
    write(dsn, "UPDATE t SET v = 'still key only'")
    running.caught_up()
    [warning] = [r.getMessage() for r in caplog.records if "not FULL" in r.getMessage()]
    assert warning.startswith("public.t is REPLICA IDENTITY DEFAULT, not FULL: the old rows of its updates and deletes")


def test_delete_without_full_identity_records_key_only_old_image_marked_incomplete(dsn, conn, capture):
    conn.execute("CREATE TABLE plans (a int, b text, name text, PRIMARY KEY (a, b))")
    conn.execute("INSERT INTO plans VALUES (1, 'x', 'free')")
    m = key_only_change(conn, capture, "plans", "plans", "DELETE FROM plans")
    assert (m["op"], m["old"], m["new"]) == ("delete", {"a": 1, "b": "x"}, None)
    assert (m["old_complete"], m["changed_columns"], m["row_key"]) == (False, None, {"a": 1, "b": "x"})


def test_unchanged_toasted_value_without_full_old_image_is_listed_missing_and_absent(dsn, conn, capture):
    conn.execute("CREATE TABLE files (id int PRIMARY KEY, name text, body text)")
    conn.execute("INSERT INTO files VALUES (1, 'a.txt', %s)", (big_text(),))
    m = key_only_change(conn, capture, "files", "files", "UPDATE files SET name = 'b.txt'")
    assert m["new"] == {"id": 1, "name": "b.txt"}
    assert (m["old"], m["old_complete"], m["missing_columns"], m["changed_columns"]) == ({"id": 1}, False, ["body"], None)


def test_update_on_a_partition_without_full_identity_keeps_only_key_columns_as_old(dsn, conn, capture):
    # The root stays FULL, so pgoutput flags every column as key: the key comes from the catalog.
    partitioned_m(conn, "eu")
    m = key_only_change(conn, capture, "m", "m_eu", "UPDATE m SET v = 11")
    assert (m["old"], m["new"]) == ({"region": "eu", "id": 1}, {"region": "eu", "id": 1, "v": 11})
    assert (m["old_complete"], m["changed_columns"]) == (False, None)


def test_a_partition_made_full_after_a_key_only_change_still_records_that_change_as_key_only(dsn, conn, capture):
    """The catalog says how partitions are when the engine reads a change, not when it was made:
    here FULL again by the time the engine reads a delete logged with the key only."""
    partitioned_m(conn, "eu")
    running = capture(tables=["m"])
    write(dsn, "ALTER TABLE m_eu REPLICA IDENTITY DEFAULT", "DELETE FROM m", "ALTER TABLE m_eu REPLICA IDENTITY FULL")
    running.caught_up()
    m = only(dsn, "m")
    assert (m["old"], m["old_complete"]) == ({"region": "eu", "id": 1}, False)


def test_a_full_partition_keeps_whole_old_rows_while_another_partition_is_key_only(dsn, conn, capture):
    partitioned_m(conn, "eu", "us")
    running = capture(tables=["m"])
    conn.execute("ALTER TABLE m_us REPLICA IDENTITY DEFAULT")
    write(dsn, "UPDATE m SET v = v + 1")
    running.caught_up()
    eu, us = sorted(mutations(dsn, "m"), key=lambda r: r["row_key"]["id"])
    assert (eu["old"], eu["old_complete"], eu["changed_columns"]) == ({"region": "eu", "id": 1, "v": 10}, True, ["v"])
    assert (us["old"], us["old_complete"]) == ({"region": "us", "id": 2}, False)


def test_delete_on_a_partition_without_full_identity_is_not_presented_as_complete(dsn, conn, capture):
    partitioned_m(conn, "eu")
    m = key_only_change(conn, capture, "m", "m_eu", "DELETE FROM m")
    assert m["old"] != {"region": "eu", "id": 1, "v": None}, "a NULL the row never had"
    assert (m["old"], m["old_complete"], m["changed_columns"]) == ({"region": "eu", "id": 1}, False, None)


# -- row_key --------------------------------------------------------------------------------


def test_row_key_holds_both_columns_of_a_composite_primary_key(dsn, conn, capture):
    conn.execute("CREATE TABLE memberships (user_id int, note text, org text, PRIMARY KEY (org, user_id))")
    running = capture(tables=["memberships"])
    write(dsn, "INSERT INTO memberships VALUES (7, 'hi', 'acme')")
    running.caught_up()
    m = only(dsn, "memberships")
    assert m["row_key"] == {"org": "acme", "user_id": 7}


def test_row_key_comes_from_the_primary_key_not_from_full_identity_key_flags(dsn, conn, capture):
    conn.execute("CREATE TABLE wide (id int PRIMARY KEY, a text, b int)")
    conn.execute("INSERT INTO wide VALUES (1, 'x', 2)")
    running = capture(tables=["wide"])  # FULL identity: pgoutput flags every column as key
    write(dsn, "UPDATE wide SET a = 'y'", "DELETE FROM wide")
    running.caught_up()
    assert [m["row_key"] for m in mutations(dsn, "wide")] == [{"id": 1}, {"id": 1}]


def test_table_without_primary_key_is_captured_with_null_row_key(dsn, conn, capture):
    conn.execute("CREATE TABLE events (kind text, payload jsonb)")
    conn.execute("INSERT INTO events VALUES ('a', '{}')")
    running = capture(tables=["events"])
    write(dsn, "INSERT INTO events VALUES ('b', '[1]')", "UPDATE events SET kind = 'c' WHERE kind = 'a'", "DELETE FROM events WHERE kind = 'b'")
    running.caught_up()
    rows = mutations(dsn, "events")
    assert [(m["op"], m["row_key"]) for m in rows] == [("insert", None), ("update", None), ("delete", None)]
    assert rows[1]["old"] == {"kind": "a", "payload": {}} and rows[1]["old_complete"] is True
    assert rows[2]["old"] == {"kind": "b", "payload": [1]}


# -- names and schemas ----------------------------------------------------------------------


def test_quoted_non_ascii_schema_table_and_column_names_are_recorded_verbatim(dsn, conn, capture):
    conn.execute('CREATE SCHEMA "my schéma"')
    conn.execute('CREATE TABLE "my schéma"."Tábla x" ("Ïd  key" int PRIMARY KEY, "naïve col" text, "Dot.ted""q" int)')
    running = capture(tables=['"my schéma"."Tábla x"'])
    write(dsn, """INSERT INTO "my schéma"."Tábla x" VALUES (1, 'ü', 2)""", """UPDATE "my schéma"."Tábla x" SET "naïve col" = 'ß'""")
    running.caught_up()
    insert, update = mutations(dsn, "Tábla x")
    assert (insert["schema"], insert["table"]) == ("my schéma", "Tábla x")
    assert insert["new"] == {"Ïd  key": 1, "naïve col": "ü", 'Dot.ted"q': 2}
    assert insert["row_key"] == {"Ïd  key": 1}
    assert update["changed_columns"] == ["naïve col"]


def test_table_in_a_non_public_schema_is_recorded_under_its_schema(dsn, conn, capture):
    conn.execute("CREATE SCHEMA billing")
    conn.execute("CREATE TABLE billing.invoices (id int PRIMARY KEY, total numeric)")
    conn.execute("CREATE TABLE public.invoices (id int PRIMARY KEY)")
    running = capture(tables=["billing.invoices"])
    write(dsn, "INSERT INTO public.invoices VALUES (1)", "INSERT INTO billing.invoices VALUES (2, 3.5)")
    running.caught_up()
    m = only(dsn, "invoices")
    assert (m["schema"], m["table"], m["new"]) == ("billing", "invoices", {"id": 2, "total": Decimal("3.5")})


# -- partitioned tables ---------------------------------------------------------------------


def test_partition_changes_are_recorded_under_the_partitioned_root_with_full_images(dsn, conn, capture):
    conn.execute("CREATE TABLE measures (region text, id int, v int, PRIMARY KEY (region, id)) PARTITION BY LIST (region)")
    conn.execute("CREATE TABLE measures_eu PARTITION OF measures FOR VALUES IN ('eu')")
    conn.execute("CREATE TABLE measures_us PARTITION OF measures FOR VALUES IN ('us')")
    running = capture(tables=["measures"])
    write(
        dsn,
        "INSERT INTO measures VALUES ('eu', 1, 10), ('us', 2, 20)",
        "UPDATE measures SET v = v + 1 WHERE id = 1",
        "UPDATE measures SET region = 'eu' WHERE id = 2",  # moves between partitions: delete + insert
        "DELETE FROM measures WHERE id = 1",
    )
    running.caught_up()
    rows = mutations(dsn)
    assert {(m["schema"], m["table"]) for m in rows} == {("public", "measures")}
    assert [(m["op"], m["row_key"]) for m in rows] == [
        ("insert", {"region": "eu", "id": 1}),
        ("insert", {"region": "us", "id": 2}),
        ("update", {"region": "eu", "id": 1}),
        ("delete", {"region": "us", "id": 2}),
        ("insert", {"region": "eu", "id": 2}),
        ("delete", {"region": "eu", "id": 1}),
    ]
    update = rows[2]
    assert (update["old"], update["new"], update["old_complete"]) == (
        {"region": "eu", "id": 1, "v": 10}, {"region": "eu", "id": 1, "v": 11}, True
    )
    assert rows[3]["old"] == {"region": "us", "id": 2, "v": 20} and rows[3]["old_complete"] is True


def test_partition_with_columns_in_another_order_is_recorded_in_root_columns(dsn, conn, capture):
    conn.execute("CREATE TABLE readings (id int, at date, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE readings_2024 (v text, at date NOT NULL, id int NOT NULL)")  # attached later: its own column order
    conn.execute("ALTER TABLE readings ATTACH PARTITION readings_2024 FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    running = capture(tables=["readings"])
    write(dsn, "INSERT INTO readings VALUES (1, '2024-05-01', 'x')", "UPDATE readings SET v = 'y'")
    running.caught_up()
    insert, update = mutations(dsn, "readings")
    assert insert["new"] == {"id": 1, "at": "2024-05-01", "v": "x"}
    assert (update["old"]["v"], update["new"]["v"], update["changed_columns"]) == ("x", "y", ["v"])
