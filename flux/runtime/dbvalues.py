"""Values across `ctx.db`: query results as the JSON a function gets, and its parameters as psycopg dumps them.

Results load with psycopg's loaders except where a Python value would lose or change what
PostgreSQL said, or could not be made at all:
- numeric is its exact text (a Decimal's str would write 0.0000001 as 1E-7);
- float4/float8 NaN, Infinity and -Infinity are those strings (JSON has no such numbers, and
  null would read as SQL NULL);
- date, time, timestamp and timestamptz are psycopg's (ISO 8601 in JSON), except what Python's
  types cannot hold: 'infinity', '-infinity', BC dates, years past 9999 and 24:00:00 come back as
  PostgreSQL's text; a timestamptz whose offset has seconds is in UTC (orjson writes minutes);
- timetz is ISO 8601 text with its offset ("12:34:56+02:00");
- interval is an ISO 8601 duration, as PostgreSQL writes it with IntervalStyle iso_8601 (the row
  images of flux.state_mutations are written so): "P1Y2M3DT4H5M6.789S";
- ranges, multiranges, inet and cidr are PostgreSQL's text ("[1,5)", "::ffff:1.2.3.4");
- an array of a type psycopg does not know (an enum, a domain, citext...) is a list of its
  elements, once `ResultTypes` has learned from pg_type that the type is an array;
- an int8 past Number's safe range (2^53 - 1 either way) stays an exact int here: `json_ready` says
  when a result may hold one, `unsafe_int_paths` finds where, and `bigint_texts` gives the
  function those values' exact text, which the prelude makes BigInts (JSON.parse would round them).

Parameters: `adapt_param` makes a JS value one psycopg dumps as the PostgreSQL type it means.

What this module does not do: it does no I/O. `ResultTypes.LEARN_QUERY` is run by the session.
"""

from __future__ import annotations

import re
from datetime import timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg import postgres, pq
from psycopg.adapt import AdaptersMap, Buffer, Loader
from psycopg.types.array import register_array
from psycopg.types.json import Jsonb
from psycopg.types import TypeInfo

_TEXT = pq.Format.TEXT
_UTC = timezone.utc
_MINUTE = timedelta(minutes=1)


def _fast(oid: int, context: Any) -> Loader:
    """psycopg's own (C) loader for `oid`, which ours fall back from."""
    loader = postgres.adapters.get_loader(oid, _TEXT)
    assert loader is not None
    return loader(oid, context)


class _ClockLoader(Loader):
    """date, time, timestamp, timestamptz: psycopg's value, or PostgreSQL's text for what Python's
    types cannot hold ('infinity', '-infinity', BC, past 9999, 24:00:00)."""

    def __init__(self, oid: int, context: Any = None) -> None:
        super().__init__(oid, context)
        self._load = _fast(oid, context).load

    def load(self, data: Buffer) -> Any:
        return self._load_or_text(data)

    def _load_or_text(self, data: Buffer) -> Any:
        try:
            return self._load(data)
        except psycopg.DataError:
            return bytes(data).decode()


class _TimestamptzLoader(_ClockLoader):
    """In UTC when the session's zone had an offset with seconds (local mean time: Amsterdam's
    +00:19:32 until 1937), which orjson would round to the minute (+00:20), 28 s off the instant."""

    def load(self, data: Buffer) -> Any:
        value = self._load_or_text(data)
        if type(value) is str or value.tzinfo is _UTC:
            return value
        offset = value.utcoffset()
        return value.astimezone(_UTC) if offset is not None and offset % _MINUTE else value


class _TimetzLoader(_ClockLoader):
    """ISO 8601 with the offset: JSON cannot carry a time with a zone (orjson refuses one)."""

    def load(self, data: Buffer) -> Any:
        try:
            return self._load(data).isoformat()
        except psycopg.DataError:
            return bytes(data).decode()


class _FloatLoader(Loader):
    def __init__(self, oid: int, context: Any = None) -> None:
        super().__init__(oid, context)
        self._load = _fast(oid, context).load

    def load(self, data: Buffer) -> Any:
        if data[-1] in b"Ny":  # NaN, Infinity, -Infinity: no JSON number says them
            return bytes(data).decode()
        return self._load(data)


class _TextLoader(Loader):
    """PostgreSQL's own text: ranges, multiranges, numeric, inet and cidr (Python's ipaddress writes
    an IPv4-mapped address, ::ffff:1.2.3.4, as ::ffff:102:304)."""

    def load(self, data: Buffer) -> str:
        return bytes(data).decode()


# IntervalStyle postgres (the default): "1 year 2 mons 3 days 04:05:06.789", "-1 years +3 days -00:00:01".
_PG_INTERVAL = re.compile(r"(?:([+-]?\d+) years? ?)?(?:([+-]?\d+) mons? ?)?(?:([+-]?\d+) days? ?)?"
                          r"(?:([+-]?)(\d+):(\d\d):(\d\d)(?:\.(\d+))?)?")


class _IntervalLoader(Loader):
    """An ISO 8601 duration, as PostgreSQL's iso_8601 IntervalStyle writes it (EncodeInterval):
    each non-zero field with its own sign, the seconds' fraction without trailing zeros, PT0S for
    zero. A timedelta would lose months and years. Text in another IntervalStyle (one the function
    SET) is returned as it is."""

    def load(self, data: Buffer) -> str:
        text = bytes(data).decode()
        m = _PG_INTERVAL.fullmatch(text)
        if m is None or not text:
            return text
        years, months, days, sign, hours, minutes, seconds, fraction = m.groups()
        neg = "-" if sign == "-" else ""
        fraction = (fraction or "").rstrip("0")
        out = ["P"]
        for value, unit in ((years, "Y"), (months, "M"), (days, "D")):
            if value and int(value):
                out.append(f"{int(value)}{unit}")
        if hours is not None and (int(hours) or int(minutes) or int(seconds) or fraction):
            out.append("T")
            for value, unit in ((hours, "H"), (minutes, "M")):
                if int(value):
                    out.append(f"{neg}{int(value)}{unit}")
            if int(seconds) or fraction:
                out.append(f"{neg}{int(seconds)}{'.' + fraction if fraction else ''}S")
        return "".join(out) if len(out) > 1 else "PT0S"


def _base_adapters() -> AdaptersMap:
    adapters = AdaptersMap(postgres.adapters)
    for name in ("date", "time", "timestamp"):
        adapters.register_loader(name, _ClockLoader)
    adapters.register_loader("timestamptz", _TimestamptzLoader)
    adapters.register_loader("timetz", _TimetzLoader)
    adapters.register_loader("float4", _FloatLoader)
    adapters.register_loader("float8", _FloatLoader)
    adapters.register_loader("interval", _IntervalLoader)
    for name in ("numeric", "inet", "cidr", "int4range", "int8range", "numrange", "daterange", "tsrange", "tstzrange",
                 "int4multirange", "int8multirange", "nummultirange", "datemultirange", "tsmultirange", "tstzmultirange"):
        adapters.register_loader(name, _TextLoader)
    return adapters


_BASE = _base_adapters()
_INT8, _INT8_ARRAY = 20, 1016
_KNOWN_CAP = 10_000  # type OIDs a pool remembers having looked up; past it, it starts over


class ResultTypes:
    """The loaders one database's results use (one per connection pool): the module's, and array
    types learned from pg_type. psycopg knows the built-in types only; any other type comes back
    as text, so an enum array would be the text "{sad,ok}" where text[] is a list. The session
    runs `LEARN_QUERY` for a result with a type this pool has not met (once per type, not per
    query), and `learn` registers what it found."""

    # Each asked-for OID that is an array, with its element (under one domain) and the delimiter.
    LEARN_QUERY = (b"SELECT t.oid::int8, CASE WHEN e.typtype = 'd' THEN e.typbasetype ELSE e.oid END::int8, e.typdelim::text"
                   b" FROM pg_catalog.pg_type t JOIN pg_catalog.pg_type e ON e.oid = t.typelem"
                   b" WHERE t.oid = ANY($1::pg_catalog.oid[]) AND t.typcategory = 'A'")

    def __init__(self) -> None:
        self.adapters = AdaptersMap(_BASE)
        self._met: set[int] = set()  # looked up already: learned, or not an array
        self._int8s = {_INT8, _INT8_ARRAY}  # and arrays of a domain over int8, once learned

    def unknown(self, result: psycopg.pq.abc.PGresult) -> list[int]:
        """The type OIDs of `result`'s columns that this pool has neither a loader for nor looked up."""
        loaders = self.adapters.get_loader
        out = []
        for i in range(result.nfields):
            oid = result.ftype(i)
            if oid not in self._met and loaders(oid, _TEXT) is None and oid not in out:
                out.append(oid)
        return out

    def learn(self, asked: list[int], arrays: list[tuple[int, int, str]]) -> None:
        """Register the arrays among `asked` (rows of LEARN_QUERY): their elements load as their
        own type if psycopg knows it, else as text."""
        if len(self._met) + len(asked) > _KNOWN_CAP:
            self._met.clear()
        for oid, element, delimiter in arrays:
            register_array(TypeInfo(f"flux_{element}", element, oid, delimiter=delimiter), self.adapters)
            if element == _INT8:
                self._int8s.add(oid)
        self._met.update(asked)

    def int8_columns(self, result: psycopg.pq.abc.PGresult, names: list[str]) -> list[str]:
        """The names of `result`'s columns that hold int8s (int8, its arrays, a domain's over it): the
        only values loaded as ints that can be past Number's safe range. A name two columns have is
        the last one's, as in the rows."""
        types = dict(zip(names, (result.ftype(i) for i in range(result.nfields))))
        return [name for name, oid in types.items() if oid in self._int8s]


class LoadContext:
    """What psycopg's Transformer takes its adapters and connection from (an AdaptContext)."""

    __slots__ = ("adapters", "connection")

    def __init__(self, adapters: AdaptersMap, connection: psycopg.AsyncConnection) -> None:
        self.adapters = adapters
        self.connection = connection


def to_json_value(value: Any) -> Any:
    """orjson `default`: database values the way JS code expects them."""
    if isinstance(value, Decimal):
        return str(value)  # exact; a JS number would round
    if isinstance(value, (bytes, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def json_ready(value: Any) -> tuple[Any, bool]:
    """Round-trip through orjson, so results hold only JSON types (for the tape and for JS), and
    whether it may hold an integer past Number's safe range: orjson's strict mode refuses one,
    which costs a result that holds none nothing (a strict dump that failed for depth says True
    too). An integer past 64 bits (in a json or jsonb value), which orjson does not write, becomes
    the double JS's JSON.parse makes of it."""
    try:
        return orjson.loads(orjson.dumps(value, default=to_json_value, option=orjson.OPT_STRICT_INTEGER)), False
    except orjson.JSONEncodeError:
        pass
    try:
        return orjson.loads(orjson.dumps(value, default=to_json_value)), True
    except orjson.JSONEncodeError:
        try:
            doubled = _wide_ints_as_doubles(value)
        except RecursionError:  # nested past what this walks: the caller's error for depth stands
            raise orjson.JSONEncodeError("nested too deep") from None
        if doubled is value:
            raise  # not a wide integer: too deep for orjson
        return orjson.loads(orjson.dumps(doubled, default=to_json_value)), True


_SAFE_INTS = range(-(2 ** 53 - 1), 2 ** 53)  # Number.MIN_SAFE_INTEGER to MAX_SAFE_INTEGER


def unsafe_int_paths(rows: list[dict[str, Any]], columns: list[str]) -> list[list[Any]]:
    """The paths, [row index, column, index inside an array ...], of the ints in `rows`' `columns`
    (`ResultTypes.int8_columns`) past Number's safe range, which a JS number would round. A json
    value's numbers are not looked at: they are what JSON.parse makes of them."""
    paths: list[list[Any]] = []

    def walk(value: Any, path: list[Any]) -> None:
        if isinstance(value, list):  # an array, of any dimension
            for index, item in enumerate(value):
                walk(item, [*path, index])
        elif type(value) is int and value not in _SAFE_INTS:
            paths.append(path)

    for index, row in enumerate(rows):
        for column in columns:
            value = row[column]
            if type(value) is int:  # the common column, a scalar: no path made for a safe one
                if value not in _SAFE_INTS:
                    paths.append([index, column])
            elif value is not None:
                walk(value, [index, column])
    return paths


def bigint_texts(rows: list[dict[str, Any]], paths: list[list[Any]]) -> list[list[Any]]:
    """[path, decimal text] of each int at `paths` in `rows`: what the prelude makes a BigInt of,
    in place of the double JSON.parse gave."""
    out = []
    for path in paths:
        value: Any = rows
        for key in path:
            value = value[key]
        out.append([path, str(value)])
    return out


_INT64 = range(-(2 ** 63), 2 ** 64)  # what orjson writes


def _wide_ints_as_doubles(value: Any) -> Any:
    """`value` with each int orjson cannot write as the double JSON.parse gives (Infinity past a
    double's range, which JSON writes as null); `value` itself when it holds none."""
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, dict):
        items = {k: _wide_ints_as_doubles(v) for k, v in value.items()}
        return items if any(items[k] is not v for k, v in value.items()) else value
    if isinstance(value, (list, tuple)):
        items = [_wide_ints_as_doubles(v) for v in value]
        return items if any(a is not b for a, b in zip(items, value)) else value
    return value


def marked_bigints(value: Any, mark: str, path: list[Any], paths: list[list[Any]]) -> Any:
    """`value` (a parameter the prelude sent as JSON text because it held a BigInt, decoded) with
    each string `mark` + digits the exact int it stands for; each one's path, [parameter index,
    key or index ...], goes onto `paths`."""
    if isinstance(value, str):
        if value.startswith(mark):
            paths.append(path)
            return int(value[len(mark):])
        return value
    if isinstance(value, list):
        return [marked_bigints(item, mark, [*path, index], paths) for index, item in enumerate(value)]
    if isinstance(value, dict):
        return {key: marked_bigints(item, mark, [*path, key], paths) for key, item in value.items()}
    return value


class ParamError(ValueError):
    """A parameter no PostgreSQL type takes as it is; the message says which and why."""


def adapt_param(value: Any, number: int) -> Any:
    """A JS value (as JSON brought it) as psycopg should dump it, `number` being its $n.

    An object is jsonb, and so is an array holding an object at any depth. Other arrays are
    PostgreSQL arrays, nested ones multi-dimensional; their numbers are one type (JSON gives 1.0
    as 1, and psycopg dumps no list of ints and floats): float8, or numeric when an int is past
    Number's safe range (a BigInt's); the strings "NaN", "Infinity" and "-Infinity" among numbers
    are those floats, as a float8[] result gives them. Bytes (a Uint8Array) are bytea."""
    if isinstance(value, dict):
        return Jsonb(value)
    if isinstance(value, list):
        kinds: set[type] = set()
        if _holds_object(value, kinds):
            return Jsonb(value)
        kinds.discard(type(None))
        if str in kinds and kinds & {int, float} and kinds - {str} <= {int, float} and _only_float_words(value):
            kinds.discard(str)  # a float array's NaN and infinities, as its results give them
            kinds.add(float)
        if kinds == {int, float} or kinds == {float}:
            return _decimals(value) if _unsafe(value) else _floats(value)
        if len(kinds) > 1:
            names = " and ".join(sorted({_JS_NAMES.get(k, k.__name__) for k in kinds}))
            raise ParamError(f"ctx.db.query: ${number} is an array of {names}; a PostgreSQL array holds values of one type")
    return value


_JS_NAMES = {int: "numbers", float: "numbers", str: "strings", bool: "booleans", bytes: "bytes"}


def _holds_object(value: list[Any], kinds: set[type]) -> bool:
    """Whether `value` holds an object at any depth; gathers the types of its other leaves."""
    for item in value:
        if isinstance(item, dict):
            return True
        if isinstance(item, list):
            if _holds_object(item, kinds):
                return True
        else:
            kinds.add(type(item))
    return False


_FLOAT_WORDS = frozenset(("NaN", "Infinity", "-Infinity"))


def _only_float_words(value: list[Any]) -> bool:
    """Whether each string in `value` is a float's NaN or infinity, as a float8[] result gives them."""
    return all(_only_float_words(v) if isinstance(v, list) else type(v) is not str or v in _FLOAT_WORDS for v in value)


def _floats(value: list[Any]) -> list[Any]:
    return [_floats(v) if isinstance(v, list) else float(v) if type(v) in (int, str) else v for v in value]


def _unsafe(value: list[Any]) -> bool:
    """Whether `value` holds an int past Number's safe range (a BigInt's): float8 would keep 15 of
    its digits going into a numeric column."""
    return any(_unsafe(v) if isinstance(v, list) else type(v) is int and v not in _SAFE_INTS for v in value)


def _decimals(value: list[Any]) -> list[Any]:
    """numeric: ints exact, and each float as the shortest text that reads back as it (JS's too)."""
    return [_decimals(v) if isinstance(v, list) else Decimal(v) if type(v) in (int, str) else Decimal(repr(v))
            if type(v) is float else v for v in value]
