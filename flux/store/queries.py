"""Read side of the mutation log: row history, blame, and request-id lookup.

Library functions over a psycopg connection that return frozen dataclasses; the CLI renders
them. Everything here only reads `flux.state_mutations` and the catalog.

How a row is found:
- `--id VALUE` names the single-column primary key. The key column comes from the catalog,
  or, when the table no longer exists, from the keys recorded in `row_key`.
- `--key COL=VALUE ...` names all primary-key columns (matched on `row_key`), or, for a table
  without a primary key, any columns, matched on the row images (`new` or `old` contains them);
  so are other columns than the key's, when some of the table's changes were recorded without a
  key (its key columns were renamed, or the table dropped, before the engine read them).
- Values arrive as text; each is tried in its typed JSON forms (string, number, boolean), so
  `42` matches a recorded `42`, `42.0` or `"42"`, a uuid in any form PostgreSQL reads
  (no hyphens, braces, upper case) matches its canonical text, `t`/`yes`/`on` a boolean, a
  timestamp as psql prints it or in any zone the engine's UTC text, and a bytea's `\\x` hex in
  either case the engine's lower-case hex.
- A primary key is looked up through the row hash index, once per combination of its columns'
  forms. Past 64 combinations (7 or more columns whose text could be a number, a boolean or a
  uuid) the columns are compared one by one instead, over all of the table's mutations.

Across a rename: history and blame of an existing table also take the changes recorded under
its earlier names with its oid (`flux.store.renames`), each saying the name it was recorded under
(`recorded_as`).

Not guaranteed: a row of a table without a primary key is followed only while its images
contain the given values (an update that changes them ends the trail; blame of a row an update
gave them starts at that update); blame of a column
whose last writer predates capture has no writer; a truncate is attributed to every row of
its table that had a mutation before it.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from flux.errors import AmbiguousError, ConfigError, NotFoundError
from flux.store.names import NUMBER, format_table, given_text, key_arg, load_json, quoted_word, shell_word
from flux.store.renames import NO_NAMES, Names, renamed_to, table_names
from flux.store.retention import pruned_before
from flux.store.schema import SCHEMA, SCHEMA_VERSION, schema_version, version_mismatch

REQUEST_PREFIX = "req:"
MAX_CANDIDATES = 10  # request ids listed in an AmbiguousError
MAX_LIMIT = 1_000_000_000  # far past any listing; PostgreSQL refuses a LIMIT past 2**63 - 1
_MAX_KEY_FORMS = 64  # typed combinations of a primary key looked up through the row hash index
_TABLE_BLAME_BATCH = 500
# One table's mutations, through its hash index (see flux.store.schema); the names are rechecked.
_TABLE_IS = (
    "flux.table_hash(schema_name, table_name) = flux.table_hash(%(schema)s, %(table)s)"
    " AND schema_name = %(schema)s AND table_name = %(table)s"
)

_BOOLEANS = {w: "true" for w in ("t", "true", "y", "yes", "on")} | {w: "false" for w in ("f", "false", "n", "no", "off")}
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d{1,6})?)?\s*(Z|[+-]\d\d(:?\d\d)?)?", re.IGNORECASE)
# As PostgreSQL reads bytea's hex form: digits of either case, whitespace allowed between pairs.
_BYTEA_INPUT = re.compile(r"\\x([ \t\n\r]*[0-9a-fA-F]{2})*[ \t\n\r]*")
# As PostgreSQL reads a uuid: optionally in braces, a hyphen allowed after any group of four digits.
_UUID = re.compile(r"(\{)?[0-9a-fA-F]{4}(-?[0-9a-fA-F]{4}){7}(?(1)\})")


# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mutation:
    """One entry of the mutation log, with its images decoded (numerics as exact Decimals)."""

    op: str  # insert | update | delete | truncate
    request_id: str | None
    function: str | None  # context->>'function'
    context: dict[str, Any] | None
    xid: int
    commit_lsn: str
    commit_time: datetime
    seq: int
    row_key: dict[str, Any] | None
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    old_complete: bool | None
    missing_columns: tuple[str, ...] | None
    changed_columns: tuple[str, ...] | None
    old_row_key: dict[str, Any] | None = None  # an update that changed the primary key: the old one
    # In a row's history, for an update that changed its primary key: "out" when it moved the row
    # away from the key asked for (to `row_key`), "in" when it brought the row there (from `old_row_key`).
    key_change: str | None = None
    recorded_as: str = ""  # the table's name when the change was recorded, as `flux state` takes it


@dataclass(frozen=True, slots=True)
class RowHistory:
    schema: str
    table: str
    match: dict[str, str]  # column -> value as given (for --id, the primary-key column)
    matched_on: str  # "row_key" | "images"
    total: int  # mutations of the row in the log; `mutations` may hold only the newest of them
    mutations: tuple[Mutation, ...]  # oldest first
    key: dict[str, Any] | None = None  # the primary key as recorded (typed), when matched on it
    # The log's last prune cutoff, when the row's recorded history starts with a change other than
    # its insert: its earlier changes, committed before this, were deleted by retention.
    pruned_before: datetime | None = None
    renamed_to: str | None = None  # no table has this name now: the one that had it is now named so


@dataclass(frozen=True, slots=True)
class Writer:
    """The mutation that wrote something: who, when, how."""

    op: str
    request_id: str | None
    function: str | None
    commit_time: datetime
    xid: int
    commit_lsn: str
    seq: int
    # No request id because the transaction's `flux` message was malformed: what was wrong with it.
    malformed_context: str | None = None
    recorded_as: str = ""  # the table's name when the change was recorded (an earlier one, after a rename)


@dataclass(frozen=True, slots=True)
class ColumnBlame:
    column: str
    value: Any
    set_by: Writer | None  # None: set before capture started
    certain: bool  # False: the old image was incomplete, so it was set by `set_by` or earlier
    # False: no recorded image holds its value (an unchanged TOASTed value without a full old row,
    # before any image had it); `value` is then None, which is not its value.
    known: bool = True


@dataclass(frozen=True, slots=True)
class RowBlame:
    schema: str
    table: str
    match: dict[str, str]
    deleted: bool
    deleted_by: Writer | None  # the delete or truncate that removed the row, or the update that moved it
    last: Writer  # the row's latest mutation
    columns: tuple[ColumnBlame, ...]  # current values; when deleted, the values it had
    moved_to: dict[str, Any] | None = None  # deleted_by changed the row's primary key to this one
    key: dict[str, Any] | None = None  # the primary key as recorded (typed), when matched on it
    pruned_before: datetime | None = None  # as RowHistory's: some values were set by changes since pruned
    renamed_to: str | None = None  # as RowHistory's


@dataclass(frozen=True, slots=True)
class RecentChange:
    """A recently changed row of a table and its last writer (`table_blame`)."""

    row_key: dict[str, Any] | None  # None for a table without a primary key, and for a truncate
    row: dict[str, Any] | None  # the image after the change (before it, for a delete)
    writer: Writer
    moved_from: dict[str, Any] | None = None  # the change moved the row here from this primary key


def no_jit(conn: psycopg.Connection) -> None:
    """Reads of a big log are index lookups that the planner may cost past `jit_above_cost` (a
    keyless row's history reads all of its table's changes): compiling them took 1 to 2.4 s at
    5 million rows, for queries that ran in a tenth of that."""
    conn.execute("SET jit = off")


def check_limit(limit: int) -> None:
    """Before querying: a LIMIT the server would refuse is a usage error, not a database error."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"--limit {limit} is out of range", hint=f"Give a number from 1 to {MAX_LIMIT:,}.")


_MUTATION_COLUMNS = sql.SQL(
    "op, request_id, context->>'function', context::text, xid, commit_lsn::text, commit_time, seq,"
    " row_key::text, old::text, new::text, old_complete, missing_columns, changed_columns, old_row_key::text,"
    " schema_name, table_name"
)


def _mutation(row: tuple, columns: tuple[str, ...] = (), key_columns: tuple[str, ...] = ()) -> Mutation:
    op, rid, fn, ctx, xid, lsn, time, seq, key, old, new, complete, missing, changed, old_key, schema, table = row[:17]
    return Mutation(
        op=op, request_id=rid, function=fn, context=load_json(ctx), xid=xid, commit_lsn=lsn,
        commit_time=time, seq=seq, row_key=_in_order(load_json(key), key_columns),
        old=_in_order(load_json(old), columns), new=_in_order(load_json(new), columns),
        old_complete=complete,
        missing_columns=tuple(missing) if missing is not None else None,
        changed_columns=tuple(changed) if changed is not None else None,
        old_row_key=_in_order(load_json(old_key), key_columns), recorded_as=format_table(schema, table),
    )


def _in_order(image: dict[str, Any] | None, columns: tuple[str, ...]) -> dict[str, Any] | None:
    """jsonb keeps keys sorted by length; show them in table (or primary-key) order, unknown ones last."""
    if not image or not columns:
        return image
    rank = {c: i for i, c in enumerate(columns)}
    return dict(sorted(image.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _writer(m: Mutation) -> Writer:
    return Writer(op=m.op, request_id=m.request_id, function=m.function, commit_time=m.commit_time,
                  xid=m.xid, commit_lsn=m.commit_lsn, seq=m.seq, malformed_context=malformed_context(m),
                  recorded_as=m.recorded_as)


def malformed_context(m: Mutation) -> str | None:
    """Why a change has no request id although its transaction sent a `flux` message (the engine
    keeps such a message as `{"malformed": why, "raw": ...}`); None otherwise."""
    if m.request_id is None and isinstance(m.context, dict) and isinstance(m.context.get("malformed"), str):
        return m.context["malformed"]
    return None


# -- finding a row ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RowMatch:
    match: dict[str, str]
    matched_on: str
    where: sql.Composable
    params: dict[str, Any]
    columns: tuple[str, ...]  # table order, to show images in; empty when the table is gone
    key_columns: tuple[str, ...]  # primary-key order, to show keys in; empty without a primary key
    values: dict[str, list[Any]]  # per matched column, the values its given text may have been recorded as


def _value_forms(value: str) -> list[str]:
    """The JSON texts a CLI value may have been recorded as."""
    forms = [json.dumps(value, ensure_ascii=False)]
    text = value.strip()
    if NUMBER.fullmatch(text):
        forms.append(str(Decimal(text)))
    elif text == "null":
        forms.append(text)
    elif text.lower() in _BOOLEANS:  # as PostgreSQL reads a boolean, psql's `t` included
        forms.append(_BOOLEANS[text.lower()])
    elif (moment := _timestamp_form(text)) is not None and json.dumps(moment) != forms[0]:
        forms.append(json.dumps(moment))
    if _BYTEA_INPUT.fullmatch(value):  # the engine's form: lower case, no spaces (flux.cdc.values)
        canonical = json.dumps("\\x" + re.sub(r"[ \t\n\r]", "", value[2:]).lower())
        if canonical != forms[0]:
            forms.append(canonical)
    if _UUID.fullmatch(text):
        digits = re.sub(r"[{}-]", "", text).lower()
        canonical = json.dumps(f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}")
        if canonical != forms[0]:
            forms.append(canonical)
    return forms


def _timestamp_form(text: str) -> str | None:
    """A timestamp as the engine records it (flux.cdc.values: UTC, `T`, `+00:00`, the fraction as
    PostgreSQL prints it), from any spelling PostgreSQL and psql use: `2026-01-02 03:04:05+00`,
    `...Z`, another offset. None for text that is not a date and a time."""
    if not _TIMESTAMP.fullmatch(text):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    zone = ""
    if moment.tzinfo is not None:
        moment, zone = moment.astimezone(timezone.utc), "+00:00"
    fraction = f".{moment.microsecond:06d}".rstrip("0") if moment.microsecond else ""
    return f"{moment:%Y-%m-%dT%H:%M:%S}{fraction}{zone}"


def _object_forms(forms: dict[str, list[str]]) -> list[str]:
    """Every combination of the columns' forms, as jsonb objects."""
    per_column = [[json.dumps(col, ensure_ascii=False) + ":" + form for form in column_forms] for col, column_forms in forms.items()]
    return ["{" + ",".join(combo) + "}" for combo in itertools.product(*per_column)]


def _columns_match(image: str, forms: dict[str, list[str]], *, whole: bool) -> sql.Composable:
    """SQL: each given column of `image` is one of its forms (jsonb equality: 1 = 1.0, "1" <> 1);
    `whole`: and the image has no other column. Parameters col<i>, forms<i>, cols (`_column_params`)."""
    parts = [sql.SQL(f"{image} -> %(col{i})s = ANY(%(forms{i})s::jsonb[])") for i in range(len(forms))]
    if whole:
        parts.append(sql.SQL(f"{image} - %(cols)s::text[] = '{{}}'::jsonb"))
    return sql.SQL("(") + sql.SQL(" AND ").join(parts) + sql.SQL(")")


def _column_params(forms: dict[str, list[str]]) -> dict[str, Any]:
    params: dict[str, Any] = {"cols": list(forms)}
    for i, (col, column_forms) in enumerate(forms.items()):
        params[f"col{i}"], params[f"forms{i}"] = col, column_forms
    return params


def _kind(value: Any) -> str:
    return "boolean" if isinstance(value, bool) else "number" if isinstance(value, (int, Decimal)) else type(value).__name__


def _is_key(key: dict[str, Any] | None, values: dict[str, list[Any]]) -> bool:
    """`key` is the row asked for: as `_columns_match(..., whole=True)` judges it in SQL."""
    return key is not None and key.keys() == values.keys() and _holds(key, values)


def _holds(image: dict[str, Any] | None, values: dict[str, list[Any]]) -> bool:
    """`image` holds each given value: as `_columns_match(..., whole=False)` judges it in SQL."""
    return image is not None and all(
        c in image and any(_kind(image[c]) == _kind(v) and image[c] == v for v in vs) for c, vs in values.items()
    )


def _moves(mut: Mutation, values: dict[str, list[Any]]) -> int:
    """Matched on images: 1 when an update brought a row to the given values, -1 when it took one
    away from them, else 0 (an old image without all its columns cannot say)."""
    if mut.op != "update" or not mut.old_complete:
        return 0
    return _holds(mut.new, values) - _holds(mut.old, values)


def _require_log(conn: psycopg.Connection) -> None:
    if not conn.execute("SELECT to_regclass('flux.state_mutations') IS NOT NULL").fetchone()[0]:
        raise NotFoundError("This database has no Flux mutation log", hint="Run `flux attach` to start recording changes.")
    version = schema_version(conn)
    if version != SCHEMA_VERSION:
        # Reads never run DDL: the engine, the gateway and `flux attach` upgrade the schema. (A log
        # without flux.meta predates versions.)
        raise version_mismatch(version or 1, doing="reads the log")


@dataclass(frozen=True, slots=True)
class _Catalog:
    primary_key: tuple[str, ...] | None  # in key order
    columns: tuple[str, ...]  # in table order


def _catalog(conn: psycopg.Connection, schema: str, table: str) -> _Catalog | None:
    """The table as it is now, or None when it does not exist (any more)."""
    row = conn.execute(
        """
        SELECT (SELECT array_agg(a.attname::text ORDER BY k.ord)
                  FROM pg_index i
                  CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = c.oid AND i.indisprimary),
               (SELECT array_agg(a.attname::text ORDER BY a.attnum)
                  FROM pg_attribute a
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
        """,
        (schema, table),
    ).fetchone()
    if row is None:
        return None
    return _Catalog(primary_key=tuple(row[0]) if row[0] else None, columns=tuple(row[1] or ()))


def _recorded_key(conn: psycopg.Connection, schema: str, table: str) -> tuple[str, ...] | None:
    """Key columns of the table's latest recorded row change (for a table that is gone)."""
    row = conn.execute(
        f"SELECT row_key::text FROM flux.state_mutations WHERE {_TABLE_IS}"
        " AND op <> 'truncate' ORDER BY commit_lsn DESC, seq DESC LIMIT 1",
        {"schema": schema, "table": table},
    ).fetchone()
    key = load_json(row[0]) if row else None
    return tuple(key) if key else None


def _require_recorded(conn: psycopg.Connection, schema: str, table: str) -> Names:
    """Where the table's changes are recorded (`flux.store.renames.table_names`); NotFoundError, with
    a hint, when nowhere."""
    _require_log(conn)
    names = table_names(conn, schema, table)
    if names.earlier or conn.execute(
        f"SELECT EXISTS (SELECT 1 FROM flux.state_mutations WHERE {_TABLE_IS})", {"schema": schema, "table": table}
    ).fetchone()[0]:
        return names
    name = format_table(schema, table)
    # Spelled differently only in case: asked of the catalog, as the log has no index for it.
    similar = [
        format_table(s, t)
        for s, t in conn.execute(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE lower(n.nspname) = lower(%s) AND lower(c.relname) = lower(%s) AND c.relkind IN ('r', 'p')"
            " AND (n.nspname, c.relname) <> (%s, %s) ORDER BY 1, 2 LIMIT 5",
            (schema, table, schema, table),
        ).fetchall()
    ]
    exists = _catalog(conn, schema, table) is not None
    # A partition's changes are recorded under its partitioned table (the root of its tree).
    root = conn.execute(
        "SELECT n.nspname::text, c.relname::text FROM pg_partition_root(to_regclass(%s)) r(oid)"
        " JOIN pg_class c ON c.oid = r.oid JOIN pg_namespace n ON n.oid = c.relnamespace",
        (format_table(schema, table),),
    ).fetchone() if exists else None
    if schema == SCHEMA:
        hint = f"Tables of the {SCHEMA} schema are Flux's own records: Flux never captures them."
    elif similar:
        hint = "Did you mean " + " or ".join(map(quoted_word, similar)) + "? Quote mixed-case names." + _pruned_note(conn)
    elif root is not None and root != (schema, table):
        parent = format_table(*root)
        hint = f"{name} is a partition: its changes are recorded under its partitioned table, `flux state history {shell_word(parent)} ...`."
    elif not exists and (elsewhere := _in_other_schemas(conn, schema, table)):
        hint = (f"There is no table {name}; did you mean " + " or ".join(map(quoted_word, elsewhere))
                + "? Name the schema: a name without one is public's." + _pruned_note(conn))
    elif exists:
        hint = _capture_hint(conn, schema, table) + _pruned_note(conn)
    else:
        hint = "No such table either. Is it captured? See `flux attach --tables`." + _pruned_note(conn)
    raise NotFoundError(f"No recorded mutations for table {name}", hint=hint, table=name)


def _in_other_schemas(conn: psycopg.Connection, schema: str, table: str) -> list[str]:
    """Tables of this name (in any case) in other schemas than the one asked for, Flux's and the system's aside."""
    return [
        format_table(s, t)
        for s, t in conn.execute(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE lower(c.relname) = lower(%s) AND c.relkind IN ('r', 'p') AND n.nspname <> %s"
            " AND n.nspname NOT IN (%s, 'pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'"
            " ORDER BY 1, 2 LIMIT 5",
            (table, schema, SCHEMA),
        ).fetchall()
    ]


def _capture_hint(conn: psycopg.Connection, schema: str, table: str) -> str:
    """Why an existing table has no recorded change: whether a publication of an attachment has it."""
    name = format_table(schema, table)
    publication = conn.execute(
        "SELECT a.publication_name FROM flux.attachments a JOIN pg_publication_tables p ON p.pubname = a.publication_name"
        " WHERE p.schemaname = %s AND p.tablename = %s ORDER BY 1 LIMIT 1",
        (schema, table),
    ).fetchone()
    if publication is not None:
        return (f"{name} is captured (publication {publication[0]}), but no change of it is recorded yet: changes made "
                "before `flux attach` are not recorded, later ones once `flux cdc run` has read them (`flux cdc status` "
                "shows how far it is). A change is recorded under the name its table had then: if the table was renamed "
                "since, its earlier changes are under its former name (those recorded before schema v7, which have no table "
                "oid to follow it by).")
    if conn.execute("SELECT EXISTS (SELECT 1 FROM flux.attachments)").fetchone()[0]:
        return (f"{name} is not captured: give it to `flux attach --tables` with the other tables to capture (the list "
                "replaces the current one), or use `flux attach --all-tables`.")
    return f"Nothing is captured in this database yet: `flux attach --tables {shell_word(name)}` (or `--all-tables`) starts recording."


def _row_match(
    conn: psycopg.Connection, schema: str, table: str, id_value: str | None, key: dict[str, str] | None
) -> _RowMatch:
    name = format_table(schema, table)
    catalog = _catalog(conn, schema, table)
    pk = catalog.primary_key if catalog else _recorded_key(conn, schema, table)
    columns = catalog.columns if catalog else ()
    if (id_value is not None) == bool(key):
        naming = ("--key COL=VALUE (repeatable): it has no primary key" if pk is None else
                  f"--id VALUE (its primary key is {pk[0]})" if len(pk) == 1 else " ".join(f"--key {c}=..." for c in pk))
        if id_value is not None:
            raise ConfigError("Give either --id or --key, not both", hint=f"Name a row of {name} with {naming}.", table=name)
        raise ConfigError("Name a row with --id VALUE or --key COL=VALUE",
                          hint=f"Name a row of {name} with {naming}; `flux state blame {shell_word(name)}` lists recently changed rows.",
                          table=name)
    if id_value is not None:
        if pk is None:
            # A table that is gone: its latest change was recorded without a key (dropped before the engine read it).
            what = "has no primary key" if catalog else "no longer exists, and its changes were recorded without a primary key"
            raise ConfigError(
                f"Table {name} {what}, so --id has nothing to match",
                hint="Name the row by its values: --key COL=VALUE (repeatable).", table=name,
            )
        if len(pk) > 1:
            example = " ".join(f"--key {c}=..." for c in pk)
            raise ConfigError(
                f"Table {name} has a composite primary key ({', '.join(pk)})",
                hint=f"Use --key for each key column: {example}", table=name,
            )
        key = {pk[0]: id_value}
    assert key is not None
    if pk is None:
        return _image_match(key, columns)
    if set(key) != set(pk):
        if _has_unkeyed(conn, schema, table):
            # Changes recorded without a key (its key columns were renamed or dropped before the engine
            # read them): found by their values, under the column names they were recorded with.
            return _image_match(key, columns)
        example = " ".join(f"--key {c}=..." for c in pk)
        raise ConfigError(
            f"--key must name exactly the primary-key columns of {name}: {', '.join(pk)}",
            hint=f"Use {example}", table=name,
        )
    ordered = {c: key[c] for c in pk}
    forms = {c: _value_forms(v) for c, v in ordered.items()}
    if math.prod(map(len, forms.values())) <= _MAX_KEY_FORMS:
        # The hash finds the row through its index; the exact comparison rules out collisions. An
        # update that changed the primary key belongs to the histories of both keys.
        where = sql.SQL(
            "(flux.row_hash(schema_name, table_name, row_key)"
            " = ANY(ARRAY(SELECT flux.row_hash(%(schema)s, %(table)s, f) FROM unnest(%(forms)s::jsonb[]) f))"
            " AND row_key = ANY(%(forms)s::jsonb[])"
            " OR old_row_key IS NOT NULL AND flux.row_hash(schema_name, table_name, old_row_key)"
            " = ANY(ARRAY(SELECT flux.row_hash(%(schema)s, %(table)s, f) FROM unnest(%(forms)s::jsonb[]) f))"
            " AND old_row_key = ANY(%(forms)s::jsonb[]))"
        )
        return _RowMatch(ordered, "row_key", where, {"forms": _object_forms(forms)}, columns, pk, _loaded(forms))
    # Too many typed combinations to look each up by its hash (7 or more columns whose text could be
    # a number, a boolean or a uuid): compared column by column over the table's mutations instead.
    where = sql.SQL("{table_is} AND ({key} OR old_row_key IS NOT NULL AND {old_key})").format(
        table_is=sql.SQL(_TABLE_IS), key=_columns_match("row_key", forms, whole=True),
        old_key=_columns_match("old_row_key", forms, whole=True))
    return _RowMatch(ordered, "row_key", where, _column_params(forms), columns, pk, _loaded(forms))


def _image_match(key: dict[str, str], columns: tuple[str, ...]) -> _RowMatch:
    """The changes whose new or old image holds each given value (a table without a primary key)."""
    forms = {c: _value_forms(v) for c, v in key.items()}
    where = sql.SQL("{table_is} AND ({new} OR {old})").format(
        table_is=sql.SQL(_TABLE_IS), new=_columns_match("new", forms, whole=False), old=_columns_match("old", forms, whole=False))
    return _RowMatch(dict(key), "images", where, _column_params(forms), columns, (), _loaded(forms))


def _has_unkeyed(conn: psycopg.Connection, schema: str, table: str) -> bool:
    """Whether some row change of a table with a primary key was recorded without one: the engine
    reads the key from the catalog, which no longer had it (see flux.cdc.assembler). Asked only on
    the way to refusing --key columns other than the key's, as it may read all of the table's changes."""
    return conn.execute(
        f"SELECT EXISTS (SELECT 1 FROM flux.state_mutations WHERE {_TABLE_IS} AND op <> 'truncate' AND row_key IS NULL)",
        {"schema": schema, "table": table},
    ).fetchone()[0]


def _loaded(forms: dict[str, list[str]]) -> dict[str, list[Any]]:
    return {c: [load_json(form) for form in column_forms] for c, column_forms in forms.items()}


def _describe(schema: str, table: str, match: dict[str, str]) -> str:
    return f"{format_table(schema, table)} / " + ", ".join(f"{c} = {given_text(v)}" for c, v in match.items())


def _recorded_as(m: _RowMatch, mutations: list[Mutation]) -> dict[str, Any] | None:
    """The key asked for as the newest of these changes recorded it: typed (42, or "42" for text)."""
    if m.matched_on != "row_key":
        return None
    for mut in reversed(mutations):
        for key in (mut.row_key, mut.old_row_key):
            if _is_key(key, m.values):
                return key
    return None


def _under_name(where: sql.Composable, i: int) -> sql.SQL:
    """`where` (written for the table's name, `%(schema)s` and `%(table)s`) for its earlier name number `i`."""
    text = where.as_string(None)
    return sql.SQL(text.replace("%(schema)s", f"%(schema{i})s").replace("%(table)s", f"%(table{i})s"))


def _row_query(schema: str, table: str, m: _RowMatch, limit: int | None,
               names: Names = NO_NAMES) -> tuple[sql.Composed, dict[str, Any]]:
    """The row's mutations and the truncates after its first one, newest first, with the total:
    under the table's name, and under each earlier name of its oid with that oid."""
    params: dict[str, Any] = {"schema": schema, "table": table, "limit": limit, "relid": names.relid, **m.params}
    row_parts = [sql.SQL(
        "SELECT commit_lsn AS lsn, seq AS pos, {cols} FROM flux.state_mutations"
        " WHERE schema_name = %(schema)s AND table_name = %(table)s AND op <> 'truncate' AND {where}"
    ).format(cols=_MUTATION_COLUMNS, where=m.where)]
    truncate_parts = [sql.SQL(
        "SELECT commit_lsn, seq, {cols} FROM flux.state_mutations, first_m f"
        " WHERE {table_is} AND op = 'truncate' AND (commit_lsn, seq) > (f.lsn, f.pos)"
    ).format(cols=_MUTATION_COLUMNS, table_is=sql.SQL(_TABLE_IS))]
    for i, (earlier_schema, earlier_table) in enumerate(names.earlier, 1):
        params[f"schema{i}"], params[f"table{i}"] = earlier_schema, earlier_table
        row_parts.append(_under_name(row_parts[0], i) + sql.SQL(" AND relid = %(relid)s"))
        truncate_parts.append(_under_name(truncate_parts[0], i) + sql.SQL(" AND relid = %(relid)s"))
    query = sql.SQL(
        """
        WITH row_m AS MATERIALIZED (
            {row_parts}
        ), first_m AS (
            SELECT lsn, pos FROM row_m ORDER BY lsn, pos LIMIT 1
        ), history AS (
            SELECT * FROM row_m
            UNION ALL
            {truncate_parts}
        )
        SELECT *, count(*) OVER () FROM history ORDER BY lsn DESC, pos DESC LIMIT %(limit)s
        """
    ).format(row_parts=sql.SQL(" UNION ALL ").join(row_parts), truncate_parts=sql.SQL(" UNION ALL ").join(truncate_parts))
    return query, params


def _fetch_row(
    conn: psycopg.Connection, schema: str, table: str, m: _RowMatch, limit: int | None, names: Names = NO_NAMES
) -> tuple[int, list[Mutation]]:
    """The row's mutations and the truncates after its first one, newest `limit`, oldest first."""
    rows = conn.execute(*_row_query(schema, table, m, limit, names)).fetchall()
    total = rows[0][-1] if rows else 0
    mutations = [_mutation(r[2:], m.columns, m.key_columns) for r in reversed(rows)]
    if m.matched_on == "row_key":
        mutations = [mut if mut.old_row_key is None else
                     dataclasses.replace(mut, key_change="out" if _is_key(mut.old_row_key, m.values) else "in")
                     for mut in mutations]
    return total, mutations


# -- history ---------------------------------------------------------------------------------


def row_history(
    conn: psycopg.Connection,
    schema: str,
    table: str,
    *,
    id_value: str | None = None,
    key: dict[str, str] | None = None,
    limit: int | None = None,
) -> RowHistory:
    """Every recorded change of one row, oldest first; with `limit`, only the newest N."""
    if limit is not None:
        check_limit(limit)
    names = _require_recorded(conn, schema, table)
    m = _row_match(conn, schema, table, id_value, key)
    total, mutations = _fetch_row(conn, schema, table, m, limit, names)
    if not mutations:
        _no_row(conn, schema, table, m)
    whole = total == len(mutations)  # else the oldest shown is not the oldest recorded
    return RowHistory(schema=schema, table=table, match=m.match, matched_on=m.matched_on, total=total,
                      mutations=tuple(mutations), key=_recorded_as(m, mutations),
                      pruned_before=_pruned_history(conn, mutations) if whole else None,
                      renamed_to=_renamed_to(conn, schema, table, names))


def _no_row(conn: psycopg.Connection, schema: str, table: str, m: _RowMatch) -> None:
    where = _describe(schema, table, m.match)
    unknown = [c for c in m.match if m.columns and c not in m.columns]
    # A misspelt column of a table without a primary key matches nothing: say so, not just "no row".
    columns = (f" It has no column {', '.join(unknown)} (its columns: {', '.join(m.columns)})." if unknown else "")
    raise NotFoundError(
        f"No recorded mutations for row {where}",
        hint=f"The table has recorded changes, but none of this row.{columns} "
             f"`flux state blame {shell_word(format_table(schema, table))}` lists recently changed rows."
        + _pruned_note(conn),
        table=format_table(schema, table),
    )


def _pruned_history(conn: psycopg.Connection, mutations: list[Mutation]) -> datetime | None:
    """The last prune's cutoff, when a row's recorded changes (oldest first) do not start with its insert."""
    return pruned_before(conn).mutations if mutations and mutations[0].op != "insert" else None


def _pruned_note(conn: psycopg.Connection) -> str:
    """A sentence for a hint about missing changes: those before the last prune's cutoff are gone."""
    pruned = pruned_before(conn).mutations
    return f" Changes committed before {pruned:%Y-%m-%d %H:%M:%S} UTC were deleted by retention." if pruned else ""


# -- blame -----------------------------------------------------------------------------------


def row_blame(
    conn: psycopg.Connection,
    schema: str,
    table: str,
    *,
    id_value: str | None = None,
    key: dict[str, str] | None = None,
) -> RowBlame:
    """Each column's current value and the mutation that last set it."""
    names = _require_recorded(conn, schema, table)
    m = _row_match(conn, schema, table, id_value, key)
    _, mutations = _fetch_row(conn, schema, table, m, None, names)
    if not mutations:
        _no_row(conn, schema, table, m)
    if m.matched_on == "images":
        _one_row(schema, table, m, mutations)
        mutations = _trail(mutations, m.values)
    mutations = _with_earlier_keys(conn, schema, table, mutations, names)
    blame = _blame(schema, table, m.match, mutations, key=_recorded_as(m, mutations))
    if any(c.set_by is None for c in blame.columns):
        blame = dataclasses.replace(blame, pruned_before=_pruned_history(conn, mutations))
    return dataclasses.replace(blame, renamed_to=_renamed_to(conn, schema, table, names))


def _renamed_to(conn: psycopg.Connection, schema: str, table: str, names: Names) -> str | None:
    """The name a table is known by now, when it no longer has this one (renamed since)."""
    if names.relid is not None:  # a table has this name now
        return None
    now = renamed_to(conn, schema, table)
    return format_table(*now) if now else None


def _one_row(schema: str, table: str, m: _RowMatch, mutations: list[Mutation]) -> None:
    """Without a primary key, the values given may match several rows: blame of them all merged
    would pass off one row's writers as another's. Several rows are seen when an insert matches
    while an earlier inserted one is still there."""
    alive = most = 0
    for mut in mutations:
        step = _moves(mut, m.values) if mut.op == "update" else {"insert": 1, "delete": -1}.get(mut.op, 0)
        alive = 0 if mut.op == "truncate" else max(0, alive + step)
        most = max(most, alive)
    if most > 1:
        columns = ", ".join(c for c in m.columns if c not in m.match) or "COL"
        raise AmbiguousError(
            f"{_describe(schema, table, m.match)} matches {most} rows (matched on row values: no primary key recorded)",
            hint=f"Add --key COL=VALUE for more of its columns ({columns}) to name one row; "
                 f"`flux state history` lists the changes of them all.",
            table=format_table(schema, table),
        )


def _trail(mutations: list[Mutation], values: dict[str, list[Any]]) -> list[Mutation]:
    """Matched on images, one row at a time (`_one_row`): the changes from the last update that
    brought a row to the given values. The changes before it are of other rows (one that held
    them and left, or was deleted), whose writers are not this row's; it is followed no further
    back (README: without a primary key, a row is followed while its images hold the values)."""
    arrivals = [i for i, mut in enumerate(mutations) if _moves(mut, values) > 0]
    return mutations[arrivals[-1]:] if arrivals else mutations


MAX_KEY_HOPS = 16  # how many primary-key changes blame follows back


def _with_earlier_keys(conn: psycopg.Connection, schema: str, table: str, mutations: list[Mutation],
                       names: Names = NO_NAMES, hops: int = MAX_KEY_HOPS) -> list[Mutation]:
    """The current row's changes: when an update brought it to this key from another one, the
    changes it had under that key come first (as `git log --follow` does), back to its insert."""
    arrivals = [i for i, mut in enumerate(mutations) if mut.key_change == "in"]
    if not arrivals or hops == 0:
        return mutations
    arrival = mutations[arrivals[-1]]
    assert arrival.old_row_key is not None
    before = _row_match(conn, schema, table, None, {c: key_arg(v) for c, v in arrival.old_row_key.items()})
    _, earlier = _fetch_row(conn, schema, table, before, None, names)
    at = next((i for i, mut in enumerate(earlier) if (mut.commit_lsn, mut.seq) == (arrival.commit_lsn, arrival.seq)), 0)
    return _with_earlier_keys(conn, schema, table, earlier[:at], names, hops - 1) + mutations[arrivals[-1]:]


def _blame(schema: str, table: str, match: dict[str, str], mutations: list[Mutation], *,
           key: dict[str, Any] | None) -> RowBlame:
    state: dict[str, ColumnBlame] = {}
    deleted_by: Writer | None = None
    moved_to: dict[str, Any] | None = None
    for mut in mutations:
        w = _writer(mut)
        if mut.op == "truncate" and deleted_by is not None:
            continue  # the row was gone already: its delete or move removed it, not this truncate
        if mut.op in ("delete", "truncate") or mut.key_change == "out":
            deleted_by, moved_to = w, mut.row_key if mut.key_change == "out" else None
            if not state and mut.old:  # its first recorded change: the values it had are in the old image
                state = {col: ColumnBlame(col, value, None, True) for col, value in mut.old.items()}
            continue
        image = mut.new or {}
        missing = set(mut.missing_columns or ())
        if mut.op == "insert" or deleted_by is not None:
            state, deleted_by, moved_to = {}, None, None
        changed = set(mut.changed_columns) if mut.changed_columns is not None else None
        next_state: dict[str, ColumnBlame] = {}
        for col, value in image.items():
            before = state.get(col)
            if col in missing:  # unchanged and unknown (TOAST): carried over below when known
                continue
            if mut.op == "insert" or (changed is not None and col in changed):
                next_state[col] = ColumnBlame(col, value, w, True)
            elif changed is not None and _unaccounted(before, mut, col):
                # Unchanged here, yet the row held another value than its history left: a change this
                # history lacks set it (one under a name not followed back, or not recorded).
                next_state[col] = ColumnBlame(col, value, w, False)
            elif before is not None and (changed is not None or before.known and before.value == value):
                next_state[col] = ColumnBlame(col, value, before.set_by, before.certain)
            elif changed is not None and not state:  # unchanged, first seen now: set before capture
                next_state[col] = ColumnBlame(col, value, None, True)
            elif changed is not None:  # unchanged, yet not in the row's earlier image: a column renamed
                # or added since, its value set by an earlier change or by the DDL (not recorded)
                next_state[col] = ColumnBlame(col, value, w, False)
            elif before is not None and before.known:  # old image incomplete, value differs: this update set it
                next_state[col] = ColumnBlame(col, value, w, True)
            else:  # no earlier value and no way to tell whether this update changed it
                next_state[col] = ColumnBlame(col, value, w, False)
        for col in missing:
            if col in state:
                next_state[col] = state[col]
            elif mut.op == "insert" or (changed is not None and col in changed):  # too large to record
                next_state[col] = ColumnBlame(col, None, w, True, known=False)
            else:  # listed though unknown: blame must not drop a column
                next_state[col] = ColumnBlame(col, None, w if state else None, not state, known=False)
        state = next_state
    return RowBlame(
        schema=schema, table=table, match=match, deleted=deleted_by is not None, deleted_by=deleted_by,
        last=_writer(mutations[-1]), columns=tuple(state.values()), moved_to=moved_to, key=key,
    )


def _unaccounted(before: ColumnBlame | None, mut: Mutation, col: str) -> bool:
    """The update's complete old row holds another value of `col` than the row's history left."""
    if before is None or not before.known or not mut.old_complete or mut.old is None or col not in mut.old:
        return False
    old = mut.old[col]
    return _kind(old) != _kind(before.value) or old != before.value


def table_blame(conn: psycopg.Connection, schema: str, table: str, *, limit: int = 20) -> list[RecentChange]:
    """The most recently changed rows of a table, newest first, each with its last writer.

    Walks the log backwards. A truncate ends the walk: every older row was removed by it, so it
    is listed once as the last writer of all of them. A row whose primary key changed is listed
    under its new key only (`moved_from` on the change that moved it, when that is its latest):
    no row has the old key any more, unless a later change of that key put one there. Changes
    recorded under the table's earlier names (with its oid) are walked too, in one order with its own.
    """
    check_limit(limit)
    names = _require_recorded(conn, schema, table)
    catalog = _catalog(conn, schema, table)
    columns = catalog.columns if catalog else ()
    key_columns = (catalog.primary_key if catalog else _recorded_key(conn, schema, table)) or ()
    walks = [_newest_first(conn, schema, table, None)]
    walks += [_newest_first(conn, s, t, names.relid) for s, t in names.earlier]
    seen: set[Any] = set()
    out: list[RecentChange] = []
    for row in heapq.merge(*walks, key=lambda row: (row[-1], row[7]), reverse=True):
        mut = _mutation(row, columns, key_columns)
        if mut.old_row_key is not None:  # older changes of the old key are of this row, now moved
            seen.add(_ident(mut.old_row_key))
        if mut.row_key is not None:
            ident = _ident(mut.row_key)
            if ident in seen:
                continue
            seen.add(ident)
        out.append(RecentChange(row_key=mut.row_key, row=mut.new if mut.new is not None else mut.old, writer=_writer(mut),
                                moved_from=mut.old_row_key))
        if mut.op == "truncate" or len(out) >= limit:
            break
    return out


def _newest_first(conn: psycopg.Connection, schema: str, table: str, relid: int | None) -> Iterator[tuple]:
    """The changes recorded under one name (with oid `relid`, when given), newest first, in batches."""
    after: tuple[str, int] | None = None
    while True:
        rows = conn.execute(
            _recent_query(paged=after is not None, relid=relid is not None),
            {"schema": schema, "table": table, "lsn": after[0] if after else None, "seq": after[1] if after else None,
             "batch": _TABLE_BLAME_BATCH, "relid": relid},
        ).fetchall()
        yield from rows
        if len(rows) < _TABLE_BLAME_BATCH:
            return
        after = (rows[-1][5], rows[-1][7])


def _recent_query(*, paged: bool, relid: bool = False) -> sql.Composed:
    """A batch of a table's mutations, newest first, read backwards through the table hash index;
    each row ends with its commit LSN as a number, to merge the walks of several names by.

    The order names the table's column: a bare `commit_lsn` would be the select list's text
    (`commit_lsn::text`), which sorts 0/1000 before 0/F00 and cannot use the index.
    """
    page = sql.SQL("AND (m.commit_lsn, m.seq) < (%(lsn)s::pg_lsn, %(seq)s)") if paged else sql.SQL("")
    oid = sql.SQL("AND m.relid = %(relid)s") if relid else sql.SQL("")
    return sql.SQL(
        "SELECT {cols}, m.commit_lsn - '0/0'::pg_lsn FROM flux.state_mutations m WHERE {table_is} {oid} {page}"
        " ORDER BY m.commit_lsn DESC, m.seq DESC LIMIT %(batch)s"
    ).format(cols=_MUTATION_COLUMNS, table_is=sql.SQL(_TABLE_IS), oid=oid, page=page)


def _ident(value: Any) -> Any:
    """A recorded key as jsonb compares keys: numbers by value (1, 1.0 and 1.00 are one key, which
    PostgreSQL keeps as written: a numeric key rewritten 2.5 to 2.50 stays the same row), never
    equal to text or a boolean."""
    if isinstance(value, dict):
        return ("object", frozenset((k, _ident(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("array", tuple(map(_ident, value)))
    return (_kind(value), value)  # int and Decimal compare (and hash) by value


# -- request ids -----------------------------------------------------------------------------


def resolve_request_id(conn: psycopg.Connection, prefix: str) -> str:
    """A unique prefix (optionally `req:`-prefixed, as printed) -> the full request id."""
    text = prefix.strip()
    if text.lower().startswith(REQUEST_PREFIX):
        text = text[len(REQUEST_PREFIX):]
    if not text:
        raise ConfigError("Empty request id", hint="Give a request id, or its first characters, as `flux requests` lists them.")
    _require_log(conn)
    found = _request_ids(conn, text)
    if not found and text != text.lower():
        found = _request_ids(conn, text.lower())
    if not found:
        raise NotFoundError(f"No request with id starting {text!r}", hint="Ids are printed as req:XXXXXXXX by `flux state history`.", request_id=text)
    if text in found:
        return text
    if len(found) == 1:
        return found[0]
    count = f"more than {MAX_CANDIDATES}" if len(found) > MAX_CANDIDATES else str(len(found))
    raise AmbiguousError(
        f"Request id {text!r} is ambiguous: it starts {count} request ids: " + ", ".join(found[:MAX_CANDIDATES]),
        hint="Give more characters of the id.", request_id=text,
    )


def _request_ids(conn: psycopg.Connection, prefix: str) -> list[str]:
    # Sources of request ids: the mutation log now; trace_requests joins here when it exists.
    pattern = re.sub(r"([\\%_])", r"\\\1", prefix) + "%"
    rows = conn.execute(
        "SELECT DISTINCT request_id FROM flux.state_mutations WHERE request_id LIKE %s ORDER BY 1 LIMIT %s",
        (pattern, MAX_CANDIDATES + 1),
    ).fetchall()
    ids = [r[0] for r in rows]
    if prefix not in ids and conn.execute(
        "SELECT EXISTS (SELECT 1 FROM flux.state_mutations WHERE request_id = %s)", (prefix,)
    ).fetchone()[0]:
        ids.append(prefix)  # an exact id wins even when more than MAX_CANDIDATES ids extend it
    return ids
