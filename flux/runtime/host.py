"""The host side of the `ctx` API: database sessions, outbound fetch, and the span each call becomes.

`DbSession` is one request's transaction. Its first statement is the `flux` context message
(`pg_logical_emit_message`) carrying request_id, tenant and function, so the CDC engine
attributes every write of the request; `finish(commit=...)` commits or rolls back. Statements
are serialised: a request's queries share one connection, in the order the function issued them.

`Transport` is the seam for outbound calls: `AiohttpTransport` in production (aiohttp costs
about a fifth of httpx's CPU per call, and outbound calls were most of the gateway's Python
work). `FetchPolicy` applies the allow-list and names spans after tools.

What this module does not do: it never sees JavaScript, and it does not redact (the gateway
redacts the whole trace at the end, once, so nothing can slip past a per-field rule).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from flux.cdc.assembler import CONTEXT_PREFIX
from flux.project import FetchConfig

_VERB = re.compile(r"^\s*(?:WITH\b.*?\)\s*)?(INSERT|UPDATE|DELETE|SELECT|MERGE)\b", re.IGNORECASE | re.DOTALL)
_IDENT = r'((?:"[^"]+"|[A-Za-z_][\w$]*)(?:\.(?:"[^"]+"|[A-Za-z_][\w$]*))?)'
_TABLE = {
    "insert": re.compile(r"\bINSERT\s+INTO\s+" + _IDENT, re.IGNORECASE),
    "update": re.compile(r"\bUPDATE\s+(?:ONLY\s+)?" + _IDENT, re.IGNORECASE),
    "delete": re.compile(r"\bDELETE\s+FROM\s+(?:ONLY\s+)?" + _IDENT, re.IGNORECASE),
    "select": re.compile(r"\bFROM\s+(?:ONLY\s+)?" + _IDENT, re.IGNORECASE),
    "merge": re.compile(r"\bMERGE\s+INTO\s+" + _IDENT, re.IGNORECASE),
}
MAX_RECORDED_FETCH_BODY = 1024 * 1024


def db_span_name(sql: str) -> str:
    """`db.insert(users)`, `db.select(orders)`; `db.query` when the statement is something else."""
    verb = _VERB.match(sql)
    if not verb:
        return "db.query"
    kind = verb.group(1).lower()
    table = _TABLE[kind].search(sql, verb.start(1))
    return f"db.{kind}({table.group(1).replace(chr(34), '')})" if table else f"db.{kind}"


def to_json_value(value: Any) -> Any:
    """orjson `default`: database values the way JS code expects them."""
    if isinstance(value, Decimal):
        return str(value)  # exact; a JS number would round
    if isinstance(value, (bytes, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, timedelta):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def json_ready(value: Any) -> Any:
    """Round-trip through orjson, so results hold only JSON types (for the tape and for JS)."""
    return orjson.loads(orjson.dumps(value, default=to_json_value))


@dataclass(slots=True)
class Span:
    id: str
    parent: str | None
    name: str
    kind: str
    start: float  # epoch ms
    duration_ms: float = 0.0
    status: str = "ok"
    error: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "parent": self.parent, "name": self.name, "kind": self.kind, "start": self.start,
            "duration_ms": round(self.duration_ms, 3), "status": self.status, "error": self.error,
            "attributes": self.attributes, "events": self.events,
        }


class Clock:
    """Wall-clock epoch milliseconds with perf_counter resolution, for span timing."""

    def __init__(self) -> None:
        self._wall = time.time() * 1000.0
        self._perf = time.perf_counter()

    def now_ms(self) -> float:
        return self._wall + (time.perf_counter() - self._perf) * 1000.0


class HostCallError(Exception):
    """A ctx call failed; `info` is what the JS side turns into its Error (name, message, sqlstate...)."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info.get("message"))
        self.info = info


class DbSession:
    """One request's database transaction, opened at the first query.

    The session runs its own BEGIN and COMMIT on a connection in autocommit mode (it switches a
    pool's connection to it), so that BEGIN travels with the context message and the first
    statement: one round trip, where psycopg's implicit BEGIN would take one of its own.
    """

    def __init__(self, pool: AsyncConnectionPool | None, context: dict[str, Any]) -> None:
        self._pool = pool
        self._context = orjson.dumps(context).decode()
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()
        self.statements = 0
        self.outcome: str | None = None  # "committed" | "rolled_back" once finished

    async def query(self, sql: str, params: list[Any]) -> dict[str, Any]:
        if self._pool is None:
            raise HostCallError({"name": "FluxError", "message": "ctx.db is not configured: start Flux with a database"})
        async with self._lock:
            if self.outcome is not None:
                raise HostCallError({"name": "FluxError", "message": "ctx.db was used after the request finished"})
            try:
                first = self._conn is None
                if first:
                    self._conn = await self._pool.getconn()
                    if not self._conn.autocommit:  # psycopg would send its own BEGIN, a round trip of its own
                        await self._conn.set_autocommit(True)
                cur = psycopg.AsyncRawCursor(self._conn, row_factory=dict_row)
                if first:
                    # BEGIN, the context message and the first statement share one round trip.
                    async with self._conn.pipeline():
                        await self._conn.execute("BEGIN")
                        await self._conn.execute(
                            "SELECT pg_logical_emit_message(true, %s::text, %s::text)", (CONTEXT_PREFIX, self._context)
                        )
                        await cur.execute(sql, [_adapt(p) for p in params])
                else:
                    await cur.execute(sql, [_adapt(p) for p in params])
                rows = await cur.fetchall() if cur.description is not None else []
                self.statements += 1
                command = (cur.statusmessage or "").split(" ")[0]
                return json_ready({"rows": rows, "rowCount": cur.rowcount, "command": command})
            except psycopg.Error as exc:
                diag = exc.diag
                detail = (diag.message_primary or str(exc).strip().splitlines()[0]) if diag else str(exc)
                raise HostCallError({
                    "name": "DatabaseError", "message": f"{detail} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else detail,
                    "sqlstate": exc.sqlstate, "detail": diag.message_detail if diag else None,
                }) from None

    async def finish(self, *, commit: bool) -> None:
        """Commit or roll back, and give the connection back. Never raises for a rollback."""
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                self.outcome = self.outcome or ("committed" if commit else "rolled_back")
                return
            assert self._pool is not None
            try:
                if commit and conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
                    await conn.commit()
                    self.outcome = "committed"
                else:
                    await conn.rollback()
                    self.outcome = "rolled_back"
            except psycopg.Error as exc:
                self.outcome = "rolled_back"
                if commit:
                    raise HostCallError({"name": "DatabaseError", "message": f"commit failed: {exc}", "sqlstate": exc.sqlstate}) from None
            finally:
                await self._pool.putconn(conn)

    async def abort(self) -> None:
        """After a timeout: cancel whatever runs on the connection, then roll back."""
        conn = self._conn
        if conn is not None and conn.info.transaction_status == psycopg.pq.TransactionStatus.ACTIVE:
            try:
                await asyncio.wait_for(conn.cancel_safe(), 5)
            except (psycopg.Error, TimeoutError):
                pass
        await self.finish(commit=False)


def _adapt(value: Any) -> Any:
    # JS objects are jsonb parameters; arrays of scalars stay Postgres arrays.
    if isinstance(value, dict):
        return Jsonb(value)
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return Jsonb(value)
    return value


@dataclass(frozen=True, slots=True)
class FetchResult:
    status: int
    headers: dict[str, str]
    body: str
    url: str
    reason: str = ""


class Transport(Protocol):
    """Outbound HTTP. Raises `TimeoutError` on timeout and `OSError` when the call cannot be made."""

    async def send(self, method: str, url: str, headers: dict[str, str], body: str | None, timeout_s: float) -> FetchResult: ...


class AiohttpTransport:
    """`ctx.fetch` over one aiohttp session (its connection pool), made at the first call: it
    needs the running loop. Redirects are not followed, proxies from the environment are not
    used, and cookies are never kept: a cookie one request receives must not reach another's
    call (another tenant's, even)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def send(self, method: str, url: str, headers: dict[str, str], body: str | None, timeout_s: float) -> FetchResult:
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        try:
            async with self._session.request(
                method, url, headers=headers, data=body.encode() if body is not None else None,
                allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                text = await response.text(errors="replace")
        except TimeoutError:  # aiohttp's timeouts are asyncio's, which are TimeoutError since 3.11
            raise TimeoutError(f"no response within {timeout_s * 1000:.0f} ms") from None
        except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a URL aiohttp cannot send to
            raise OSError(f"{type(exc).__name__}: {exc}") from None
        return FetchResult(
            status=response.status, headers={k.lower(): v for k, v in response.headers.items()},
            body=text, url=str(response.url), reason=response.reason or "",
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class FetchPolicy:
    """The allow-list and the host-to-tool map of flux.toml [fetch] and [tools]."""

    def __init__(self, config: FetchConfig) -> None:
        self.config = config

    def check(self, url: str) -> tuple[str, str]:
        """(host, host:port) of an allowed http(s) URL; HostCallError otherwise."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HostCallError({"name": "TypeError", "message": f"ctx.fetch needs an absolute http(s) URL, not {url!r}"})
        host = parts.hostname.lower()
        port = parts.port or (443 if parts.scheme == "https" else 80)
        hostport = f"{host}:{port}"
        allow = self.config.allow
        if allow is not None and host not in allow and hostport not in allow:
            raise HostCallError({
                "name": "FetchNotAllowed",
                "message": f"outbound calls to {hostport} are not allowed: add it to [fetch] allow in flux.toml",
            })
        return host, hostport

    def span_name(self, url: str, host: str, hostport: str, explicit: str | None) -> str:
        if explicit:
            return str(explicit)
        tool = self.config.tools.get(hostport) or self.config.tools.get(host)
        if tool is None:
            return f"fetch {hostport}"
        segments = [s for s in urlsplit(url).path.split("/") if s]
        return f"{tool}.{segments[-1]}" if segments else tool


def as_text(body: str, limit: int = MAX_RECORDED_FETCH_BODY) -> tuple[str, bool]:
    return (body, False) if len(body) <= limit else (body[:limit], True)
