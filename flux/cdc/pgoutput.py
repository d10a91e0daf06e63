"""Decode one pgoutput message (protocol version 1) into a small immutable object.

`decode(payload, lsn=...)` takes the bytes of one pgoutput message -- the payload of one
XLogData frame, or one `data` row of `pg_logical_slot_peek_binary_changes` -- and returns a
`Begin`, `Commit`, `Origin`, `Relation`, `Type`, `Insert`, `Update`, `Delete`, `Truncate` or
`LogicalMessage`. Pure: no I/O, no state between calls.

What it guarantees:
- every byte of the payload is accounted for; an unknown message type, an unknown tuple or
  sub-message kind, a truncated message, trailing bytes or invalid UTF-8 raise `DecodeError`
  naming the LSN and the message type. Nothing is skipped.
- integers keep their wire meaning: xids, relation ids and type OIDs are unsigned 32-bit, LSNs
  unsigned 64-bit, timestamps (microseconds since 2000-01-01 UTC, left raw) and type modifiers
  signed.
- tuple values come back as `str` (text, kind 't'), `bytes` (binary, kind 'b'), `None` (NULL,
  kind 'n') or `UNCHANGED_TOAST` (kind 'u': a TOASTed value the update did not change and the
  server did not send).

What it does not do -- the caller does:
- track relations: a change carries only a relation id; pairing it with the last `Relation`
  for that id, and mapping type OIDs to Python values, happen elsewhere;
- track transactions: it does not check that changes sit between `Begin` and `Commit`;
- protocol version 2 and later (streamed transactions 'S'/'E'/'c'/'A', two-phase messages):
  those type bytes are unknown here and raise `DecodeError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from collections.abc import Callable
from typing import Final, NamedTuple, TypeAlias

from flux.cdc.wire import format_lsn
from flux.errors import DecodeError

__all__ = [
    "UNCHANGED_TOAST",
    "Begin",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Origin",
    "PgoutputMessage",
    "Relation",
    "Truncate",
    "TupleValue",
    "Type",
    "UnchangedToast",
    "Update",
    "decode",
]


class UnchangedToast:
    """Type of `UNCHANGED_TOAST`: a column value the server did not send because it did not change."""

    __slots__ = ()
    _instance: UnchangedToast | None = None

    def __new__(cls) -> UnchangedToast:
        if cls._instance is None:
            cls._instance = object.__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:  # copy and pickle give back the singleton
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = UnchangedToast()

TupleValue: TypeAlias = str | bytes | None | UnchangedToast


# The five messages of every transaction are NamedTuples: the engine makes one per message, and
# a tuple is built about three times as fast as a frozen dataclass. Like any tuple, each compares
# equal to a plain tuple of the same values.


class Begin(NamedTuple):
    final_lsn: int
    commit_time: int  # microseconds since 2000-01-01 UTC
    xid: int


class Commit(NamedTuple):
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int  # microseconds since 2000-01-01 UTC


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int  # of the commit on the origin server
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    is_key: bool
    name: str
    type_oid: int
    type_modifier: int  # atttypmod; -1 when the type has none


@dataclass(frozen=True, slots=True)
class Relation:
    relation_id: int
    namespace: str  # empty for pg_catalog
    name: str
    replica_identity: str  # relreplident: 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    type_oid: int
    namespace: str  # empty for pg_catalog
    name: str


class Insert(NamedTuple):
    relation_id: int
    new: tuple[TupleValue, ...]


class Update(NamedTuple):
    relation_id: int
    old_kind: str | None  # 'K' replica-identity key, 'O' whole old row (REPLICA IDENTITY FULL), None
    old: tuple[TupleValue, ...] | None
    new: tuple[TupleValue, ...]


class Delete(NamedTuple):
    relation_id: int
    old_kind: str  # 'K' or 'O'
    old: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Truncate:
    options: int
    relation_ids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & 2)


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgoutputMessage: TypeAlias = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)

_BEGIN = struct.Struct("!QqI")  # final lsn, commit time, xid
_COMMIT = struct.Struct("!BQQq")  # flags, commit lsn, end lsn, commit time
_U64 = struct.Struct("!Q")
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_U32_U8 = struct.Struct("!IB")  # truncate: relation count, options
_COLUMN_TAIL = struct.Struct("!Ii")  # type oid, type modifier
_MESSAGE_HEAD = struct.Struct("!BQ")  # flags, lsn

_NAMES = {
    "B": "Begin", "C": "Commit", "O": "Origin", "R": "Relation", "Y": "Type", "I": "Insert",
    "U": "Update", "D": "Delete", "T": "Truncate", "M": "Message",
}  # fmt: skip
_REPLICA_IDENTITIES = frozenset("dnfi")
_PROTOCOL_HINT = (
    "Flux reads pgoutput with proto_version '1' and streaming off; this message type does not "
    "exist there. Check the options the replication stream was started with."
)


class _Malformed(Exception):
    """Raised inside the decoders; `decode` turns it into a DecodeError with the LSN attached."""

    def __init__(self, reason: str, offset: int) -> None:
        self.reason = reason
        self.offset = offset


def _string(data: bytes, pos: int) -> tuple[str, int]:
    end = data.find(b"\0", pos)
    if end < 0:
        raise _Malformed("truncated: string has no terminating NUL", pos)
    return data[pos:end].decode(), end + 1


def _tuple(data: bytes, pos: int) -> tuple[tuple[TupleValue, ...], int]:
    """Read TupleData at `pos`: Int16 column count, then per column a kind byte and maybe a value."""
    (count,) = _U16.unpack_from(data, pos)
    pos += 2
    size = len(data)
    unpack_u32 = _U32.unpack_from
    values: list[TupleValue] = []
    append = values.append
    for _ in range(count):
        kind = data[pos]
        if kind == 0x74:  # 't' text
            (length,) = unpack_u32(data, pos + 1)
            start = pos + 5
            pos = start + length
            if pos > size:
                raise _Malformed(f"truncated: text value of {length} bytes", start)
            append(data[start:pos].decode())
        elif kind == 0x6E:  # 'n' NULL
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u' unchanged TOAST
            append(UNCHANGED_TOAST)
            pos += 1
        elif kind == 0x62:  # 'b' binary
            (length,) = unpack_u32(data, pos + 1)
            start = pos + 5
            pos = start + length
            if pos > size:
                raise _Malformed(f"truncated: binary value of {length} bytes", start)
            append(data[start:pos])
        else:
            raise _Malformed(f"unknown tuple column kind {_show(kind)} in column {len(values) + 1}", pos)
    return tuple(values), pos


def _end(data: bytes, pos: int) -> None:
    if pos != len(data):
        if pos > len(data):
            raise _Malformed("truncated", len(data))
        raise _Malformed(f"{len(data) - pos} trailing bytes", pos)


def _begin(data: bytes) -> Begin:
    _end(data, 1 + _BEGIN.size)
    return Begin(*_BEGIN.unpack_from(data, 1))


def _commit(data: bytes) -> Commit:
    _end(data, 1 + _COMMIT.size)
    return Commit(*_COMMIT.unpack_from(data, 1))


def _origin(data: bytes) -> Origin:
    (commit_lsn,) = _U64.unpack_from(data, 1)
    name, pos = _string(data, 9)
    _end(data, pos)
    return Origin(commit_lsn, name)


def _relation(data: bytes) -> Relation:
    (relation_id,) = _U32.unpack_from(data, 1)
    namespace, pos = _string(data, 5)
    name, pos = _string(data, pos)
    identity = chr(data[pos])
    if identity not in _REPLICA_IDENTITIES:
        raise _Malformed(f"unknown replica identity {identity!r}", pos)
    (count,) = _U16.unpack_from(data, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        flags = data[pos]
        column_name, pos = _string(data, pos + 1)
        type_oid, type_modifier = _COLUMN_TAIL.unpack_from(data, pos)
        pos += 8
        columns.append(Column(bool(flags & 1), column_name, type_oid, type_modifier))
    _end(data, pos)
    return Relation(relation_id, namespace, name, identity, tuple(columns))


def _type(data: bytes) -> Type:
    (type_oid,) = _U32.unpack_from(data, 1)
    namespace, pos = _string(data, 5)
    name, pos = _string(data, pos)
    _end(data, pos)
    return Type(type_oid, namespace, name)


def _insert(data: bytes) -> Insert:
    (relation_id,) = _U32.unpack_from(data, 1)
    if data[5] != 0x4E:  # 'N'
        raise _Malformed(f"expected new tuple 'N', got {_show(data[5])}", 5)
    new, pos = _tuple(data, 6)
    _end(data, pos)
    return Insert(relation_id, new)


def _update(data: bytes) -> Update:
    (relation_id,) = _U32.unpack_from(data, 1)
    kind = data[5]
    old_kind = old = None
    pos = 6
    if kind == 0x4B or kind == 0x4F:  # 'K' key, 'O' old row
        old_kind = chr(kind)
        old, pos = _tuple(data, 6)
        kind = data[pos]
        pos += 1
    if kind != 0x4E:  # 'N'
        raise _Malformed(f"expected 'K', 'O' or new tuple 'N', got {_show(kind)}", pos - 1)
    new, pos = _tuple(data, pos)
    _end(data, pos)
    return Update(relation_id, old_kind, old, new)


def _delete(data: bytes) -> Delete:
    (relation_id,) = _U32.unpack_from(data, 1)
    kind = data[5]
    if kind != 0x4B and kind != 0x4F:
        raise _Malformed(f"expected old tuple 'K' or 'O', got {_show(kind)}", 5)
    old, pos = _tuple(data, 6)
    _end(data, pos)
    return Delete(relation_id, chr(kind), old)


def _truncate(data: bytes) -> Truncate:
    count, options = _U32_U8.unpack_from(data, 1)
    _end(data, 6 + 4 * count)
    return Truncate(options, struct.unpack_from(f"!{count}I", data, 6))


def _message(data: bytes) -> LogicalMessage:
    flags, lsn = _MESSAGE_HEAD.unpack_from(data, 1)
    prefix, pos = _string(data, 10)
    (length,) = _U32.unpack_from(data, pos)
    pos += 4
    _end(data, pos + length)
    return LogicalMessage(bool(flags & 1), lsn, prefix, data[pos:])


_DECODERS: dict[int, Callable[[bytes], PgoutputMessage]] = {
    0x42: _begin, 0x43: _commit, 0x4F: _origin, 0x52: _relation, 0x59: _type, 0x49: _insert,
    0x55: _update, 0x44: _delete, 0x54: _truncate, 0x4D: _message,
}  # fmt: skip


def _show(byte: int) -> str:
    return repr(chr(byte)) if 0x20 < byte < 0x7F else f"0x{byte:02x}"


def decode(payload: bytes | memoryview, *, lsn: int = 0) -> PgoutputMessage:
    """Decode one pgoutput v1 message. `lsn` (the XLogData start) only labels errors."""
    # One copy up front: bytes.find locates NUL terminators and bytes slices decode faster
    # than memoryview slices, which more than pays for the copy.
    data = payload if type(payload) is bytes else bytes(payload)
    if not data:
        raise DecodeError("Empty pgoutput message", lsn=format_lsn(lsn))
    decoder = _DECODERS.get(data[0])
    if decoder is None:
        raise DecodeError(
            f"Unknown pgoutput message type {_show(data[0])}",
            hint=_PROTOCOL_HINT,
            lsn=format_lsn(lsn),
            message_type=_show(data[0]),
            length=len(data),
        )
    offset: int | None
    try:
        return decoder(data)
    except _Malformed as exc:
        reason, offset = exc.reason, exc.offset
    except (struct.error, IndexError):  # a fixed-size field ran past the end
        reason, offset = "truncated", len(data)
    except UnicodeDecodeError as exc:  # exc.start is relative to the value, not the message
        reason, offset = f"invalid UTF-8 ({exc.reason})", None
    name = _NAMES[chr(data[0])]
    raise DecodeError(
        f"Cannot decode pgoutput {name} message: {reason}",
        hint="The message is malformed; Flux stops rather than lose a change. Report it with the LSN.",
        lsn=format_lsn(lsn),
        message_type=name,
        offset=offset,
        length=len(data),
    )
