"""Values across ctx.db against a real PostgreSQL: what a query's values come back as, and how parameters are sent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from flux.runtime.host import DbSession, HostCallError

CONTEXT = {"request_id": "r1", "tenant": "default", "function": "w"}


def in_session(dsn: str, work: Callable[[DbSession], Awaitable[Any]]) -> Any:
    """What `work` returns from a request's session of its own, on a pool of one connection."""

    async def main() -> Any:
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False)
        await pool.open(wait=True)
        try:
            return await work(DbSession(pool, CONTEXT))
        finally:
            await pool.close()

    return asyncio.run(main())


def query(dsn: str, sql: str, params: list[Any] | None = None) -> dict[str, Any]:
    """The first row `sql` returns through a request's session; a refusal or a failure as its HostCallError info."""

    async def first_row(session: DbSession) -> dict[str, Any]:
        try:
            row = (await session.query(sql, params or []))["rows"][0]
        except HostCallError as exc:
            row = {"error": exc.info}
        await session.finish(commit=False)
        return row

    return in_session(dsn, first_row)


def test_timetz_is_iso_8601_text_with_its_offset(dsn):
    assert query(dsn, "SELECT '12:34:56+02'::timetz AS t, '08:00:00.5-03:30'::timetz AS u") == {
        "t": "12:34:56+02:00", "u": "08:00:00.500000-03:30"}


@pytest.mark.parametrize(("sql", "text"), [
    ("'infinity'::date", "infinity"), ("'-infinity'::date", "-infinity"), ("'infinity'::timestamp", "infinity"),
    ("'-infinity'::timestamptz", "-infinity"), ("'0044-03-15 BC'::date", "0044-03-15 BC"),
    ("'10000-01-01'::date", "10000-01-01"), ("'24:00:00'::time", "24:00:00"),
])
def test_dates_and_times_python_cannot_hold_come_back_as_postgresqls_text(dsn, sql, text):
    assert query(dsn, f"SELECT {sql} AS v, ARRAY[{sql}] AS a") == {"v": text, "a": [text]}


def test_ordinary_dates_and_timestamps_are_iso_8601(dsn):
    row = query(dsn, "SELECT '2024-02-29'::date AS d, '2024-02-29 10:11:12.5+00'::timestamptz AT TIME ZONE 'UTC' AS ts")
    assert row == {"d": "2024-02-29", "ts": "2024-02-29T10:11:12.500000"}


def test_float_nan_and_infinities_are_strings_not_null(dsn):
    row = query(dsn, "SELECT 'NaN'::float8 AS a, 'Infinity'::float8 AS b, '-Infinity'::float4 AS c, NULL::float8 AS d,"
                     " ARRAY['NaN', '1.5', NULL]::float8[] AS e")
    assert row == {"a": "NaN", "b": "Infinity", "c": "-Infinity", "d": None, "e": ["NaN", 1.5, None]}


def test_numeric_is_its_exact_text(dsn):
    assert query(dsn, "SELECT 0.0000001::numeric AS a, 12.50::numeric AS b, 'NaN'::numeric AS c") == {
        "a": "0.0000001", "b": "12.50", "c": "NaN"}


INTERVALS = ["1 year 2 months 3 days 4:05:06.789", "1 month", "-1 second", "1 day -1 second", "0",
             "-1 year -2 months +3 days -04:05:06", "100 hours", "-1.5 seconds", "0.000001 s", "1 year -1 month", "-7 days"]


def test_an_interval_is_the_iso_8601_duration_postgresql_writes(dsn, conn):
    """As row images record it (IntervalStyle iso_8601), months and years kept."""
    conn.execute("SET IntervalStyle = iso_8601")
    expected = [conn.execute("SELECT %s::interval::text", (v,)).fetchone()[0] for v in INTERVALS]
    sql = "SELECT " + ", ".join(f"$%d::interval AS v{i}" % (i + 1) for i in range(len(INTERVALS)))
    row = query(dsn, sql, INTERVALS)
    assert [row[f"v{i}"] for i in range(len(INTERVALS))] == expected
    assert expected[:3] == ["P1Y2M3DT4H5M6.789S", "P1M", "PT-1S"]


def test_ranges_come_back_as_postgresqls_text(dsn):
    row = query(dsn, "SELECT '[1,5)'::int4range AS a, tstzrange('2024-01-01 00:00+00', NULL) AS b,"
                     " ARRAY['[1,5)'::int4range] AS c, '{[1,2),[4,6)}'::int4multirange AS d, 'empty'::numrange AS e")
    assert row == {"a": "[1,5)", "b": '["2024-01-01 00:00:00+00",)', "c": ["[1,5)"], "d": "{[1,2),[4,6)}", "e": "empty"}


def test_an_array_of_an_enum_is_a_list_as_text_arrays_are(dsn, conn):
    conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok')")
    conn.execute("CREATE DOMAIN positive AS int CHECK (VALUE > 0)")
    row = query(dsn, "SELECT '{sad,ok}'::mood[] AS moods, 'ok'::mood AS mood, ARRAY[1, 2]::positive[] AS ps,"
                     " ARRAY['a', NULL]::text[] AS texts")
    assert row == {"moods": ["sad", "ok"], "mood": "ok", "ps": [1, 2], "texts": ["a", None]}


def test_a_type_lookup_that_fails_leaves_the_transaction_going(dsn, conn):
    """The lookup runs in the request's transaction, as the function's role: one that may not
    read pg_type gets the array as text, and its transaction is not aborted."""
    role = f"flux_test_{uuid.uuid4().hex[:8]}"
    conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok')")
    conn.execute("CREATE TABLE notes (v text)")
    conn.execute(f"CREATE ROLE {role} NOLOGIN")
    conn.execute(f"GRANT INSERT ON notes TO {role}")
    conn.execute("REVOKE SELECT ON pg_catalog.pg_type FROM PUBLIC")  # in this test's database only

    async def as_role(session: DbSession) -> list[Any]:
        await session.query(f"SET ROLE {role}", [])
        row = (await session.query("SELECT '{sad,ok}'::mood[] AS m", []))["rows"][0]
        await session.query("INSERT INTO notes VALUES ('kept')", [])
        await session.finish(commit=True)
        return [row, session.outcome]

    try:
        out = in_session(dsn, as_role)
    finally:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")
    assert out == [{"m": "{sad,ok}"}, "committed"]
    assert conn.execute("SELECT v FROM notes").fetchall() == [("kept",)]


def test_an_integer_past_64_bits_in_jsonb_is_the_double_json_parse_makes_of_it(dsn):
    """It failed the query as "nested deeper than 254 levels", which flux why then named as the cause."""
    row = query(dsn, """SELECT '{"x": 123456789012345678901234567890, "small": 7, "list": [18446744073709551616, 1]}'::jsonb AS j,"""
                     " '-99999999999999999999'::json AS k")
    assert row == {"j": {"x": 1.2345678901234568e29, "small": 7, "list": [1.8446744073709552e19, 1]}, "k": -1e20}


def result_of(dsn: str, sql: str) -> dict[str, Any]:
    """The whole result of `sql` as DbSession.query gives it."""

    async def run(session: DbSession) -> dict[str, Any]:
        result = await session.query(sql, [])
        await session.finish(commit=False)
        return result

    return in_session(dsn, run)


def test_int8_values_past_2_53_are_exact_and_their_paths_are_given(dsn):
    result = result_of(dsn, """
        SELECT 9007199254740991::int8 AS safe, 9007199254740992::int8 AS past, '-9223372036854775808'::int8 AS lo,
               ARRAY[1, NULL, 9223372036854775807]::int8[] AS a, '{{1,-9007199254740992},{NULL,2}}'::int8[] AS nested,
               (2 ^ 62)::int8 AS power, count(*) AS n, '{"j": 9007199254740993}'::jsonb AS j, 9007199254740993::numeric AS num
        UNION ALL SELECT -9007199254740991, NULL, 0, NULL, NULL, 1, 1, 'null', 1""")
    assert result["rows"] == [
        {"safe": 2 ** 53 - 1, "past": 2 ** 53, "lo": -2 ** 63, "a": [1, None, 2 ** 63 - 1], "nested": [[1, -2 ** 53], [None, 2]],
         "power": 2 ** 62, "n": 1, "j": {"j": 2 ** 53 + 1}, "num": "9007199254740993"},
        {"safe": -(2 ** 53 - 1), "past": None, "lo": 0, "a": None, "nested": None, "power": 1, "n": 1, "j": None, "num": "1"}]
    # A json value's numbers are JSON.parse's to read; numeric is text already.
    assert result["bigints"] == [[0, "past"], [0, "lo"], [0, "a", 2], [0, "nested", 0, 1], [0, "power"]]


def test_a_result_of_safe_int8_values_has_no_bigints(dsn):
    result = result_of(dsn, "SELECT x::int8 AS id, ARRAY[x, -x]::int8[] AS a, '{\"big\": 9007199254740993}'::json AS j"
                            " FROM generate_series(9007199254740891, 9007199254740991) x")
    assert len(result["rows"]) == 101 and "bigints" not in result


def test_an_array_of_a_domain_over_int8_is_looked_at_too(dsn, conn):
    conn.execute("CREATE DOMAIN snowflake AS int8")
    conn.commit()
    result = result_of(dsn, "SELECT 1234567890123456789::snowflake AS id, ARRAY[1234567890123456789]::snowflake[] AS ids")
    assert result["rows"] == [{"id": 1234567890123456789, "ids": [1234567890123456789]}]
    assert result["bigints"] == [[0, "id"], [0, "ids", 0]]


def test_inet_and_cidr_are_postgresqls_text(dsn):
    """An IPv4-mapped address came back as Python's ipaddress writes it, ::ffff:102:304."""
    row = query(dsn, "SELECT '::ffff:1.2.3.4'::inet AS mapped, '2001:0db8::0001/64'::inet AS v6, '10.1.2.3'::inet AS v4,"
                     " '::ffff:1.2.3.0/120'::cidr AS net, ARRAY['::ffff:10.0.0.1', NULL]::inet[] AS a")
    assert row == {"mapped": "::ffff:1.2.3.4", "v6": "2001:db8::1/64", "v4": "10.1.2.3", "net": "::ffff:1.2.3.0/120",
                   "a": ["::ffff:10.0.0.1", None]}


def test_a_fractional_number_into_numeric_keeps_15_digits_and_its_string_keeps_all(dsn):
    """As the README says: a float8 parameter, which PostgreSQL casts to numeric with 15 significant digits."""
    row = query(dsn, "SELECT $1::float8::numeric::text AS cast, $2::numeric::text AS text, $1 AS back", [0.1 + 0.2, str(0.1 + 0.2)])
    assert row == {"cast": "0.3", "text": "0.30000000000000004", "back": 0.30000000000000004}


def test_a_json_number_past_a_doubles_range_is_null(dsn):
    """As the README says: JSON has no Infinity, which is what JSON.parse would make of it."""
    assert query(dsn, """SELECT '[1e400, -1e400, 1e308]'::jsonb AS j""") == {"j": [None, None, 1e308]}


def test_a_timestamptz_whose_zone_offset_has_seconds_is_the_same_instant_in_utc(dsn):
    """Amsterdam's local mean time, +00:19:32 until 1937: JSON's writer would round it to +00:20, 28 s off."""
    async def work(session: DbSession) -> dict[str, Any]:
        await session.query("SET LOCAL TIME ZONE 'Europe/Amsterdam'", [])
        row = (await session.query("SELECT '1900-01-01 00:00:00+00'::timestamptz AS t, ARRAY['1936-06-30 12:00+00'::timestamptz] AS a,"
                                   " '2024-02-29 10:00+00'::timestamptz AS now", []))["rows"][0]
        await session.finish(commit=False)
        return row

    assert in_session(dsn, work) == {"t": "1900-01-01T00:00:00+00:00", "a": ["1936-06-30T12:00:00+00:00"],
                                     "now": "2024-02-29T11:00:00+01:00"}


def test_a_float_arrays_nan_and_infinities_among_its_numbers_go_back_as_those_floats(dsn):
    """A float8[] result gives them as strings beside its numbers; such an array was refused as numbers and strings."""
    assert query(dsn, "SELECT $1::float8[]::text AS v, pg_typeof($1)::text AS t", [["NaN", 1.5, None, "-Infinity", 2]]) == {
        "v": "{NaN,1.5,NULL,-Infinity,2}", "t": "double precision[]"}
