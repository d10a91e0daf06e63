"""A value a query gives the function, passed back as a parameter, is the value PostgreSQL had:
`SELECT $1::TYPE IS NOT DISTINCT FROM (the value)` for every type the README's table of values
across ctx.db lists. Real V8 and real PostgreSQL, through the executor (`run1`)."""

from __future__ import annotations

from tests.functions import write_project
from tests.runtime.test_executor import run1

SETUP = """
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy ünïcode');
    CREATE DOMAIN big_id AS int8 CHECK (VALUE <> 0);
    CREATE DOMAIN short_text AS text CHECK (length(VALUE) < 100);
    CREATE DOMAIN price AS numeric(12, 2);
    CREATE TYPE pair AS (n int, s text);
"""

# [id, type, SQL literal of a value]
CASES = [
    ["int2", "int2", "-32768"], ["int4", "int4", "2147483647"], ["int8", "int8", "42"],
    ["int8 past 2^53", "int8", "9007199254740993"], ["int8 min", "int8", "-9223372036854775808"],
    ["int8 max", "int8", "9223372036854775807"],
    ["numeric", "numeric", "'12.50'"], ["numeric tiny", "numeric", "'0.0000001'"], ["numeric NaN", "numeric", "'NaN'"],
    ["numeric wide", "numeric", "'-123456789012345678901234567890.123456789012345678901234567890'"],
    ["numeric infinity", "numeric", "'Infinity'"],
    ["float4", "float4", "'1.1'"], ["float4 max", "float4", "'3.4028235e38'"], ["float4 denormal", "float4", "'1e-45'"],
    ["float4 NaN", "float4", "'NaN'"], ["float4 -Infinity", "float4", "'-Infinity'"],
    ["float8", "float8", "'0.1'"], ["float8 max", "float8", "'1.7976931348623157e308'"], ["float8 min", "float8", "'5e-324'"],
    ["float8 NaN", "float8", "'NaN'"], ["float8 Infinity", "float8", "'Infinity'"], ["float8 -Infinity", "float8", "'-Infinity'"],
    ["float8 2^53+2", "float8", "'9007199254740994'"],
    ["bool", "bool", "true"], ["bool false", "bool", "false"],
    ["text", "text", "'plain'"], ["text empty", "text", "''"],
    ["text unicode", "text", "E'é e\\u0301 😀 \\u200d\\u2028\\u2029 \\ufeff \\uffff \\U0010ffff עברית \\\\ \" '' \\t\\n\\r'"],
    ["bytea", "bytea", "'\\x00ff7f80'"], ["bytea empty", "bytea", "''"],
    ["uuid", "uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"],
    ["jsonb object", "jsonb", "'{\"a\": [1, 2.5, \"x\", null, true], \"b\": {\"c\": \"é😀\"}, \"n\": -0.0001}'"],
    ["jsonb array of objects", "jsonb", "'[{\"a\": 1}, 2]'"],
    ["date", "date", "'2024-02-29'"], ["date infinity", "date", "'infinity'"], ["date -infinity", "date", "'-infinity'"],
    ["date BC", "date", "'0044-03-15 BC'"], ["date past 9999", "date", "'10000-01-01'"],
    ["time", "time", "'10:11:12.5'"], ["time 24:00", "time", "'24:00:00'"], ["time micro", "time", "'23:59:59.999999'"],
    ["timetz", "timetz", "'12:34:56.5+02'"], ["timetz odd offset", "timetz", "'12:00:00-03:30'"],
    ["timestamp", "timestamp", "'2024-02-29 10:11:12.123456'"], ["timestamp infinity", "timestamp", "'infinity'"],
    ["timestamp BC", "timestamp", "'0044-03-15 12:00:00 BC'"], ["timestamp far", "timestamp", "'294276-12-31 23:59:59.999999'"],
    ["timestamptz", "timestamptz", "'2024-02-29 10:11:12.5+05:30'"], ["timestamptz -infinity", "timestamptz", "'-infinity'"],
    ["timestamptz BC", "timestamptz", "'0044-03-15 12:00:00+00 BC'"], ["timestamptz 1900", "timestamptz", "'1900-01-01 00:00:00+00'"],
    ["interval", "interval", "'1 year 2 mons 3 days 04:05:06.789'"], ["interval signs", "interval", "'-1 years +3 days -00:00:01'"],
    ["interval micro", "interval", "'-0.000001 seconds'"], ["interval day hours", "interval", "'1 day -25 hours'"],
    ["interval zero", "interval", "'0'"], ["interval huge", "interval", "'178000000 years'"],
    ["inet", "inet", "'192.168.0.1/24'"], ["inet mapped", "inet", "'::ffff:1.2.3.4'"], ["inet v6", "inet", "'2001:db8::1/64'"],
    ["cidr", "cidr", "'10.0.0.0/8'"], ["cidr v6", "cidr", "'2001:db8::/32'"],
    ["int4range", "int4range", "'[1,5)'"], ["tstzrange", "tstzrange", "'[2024-01-01 00:00+00,infinity)'"],
    ["int4multirange", "int4multirange", "'{[1,2),[4,6)}'"],
    ["enum", "mood", "'happy ünïcode'"], ["composite", "pair", "'(1,\"a b\")'"],
    ["domain int8", "big_id", "9007199254740993"], ["domain text", "short_text", "'x'"], ["domain numeric", "price", "'12.50'"],
    ["int8[]", "int8[]", "ARRAY[1, NULL, 9007199254740993, -9223372036854775808]"],
    ["int4[][]", "int4[]", "'{{1,2},{3,NULL}}'"], ["int4[] 3-d", "int4[]", "'{{{1},{2}},{{3},{4}}}'"],
    ["text[]", "text[]", "ARRAY['NULL', NULL, '', 'a,b', '\"q\"', 'x\\y', ' sp ', '{}', 'é😀']"],
    ["text[][]", "text[]", "'{{a,b},{NULL,\"\"}}'"],
    ["numeric[]", "numeric[]", "'{12.50,NaN,NULL,-0.0000001}'"], ["float8[]", "float8[]", "'{0.5,1,NULL}'"],
    ["float8[] NaN", "float8[]", "'{NaN,Infinity,-Infinity,1.5}'"], ["float4[]", "float4[]", "'{1.1,-3.5}'"],
    ["bool[]", "bool[]", "'{t,NULL,f}'"], ["bytea[]", "bytea[]", "ARRAY['\\x00ff'::bytea, NULL]"],
    ["uuid[]", "uuid[]", "ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid]"],
    ["date[]", "date[]", "'{2024-02-29,infinity,\"0044-03-15 BC\",NULL}'"],
    ["timestamptz[]", "timestamptz[]", "ARRAY['2024-02-29 10:11:12.5+00'::timestamptz, '-infinity']"],
    ["interval[]", "interval[]", "ARRAY['1 mon'::interval, '-1 sec']"], ["inet[]", "inet[]", "ARRAY['::ffff:1.2.3.4'::inet]"],
    ["enum[]", "mood[]", "'{sad,NULL,\"happy ünïcode\"}'"], ["domain[]", "big_id[]", "ARRAY[9007199254740993]::big_id[]"],
]

# Each case's value read by one query and passed to the next as `send` makes it: "as is", or
# JSON.stringify of it ("text"), or of each element ("texts"); "same" when PostgreSQL finds it
# equal (as jsonb for json) and writes it as the same text, else what it came back as.
ROUNDTRIP = """
    const send = {"as is": (v) => v, text: (v) => JSON.stringify(v), texts: (v) => v.map((x) => JSON.stringify(x))};
    export default async function (req, ctx) {
      if (req.body.zone) await ctx.db.query(`SET LOCAL TIME ZONE '${req.body.zone}'`);
      const out = {};
      for (const [id, type, literal] of req.body.cases) {
        const { rows: [{ v }] } = await ctx.db.query(`SELECT (${literal})::${type} AS v`);
        const compared = type.replace(/^jsonb?/, "jsonb");
        await ctx.db.query("SAVEPOINT s");
        try {
          const { rows: [r] } = await ctx.db.query(
            `SELECT $1::${type}::${compared} IS NOT DISTINCT FROM (${literal})::${type}::${compared} AS same,
                    $1::${type}::text AS back, (${literal})::${type}::text AS orig`, [send[req.body.send](v)]);
          out[id] = r.same ? (r.back === r.orig ? "same" : `equal, written ${r.back}`) : `came back as ${r.back}`;
        } catch (e) {
          out[id] = `${e.name}: ${e.message}`;
          await ctx.db.query("ROLLBACK TO SAVEPOINT s");
        }
      }
      return {status: 200, body: out};
    }
"""


def roundtrips(tmp_path, dsn, conn, cases: list[list[str]], *, send: str = "as is", zone: str | None = None) -> dict[str, str]:
    if conn.execute("SELECT to_regtype('mood')").fetchone()[0] is None:
        conn.execute(SETUP)
    write_project(tmp_path, {"roundtrip": ROUNDTRIP})
    result = run1(tmp_path, "roundtrip", {"cases": cases, "send": send, "zone": zone}, dsn=dsn)
    assert result.status == 200, result.error
    return result.body


def test_every_value_a_query_gives_comes_back_the_same_as_a_parameter(tmp_path, dsn, conn):
    assert {k: v for k, v in roundtrips(tmp_path, dsn, conn, CASES).items() if v != "same"} == {}


def test_timestamps_come_back_the_same_in_a_zone_whose_old_offsets_have_seconds(tmp_path, dsn, conn):
    """Amsterdam's local mean time was +00:19:32: its timestamptz text and the ISO 8601 the function gets carry the seconds."""
    cases = [case for case in CASES if case[1] in ("timestamptz", "timestamptz[]", "timetz", "tstzrange")]
    assert set(roundtrips(tmp_path, dsn, conn, cases, zone="Europe/Amsterdam").values()) == {"same"}


def test_json_comes_back_equal_written_as_jsonb_writes_it(tmp_path, dsn, conn):
    """The function gets what JSON.parse makes of it: key order, spacing and a number's trailing
    zeros are jsonb's once passed back (README, values across ctx.db)."""
    assert roundtrips(tmp_path, dsn, conn, [["json", "json", """'{"b": 1,  "a": [1, 2.50]}'"""]]) == {
        "json": 'equal, written {"a": [1, 2.5], "b": 1}'}


JSON_NOT_OBJECTS = [
    ["array", "jsonb", """'[1, "x"]'"""], ["string", "jsonb", """'"x"'"""], ["number", "json", "'5'"],
    ["true", "jsonb", "'true'"], ["null", "jsonb", "'null'"],
]


def test_json_other_than_an_object_goes_back_as_its_json_stringify_text(tmp_path, dsn, conn):
    """A JS array is a PostgreSQL array, a string text, a number a number and null SQL NULL: as it
    is, a json value that is none of them does not come back (README says to pass JSON.stringify)."""
    as_is = roundtrips(tmp_path, dsn, conn, JSON_NOT_OBJECTS)
    assert as_is == {
        "array": "TypeError: ctx.db.query: $1 is an array of numbers and strings; a PostgreSQL array holds values of one type",
        "string": "DatabaseError: invalid input syntax for type json (SQLSTATE 22P02)",
        "number": "DatabaseError: cannot cast type smallint to json (SQLSTATE 42846)",
        "true": "DatabaseError: cannot cast type boolean to jsonb (SQLSTATE 42846)",
        "null": "came back as null",
    }


def test_json_other_than_an_object_comes_back_the_same_through_json_stringify(tmp_path, dsn, conn):
    assert set(roundtrips(tmp_path, dsn, conn, JSON_NOT_OBJECTS, send="text").values()) == {"same"}


def test_a_jsonb_array_comes_back_the_same_as_the_json_stringify_of_each_element(tmp_path, dsn, conn):
    """A jsonb[] reaches the function as a list of objects, which goes back as one jsonb value."""
    case = [["jsonb[]", "jsonb[]", """ARRAY['{"a": 1}'::jsonb, '[1]', '"x"']"""]]
    assert roundtrips(tmp_path, dsn, conn, case) == {"jsonb[]": "DatabaseError: cannot cast type jsonb to jsonb[] (SQLSTATE 42846)"}
    assert roundtrips(tmp_path, dsn, conn, case, send="texts") == {"jsonb[]": "same"}


def test_a_floats_negative_zero_goes_back_as_zero_which_postgresql_finds_equal(tmp_path, dsn, conn):
    """JSON has no -0: the function gets -0, and a parameter of it is 0 (README)."""
    cases = [["float8", "float8", "'-0'"], ["float4[]", "float4[]", "'{-0,1}'"]]
    assert roundtrips(tmp_path, dsn, conn, cases) == {"float8": "equal, written 0", "float4[]": "equal, written {0,1}"}
