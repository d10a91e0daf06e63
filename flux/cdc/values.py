"""Column values: pgoutput's text form of a value, turned into a JSON-ready Python value.

Pure functions, no I/O. `TypeCatalog` maps a column's type OID to a converter. Built-in
types are known up front; user types (enums, domains, their arrays, extension types) are
taught from pg_type rows that the engine fetches with `TypeCatalog.LEARN_QUERY`.

The text is assumed to come from a walsender session set to `DateStyle=ISO, YMD`,
`TimeZone=UTC`, `IntervalStyle=iso_8601`, `extra_float_digits=3`, `bytea_output=hex`.

What the JSON image looks like:

- integers are ints; `numeric` is an `orjson.Fragment` of its exact text (never a float);
- float4/float8 are floats; NaN and the infinities of floats and numerics are strings;
- bool is True/False; json/jsonb are `orjson.Fragment`s of their (already valid JSON) text;
- timestamp/timestamptz become ISO 8601 with a `T` (and `+HH:MM` offsets), as `to_jsonb` writes
  them, BC values too (`0044-03-15T12:00:00+00:00 BC`); `infinity` and `-infinity` stay so;
- arrays are (nested) lists of converted elements, NULL elements are None;
- everything else (text, bytea's `\\x..`, uuid, date, time, interval, enum, ...) is the text.

Not guaranteed: values are not validated (malformed text gives a wrong value or a
ValueError from `int`/`float`, never a silent repair); a `json` value that jsonb would
refuse (see `jsonb_refuses`) is kept as a string so that the image can still be stored;
array delimiters other than `,` are known only for `box`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar

from orjson import Fragment

Convert = Callable[[str], Any]

_BOX = 603  # the one built-in type whose array delimiter is ';' (pg_type.typdelim)
_MAX_DEPTH = 16  # guard against a malformed pg_type chain; real chains are 1-3 deep


def _bool(text: str) -> bool:
    return text == "t"


def _float(text: str) -> float | str:
    if text[-1] in "yN":  # Infinity, -Infinity, NaN
        return text
    return float(text)


def _numeric(text: str) -> Fragment | str:
    if text[-1] in "yN":  # NaN, Infinity, -Infinity (PG 14+)
        return text
    return Fragment(text)  # numeric_out never uses exponents or a bare '.': valid JSON as is


# Each JSON escape in turn, so that an escaped backslash followed by `u0000` is not taken for `\u0000`.
_JSON_ESCAPES = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.S)
# A number jsonb's numeric may not hold (131072 digits before the point, 16383 after, counting
# the exponent). Conservative: any 4-digit exponent or 15000-digit run, even inside a string.
# The exponent is found from its letter (the regex engine skips fast to an 'e'), then the digit before it is checked.
_EXPONENT_4 = re.compile(r"[eE][+-]?\d{4}")
_DIGITS_15000 = re.compile(r"\d{15000}")


def jsonb_refuses(text: str) -> bool:
    """Whether valid JSON `text` may be refused by jsonb (json accepts it): a `\\u0000` escape,
    a surrogate escape not in a high-low pair, or a number beyond numeric's range. It errs
    towards True; storing a refused value would stop the sink."""
    if "\\u" in text:
        high_end = -1  # end of a high-surrogate escape still waiting for its low half
        for m in _JSON_ESCAPES.finditer(text):
            escape = m.group(1)
            code = int(escape[1:], 16) if len(escape) == 5 else -1
            if high_end >= 0:
                if m.start() != high_end or not 0xDC00 <= code <= 0xDFFF:
                    return True
                high_end = -1
            elif code == 0 or 0xDC00 <= code <= 0xDFFF:
                return True
            elif 0xD800 <= code <= 0xDBFF:
                high_end = m.end()
        if high_end >= 0:
            return True
    if len(text) >= 15000 and _DIGITS_15000.search(text):
        return True
    return any(m.start() > 0 and text[m.start() - 1].isdigit() for m in _EXPONENT_4.finditer(text))


def _json(text: str) -> Fragment | str:
    return text if jsonb_refuses(text) else Fragment(text)


def _timestamp(text: str) -> str:
    if text[-1] == "y":  # infinity, -infinity
        return text
    return text.replace(" ", "T", 1)  # '0044-03-15 12:00:00 BC' too: its era stays after a space, as to_jsonb writes it


def _timestamptz(text: str) -> str:
    if text[-1] == "y":
        return text
    if text[-1] == "C":  # '0044-03-15 12:00:00+00 BC': the offset as any other's, the era after it (to_jsonb's form)
        return _timestamptz(text[:-3]) + " BC"
    text = text.replace(" ", "T", 1)
    if text[-3] in "+-":  # '+00', '-08' -> '+00:00'; '+05:30' and LMT's '+00:19:32' stay
        text += ":00"
    return text


# Built-in scalar types: oid -> (typname, converter).
# OIDs are facts from PostgreSQL's src/include/catalog/pg_type.dat; tests check them
# against a real server.
SCALAR_TYPES: dict[int, tuple[str, Convert]] = {
    16: ("bool", _bool),
    17: ("bytea", str),
    18: ("char", str),
    19: ("name", str),
    20: ("int8", int),
    21: ("int2", int),
    22: ("int2vector", str),
    23: ("int4", int),
    24: ("regproc", str),
    25: ("text", str),
    26: ("oid", int),
    27: ("tid", str),
    28: ("xid", int),
    29: ("cid", int),
    30: ("oidvector", str),
    114: ("json", _json),
    142: ("xml", str),
    600: ("point", str),
    603: ("box", str),
    650: ("cidr", str),
    700: ("float4", _float),
    701: ("float8", _float),
    774: ("macaddr8", str),
    790: ("money", str),
    829: ("macaddr", str),
    869: ("inet", str),
    1042: ("bpchar", str),
    1043: ("varchar", str),
    1082: ("date", str),
    1083: ("time", str),
    1114: ("timestamp", _timestamp),
    1184: ("timestamptz", _timestamptz),
    1186: ("interval", str),
    1266: ("timetz", str),
    1560: ("bit", str),
    1562: ("varbit", str),
    1700: ("numeric", _numeric),
    2205: ("regclass", str),
    2206: ("regtype", str),
    2950: ("uuid", str),
    3220: ("pg_lsn", str),
    3614: ("tsvector", str),
    3615: ("tsquery", str),
    3802: ("jsonb", Fragment),  # jsonb_out always prints JSON that jsonb accepts back
    3904: ("int4range", str),
    3906: ("numrange", str),
    3908: ("tsrange", str),
    3910: ("tstzrange", str),
    3912: ("daterange", str),
    3926: ("int8range", str),
    4072: ("jsonpath", str),
    5069: ("xid8", int),
}

# Built-in array types: oid -> (typname, element oid). Same source, same test.
ARRAY_TYPES: dict[int, tuple[str, int]] = {
    143: ("_xml", 142),
    199: ("_json", 114),
    271: ("_xid8", 5069),
    651: ("_cidr", 650),
    775: ("_macaddr8", 774),
    791: ("_money", 790),
    1000: ("_bool", 16),
    1001: ("_bytea", 17),
    1002: ("_char", 18),
    1003: ("_name", 19),
    1005: ("_int2", 21),
    1006: ("_int2vector", 22),
    1007: ("_int4", 23),
    1008: ("_regproc", 24),
    1009: ("_text", 25),
    1010: ("_tid", 27),
    1011: ("_xid", 28),
    1012: ("_cid", 29),
    1013: ("_oidvector", 30),
    1014: ("_bpchar", 1042),
    1015: ("_varchar", 1043),
    1016: ("_int8", 20),
    1017: ("_point", 600),
    1020: ("_box", 603),
    1021: ("_float4", 700),
    1022: ("_float8", 701),
    1028: ("_oid", 26),
    1040: ("_macaddr", 829),
    1041: ("_inet", 869),
    1115: ("_timestamp", 1114),
    1182: ("_date", 1082),
    1183: ("_time", 1083),
    1185: ("_timestamptz", 1184),
    1187: ("_interval", 1186),
    1231: ("_numeric", 1700),
    1270: ("_timetz", 1266),
    1561: ("_bit", 1560),
    1563: ("_varbit", 1562),
    2210: ("_regclass", 2205),
    2211: ("_regtype", 2206),
    2951: ("_uuid", 2950),
    3221: ("_pg_lsn", 3220),
    3643: ("_tsvector", 3614),
    3645: ("_tsquery", 3615),
    3807: ("_jsonb", 3802),
    3905: ("_int4range", 3904),
    3907: ("_numrange", 3906),
    3909: ("_tsrange", 3908),
    3911: ("_tstzrange", 3910),
    3913: ("_daterange", 3912),
    3927: ("_int8range", 3926),
    4073: ("_jsonpath", 4072),
}


# --- arrays -----------------------------------------------------------------------------
#
# array_out prints `{a,b,...}`, nested braces per dimension, and `[lo:hi]...=` in front when
# a lower bound is not 1. An element is double-quoted (with `"` and `\` backslash-escaped)
# when it is empty, spells NULL, or holds a delimiter, brace, quote, backslash or white
# space; an unquoted NULL is the null element.

_UNESCAPE = re.compile(r"\\(.)", re.S)


def _tokenizer(delim: str) -> Callable[[str], Any]:
    d = re.escape(delim)
    # 1: a quoted element's inside, 2: a brace, 3: an unquoted element. Delimiters are skipped.
    return re.compile(rf'"([^"\\]*(?:\\.[^"\\]*)*)"|([{{}}])|([^{d}{{}}"]+)', re.S).finditer


_TOKENIZERS = {",": _tokenizer(","), ";": _tokenizer(";")}


def _parse_nested(text: str, convert: Convert, tokens: Callable[[str], Any]) -> list[Any]:
    stack: list[list[Any]] = []
    done: list[Any] = []
    for m in tokens(text):
        kind = m.lastindex
        if kind == 1:
            value = m.group(1)
            if "\\" in value:
                value = _UNESCAPE.sub(r"\1", value)
            stack[-1].append(convert(value))
        elif kind == 3:
            value = m.group(3)
            stack[-1].append(None if value == "NULL" else convert(value))
        elif m.group(2) == "{":
            inner: list[Any] = []
            if stack:
                stack[-1].append(inner)
            stack.append(inner)
        else:
            done = stack.pop()
    return done


def array_converter(convert: Convert, delim: str = ",") -> Convert:
    """A converter for the text of an array whose elements convert with `convert`."""
    tokens = _TOKENIZERS.get(delim) or _tokenizer(delim)

    def parse_array(text: str) -> Any:
        if text[0] != "{":
            if text[0] != "[":  # not array_out's format (e.g. int2vector): keep the text
                return text
            text = text[text.index("=") + 1 :]  # drop the '[0:1]=' dimension decoration
        if '"' in text or text.find("{", 1) >= 0:
            return _parse_nested(text, convert, tokens)
        # One dimension, nothing quoted: a plain split.
        if len(text) == 2:
            return []
        items = text[1:-1].split(delim)
        if "NULL" not in text:
            return items if convert is str else list(map(convert, items))
        return [None if item == "NULL" else convert(item) for item in items]

    return parse_array


# --- the catalog --------------------------------------------------------------------------


def _builtins() -> dict[int, Convert]:
    table = {oid: convert for oid, (_, convert) in SCALAR_TYPES.items()}
    for oid, (_, element) in ARRAY_TYPES.items():
        table[oid] = array_converter(table[element], ";" if element == _BOX else ",")
    return table


_BUILTINS = _builtins()


class TypeCatalog:
    """Maps type OIDs to converters. Built-in OIDs are known up front; others are learned.

    Learned types resolve lazily, so `learn()` may be called in any order; a part that is
    still unknown when a converter is asked for (an element type, a domain's base type)
    converts as text.
    """

    # One round trip: the asked-for OIDs plus, recursively, their element and base types.
    LEARN_QUERY: ClassVar[str] = """
        WITH RECURSIVE wanted(oid) AS (
            SELECT unnest(%s::oid[])
          UNION
            SELECT dep.oid
            FROM wanted w
            JOIN pg_catalog.pg_type t ON t.oid = w.oid
            CROSS JOIN LATERAL (VALUES (t.typelem), (t.typbasetype)) AS dep(oid)
            WHERE dep.oid <> 0
        )
        SELECT t.oid::int8, t.typcategory::text, t.typelem::int8, t.typbasetype::int8
        FROM wanted w
        JOIN pg_catalog.pg_type t ON t.oid = w.oid
    """

    def __init__(self) -> None:
        self._converters: dict[int, Convert] = dict(_BUILTINS)
        self._learned: dict[int, tuple[str, int, int]] = {}

    def converter(self, type_oid: int) -> Convert | None:
        """The converter for a known OID, or None when the OID must be learned from the catalog first."""
        convert = self._converters.get(type_oid)
        if convert is None and type_oid in self._learned:
            convert = self._converters[type_oid] = self._resolve(type_oid, 0)
        return convert

    def converter_or_text(self, type_oid: int) -> Convert:
        return self.converter(type_oid) or str

    def learn(self, type_oid: int, *, category: str, element_oid: int, base_oid: int) -> None:
        """Teach a non-built-in OID from pg_type: typcategory (e.g. 'A' array, 'E' enum, 'N' numeric...), typelem (0 if none), typbasetype (0 unless domain). An array of an unknown element type, an unknown base type etc. falls back to text for the unknown part; never raise."""
        if type_oid in _BUILTINS:
            return
        self._learned[type_oid] = (category, element_oid, base_oid)
        for oid in self._learned:  # a converter resolved earlier may have lacked this type
            self._converters.pop(oid, None)

    def _resolve(self, oid: int, depth: int) -> Convert:
        builtin = _BUILTINS.get(oid)
        if builtin is not None:
            return builtin
        facts = self._learned.get(oid)
        if facts is None or depth > _MAX_DEPTH:
            return str
        category, element, base = facts
        if base:  # a domain converts like its base type
            return self._resolve(base, depth + 1)
        if category == "A" and element:
            delim = ";" if self._root(element, depth + 1) == _BOX else ","
            return array_converter(self._resolve(element, depth + 1), delim)
        # Enums, composites, ranges, extension types... Not even category 'N' or 'B' says the
        # text is a JSON number or boolean (regclass is 'N'), so the text it is.
        return str

    def _root(self, oid: int, depth: int) -> int:
        """The OID under any domains."""
        while depth <= _MAX_DEPTH and oid in self._learned and self._learned[oid][2]:
            oid = self._learned[oid][2]
            depth += 1
        return oid
