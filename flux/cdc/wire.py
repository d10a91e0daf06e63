"""The streaming-replication wire format around pgoutput: CopyData frames and LSNs.

Pure functions, no I/O. `parse_frame` turns one CopyData payload from the server into an
`XLogData` or a `Keepalive`; `standby_status` builds the client's 'r' reply. The pgoutput
payload inside XLogData is decoded by `flux.cdc.pgoutput`, not here.

Timestamps on this wire count microseconds since 2000-01-01 00:00:00 UTC.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from flux.errors import DecodeError

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
_PG_EPOCH_UNIX_US = 946_684_800_000_000

_XLOGDATA_HEADER = struct.Struct("!QQq")  # data start, wal end, send time
_KEEPALIVE = struct.Struct("!QqB")  # wal end, send time, reply requested
_STATUS = struct.Struct("!cQQQqB")
_U64 = struct.Struct("!Q")


@dataclass(frozen=True, slots=True)
class XLogData:
    data_start: int
    wal_end: int
    send_time: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int
    send_time: int
    reply_requested: bool


def parse_frame(frame: bytes | memoryview) -> XLogData | Keepalive:
    view = memoryview(frame)
    if not view:
        raise DecodeError("Empty replication frame")
    kind = view[0]
    if kind == 0x77:  # 'w'
        if len(view) < 1 + _XLOGDATA_HEADER.size:
            raise DecodeError("Truncated XLogData header", length=len(view))
        start, end, sent = _XLOGDATA_HEADER.unpack_from(view, 1)
        return XLogData(start, end, sent, view[1 + _XLOGDATA_HEADER.size :])
    if kind == 0x6B:  # 'k'
        if len(view) < 1 + _KEEPALIVE.size:
            raise DecodeError("Truncated primary keepalive message", length=len(view))
        end, sent, reply = _KEEPALIVE.unpack_from(view, 1)
        return Keepalive(end, sent, bool(reply))
    raise DecodeError(f"Unknown replication frame type {chr(kind)!r}", first_byte=kind)


def xlogdata(frame: memoryview) -> tuple[int, memoryview] | None:
    """(data start LSN, pgoutput payload) of an XLogData frame; None for any other frame.

    The engine's hot path: no object per frame. `parse_frame` is the general form.
    """
    if not frame or frame[0] != 0x77:
        return None
    if len(frame) < 1 + _XLOGDATA_HEADER.size:
        raise DecodeError("Truncated XLogData header", length=len(frame))
    return _U64.unpack_from(frame, 1)[0], frame[1 + _XLOGDATA_HEADER.size :]


def standby_status(*, written: int, flushed: int, applied: int, now_us: int, reply_requested: bool = False) -> bytes:
    """Build a Standby Status Update ('r') reporting positions as the next byte to be processed."""
    return _STATUS.pack(b"r", written, flushed, applied, now_us, 1 if reply_requested else 0)


def pg_now_us(unix_seconds: float) -> int:
    return int(unix_seconds * 1_000_000) - _PG_EPOCH_UNIX_US


def pg_time_to_datetime(us: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=us)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    try:
        high, low = text.split("/")
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise DecodeError(f"Not an LSN: {text!r}", hint="An LSN looks like 16/B374D848.") from None
