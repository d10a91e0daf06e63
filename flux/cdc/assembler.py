"""Transaction assembly: decoded pgoutput messages in, `flux.state_mutations` rows out.

`Assembler` tracks relations and the open transaction, assigns each change its position
(`seq`) and its request context, and builds typed JSON row images. It does no I/O of its own:
what it needs from the catalog (primary keys, non-built-in types) comes through the small
`Catalog` protocol, and rows go to whoever calls it.

The request context contract (public, see README):
- a transactional logical message with prefix `flux` carries a JSON object with `request_id`;
- each change gets the context of the most recent `flux` message before it in its transaction;
  changes before the first message get the first one (reported as a `Backfill`);
- malformed content never drops a change: request_id is NULL and the raw text is kept;
- changes with no message at all are recorded with request_id NULL (xid identifies them).

It does not deduplicate or decide what to skip on restart: the engine does, from the
commit LSN in BEGIN.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple, Protocol, TypeAlias

import orjson

from flux.cdc import pgoutput as pg
from flux.cdc.values import Convert, TypeCatalog, jsonb_refuses
from flux.cdc.wire import format_lsn, pg_time_to_datetime
from flux.errors import StreamError

CONTEXT_PREFIX = "flux"
MAX_RAW_CONTEXT = 4096
# An image the server cannot store as jsonb would fail its whole sink transaction on every retry.
# jsonb holds at most 256 MiB per value, and can be 6 times the JSON text's size (`0,` is 2 bytes
# of text and 12 of jsonb: a numeric and its entry); parsing one also builds an in-memory tree of
# 32 bytes per element, which must stay under PostgreSQL's 1 GiB allocation limit. 32 MiB of JSON
# stays under both in the worst case (tested: 16 million zeros). Columns that do not fit are
# left out of both images and listed in missing_columns, largest first, with a warning.
MAX_IMAGE_BYTES = 32 * 1024 * 1024

log = logging.getLogger("flux.cdc")
_IDENTITY_NAMES = {"d": "DEFAULT", "n": "NOTHING", "i": "USING INDEX"}
TupleValueNotToast: TypeAlias = str | bytes | None  # a pgoutput tuple value other than UNCHANGED_TOAST


class Catalog(Protocol):
    """What the assembler needs to know that the stream does not say."""

    def primary_key(self, relation_id: int) -> tuple[str, ...] | None:
        """Primary-key column names of a relation, in key order; None if it has none (or is gone)."""

    def learn_types(self, types: TypeCatalog, type_oids: list[int]) -> None:
        """Teach `types` the given non-built-in type OIDs."""

    def is_partitioned(self, relation_id: int) -> bool:
        """Whether a relation is a partitioned table (False for a plain one, or one that is gone)."""


@dataclass(slots=True)
class MutationRow:
    """One row of flux.state_mutations, in COPY column order (see `COLUMNS`)."""

    request_id: str | None
    context: str | None  # JSON text
    schema_name: str
    table_name: str
    op: str
    row_key: str | None
    old: str | None
    new: str | None
    old_complete: bool | None
    missing_columns: list[str] | None
    changed_columns: Sequence[str] | None
    xid: int
    commit_lsn: str
    commit_time: datetime
    seq: int
    old_row_key: str | None = None  # an UPDATE that changed the primary key: the old one (row_key is the new)
    relid: int | None = None  # the table's oid, from its Relation message (the root's, for a partition)

    def as_tuple(self) -> tuple:
        return (
            self.request_id, self.context, self.schema_name, self.table_name, self.op, self.row_key,
            self.old, self.new, self.old_complete, self.missing_columns, self.changed_columns,
            self.xid, self.commit_lsn, self.commit_time, self.seq, self.old_row_key, self.relid,
        )


COLUMNS = (
    "request_id", "context", "schema_name", "table_name", "op", "row_key", "old", "new", "old_complete",
    "missing_columns", "changed_columns", "xid", "commit_lsn", "commit_time", "seq", "old_row_key", "relid",
)


@dataclass(frozen=True, slots=True)
class Backfill:
    """Changes seq < `before_seq` of the transaction at `commit_lsn` take this context."""

    commit_lsn: str
    before_seq: int
    request_id: str | None
    context: str


class TransactionEnd(NamedTuple):  # one per source transaction: a tuple is cheapest to build
    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    changes: int


@dataclass(slots=True)
class _Transaction:
    xid: int
    commit_lsn: int
    commit_lsn_text: str
    commit_time: datetime
    seq: int = 0
    request_id: str | None = None
    context: str | None = None
    has_context: bool = False


@dataclass(slots=True)
class _Table:
    relation: pg.Relation
    names: tuple[str, ...]
    converters: tuple[Convert, ...]
    key_indexes: tuple[int, ...]  # replica identity key columns (pgoutput flags)
    full_identity: bool
    partitioned: bool  # its 'O' old tuples may be key-only rows (see Assembler._old_is_whole)
    pk_resolved: bool = False
    pk_names: tuple[str, ...] = field(default_factory=tuple)
    pk_positions: tuple[int, ...] | None = None  # of pk_names, in the tuples (resolved with them)
    other_positions: tuple[int, ...] | None = None  # every other column's


_NUL_ESCAPE = re.compile(r"\\(u0000|.)", re.S)  # each escape in turn: `\\u0000` is not a NUL


def parse_context(content: bytes) -> tuple[str | None, str]:
    """(request_id, context JSON text) from a `flux` message; malformed content is kept raw.

    Valid content is kept as sent, not re-encoded: orjson reads integers beyond 64 bits and
    long decimals as floats, while jsonb keeps them exact. Content jsonb would refuse (U+0000,
    a number beyond numeric's range) is re-encoded with U+0000 as U+FFFD instead: storing it
    as sent would stop the sink for good.
    """
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        request_id = value.get("request_id")
        if isinstance(request_id, str) and request_id:
            text = content.decode()  # orjson accepted it: valid UTF-8
            if jsonb_refuses(text):
                # U+0000 escapes as U+FFFD in the text as sent, which keeps its numbers exact;
                # re-encoded only when that is not enough (lone surrogates, huge numbers).
                text = _NUL_ESCAPE.sub(_no_nul, text)
                if jsonb_refuses(text):
                    text = _NUL_ESCAPE.sub(_no_nul, orjson.dumps(value).decode())
                request_id = request_id.replace("\x00", "\ufffd")
            return request_id, text
        problem = "request_id missing or not a non-empty string"
    else:
        problem = "content is not a JSON object"
    raw = content[:MAX_RAW_CONTEXT].decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    return None, orjson.dumps({"malformed": problem, "raw": raw}).decode()


def _no_nul(escape: re.Match) -> str:
    return "\\ufffd" if escape.group(1) == "u0000" else escape.group(0)


class Assembler:
    """Turns one replication session's messages into rows. Create a new one per session."""

    def __init__(self, *, catalog: Catalog, types: TypeCatalog | None = None) -> None:
        self.catalog = catalog
        self.types = types or TypeCatalog()
        self._tables: dict[int, _Table] = {}
        self._txn: _Transaction | None = None

    @property
    def in_transaction(self) -> bool:
        return self._txn is not None

    def begin(self, msg: pg.Begin) -> None:
        if self._txn is not None:
            raise StreamError("BEGIN inside an open transaction", xid=msg.xid, lsn=format_lsn(msg.final_lsn))
        self._txn = _Transaction(
            xid=msg.xid,
            commit_lsn=msg.final_lsn,
            commit_lsn_text=format_lsn(msg.final_lsn),
            commit_time=pg_time_to_datetime(msg.commit_time),
        )

    def abandon(self) -> None:
        """Forget the open transaction (the engine skips it, or the connection dropped mid-way)."""
        self._txn = None

    def commit(self, msg: pg.Commit) -> TransactionEnd:
        txn = self._require("COMMIT", msg.commit_lsn)
        self._txn = None
        return TransactionEnd(
            xid=txn.xid, commit_lsn=msg.commit_lsn, end_lsn=msg.end_lsn, commit_time=txn.commit_time, changes=txn.seq
        )

    def relation(self, msg: pg.Relation) -> None:
        previous = self._tables.get(msg.relation_id)
        if msg.replica_identity != "f" and (previous is None or previous.full_identity):
            # Said once per change of identity (a Relation comes again after any DDL): `flux cdc
            # status` says it too, but only to whoever asks.
            log.warning("%s.%s is REPLICA IDENTITY %s, not FULL: the old rows of its updates and deletes are recorded "
                        "by key only (old_complete false) until it is FULL again (`flux attach` sets it)",
                        msg.namespace, msg.name, _IDENTITY_NAMES.get(msg.replica_identity, msg.replica_identity))
        unknown = [c.type_oid for c in msg.columns if self.types.converter(c.type_oid) is None]
        if unknown:
            self.catalog.learn_types(self.types, unknown)
        self._tables[msg.relation_id] = _Table(
            relation=msg,
            names=tuple(c.name for c in msg.columns),
            converters=tuple(self.types.converter_or_text(c.type_oid) for c in msg.columns),
            key_indexes=tuple(i for i, c in enumerate(msg.columns) if c.is_key),
            full_identity=msg.replica_identity == "f",
            partitioned=msg.replica_identity == "f" and self.catalog.is_partitioned(msg.relation_id),
        )

    def message(self, msg: pg.LogicalMessage) -> Backfill | None:
        """Apply a logical message; returns a Backfill when earlier changes take its context."""
        if msg.prefix != CONTEXT_PREFIX or not msg.transactional or self._txn is None:
            return None
        txn = self._txn
        txn.request_id, txn.context = parse_context(msg.content)
        first = not txn.has_context
        txn.has_context = True
        if first and txn.seq > 0:
            return Backfill(txn.commit_lsn_text, txn.seq, txn.request_id, txn.context)
        return None

    def insert(self, msg: pg.Insert) -> MutationRow:
        txn = self._txn or self._require("INSERT", 0)
        table = self._table(msg.relation_id)
        new, missing = self._image(table, msg.new)
        changed = table.names if missing is None else tuple(new)
        return self._row(txn, table, "insert", None, new, None, missing, changed, new)

    def update(self, msg: pg.Update) -> MutationRow:
        txn = self._txn or self._require("UPDATE", 0)
        table = self._table(msg.relation_id)
        # No old tuple at all means the key did not change; otherwise its text says (as sent: a
        # converted numeric compares by identity).
        moved = msg.old is not None and self._key_moved(table, msg.old, msg.new)
        if msg.old_kind == "O" and self._old_is_whole(table, msg.old):
            old, new, changed, missing = self._update_images(table, msg.old, msg.new)
            return self._row(txn, table, "update", old, new, True, missing, changed, new, moved)
        new, missing = self._image(table, msg.new)
        # Only the key of the old row is known.
        old = self._key_image(table, msg.old if msg.old is not None else msg.new)
        return self._row(txn, table, "update", old, new, False, missing, None, new, moved)

    def delete(self, msg: pg.Delete) -> MutationRow:
        txn = self._txn or self._require("DELETE", 0)
        table = self._table(msg.relation_id)
        if msg.old_kind == "O" and self._old_is_whole(table, msg.old):
            old, _ = self._image(table, msg.old)
            return self._row(txn, table, "delete", old, None, True, None, tuple(old), old)
        old = self._key_image(table, msg.old)
        return self._row(txn, table, "delete", old, None, False, None, None, old)

    def truncate(self, msg: pg.Truncate) -> list[MutationRow]:
        txn = self._require("TRUNCATE", 0)
        rows = []
        for relation_id in msg.relation_ids:
            table = self._table(relation_id)
            rows.append(self._row(txn, table, "truncate", None, None, None, None, None, None))
        return rows

    # -- images -------------------------------------------------------------------------

    def _image(self, table: _Table, values: tuple) -> tuple[dict[str, Any], list[str] | None]:
        """(image, missing columns) of one tuple on its own: an unchanged TOASTed value is missing."""
        image: dict[str, Any] = {}
        missing: list[str] | None = None
        for name, convert, value in zip(table.names, table.converters, values):
            if value.__class__ is str:  # the common case first: this loop runs for every column
                image[name] = convert(value)
            elif value is pg.UNCHANGED_TOAST:
                missing = (missing or []) + [name]
            else:
                image[name] = _odd_value(value, convert)
        return image, missing

    def _update_images(
        self, table: _Table, old_values: tuple, new_values: tuple
    ) -> tuple[dict[str, Any], dict[str, Any], tuple[str, ...], list[str] | None]:
        """(old image, new image, changed columns, missing columns) of an update with its whole old row.

        One pass over both tuples: a column whose text did not change is converted once. A
        column is changed when the new tuple carries a value that differs from the old one.
        """
        old: dict[str, Any] = {}
        new: dict[str, Any] = {}
        changed: list[str] = []
        missing: list[str] | None = None
        for name, convert, a, b in zip(table.names, table.converters, old_values, new_values):
            if b.__class__ is str:
                value = new[name] = convert(b)
                if a == b:
                    old[name] = value
                    continue
                changed.append(name)
            elif b is pg.UNCHANGED_TOAST:  # not sent: the old row has it
                if a is pg.UNCHANGED_TOAST:
                    missing = (missing or []) + [name]
                    continue
                new[name] = old[name] = convert(a) if a.__class__ is str else _odd_value(a, convert)
                continue
            else:
                new[name] = _odd_value(b, convert)
                if a == b:
                    old[name] = new[name]
                    continue
                changed.append(name)
            if a.__class__ is str:
                old[name] = convert(a)
            elif a is not pg.UNCHANGED_TOAST:
                old[name] = _odd_value(a, convert)
        return old, new, tuple(changed), missing

    def _old_is_whole(self, table: _Table, old: tuple) -> bool:
        """Whether an 'O' old tuple is the whole old row.

        For a plain table, 'O' means the table was REPLICA IDENTITY FULL when the change was made
        (the Relation message is as of the change). A partitioned table publishes under its root,
        and pgoutput sends 'O' when the root is FULL, even for a partition that logged only its key
        (its own identity not FULL at the time, e.g. one created since attach, before Flux set it):
        the other columns then come as NULLs. The catalog says only how partitions are now, so the
        tuple itself decides: a non-key value that is not NULL can only come from a whole row. A
        whole row whose non-key columns are all NULL is taken for a key-only one (recorded as
        incomplete, never with NULLs it did not have).
        """
        if not table.partitioned:
            return True
        if table.other_positions is None:
            self._primary_key(table)
        for i in table.other_positions:  # type: ignore[union-attr]  # a loop, not any(): this runs per row
            if old[i] is not None:
                return True
        return False

    def _key_moved(self, table: _Table, old: tuple, new: tuple) -> bool:
        """Whether an update's tuples differ in a primary-key column. A key column not sent again
        is unchanged; one the old tuple lacks (its identity logs another index) is unknown."""
        if table.pk_positions is None:
            self._primary_key(table)
        for i in table.pk_positions:  # type: ignore[union-attr]  # a loop, not any(): this runs per row
            before, after = old[i], new[i]
            if before != after and before is not None and after is not pg.UNCHANGED_TOAST:
                return True
        return False

    def _key_image(self, table: _Table, values: tuple) -> dict[str, Any]:
        """Only the replica-identity key columns: what pgoutput sends when identity is not FULL.

        A relation that says FULL flags every column as key, yet can still send an update
        without an old tuple: a partition whose own identity is not FULL, published through
        its FULL root. Its old row is then known by the primary key only.
        """
        image: dict[str, Any] = {}
        indexes = table.key_indexes
        if table.full_identity:
            indexes = tuple(table.names.index(name) for name in self._primary_key(table))
        for i in indexes:
            value = values[i]
            image[table.names[i]] = None if value is pg.UNCHANGED_TOAST else _odd_value(value, table.converters[i])
        return image

    def _row(
        self,
        txn: _Transaction,
        table: _Table,
        op: str,
        old: dict | None,
        new: dict | None,
        old_complete: bool | None,
        missing: list[str] | None,
        changed: Sequence[str] | None,
        key_source: dict | None,
        key_moved: bool = False,
    ) -> MutationRow:
        row_key = old_row_key = None
        if key_source is not None:
            pk = table.pk_names if table.pk_resolved else self._primary_key(table)
            if pk:
                try:
                    row_key = _dumps({name: key_source[name] for name in pk})
                except KeyError:  # a key column is not in this image
                    row_key = None
                if key_moved and row_key is not None and old is not None:
                    old_row_key = _old_key(old, pk, row_key)
        seq = txn.seq
        txn.seq = seq + 1
        rel = table.relation
        old_json = None if old is None else orjson.dumps(old)
        new_json = None if new is None else orjson.dumps(new)
        if len(old_json or b"") > MAX_IMAGE_BYTES or len(new_json or b"") > MAX_IMAGE_BYTES:
            old_json, new_json, missing = _fit_images(old, new, missing, f"{rel.namespace}.{rel.name}", row_key)
            if row_key is not None and len(row_key) > MAX_IMAGE_BYTES:
                row_key = None
        return MutationRow(
            txn.request_id, txn.context, rel.namespace, rel.name, op, row_key,
            None if old_json is None else old_json.decode(), None if new_json is None else new_json.decode(),
            old_complete, missing, changed, txn.xid, txn.commit_lsn_text, txn.commit_time, seq, old_row_key,
            rel.relation_id,
        )  # fmt: skip

    def _primary_key(self, table: _Table) -> tuple[str, ...]:
        if not table.pk_resolved:
            names = self.catalog.primary_key(table.relation.relation_id)
            # The catalog is read now, not as of the change: if the key no longer matches the
            # stream's columns (dropped table, DDL since), row_key stays NULL rather than wrong.
            table.pk_names = tuple(n for n in names if n in table.names) if names else ()
            if names and len(table.pk_names) != len(names):
                table.pk_names = ()
            table.pk_positions = tuple(table.names.index(name) for name in table.pk_names)
            table.other_positions = tuple(i for i in range(len(table.names)) if i not in table.pk_positions)
            table.pk_resolved = True
        return table.pk_names

    def _table(self, relation_id: int) -> _Table:
        table = self._tables.get(relation_id)
        if table is None:
            raise StreamError(
                "A change refers to a relation the stream never described",
                hint="This breaks pgoutput's ordering guarantee; restart the engine to resync.",
                relation_id=relation_id,
            )
        return table

    def _require(self, what: str, lsn: int) -> _Transaction:
        if self._txn is None:
            raise StreamError(f"{what} outside a transaction", lsn=format_lsn(lsn) if lsn else None)
        return self._txn


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _old_key(old: dict, pk: tuple[str, ...], row_key: str) -> str | None:
    """The old primary key of an update whose key text changed, or None when it is the same key
    (numeric 1.0 and 1.00 are one key value, and one jsonb)."""
    key = {name: old.get(name) for name in pk}
    if None in key.values():  # a key column the old row did not carry
        return None
    text = _dumps(key)
    exact = functools.partial(json.loads, parse_float=Decimal)
    return None if exact(text) == exact(row_key) else text


def _fit_images(
    old: dict | None, new: dict | None, missing: list[str] | None, table: str, row_key: str | None
) -> tuple[bytes | None, bytes | None, list[str] | None]:
    """The images without their largest columns, until each fits in MAX_IMAGE_BYTES (see there)."""
    sizes: dict[str, int] = {}
    for image in (old, new):
        for name, value in (image or {}).items():
            sizes[name] = max(sizes.get(name, 0), len(orjson.dumps(value)))
    dropped: list[str] = []
    while True:
        old_json = None if old is None else orjson.dumps(old)
        new_json = None if new is None else orjson.dumps(new)
        if len(old_json or b"") <= MAX_IMAGE_BYTES and len(new_json or b"") <= MAX_IMAGE_BYTES:
            break
        name = max((n for n in sizes if n not in dropped), key=sizes.__getitem__)
        dropped.append(name)
        old = None if old is None else {k: v for k, v in old.items() if k != name}
        new = None if new is None else {k: v for k, v in new.items() if k != name}
    for name in dropped:
        log.warning("%s row %s: column %s (%d bytes as JSON) is too large for a jsonb image; "
                    "it is left out of the images and listed in missing_columns",
                    table, row_key if row_key is None or len(row_key) <= 200 else row_key[:200] + "…", name, sizes[name])
    return old_json, new_json, (missing or []) + dropped


def _odd_value(value: TupleValueNotToast, convert: Convert) -> Any:
    """A value that is not the usual text: NULL, or binary (never requested; kept visible if it comes)."""
    if value is None:
        return None
    if value.__class__ is bytes:
        return "\\x" + value.hex()
    return convert(value)
