"""Trace rows (`flux.trace_requests`): writing them in batches, finding and explaining them.

The gateway writes one `TraceRecord` per request through `insert_encoded_traces_async`; the CLI
reads them back with `get_trace`, `list_traces` and `find_request` (which `flux.store.why` builds
on). Every function here takes a psycopg connection and returns frozen dataclasses; rendering is
the CLI's job.

How a trace is found: by its request id or a unique prefix of it (at least `MIN_PREFIX`
characters, unless it is a whole id; optionally written `req:...` as `flux state` prints it). The primary key is
`COLLATE "C"`, so the prefix `LIKE` is a range scan of it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from flux.errors import AmbiguousError, ConfigError, NotFoundError
from flux.project import MAX_DURATION
from flux.store import queries, retention
from flux.store.schema import SCHEMA_VERSION, schema_version, version_mismatch

MIN_PREFIX = 4
MAX_CANDIDATES = queries.MAX_CANDIDATES
STATUS_FILTERS = ("1xx", "2xx", "3xx", "4xx", "5xx", "error")  # or an exact code such as "500"
_NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")  # \u0000 not itself escaped (\\u0000 is text)


# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One row of `flux.trace_requests`; the jsonb columns as Python objects."""

    id: str  # the request_id
    tenant: str | None
    function: str | None
    method: str
    path: str
    status: int
    duration_ms: float
    started_at: datetime
    error: str | None
    spans: list[dict[str, Any]]
    request: dict[str, Any]
    response: dict[str, Any]
    recording: dict[str, Any] | None = None
    code_version: str | None = None
    git_commit: str | None = None
    replay_of: str | None = None
    recorded_at: datetime | None = None  # set by the database; ignored on insert


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """A trace without its payloads, as `flux requests` lists them."""

    id: str
    started_at: datetime
    tenant: str | None
    function: str | None
    method: str
    path: str
    status: int
    duration_ms: float
    error: str | None


# -- writing ---------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _std_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return _json_default(value)


def _dumps(value: Any) -> bytes:
    """JSON for a jsonb column. jsonb refuses NUL in strings (SQLSTATE 22P05), which would fail
    the whole batch on every retry; a NUL a client sent is stored as U+FFFD instead."""
    try:
        data = orjson.dumps(value, default=_json_default)
    except TypeError:  # an integer past 64 bits, which orjson does not write
        data = json.dumps(value, default=_std_default, ensure_ascii=False).encode()
    return _NUL_ESCAPE.sub(rb"\1\\ufffd", data) if b"\\u0000" in data else data


_COLUMNS = (
    "id, tenant, function, method, path, status, duration_ms, started_at, error,"
    " spans, request, response, recording, code_version, git_commit, replay_of"
)
# A batch is one jsonb document, one row per record: one statement, one parameter. psycopg's
# executemany adapted 16 parameters per record, and its pipeline and transaction took three round
# trips: 330 to 490 us of the gateway loop's CPU for a batch of one to three records, 580 to 870 us
# for 17 to 20 (measured with the bench's records); this way 75 to 150 us and 135 to 300 us.
_INSERT = (
    f"INSERT INTO flux.trace_requests ({_COLUMNS}) SELECT {_COLUMNS}"
    " FROM jsonb_to_recordset(%s::jsonb) AS r(id text, tenant text, function text, method text, path text,"
    " status integer, duration_ms double precision, started_at timestamptz, error text, spans jsonb,"
    " request jsonb, response jsonb, recording jsonb, code_version text, git_commit text, replay_of text)"
    " ON CONFLICT (id) DO NOTHING"
)


def _row(r: TraceRecord) -> dict[str, Any]:
    return {
        "id": r.id, "tenant": r.tenant, "function": r.function, "method": r.method, "path": r.path,
        "status": r.status, "duration_ms": r.duration_ms, "started_at": r.started_at, "error": r.error,
        "spans": r.spans, "request": r.request, "response": r.response, "recording": r.recording,
        "code_version": r.code_version, "git_commit": r.git_commit, "replay_of": r.replay_of,
    }


def _batch(records: list[TraceRecord]) -> Jsonb:
    """The records as one jsonb array; `_dumps` makes a NUL in any string, text columns included, U+FFFD."""
    return Jsonb([_row(r) for r in records], _dumps)


def encode_trace(record: TraceRecord) -> bytes:
    """One record as the JSON `insert_encoded_traces_async` writes, so a writer can size it first."""
    return _dumps(_row(record))


def insert_traces(conn: psycopg.Connection, records: list[TraceRecord]) -> None:
    """Write a batch in one statement, so one round trip and one transaction (one commit, one WAL
    flush, however many records). A record whose id is already stored is skipped, so a batch
    retried after a lost acknowledgement is harmless."""
    if records:
        with conn.transaction():
            conn.execute(_INSERT, [_batch(records)])


async def insert_encoded_traces_async(aconn: psycopg.AsyncConnection, encoded: list[bytes]) -> None:
    """`insert_traces` for the gateway's writer task, of records it encoded with `encode_trace` (to
    size its batches), on an autocommit connection: the statement is its own transaction (psycopg
    would spend a round trip each on BEGIN and COMMIT)."""
    if encoded:
        await aconn.execute(_INSERT, [Jsonb(b"[" + b",".join(encoded) + b"]", _as_is)])


def _as_is(data: bytes) -> bytes:
    return data


# -- reading ---------------------------------------------------------------------------------


def _load(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # an integer past 64 bits, which orjson does not read
        return json.loads(text)


_SELECT = (
    "SELECT id, tenant, function, method, path, status, duration_ms, started_at, error,"
    " spans::text, request::text, response::text, recording::text, code_version, git_commit, replay_of, recorded_at"
    " FROM flux.trace_requests"
)


def _record(row: tuple) -> TraceRecord:
    (id_, tenant, function, method, path, status, duration, started, error, spans, request, response,
     recording, code_version, git_commit, replay_of, recorded_at) = row
    return TraceRecord(
        id=id_, tenant=tenant, function=function, method=method, path=path, status=status, duration_ms=duration,
        started_at=started, error=error, spans=_load(spans), request=_load(request), response=_load(response),
        recording=_load(recording), code_version=code_version, git_commit=git_commit, replay_of=replay_of,
        recorded_at=recorded_at,
    )


def _require_traces(conn: psycopg.Connection) -> None:
    version = schema_version(conn)
    if version is None:
        raise NotFoundError(
            "This database has no Flux traces", hint="Traces are recorded by `flux dev` and `flux serve` against this database."
        )
    if version != SCHEMA_VERSION:
        # Reads never run DDL: the gateway, the engine and `flux attach` upgrade the schema.
        raise version_mismatch(version, doing="reads traces")


def _prefix(id_or_prefix: str) -> str:
    text = id_or_prefix.strip()
    if text.lower().startswith(queries.REQUEST_PREFIX):
        text = text[len(queries.REQUEST_PREFIX):]
    return text


def _whole_if_short(prefix: str, found: list[str]) -> list[str]:
    """`found`, or for a text shorter than MIN_PREFIX only the id it is whole: a writer that sends its
    own request ids may send `42`, which `flux state` shows as `req:42`."""
    if len(prefix) >= MIN_PREFIX:
        return found
    if prefix in found:
        return [prefix]
    raise ConfigError(
        f"Request id {prefix!r} is too short to look up", hint=f"Give at least {MIN_PREFIX} characters of the id.",
    )


def _like(prefix: str) -> str:
    return re.sub(r"([\\%_])", r"\\\1", prefix) + "%"


def _trace_ids(conn: psycopg.Connection, prefix: str, tenant: str | None) -> list[str]:
    """Ids starting with `prefix`, in order, at most MAX_CANDIDATES + 1 (plus the exact id, if it exists)."""
    tenant_sql = " AND tenant = %(tenant)s" if tenant is not None else ""
    params = {"like": _like(prefix), "exact": prefix, "tenant": tenant, "limit": MAX_CANDIDATES + 1}
    ids = [r[0] for r in conn.execute(
        f"SELECT id FROM flux.trace_requests WHERE id LIKE %(like)s{tenant_sql} ORDER BY id LIMIT %(limit)s", params
    ).fetchall()]
    if len(ids) > MAX_CANDIDATES and prefix not in ids and conn.execute(
        f"SELECT EXISTS (SELECT 1 FROM flux.trace_requests WHERE id = %(exact)s{tenant_sql})", params
    ).fetchone()[0]:
        ids.append(prefix)  # an exact id wins even when more than MAX_CANDIDATES ids extend it
    return ids


def _pick(prefix: str, found: list[str], what: str) -> str | None:
    """The one id `prefix` names: an exact match, or the only one; None when there is none."""
    if not found:
        return None
    if prefix in found or len(found) == 1:
        return prefix if prefix in found else found[0]
    count = f"more than {MAX_CANDIDATES}" if len(found) > MAX_CANDIDATES else str(len(found))
    raise AmbiguousError(
        f"Request id {prefix!r} is ambiguous: it starts {count} {what}",
        hint="Give more characters of the id. Candidates: " + ", ".join(found[:MAX_CANDIDATES]), request_id=prefix,
    )


def _resolve_trace(conn: psycopg.Connection, prefix: str, tenant: str | None) -> str | None:
    found = _trace_ids(conn, prefix, tenant)
    if not found and prefix != prefix.lower():  # uuids are stored in lower case
        prefix = prefix.lower()
        found = _trace_ids(conn, prefix, tenant)
    return _pick(prefix, _whole_if_short(prefix, found), "traces")


def _fetch(conn: psycopg.Connection, request_id: str) -> TraceRecord | None:
    row = conn.execute(_SELECT + " WHERE id = %s", (request_id,)).fetchone()
    return _record(row) if row else None


def get_trace(conn: psycopg.Connection, id_or_prefix: str, *, tenant: str | None = None) -> TraceRecord:
    """The trace of a request, by its id or a unique prefix; with `tenant`, only that tenant's."""
    prefix = _prefix(id_or_prefix)
    _require_traces(conn)
    request_id = _resolve_trace(conn, prefix, tenant)
    record = _fetch(conn, request_id) if request_id else None
    if record is None:
        scope = f" of tenant {tenant!r}" if tenant is not None else ""
        raise NotFoundError(
            f"No trace{scope} with id starting {prefix!r}",
            hint="`flux requests` lists recent requests; `flux why ID` also looks in the mutation log."
                 + _deleted_by_retention(conn, mutations=False),
            request_id=prefix,
        )
    return record


def _status_filter(status: str) -> tuple[str, dict[str, Any]]:
    text = status.strip().lower()
    if text == "error":
        return "(status >= 400 OR error IS NOT NULL)", {}
    if len(text) == 3 and text[0] in "12345" and text[1:] == "xx":
        low = int(text[0]) * 100
        return "status >= %(low)s AND status < %(high)s", {"low": low, "high": low + 100}
    if text.isdigit() and 100 <= int(text) <= 599:
        return "status = %(code)s", {"code": int(text)}
    raise ConfigError(
        f"Unknown status filter {status!r}", hint="Use a class (2xx, 4xx, 5xx), an exact code (500), or `error`.",
    )


def list_traces(
    conn: psycopg.Connection,
    *,
    function: str | None = None,
    status: str | None = None,
    since: timedelta | None = None,
    tenant: str | None = None,
    limit: int = 50,
) -> list[TraceSummary]:
    """Recent requests, newest first. `status`: "2xx" / "4xx" / "5xx" / ..., "500", or "error" (4xx, 5xx or
    an error recorded); `since`: started within that long before the database's now()."""
    queries.check_limit(limit)
    if since is not None and not timedelta(0) <= since <= MAX_DURATION:
        raise ConfigError("--since is out of range", hint=f"Give a window from 0 to {MAX_DURATION.days} days.")
    query, params = _list_query(function=function, status=status, since=since, tenant=tenant, limit=limit)
    _require_traces(conn)
    rows = conn.execute(query, params).fetchall()
    return [TraceSummary(*row) for row in rows]


def _list_query(*, function: str | None, status: str | None, since: timedelta | None, tenant: str | None,
                limit: int) -> tuple[str, dict[str, Any]]:
    """`list_traces`' statement. Function, tenant, status and time each have an index ending with
    started_at, so a filter that matches no recent trace does not read every trace to say so."""
    where: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    if status is not None:
        clause, more = _status_filter(status)
        where.append(clause)
        params.update(more)
    if function is not None:
        where.append("function = %(function)s")
        params["function"] = function
    if tenant is not None:
        where.append("tenant = %(tenant)s")
        params["tenant"] = tenant
    if since is not None:
        where.append("started_at >= now() - %(since)s")
        params["since"] = since
    return (
        "SELECT id, started_at, tenant, function, method, path, status, duration_ms, error FROM flux.trace_requests"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY started_at DESC, id DESC LIMIT %(limit)s"
    ), params


def find_request(conn: psycopg.Connection, id_or_prefix: str) -> tuple[str, TraceRecord | None]:
    """A request by its id or a unique prefix, looked up in both records Flux keeps of it (its trace
    and its row changes; it must name one request across them): its id, and its trace if one was
    recorded."""
    prefix = _prefix(id_or_prefix)
    _require_traces(conn)
    found = sorted(set(_trace_ids(conn, prefix, None)) | set(queries._request_ids(conn, prefix)))
    if not found and prefix != prefix.lower():
        prefix = prefix.lower()
        found = sorted(set(_trace_ids(conn, prefix, None)) | set(queries._request_ids(conn, prefix)))
    request_id = _pick(prefix, _whole_if_short(prefix, found), "requests")
    if request_id is None:
        hint = "`flux requests` lists recent requests." + _deleted_by_retention(conn, mutations=True)
        if re.fullmatch(r"xid:\d+", prefix, re.IGNORECASE):  # copied from `flux state`, which names such writers so
            hint = (f"{prefix} is a transaction that sent no request context (a write made outside Flux): there is no "
                    "request to explain. `flux state history` and `flux state blame` of its rows show what it changed.")
        raise NotFoundError(
            f"No request with id starting {prefix!r}: neither a trace nor a row change", hint=hint, request_id=prefix,
        )
    return request_id, _fetch(conn, request_id)


def _deleted_by_retention(conn: psycopg.Connection, *, mutations: bool) -> str:
    """A sentence for the hint of an id not found: what the last prune deleted, or ''. An id copied
    from an old ticket or log names a request whose records may be gone."""
    pruned = retention.pruned_before(conn)
    gone = [f"{what} before {cutoff:%Y-%m-%d %H:%M:%S} UTC" for what, cutoff in (
        ("traces that started", pruned.traces), ("row changes committed", pruned.mutations if mutations else None)) if cutoff]
    if not gone:
        return ""
    sentence = " and ".join(gone)
    return f" {sentence[0].upper()}{sentence[1:]} were deleted by retention."


def unique_prefixes(conn: psycopg.Connection, ids: list[str], shortest: int) -> dict[str, str]:
    """Each id's shortest prefix to show (as `flux requests`, `trace`, `why` and `state` do): its
    first `shortest` characters, or more when another request's id starts with them too (as likely
    as not somewhere among 77,000 requests for 8), so that every prefix names one request to
    `find_request`: 13 (a UUID's first two groups), else the whole id."""
    shown = {i: i[:shortest] for i in ids}
    pending = ids
    for length in (13, None):
        shared = _ambiguous_prefixes(conn, {i: shown[i] for i in pending if shown[i] != i})
        pending = [i for i in pending if shown[i] in shared]
        shown.update({i: i[:length] for i in pending})
    return shown


def _ambiguous_prefixes(conn: psycopg.Connection, shown: dict[str, str]) -> set[str]:
    """Those of the prefixes in `shown` (request id -> a prefix of it) that start another request's
    id too, in the traces or the row changes, where `find_request` looks ids up. One statement,
    whose parameters are two arrays however many ids there are (a statement's parameters are at
    most 65,535). In byte order the ids a prefix starts are one run, from the prefix on, that holds
    the request's own id: another is the last id before it, at or past the prefix, or the first id
    after it. So each prefix is four index probes, which read one entry each however many row
    changes the request has, or however many ids share the prefix."""
    if not shown:
        return set()
    return {row[0] for row in conn.execute(_AMBIGUOUS, [list(shown.values()), list(shown)]).fetchall()}


# state_mutations' request_id index is text_pattern_ops: its operators compare bytes, as the
# traces' "C" key does.
_AMBIGUOUS = (
    "SELECT prefix FROM unnest(%s::text[], %s::text[]) AS shown(prefix, own)"
    " WHERE EXISTS (SELECT FROM flux.trace_requests WHERE id >= prefix AND id < own)"
    " OR starts_with((SELECT id FROM flux.trace_requests WHERE id > own ORDER BY id LIMIT 1), prefix)"
    " OR EXISTS (SELECT FROM flux.state_mutations WHERE request_id ~>=~ prefix AND request_id ~<~ own)"
    " OR starts_with((SELECT request_id FROM flux.state_mutations WHERE request_id ~>~ own"
    " ORDER BY request_id USING ~<~ LIMIT 1), prefix)"
)


def count_mutations(conn: psycopg.Connection, request_id: str) -> int:
    """How many row changes the mutation log holds for a request ("DB writes" of `flux trace`)."""
    return conn.execute("SELECT count(*) FROM flux.state_mutations WHERE request_id = %s", (request_id,)).fetchone()[0]
