"""flux.cdc.values: text values as a walsender session prints them, turned into JSON-ready values.

Every input is produced by a real server under the walsender's session settings, never typed
in by hand, so the tests track what Postgres prints. The text is the raw text-format result of
`SELECT expr`, i.e. the type's output function as pgoutput uses it; `expr::text` would differ
for types with their own cast to text (bool gives 'true', inet adds '/32', bpchar is trimmed).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson
import psycopg
import pytest

from flux.cdc.values import ARRAY_TYPES, SCALAR_TYPES, TypeCatalog

WALSENDER_SETTINGS = (
    "SET DateStyle='ISO, YMD'; SET TimeZone='UTC'; SET IntervalStyle='iso_8601';"
    " SET extra_float_digits=3; SET bytea_output='hex'"
)

THIRTY_DIGITS = "123456789012345678901234567890"


@pytest.fixture
def pg(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute(WALSENDER_SETTINGS)
    return conn


def text_of(pg: psycopg.Connection, expr: str, params: tuple | None = None) -> str:
    """What the walsender would send for `expr`: its type's output function, untouched."""
    cur = pg.execute(f"SELECT {expr}", params)
    assert cur.pgresult is not None and cur.pgresult.fformat(0) == 0
    return cur.pgresult.get_value(0, 0).decode()


def oid_of(pg: psycopg.Connection, type_name: str) -> int:
    return pg.execute("SELECT %s::regtype::oid", (type_name,)).fetchone()[0]


def convert(pg: psycopg.Connection, expr: str, type_name: str, catalog: TypeCatalog | None = None) -> Any:
    catalog = catalog or TypeCatalog()
    convert_fn = catalog.converter(oid_of(pg, type_name))
    assert convert_fn is not None, f"{type_name} is not known"
    return convert_fn(text_of(pg, f"({expr})::{type_name}"))


def test_text_is_the_output_function_not_the_cast_to_text(pg):
    assert text_of(pg, "true") == "t"
    assert text_of(pg, "'1.2.3.4'::inet") == "1.2.3.4"
    assert text_of(pg, "'a'::char(3)") == "a  "


def learn(pg: psycopg.Connection, catalog: TypeCatalog, oids: Iterable[int]) -> list[tuple]:
    rows = pg.execute(TypeCatalog.LEARN_QUERY, (list(oids),)).fetchall()
    for oid, category, element, base in rows:
        catalog.learn(oid, category=category, element_oid=element, base_oid=base)
    return rows


def learned(pg: psycopg.Connection, *type_names: str) -> TypeCatalog:
    catalog = TypeCatalog()
    oids = [oid_of(pg, name) for name in type_names]
    assert all(catalog.converter(oid) is None for oid in oids)
    learn(pg, catalog, oids)
    return catalog


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def jsonb_equal(pg: psycopg.Connection, value: Any, expected_jsonb: str) -> bool:
    """Whether Postgres reads our JSON for `value` back as the same jsonb."""
    return pg.execute(
        "SELECT %s::jsonb -> 'v' = %s::jsonb", (dumps({"v": value}), expected_jsonb)
    ).fetchone()[0]


# --- the built-in table -----------------------------------------------------------------


def test_builtin_scalar_oids_match_the_server_catalog(pg):
    rows = dict(pg.execute("SELECT oid, typname FROM pg_type WHERE oid = ANY(%s)", (list(SCALAR_TYPES),)))
    assert rows == {oid: name for oid, (name, _) in SCALAR_TYPES.items()}


def test_builtin_array_oids_match_the_server_catalog(pg):
    rows = pg.execute(
        "SELECT oid, typname, typelem, typcategory::text FROM pg_type WHERE oid = ANY(%s)", (list(ARRAY_TYPES),)
    ).fetchall()
    assert {oid: (name, elem) for oid, name, elem, _ in rows} == ARRAY_TYPES
    assert {category for *_, category in rows} == {"A"}


def test_requested_oids_are_all_known_up_front():
    catalog = TypeCatalog()
    wanted = [16, 17, 18, 19, 20, 21, 23, 25, 26, 28, 114, 142, 700, 701, 790, 1042, 1043, 1082, 1083, 1114,
              1184, 1186, 1266, 1700, 2950, 3802, 869, 650, 1000, 1005, 1007, 1016, 1009, 1015, 1014, 1021,
              1022, 1231, 199, 3807, 2951, 1115, 1185, 1182, 1183, 1187, 1001, 1028, 1002, 1003, 791, 1270,
              1041, 651, 143]  # fmt: skip
    assert [oid for oid in wanted if catalog.converter(oid) is None] == []


# --- numbers ------------------------------------------------------------------------------


def test_numeric_with_30_digits_stays_exact_in_json(pg):
    value = convert(pg, f"'{THIRTY_DIGITS}.{THIRTY_DIGITS}'", "numeric")
    assert dumps({"v": value}) == f'{{"v":{THIRTY_DIGITS}.{THIRTY_DIGITS}}}'
    assert jsonb_equal(pg, value, f"{THIRTY_DIGITS}.{THIRTY_DIGITS}")


def test_negative_numeric_and_trailing_zeros_keep_their_text(pg):
    value = convert(pg, "-0.000100", "numeric")
    assert dumps(value) == "-0.000100"
    assert jsonb_equal(pg, value, "-0.000100")


def test_numeric_nan_and_infinities_are_strings(pg):
    assert [convert(pg, f"'{v}'", "numeric") for v in ("NaN", "Infinity", "-Infinity")] == [
        "NaN", "Infinity", "-Infinity"
    ]  # fmt: skip


def test_numeric_array_elements_are_exact(pg):
    value = convert(pg, f"ARRAY['{THIRTY_DIGITS}', 'NaN', NULL, '1.50']", "numeric[]")
    assert dumps(value) == f'[{THIRTY_DIGITS},"NaN",null,1.50]'


def test_float_values_are_json_numbers(pg):
    assert convert(pg, "0.1", "float8") == 0.1
    assert convert(pg, "1e300", "float8") == 1e300
    assert dumps(convert(pg, "0.1", "float4")) == "0.1"  # shortest-exact output survives


def test_float_nan_and_infinities_are_strings(pg):
    for type_name in ("float4", "float8"):
        values = [convert(pg, f"'{v}'", type_name) for v in ("NaN", "Infinity", "-Infinity")]
        assert values == ["NaN", "Infinity", "-Infinity"]


def test_integers_are_ints_at_their_extremes(pg):
    assert convert(pg, "-32768", "int2") == -32768
    assert convert(pg, "2147483647", "int4") == 2147483647
    assert convert(pg, "-9223372036854775808", "int8") == -9223372036854775808
    assert convert(pg, "4294967295", "oid") == 4294967295
    assert convert(pg, "'4294967295'", "xid") == 4294967295


def test_bool_is_true_or_false(pg):  # boolout prints 't' and 'f'
    assert [convert(pg, v, "bool") for v in ("true", "false")] == [True, False]
    assert convert(pg, "ARRAY[true, NULL, false]", "bool[]") == [True, None, False]


# --- json -----------------------------------------------------------------------------------


def test_jsonb_nests_as_json(pg):
    value = convert(pg, """'{"a": [1, 2.50, {"b": null}], "c": "x\\"y"}'""", "jsonb")
    assert orjson.loads(dumps({"v": value})) == {"v": {"a": [1, 2.5, {"b": None}], "c": 'x"y'}}
    assert jsonb_equal(pg, value, """{"a": [1, 2.50, {"b": null}], "c": "x\\"y"}""")


def test_json_keeps_its_text_and_nests_as_json(pg):
    value = convert(pg, """'{"a" : [1,\n 2], "a": 3}'""", "json")
    assert dumps(value) == '{"a" : [1,\n 2], "a": 3}'
    assert orjson.loads(dumps([value])) == [{"a": 3}]


def test_json_with_nul_escape_is_kept_as_a_string(pg):
    # jsonb cannot hold \u0000; a nested value would make the row image unstorable
    value = convert(pg, """'{"a": "\\u0000"}'""", "json")
    assert value == '{"a": "\\u0000"}'
    assert pg.execute("SELECT %s::jsonb ->> 'v'", (dumps({"v": value}),)).fetchone()[0] == value


def test_jsonb_array_elements_nest_as_json(pg):
    value = convert(pg, """ARRAY['{"a": "q\\"uote, {brace}"}', NULL, '[1, "x"]']::jsonb[]""", "jsonb[]")
    assert orjson.loads(dumps(value)) == [{"a": 'q"uote, {brace}'}, None, [1, "x"]]


# --- arrays ---------------------------------------------------------------------------------


def test_int_array_with_nulls(pg):
    assert convert(pg, "ARRAY[1, NULL, -3]", "int4[]") == [1, None, -3]
    assert convert(pg, "ARRAY[9223372036854775807]", "int8[]") == [9223372036854775807]


def test_text_array_with_quotes_commas_backslashes_braces_spaces(pg):
    elements = ['a"b', "c,d", "e\\f", "{g}", " h ", "", "i j", "plain", "ünï"]
    text = text_of(pg, "%s::text[]", (elements,))
    assert TypeCatalog().converter(1009)(text) == elements


def test_text_array_null_element_is_none_but_quoted_null_is_a_string(pg):
    text = text_of(pg, "%s::text[]", (["NULL", None, "null"],))
    assert text == '{"NULL",NULL,"null"}'
    assert TypeCatalog().converter(1009)(text) == ["NULL", None, "null"]


def test_two_dimensional_arrays_nest(pg):
    assert convert(pg, "'{{1,2},{3,NULL}}'", "int4[]") == [[1, 2], [3, None]]
    assert convert(pg, """'{{"a,b",c},{NULL,"d}"}}'""", "text[]") == [["a,b", "c"], [None, "d}"]]


def test_three_dimensional_array_nests(pg):
    assert convert(pg, "'{{{1},{2}},{{3},{4}}}'", "int2[]") == [[[1], [2]], [[3], [4]]]


def test_dimension_decoration_is_dropped(pg):
    assert text_of(pg, "'[0:1]={1,2}'::int4[]") == "[0:1]={1,2}"
    assert convert(pg, "'[0:1]={1,2}'", "int4[]") == [1, 2]
    assert convert(pg, "'[-2:-1][3:4]={{a,\"b c\"},{d,e}}'", "text[]") == [["a", "b c"], ["d", "e"]]


def test_empty_array_is_an_empty_list(pg):
    assert convert(pg, "'{}'", "int4[]") == []
    assert convert(pg, "'{}'", "text[]") == []


def test_box_array_splits_on_semicolons(pg):
    assert text_of(pg, "ARRAY['((0,0),(1,1))'::box, '((2,2),(3,3))']") == "{(1,1),(0,0);(3,3),(2,2)}"
    assert convert(pg, "ARRAY['((0,0),(1,1))'::box, '((2,2),(3,3))']", "box[]") == ["(1,1),(0,0)", "(3,3),(2,2)"]


def test_int2vector_text_is_kept(pg):
    assert convert(pg, "'1 2 3'", "int2vector") == "1 2 3"


# --- time -----------------------------------------------------------------------------------


def test_timestamptz_is_iso_8601_with_a_colon_offset(pg):
    value = convert(pg, "'2026-03-10 14:20:11.123456+00'", "timestamptz")
    assert value == "2026-03-10T14:20:11.123456+00:00"
    assert convert(pg, "'2026-03-10 19:20:11+05'", "timestamptz") == "2026-03-10T14:20:11+00:00"


@pytest.mark.parametrize(
    ("zone", "literal", "expected"),
    [
        ("Asia/Kolkata", "2026-03-10 14:20:11+00", "2026-03-10T19:50:11+05:30"),
        ("America/Los_Angeles", "2026-01-10 14:20:11+00", "2026-01-10T06:20:11-08:00"),
        ("Europe/Amsterdam", "1900-01-01 00:00:00+00", "1900-01-01T00:19:32+00:19:32"),  # local mean time
    ],
)
def test_timestamptz_offsets_of_other_zones_become_iso(pg, zone, literal, expected):
    pg.execute(f"SET TimeZone='{zone}'")
    value = convert(pg, f"'{literal}'", "timestamptz")
    assert value == expected
    assert datetime.fromisoformat(value) == datetime.fromisoformat(literal.replace(" ", "T"))


def test_timestamp_without_tz_is_iso_8601(pg):
    assert convert(pg, "'2026-03-10 14:20:11'", "timestamp") == "2026-03-10T14:20:11"
    assert convert(pg, "'2026-03-10 14:20:11.5'", "timestamp") == "2026-03-10T14:20:11.5"


def test_timestamp_infinities_stay_as_text(pg):
    for type_name in ("timestamp", "timestamptz"):
        assert [convert(pg, f"'{v}'", type_name) for v in ("infinity", "-infinity")] == ["infinity", "-infinity"]


def test_bc_timestamps_are_written_as_to_jsonb_writes_them(pg):
    # As any other timestamp: a 'T', an offset with minutes; the era after them.
    for literal, type_name in (("0044-03-15 12:00:00 BC", "timestamp"), ("0044-03-15 12:00:00.5+00 BC", "timestamptz"),
                               ("4713-11-24 00:00:00-05 BC", "timestamptz")):
        [written] = pg.execute(f"SELECT to_jsonb('{literal}'::{type_name}) #>> '{{}}'").fetchone()
        assert convert(pg, f"'{literal}'", type_name) == written
    assert convert(pg, "'0044-03-15 12:00:00+00 BC'", "timestamptz") == "0044-03-15T12:00:00+00:00 BC"


def test_timestamptz_array_elements_are_iso(pg):
    value = convert(pg, "ARRAY['2026-03-10 14:20:11+00', NULL, 'infinity']", "timestamptz[]")
    assert value == ["2026-03-10T14:20:11+00:00", None, "infinity"]


def test_date_time_and_interval_keep_their_text(pg):
    assert convert(pg, "'2026-03-10'", "date") == "2026-03-10"
    assert convert(pg, "'14:20:11.25'", "time") == "14:20:11.25"
    assert convert(pg, "'1 day 2 hours'", "interval") == "P1DT2H"


# --- text-like ------------------------------------------------------------------------------


def test_bytea_keeps_its_hex_text(pg):
    assert convert(pg, "'\\x0102ff'", "bytea") == "\\x0102ff"
    assert convert(pg, "ARRAY['\\x00'::bytea, NULL]", "bytea[]") == ["\\x00", None]


def test_uuid_keeps_its_text(pg):
    value = convert(pg, "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'", "uuid")
    assert value == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"


# --- learned types --------------------------------------------------------------------------


def test_unknown_oid_must_be_learned_and_falls_back_to_text():
    catalog = TypeCatalog()
    assert catalog.converter(987654) is None
    assert catalog.converter_or_text(987654) is str


def test_enum_is_learned_from_the_catalog_and_kept_as_text(pg):
    pg.execute("CREATE TYPE mood AS ENUM ('happy', 'so so')")
    catalog = learned(pg, "mood")
    assert convert(pg, "'so so'", "mood", catalog) == "so so"


def test_learn_query_returns_element_and_base_types_in_one_round_trip(pg):
    pg.execute("CREATE DOMAIN posint AS int4 CHECK (VALUE > 0)")
    posint, posint_array = oid_of(pg, "posint"), oid_of(pg, "posint[]")
    rows = learn(pg, TypeCatalog(), [posint_array])
    assert sorted(rows) == sorted([(posint_array, "A", posint, 0), (posint, "N", 0, 23), (23, "N", 0, 0)])


def test_learn_query_returns_nothing_for_oids_not_in_the_catalog(pg):
    assert learn(pg, TypeCatalog(), [3_000_000_000]) == []


def test_domain_over_int_converts_like_int(pg):
    pg.execute("CREATE DOMAIN posint AS int4 CHECK (VALUE > 0)")
    assert convert(pg, "42", "posint", learned(pg, "posint")) == 42


def test_domain_over_domain_over_numeric_stays_exact(pg):
    pg.execute("CREATE DOMAIN money2 AS numeric(40, 10); CREATE DOMAIN price AS money2")
    value = convert(pg, f"'{THIRTY_DIGITS}.5'", "price", learned(pg, "price"))
    assert dumps(value) == f"{THIRTY_DIGITS}.5000000000"


def test_array_of_enum_is_a_list_of_labels(pg):
    pg.execute("CREATE TYPE mood AS ENUM ('happy', 'so so', 'NULL')")
    catalog = learned(pg, "mood[]")
    assert convert(pg, "ARRAY['happy', NULL, 'so so', 'NULL']", "mood[]", catalog) == ["happy", None, "so so", "NULL"]


def test_array_of_domain_converts_elements_like_the_base_type(pg):
    pg.execute("CREATE DOMAIN posint AS int4 CHECK (VALUE > 0); CREATE DOMAIN amount AS numeric")
    catalog = learned(pg, "posint[]", "amount[]")
    assert convert(pg, "'{{1,2},{3,NULL}}'", "posint[]", catalog) == [[1, 2], [3, None]]
    assert dumps(convert(pg, f"ARRAY['{THIRTY_DIGITS}']", "amount[]", catalog)) == f"[{THIRTY_DIGITS}]"


def test_domain_over_array_converts_like_the_array(pg):
    pg.execute("CREATE DOMAIN ints AS int8[]")
    assert convert(pg, "ARRAY[1, NULL]", "ints", learned(pg, "ints")) == [1, None]


def test_learning_in_any_order_resolves_the_same(pg):
    pg.execute("CREATE DOMAIN posint AS int4; CREATE DOMAIN pos2 AS posint")
    rows = pg.execute(TypeCatalog.LEARN_QUERY, ([oid_of(pg, "pos2[]")],)).fetchall()
    for order in (rows, rows[::-1]):
        catalog = TypeCatalog()
        for oid, category, element, base in order:
            catalog.learn(oid, category=category, element_oid=element, base_oid=base)
        assert convert(pg, "ARRAY[7]", "pos2[]", catalog) == [7]


def test_array_of_unknown_element_type_is_a_list_of_text():
    catalog = TypeCatalog()
    catalog.learn(900001, category="A", element_oid=900000, base_oid=0)
    assert catalog.converter(900001)('{1,"a b",NULL}') == ["1", "a b", None]


def test_learning_the_element_later_upgrades_the_array():
    catalog = TypeCatalog()
    catalog.learn(900001, category="A", element_oid=900000, base_oid=0)
    assert catalog.converter(900001)("{1}") == ["1"]
    catalog.learn(900000, category="N", element_oid=0, base_oid=20)
    assert catalog.converter(900001)("{1}") == [1]


def test_array_of_composite_keeps_each_record_as_text(pg):
    pg.execute("CREATE TYPE pair AS (a int, b text)")
    value = convert(pg, "ARRAY[ROW(1, 'x y')::pair, ROW(NULL, 'q\"')::pair]", "pair[]", learned(pg, "pair[]"))
    assert value == ['(1,"x y")', '(,"q""")']


def test_learning_a_builtin_oid_does_not_change_it():
    catalog = TypeCatalog()
    catalog.learn(1700, category="N", element_oid=0, base_oid=0)
    assert dumps(catalog.converter(1700)("1.0")) == "1.0"


# --- against psycopg's own array parsing ----------------------------------------------------

_ALPHABET = ['a', 'Z', '0', ' ', ',', '"', '\\', '{', '}', ';', '\t', '\n', 'é', '☃', "'", '[', ':', '=']


def _random_text(rng: random.Random) -> str | None:
    roll = rng.random()
    if roll < 0.1:
        return None
    if roll < 0.15:
        return rng.choice(["NULL", "null", "", " ", "\\N"])
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 8)))


def _random_shape(rng: random.Random, make) -> list:
    if rng.random() < 0.3:  # two dimensions, rectangular
        rows, cols = rng.randint(1, 4), rng.randint(1, 4)
        return [[make() for _ in range(cols)] for _ in range(rows)]
    return [make() for _ in range(rng.randint(0, 6))]


def _check_against_psycopg(pg: psycopg.Connection, sql_type: str, values: list[list]) -> None:
    pg.execute(f"CREATE TEMP TABLE samples (i int, v {sql_type})")
    with pg.cursor() as cur:
        cur.executemany(f"INSERT INTO samples VALUES (%s, %s::{sql_type})", list(enumerate(values)))
    parse = TypeCatalog().converter(oid_of(pg, sql_type))
    cur = pg.execute("SELECT v FROM samples ORDER BY i")
    natives = [native for (native,) in cur.fetchall()]
    assert len(natives) == len(values) and cur.pgresult is not None
    for row, native in enumerate(natives):
        text = cur.pgresult.get_value(row, 0).decode()
        assert parse(text) == native, text


def test_generated_int_arrays_parse_like_psycopg(pg):
    rng = random.Random(20260310)
    make = lambda: None if rng.random() < 0.1 else rng.randint(-(2**63), 2**63 - 1)  # noqa: E731
    _check_against_psycopg(pg, "int8[]", [_random_shape(rng, make) for _ in range(300)])


def test_generated_text_arrays_parse_like_psycopg(pg):
    rng = random.Random(20260311)
    _check_against_psycopg(pg, "text[]", [_random_shape(rng, lambda: _random_text(rng)) for _ in range(300)])
