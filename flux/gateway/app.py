"""The gateway: a Quart app that turns each HTTP request into one recorded execution.

    request -> request_id -> tenant (API key) -> route -> body checks -> runtime -> response
                                                                         \\-> trace record (queued)

Every answer, including 401/404/413/400, carries `x-flux-request-id` and is recorded as one
`flux.trace_requests` row. The app is built by `create_app()`; long-lived pieces (the isolate
pools, the database pool, the trace writer) live on a `Gateway` object stored on the app and
are started and stopped by the app's lifespan (`before_serving` / `after_serving`).

Tenants see only their own traces through `GET /_flux/requests[/<id>]`.

A client that goes away does not stop its function: once started, a function runs to its end
(its time limit bounds that), commits or rolls back as it would have, and is recorded, marked
`flux.client_disconnected`. Its outcome never depends on when the client hung up. A client
that leaves before the function starts (while its body arrives, or while it waits for a worker)
is recorded as a 499 and nothing runs. At shutdown the gateway lets started functions finish
and answers queued requests 503 (`Gateway.settle`).

The wait for a worker is bounded: beyond `max_queue` waiting requests (checked before its body is
read, and again before it joins the queue), or after `queue_timeout` seconds of waiting if set, a
request is answered 503 with `Retry-After` and recorded, and nothing runs. Each waiting request holds its body, so an unbounded queue was memory without limit.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
import uuid
import zlib
from datetime import datetime, timezone
from http import HTTPStatus
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
from quart import Quart, Response, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import MethodNotAllowed, RequestEntityTooLarge, RequestTimeout
from werkzeug.http import parse_options_header

from flux.errors import INTERNAL_ERROR, FluxError, NotFoundError, SchemaVersionError, from_psycopg
from flux.gateway.health import DatabaseProbe
from flux.gateway.metrics import Metrics
from flux.gateway.traces import TraceSink, cap_depth, cap_recording
from flux.project import Project, Tenant
from flux.redaction import REDACTED, Redactor, as_text, one_line, redact_headers
from flux.runtime.executor import CutShort, Execution, Executor, FailedInsideFlux, Invocation, new_span_id
from flux.runtime.fetch import FetchPolicy, Transport, text_codec
from flux.runtime.host import Clock, Span
from flux.runtime.isolate import CompiledFunction, IsolatePool, compile_function
from flux.store.traces import TraceRecord

log = logging.getLogger("flux.gateway")

REQUEST_ID_HEADER = "x-flux-request-id"
REPLAY_HEADER = "x-flux-replay"
API_KEY_HEADER = "x-flux-api-key"
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
CLIENT_GONE = "the client disconnected before the response was sent"


class _Answer(Response):
    """An answer with no body has no content-type (Quart's default would be text/html)."""

    default_mimetype = None


class Functions:
    """The project's compiled functions and their isolate pools, and what every request needs of
    its config worked out once (every secret's forms, every API key, the executor of its limits and
    `[fetch]`); swapped whole on reload."""

    def __init__(self, project: Project, *, pool_size: int, executor: Callable[[Project, Redactor], Executor],
                 redactor: Redactor) -> None:
        self.project = project
        self.redactor = redactor  # the gateway's when this version was read: its secrets and every earlier one
        self.api_keys = frozenset(key for tenant in project.tenants.values() for key in tenant.api_keys)
        # A request runs on the version it started on, limits and all: one that waited for a worker
        # across a reload was held to the new flux.toml's timeout_ms (a 504 its own version never gave).
        self.executor = executor(project, self.redactor)
        self.compiled: dict[str, CompiledFunction] = {
            name: compile_function(fn, memory_mb=project.limits.memory_mb, timeout_ms=project.limits.timeout_ms)
            for name, fn in project.functions.items()
        }
        self.pools = {
            name: IsolatePool(c, size=pool_size if c.script is not None else 0, memory_mb=project.limits.memory_mb,
                              timeout_ms=project.limits.timeout_ms)
            for name, c in self.compiled.items()
        }

    @property
    def load_errors(self) -> list[str]:
        return [c.error for c in self.compiled.values() if c.error]

    def warm(self) -> None:
        for pool in self.pools.values():
            pool.warm_now()

    async def warm_async(self) -> None:
        """`warm`, with each isolate made on a worker thread: the loop keeps serving."""
        for pool in self.pools.values():
            await pool.warm_async()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


class Gateway:
    """Everything a request needs, held for the app's lifetime."""

    def __init__(
        self, project: Project, *, transport: Transport, db_pool: Any | None, sink: TraceSink | None,
        workers: int = 64, pool_size: int = 4, record: bool = True, trace_reader: Any = None,
        max_queue: int | None = None, queue_timeout: float | None = None,
        engine_status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.transport = transport
        self.trace_reader = trace_reader  # async (tenant, request_id | None, args) -> data
        self.engine_status = engine_status  # the CDC engine run in this process, if one is (`Engine.status`)
        self.db_pool = db_pool
        self.database_probe = None if db_pool is None else DatabaseProbe(db_pool.conninfo, db_pool.kwargs)
        self.metrics = Metrics()
        self.sink = sink
        self.record = record
        self.workers = workers
        self.pool_size = pool_size
        self.secret_values = _secrets_of(project)
        self.redactor = Redactor(self.secret_values)  # every secret read so far (`_learn_secrets`)
        self.functions = Functions(project, pool_size=pool_size, executor=self._executor, redactor=self.redactor)
        self._slots = asyncio.Semaphore(workers)
        self._running: set[asyncio.Future[Execution]] = set()  # executions started, their client there or not
        self._queued = 0  # requests waiting for a worker slot
        self.max_queue = QUEUE_PER_WORKER * workers if max_queue is None else max_queue
        self.queue_timeout = queue_timeout  # seconds a request may wait for a slot; None: as long as its client waits
        self.refused = 0  # requests answered 503 because the queue was full or their wait too long
        self._stopping = False
        self._stop_began: float | None = None  # the loop's time when the stop began
        self.reload_hooks: list[Callable[[Project], None]] = []  # app settings that follow flux.toml
        self.reload_error: str | None = None  # why the project's files on disk are not what serves (flux dev, --reload)
        self._incoming: Project | None = None  # the version a reload is compiling and warming, until it serves
        self.loaded_at = time.time()  # when the version serving now was loaded
        for error in self.functions.load_errors:
            log.error("function failed to load: %s", error)

    def _executor(self, project: Project, redactor: Redactor) -> Executor:
        return Executor(limits=project.limits, fetch_policy=FetchPolicy(project.fetch), transport=self.transport,
                        db_pool=self.db_pool, redactor=redactor)

    @property
    def project(self) -> Project:
        return self.functions.project

    @property
    def executor(self) -> Executor:
        return self.functions.executor

    async def reload(self, project: Project) -> list[str]:
        """Swap in a new version of the project; requests in flight finish on the old one.

        The new functions are compiled and their isolates made off the loop (top-level code may
        run up to its time limit per function), so requests keep being served meanwhile; the swap
        itself is one step on the loop, every function at once. Meanwhile the new version's
        API keys already apply (`tenant_for`): a key it revokes is refused at once."""
        self._incoming = project
        self._learn_secrets(project)
        try:
            functions = await asyncio.to_thread(Functions, project, pool_size=self.pool_size, executor=self._executor,
                                                redactor=self.redactor)
            try:
                await functions.warm_async()
            except BaseException:
                functions.close()
                raise
        finally:
            if self._incoming is project:
                self._incoming = None
        if self._stopping:  # stopped meanwhile: the stop closes the functions it knows, not these
            functions.close()
            return functions.load_errors
        old, self.functions = self.functions, functions
        self.loaded_at = time.time()
        old.close()
        for hook in self.reload_hooks:
            hook(project)
        return self.functions.load_errors

    def expect(self, project: Project) -> None:
        """A flux.toml read while a reload of an earlier version runs (`flux.gateway.server`): its API
        keys apply at once too (`tenant_for`), rather than once that reload is done and the next one
        has read it again. Until a later reload replaces it, also should that one not load."""
        self._incoming = project
        self._learn_secrets(project)

    def _learn_secrets(self, project: Project) -> None:
        """Redact the secrets of a version from the moment it is read, and for the life of the process.
        Until the reload swaps it in (seconds, with slow top-level code), and for requests that finish
        on the version before, a rotated value can already arrive (a client given it): their traces
        recorded it as it was. A value rotated out stays too: it is often valid for a while yet, and can
        still arrive (an upstream's echo, a row written with it)."""
        values = self.secret_values | _secrets_of(project)
        if values != self.secret_values:
            self.secret_values = values
            self.redactor = Redactor(values)

    def tenant_for(self, project: Project, key: str | None) -> Tenant | None:
        """The tenant of `project` (the version serving the request) that API key `key` is served as.

        While a reload compiles and warms the next version (seconds, with slow top-level code), a
        key must also name the same tenant in that version's flux.toml: one it removes, or gives to
        another tenant, is refused from the moment it is read, not once every function is ready.
        A key it adds is taken once the reload is done, with the tenant's new secrets."""
        tenant = project.tenant_for_key(key)
        incoming = self._incoming
        if tenant is None or incoming is None or incoming is project:
            return tenant
        again = incoming.tenant_for_key(key)
        return tenant if again is not None and again.name == tenant.name else None

    async def handle(self, method: str, path: str) -> Response:
        clock = Clock()
        started_at = datetime.now(timezone.utc)
        request_id = str(uuid.uuid4())
        gateway = Span(id=new_span_id(), parent=None, name="gateway", kind="server", start=clock.now_ms(),
                       attributes={"flux.kind": "gateway", "http.method": method, "http.target": path})
        functions = self.functions  # one consistent version for the whole request
        project = functions.project
        headers = _request_headers(request.scope["headers"])
        client = request.scope.get("client")
        trace = _Trace(request_id, started_at, clock, gateway, method, path, headers, functions, _query(request.args),
                       client[0] if client else None)
        # Until its body is read, an answer leaves a body behind, and Hypercorn then closes an HTTP/1.1
        # connection: the answer says so (`connection: close`), or a keep-alive client would reuse it.
        trace.body_pending = _body_unread()
        tenant = self.tenant_for(project, _api_key(headers))
        if tenant is None:
            return self._reply(trace, None, None, _error(401, "missing or invalid API key",
                               "Send the tenant's key as `Authorization: Bearer KEY` or `x-flux-api-key: KEY`."))
        trace.tenant = tenant
        function = project.route(method, path)
        if function is None:
            allowed = project.methods_at(path)
            if not allowed:
                return self._reply(trace, tenant, None, _error(404, f"no function is routed at {method} {path}",
                                   "Routes come from [routes] in flux.toml; the default is POST /<function>."))
            answer = _error(405, f"no function is routed at {method} {path}; the routes at this path take {', '.join(allowed)}",
                            "Send one of those methods, or route this one in [routes] in flux.toml.")
            answer.headers.append(("allow", ", ".join(allowed)))  # RFC 9110: a 405 lists what the path takes
            return self._reply(trace, tenant, None, answer)
        pool = functions.pools[function]
        trace.function = functions.compiled[function]
        if self._full():  # refused before its body is read: under overload, no time or memory spent on it
            return self._refuse(trace, tenant, function)
        limit = project.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._reply(trace, tenant, function, _error(413, f"the request body is over the {limit}-byte limit",
                               "Raise [limits] max_body_bytes in flux.toml, or send less."))
        try:
            raw = await request.get_data(cache=False, as_text=False)
        except RequestEntityTooLarge:
            return self._reply(trace, tenant, function, _error(413, f"the request body is over the {limit}-byte limit",
                               "Raise [limits] max_body_bytes in flux.toml, or send less."))
        except RequestTimeout:  # Quart's BODY_TIMEOUT: its own answer was an HTML 408, unrecorded
            return self._reply(trace, tenant, function, _error(
                408, f"the request body did not arrive within {request.body_timeout:g} s", "Nothing ran. Send the body faster."))
        except asyncio.CancelledError:
            self._reply(trace, tenant, function, _error(CLIENT_CLOSED_REQUEST, "the client disconnected before its request body arrived",
                        "Nothing ran. The client (or a proxy in front of Flux) closed the connection."), client_gone=True)
            raise
        trace.raw_body = raw
        trace.body_pending = False
        coding = headers.get("content-encoding", "").strip().lower()
        if coding and coding != "identity":
            trace.body = raw  # recorded as sent (base64) unless it decodes
            if coding not in _DECODERS:
                answer = _error(415, f"the request body's content-encoding {coding!r} is not supported",
                                "Send it uncompressed, or compressed with gzip or deflate (see accept-encoding).")
                answer.headers.append(("accept-encoding", "gzip, deflate"))  # RFC 9110: the codings taken
                return self._reply(trace, tenant, function, answer)
            try:
                raw = trace.raw_body = _decompress(raw, coding, limit)
                trace.body = None  # recorded as any body is, from here
            except _TooLarge:
                return self._reply(trace, tenant, function, _error(
                    413, f"the request body is over the {limit}-byte limit once decompressed",
                    "Raise [limits] max_body_bytes in flux.toml, or send less."))
            except ValueError as exc:
                return self._reply(trace, tenant, function, _error(
                    400, f"the request body is not valid {coding}: {exc}", "Send it as its content-encoding says."))
        try:
            body, trace.charset = _parse_body(raw, headers.get("content-type", ""))
        except ValueError as exc:
            return self._reply(trace, tenant, function, _error(400, f"the request body is not valid JSON: {exc}",
                               "Send a JSON body with content-type application/json."))
        trace.body = body
        invocation = Invocation(
            request_id=request_id, tenant=tenant.name, secrets=tenant.secrets, parent_span=gateway.id,
            replay=headers.get(REPLAY_HEADER, "").lower() == "true", record=self.record,
            request={"method": method, "path": path, "query": trace.query, "body": body, "ip": trace.ip,
                     "headers": {k: v for k, v in headers.items()
                                 if k != API_KEY_HEADER and not _carries_api_key(v, functions.api_keys)}},
        )
        # A worker slot first, in the request's own task: a client that leaves while it waits
        # leaves nothing running behind it (under overload, abandoned requests are shed).
        # With a free slot, `acquire` returns at once: an empty queue costs a check here and one above.
        if self._full():  # filled while its body arrived
            return self._refuse(trace, tenant, function)
        self._queued += 1
        try:
            if self.queue_timeout is not None and self._slots.locked():
                async with asyncio.timeout(self.queue_timeout):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()
        except TimeoutError:
            self.refused += 1
            return self._reply(trace, tenant, function, _at_capacity(
                f"the server is at capacity: no worker came free within {self.queue_timeout:g} s"))
        except asyncio.CancelledError:
            self._reply(trace, tenant, function, _error(
                CLIENT_CLOSED_REQUEST, "the client disconnected while its request waited for a free worker",
                "Nothing ran. Raise --workers, or look for what keeps the workers busy."), client_gone=True)
            raise
        finally:
            self._queued -= 1
        if self._stopping:
            self._slots.release()
            return self._reply(trace, tenant, function, _error(503, "the server is stopping; the function did not run",
                                                                 "Send the request again (to another instance)."))
        work = asyncio.ensure_future(self._execute(functions.executor, pool, invocation, function))  # releases the slot
        self._running.add(work)
        work.add_done_callback(self._running.discard)
        try:
            execution = await asyncio.shield(work)
        except asyncio.CancelledError:
            if work.cancelled() and not asyncio.current_task().cancelling():  # a stop cut it short, the client is there
                return self._reply(trace, tenant, function, _cut_off())
            # The client went away: see the module's doc.
            work.add_done_callback(lambda done: self._record_detached(done, trace, tenant, function))
            raise
        return self._reply(trace, tenant, function, execution)

    def _full(self) -> bool:
        """No free worker, and `max_queue` requests already wait for one."""
        return self._queued >= self.max_queue and self._slots.locked()

    def _refuse(self, trace: _Trace, tenant: Tenant, function: str) -> Response:
        self.refused += 1
        return self._reply(trace, tenant, function, _at_capacity(
            f"the server is at capacity: {self._queued} request(s) already wait for one of {self.workers} workers"))

    async def _execute(self, executor: Executor, pool: IsolatePool, invocation: Invocation, function: str) -> Execution:
        try:
            return await executor.run(pool, invocation)
        except CutShort as exc:  # a stop that could not wait (only a stop cancels this task): answered 503, with its tape
            answer = _cut_off()
            answer.recording = exc.partial.recording
            return answer
        except Exception as exc:  # a bug in Flux: the request still gets its id, a clear answer and a trace
            cause = exc.__cause__ if isinstance(exc, FailedInsideFlux) and exc.__cause__ is not None else exc
            log.error("request %s: running %s failed inside Flux", invocation.request_id, function, exc_info=cause,
                      extra={"request_id": invocation.request_id, "function": function})
            answer = _error(500, INTERNAL_ERROR, "The gateway's log has the details, under this request id.")
            if isinstance(exc, FailedInsideFlux):  # the tape up to the failure: what a replay needs most
                answer.recording = exc.partial.recording
            return answer
        finally:
            self._slots.release()

    def _record_detached(self, done: asyncio.Future[Execution], trace: _Trace, tenant: Tenant | None, function: str) -> None:
        if done.cancelled():  # cut off by a shutdown that could not wait for it
            execution = _cut_off()
        else:
            execution = done.result()
        self._reply(trace, tenant, function, execution, client_gone=True)

    async def health(self) -> dict[str, Any]:
        """What /_flux/health answers (and /_flux/metrics reads its gauges from)."""
        traces = self.sink.status() if self.sink is not None and self.record else None
        database = await self.database_probe.status() if self.database_probe is not None else None
        return {"ok": True, "functions": sorted(self.functions.compiled), "database": database,
                "load_errors": self.functions.load_errors, "reload_error": self.reload_error, **self.load(),
                "traces": traces, "engine": self.engine_status() if self.engine_status else None}

    def load(self) -> dict[str, int]:
        """Functions running now (their clients there or not), requests waiting for a worker, the
        queue's bounds, and how many requests were refused at capacity since the start."""
        return {"running": len(self._running), "queued": self._queued, "workers": self.workers,
                "max_queue": self.max_queue, "queue_timeout_seconds": self.queue_timeout, "refused": self.refused}

    def stop_starting(self) -> None:
        """From now on, requests still waiting for a worker are answered 503 and run nothing."""
        self._stopping = True
        if self._stop_began is None:
            self._stop_began = asyncio.get_running_loop().time()

    def cut_short(self) -> int:
        """Stop now (a second Ctrl-C): cancel the functions running (they roll back and are answered
        and recorded 503) and answer queued requests 503. Returns how many functions it cancelled."""
        self.stop_starting()
        for work in self._running:
            work.cancel()
        return len(self._running)

    async def settle(self, timeout: float) -> None:
        """At shutdown, before traces are drained: let every started function finish (whether or not
        its client or the HTTP server is still there), and answer queued requests 503 without
        running them. Functions still running `timeout` seconds after the stop began (not after the
        HTTP server's own grace period) are cancelled, and get 5 s to roll back."""
        self.stop_starting()
        deadline = self._stop_began + timeout
        while self._running or self._queued:
            if self._running:
                await asyncio.wait(set(self._running), timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
                                   return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(0.01)  # queued requests take a freed slot, see _stopping, and answer
            if asyncio.get_running_loop().time() >= deadline:
                break
        late = set(self._running)
        for work in late:
            work.cancel()
        if late:
            await asyncio.wait(late, timeout=LATE_CANCEL_SECONDS)

    def _reply(self, trace: _Trace, tenant: Tenant | None, function: str | None, execution: Execution,
               *, client_gone: bool = False) -> Response:
        status = execution.status
        # The function's own headers, less the request id: that is Flux's, one per answer.
        headers = [(k, v) for k, v in execution.headers if k != REQUEST_ID_HEADER]
        typed = any(k == "content-type" for k, _ in headers)  # the function's content-type wins
        headers.append((REQUEST_ID_HEADER, trace.request_id))
        if trace.body_pending:
            headers.append(("connection", "close"))
        secrets = tenant.secrets if tenant else {}
        body = execution.body
        if execution.error is not None:  # Flux's own error bodies
            body = self.redactor.redact({**body, "request_id": trace.request_id}, secrets)
        if status in (204, 304):  # HTTP allows neither a body nor its length on these
            if body is not None:
                trace.span.attributes["flux.response_body_dropped"] = f"a {status} response has no body; the function's was not sent"
            payload = b""
        elif body is None:  # no body: nothing to type
            payload = b""
        elif isinstance(body, str):
            payload = body.encode()
            if not typed:
                headers.append(("content-type", "text/plain; charset=utf-8"))
        else:
            try:
                payload = orjson.dumps(body)
            except orjson.JSONEncodeError as exc:  # nested deeper than orjson writes (254 levels)
                return self._reply(trace, tenant, function, _error(
                    500, f"the return value's body cannot be sent as JSON: {exc}",
                    "Return a body nested less deeply; the function's transaction has committed."), client_gone=client_gone)
            if not typed:
                headers.append(("content-type", "application/json"))
        self.metrics.observe(function, status, (trace.clock.now_ms() - trace.span.start) / 1000)
        if self.sink is not None and self.record:
            self.sink.submit(trace.record(execution, function, status, headers, payload, secrets, self.redactor,
                                          client_gone=client_gone))
        # To a HEAD request the HTTP server sends these headers, the length included, and no body.
        response = _Answer(payload, status=status, headers=headers)
        if status in (204, 304):
            response.headers.pop("content-length", None)  # Quart sets it; HTTP forbids it on a 204
        return response


class _Trace:
    """What the gateway learns about a request as it goes, turned into one TraceRecord at the end."""

    def __init__(self, request_id: str, started_at: datetime, clock: Clock, span: Span, method: str, path: str,
                 headers: dict[str, str], functions: Functions, query: dict[str, str | list[str]], ip: str | None) -> None:
        self.request_id = request_id
        self.started_at = started_at
        self.clock = clock
        self.span = span
        self.method = method
        self.path = path
        self.headers = headers
        self.functions = functions
        self.project = functions.project
        self.query = query
        self.ip = ip
        self.tenant: Tenant | None = None
        self.function: CompiledFunction | None = None
        self.raw_body: bytes | None = None
        self.body: Any = None  # bytes for a body that is not text
        self.charset = "utf-8"  # a text body's
        self.body_pending = False  # an HTTP/1.1 body not read (yet): an answer now closes the connection

    def record(self, execution: Execution, function: str | None, status: int, headers: list[tuple[str, str]],
               payload: bytes, secrets: dict[str, str], redactor: Redactor, *, client_gone: bool = False) -> TraceRecord:
        span = self.span
        span.duration_ms = self.clock.now_ms() - span.start
        span.attributes["http.status_code"] = status
        if self.tenant is not None:
            span.attributes["flux.tenant"] = self.tenant.name
        if client_gone:  # the answer was never sent
            span.attributes["flux.client_disconnected"] = True
        # A server error, or a refusal of the gateway's own (no function ran: 400, 401, 404, 413). A
        # 4xx the function returned is its answer, not a failure.
        if status >= 500 or (status >= 400 and not execution.spans):
            span.status = "error"
            span.error = execution.error or _returned_error(status, execution.body)
        if function is None or execution.spans and execution.spans[0].get("parent") != span.id:
            spans = [span.to_dict()]
        else:
            spans = [span.to_dict(), *execution.spans]
        limit = self.project.limits.record_body_bytes
        api_keys = self.functions.api_keys
        request_headers = {k: REDACTED if _carries_api_key(v, api_keys) else v for k, v in redact_headers(self.headers).items()}
        record = {
            "method": self.method,  # the client's: any HTTP token reaches a 405
            "path": self.path,
            "spans": spans,
            "request": {"headers": request_headers, "query": self.query, "ip": self.ip,
                        **_body_record(self.raw_body, self.body, limit, redactor, secrets, self.charset)},
            "response": {"headers": redact_headers(_header_record(headers)), **_body_record(payload, None, limit, redactor, secrets)},
            "recording": execution.recording,
            "error": execution.error or _returned_error(status, execution.body)
                     or (CLIENT_GONE if client_gone else None),
        }
        # Every tenant's secrets, not only this one's; without a tenant (a 401), all as `[secret]`.
        try:
            record = redactor.redact(record, secrets)
        except RecursionError:  # a body or result nested deeper than a walk can go: the rest is still recorded
            record = redactor.redact({key: cap_recording(value) if key == "recording" else cap_depth(value)
                                      for key, value in record.items()}, secrets)
        # One line each, cut only now that no secret is left to cut into.
        if record["error"] is not None:
            record["error"] = one_line(record["error"])
        if record["spans"][0]["error"] is not None:
            record["spans"][0]["error"] = one_line(record["spans"][0]["error"])
        return TraceRecord(
            id=self.request_id, tenant=self.tenant.name if self.tenant else None, function=function,
            method=record["method"], path=record["path"], status=status, duration_ms=round(span.duration_ms, 3),
            started_at=self.started_at, error=record["error"], spans=record["spans"], request=record["request"],
            response=record["response"], recording=record["recording"],
            code_version=self.function.function.code_version if self.function else None,
            git_commit=self.project.git_commit if self.function else None, replay_of=None,
        )


def _secrets_of(project: Project) -> frozenset[str]:
    return frozenset(value for tenant in project.tenants.values() for value in tenant.secrets.values())


def _header_record(pairs: list[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Headers as recorded: name -> value, or the list of its values for a repeated header."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        known = out.get(name)
        out[name] = value if known is None else [*known, value] if isinstance(known, list) else [known, value]
    return out


def _returned_error(status: int, body: Any) -> str | None:
    """The error of a 4xx/5xx the function returned itself: its body's `error`, or the status. Whole:
    the record cuts it to one line once it is redacted."""
    if status < 400:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"] if body["error"].strip() else HTTPStatus(status).phrase
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _body_record(raw: bytes | None, parsed: Any, limit: int, redactor: Redactor, own: dict[str, str],
                 charset: str = "utf-8") -> dict[str, Any]:
    if raw is None:
        return {"body": None, "body_truncated": False, "body_bytes": 0}
    if isinstance(parsed, bytes):  # not text: base64, within the limit, of bytes redacted before (base64 hides a secret)
        kept, truncated = as_text(raw, limit // 4 * 3, redactor.byte_forms)
        return {"body": base64.b64encode(redactor.redact_bytes(kept, own)).decode(), "body_encoding": "base64",
                "body_truncated": truncated, "body_bytes": len(raw)}
    if len(raw) > limit:
        head = raw[:limit].decode(charset, "replace")
        # Past the cut too, as far as a secret could reach: one that straddles it moves the cut back.
        text = raw[:limit + 4 * redactor.longest].decode(charset, "replace")
        body, _ = as_text(text, len(head), redactor.forms)
        return {"body": body, "body_truncated": True, "body_bytes": len(raw)}
    if parsed is None and raw:
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = raw.decode("utf-8", "replace")
    return {"body": parsed, "body_truncated": False, "body_bytes": len(raw)}


def _request_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's headers as the client sent them, from the ASGI scope (Quart's own adds a
    `Remote-Addr` that a client's header of that name replaced), names lower-cased. A repeated
    header's values are joined with ", " (a cookie's with "; "), as Node and fetch join them."""
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        known = headers.get(key)
        headers[key] = text if known is None else f"{known}; {text}" if key == "cookie" else f"{known}, {text}"
    return headers


def _query(args: MultiDict[str, str]) -> dict[str, str | list[str]]:
    """The query string: a key given once has its value, a key given more than once the list of
    its values, in order (`?a=1&a=2`: ["1", "2"]), as Node's querystring gives them."""
    return {key: values[0] if len(values) == 1 else values for key, values in args.lists()}


def _api_key(headers: dict[str, str]) -> str | None:
    if headers.get(API_KEY_HEADER):
        return headers[API_KEY_HEADER]
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def _carries_api_key(value: str, api_keys: frozenset[str]) -> bool:
    """Whether a header's value is any tenant's API key, bare or as a bearer token, or holds one as
    one of a repeated header's values: no function, and no trace, sees one (a request may carry
    another tenant's key beside the one it is served by)."""
    if _is_api_key(value, api_keys):
        return True
    return ("," in value or ";" in value) and any(_is_api_key(part, api_keys) for part in re.split("[,;]", value))


def _is_api_key(value: str, api_keys: frozenset[str]) -> bool:
    value = value.strip()
    return value in api_keys or (value[:7].lower() == "bearer " and value[7:].strip() in api_keys)


_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # wbits per coding


class _TooLarge(Exception):
    pass


def _decompress(raw: bytes, coding: str, limit: int) -> bytes:
    """A gzip or deflate (zlib) request body, decompressed: at most `limit` bytes of it are made, so a
    small body that expands a thousandfold stops there (`_TooLarge`). A ValueError says why it does not
    decode. Concatenated gzip members are one body, as gunzip reads them."""
    out = bytearray()
    data = raw
    while data:
        decoder = zlib.decompressobj(_DECODERS[coding])
        try:
            out += decoder.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            raise ValueError(str(exc).removeprefix("Error -3 while decompressing data: ")) from None
        if len(out) > limit:
            raise _TooLarge
        if not decoder.eof:
            raise ValueError("it ends before its compressed data does")
        data = decoder.unused_data
        if data and coding == "deflate":
            raise ValueError("data follows the end of its compressed data")
    return bytes(out)


# Types whose bodies are bytes, whatever they hold: a function gets them exact, never as text.
_BINARY_TYPES = frozenset({"application/octet-stream", "application/pdf", "application/zip", "application/gzip",
                           "application/wasm", "application/protobuf", "application/x-protobuf", "application/msgpack"})
_BINARY_FAMILIES = ("image/", "audio/", "video/", "font/", "multipart/")


def _parse_body(raw: bytes, content_type: str) -> tuple[Any, str]:
    """The request body as `req.body` has it, and the charset it was read in. JSON (no content type,
    or a JSON type) is parsed (None when empty; a ValueError says why it does not parse); a binary
    type's body is its bytes; any other body is text in its declared charset (UTF-8 by default),
    or its bytes when it is not valid in that charset: never text with a byte lost."""
    if not content_type or content_type == "application/json":  # the common case, without parsing the type
        return _json(raw), "utf-8"
    mimetype, options = parse_options_header(content_type)
    mimetype = mimetype.lower()
    if _is_json(mimetype):  # JSON is UTF-8 (RFC 8259); application/json defines no charset
        return _json(raw), "utf-8"
    if mimetype in _BINARY_TYPES or mimetype.startswith(_BINARY_FAMILIES):
        return raw, ""
    charset = options.get("charset") or "utf-8"
    if text_codec(charset) is None:  # a charset Python does not know, or a codec that is no charset (it would lose bytes)
        return raw, ""
    try:
        return raw.decode(charset), charset
    except ValueError:  # not valid in its charset
        return raw, ""


def _is_json(mimetype: str) -> bool:
    """application/json, text/json and the +json types (RFC 6839: vnd.api+json, problem+json). Not every
    type that says json: JSON Lines (x-ndjson, jsonl) and json-seq are several documents, read as text."""
    _, _, subtype = mimetype.partition("/")
    return subtype in ("json", "x-json") or subtype.endswith("+json")


MAX_BODY_DEPTH = 200  # JSON nesting a request body may have: orjson writes 254 levels at most, and the runtime adds some


def _json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(str(exc).split(":")[0]) from None
    # Counting brackets first keeps the walk off every ordinary body.
    if raw.count(b"[") + raw.count(b"{") > MAX_BODY_DEPTH and _deeper_than(value, MAX_BODY_DEPTH):
        raise ValueError(f"it is nested deeper than {MAX_BODY_DEPTH} levels")
    return value


ORJSON_MAX_DEPTH = 254  # the most levels orjson.dumps writes; past them it raises "Recursion limit reached"


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` (as orjson.loads gave it) nests lists and objects deeper than `limit`.

    Asked of orjson itself, at C speed: `value` wrapped in ORJSON_MAX_DEPTH - `limit` lists
    can be written only if it holds at most `limit` levels. A walk in Python took 0.25 ms for a
    4 KB body of 100 small objects, on every request whose body has over 200 brackets."""
    probe = value
    for _ in range(ORJSON_MAX_DEPTH - limit):
        probe = [probe]
    try:
        orjson.dumps(probe)
    except orjson.JSONEncodeError:  # what orjson.loads gave, it writes back: only depth fails it
        return True
    return False


SETTLE_GRACE_SECONDS = 6.0  # past the time limit: a COMMIT or a cancel at the deadline may take up to 5 s to reach the server
LATE_CANCEL_SECONDS = 5.0  # what a function cancelled at the end of the settle gets to roll back
QUEUE_PER_WORKER = 4  # the default bound on requests waiting for a worker: 4 per worker
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client left first; never sent


def _error(status: int, message: str, hint: str) -> Execution:
    phrase = "Client Closed Request" if status == CLIENT_CLOSED_REQUEST else HTTPStatus(status).phrase
    return Execution(status=status, headers=[], body={"error": message, "hint": hint, "status": phrase}, error=message)


RETRY_AFTER_SECONDS = 1  # what a 503 at capacity asks: soon, a worker frees within a function's time


def _at_capacity(message: str) -> Execution:
    answer = _error(503, message, "Nothing ran. Send it again after Retry-After (or to another instance); "
                                  "to queue more, raise --workers or --max-queue.")
    answer.headers.append(("retry-after", str(RETRY_AFTER_SECONDS)))
    return answer


def _cut_off() -> Execution:
    return _error(503, "the server stopped before the function finished (its span and the mutation log say "
                       "what became of its transaction)", "Stop the server with one SIGTERM or Ctrl-C, which "
                       "waits for functions in flight up to their time limit.")


def create_app(gateway: Gateway, *, on_startup: Any = None, on_shutdown: Any = None) -> Quart:
    """The Quart app for a Gateway. `on_startup` / `on_shutdown` are awaited in the app's lifespan."""
    app = Quart("flux")
    app.config["MAX_CONTENT_LENGTH"] = gateway.project.limits.max_body_bytes
    # Quart sizes each request's body reader from this, so a reload with a new limit must update it.
    gateway.reload_hooks.append(lambda project: app.config.update(MAX_CONTENT_LENGTH=project.limits.max_body_bytes))
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.extensions["flux"] = gateway

    @app.before_serving
    async def _start() -> None:
        gateway.functions.warm()
        if on_startup is not None:
            await on_startup()

    @app.after_serving
    async def _stop() -> None:
        # Functions run on past their request (a client gone, the HTTP server's grace period over):
        # their traces go in the drain.
        await gateway.settle(timeout=gateway.project.limits.timeout_ms / 1000 + SETTLE_GRACE_SECONDS)
        if on_shutdown is not None:
            await on_shutdown()
        if gateway.database_probe is not None:
            gateway.database_probe.close()
        gateway.functions.close()

    @app.get("/_flux/health")
    async def _health() -> Response:
        return _own(Response(orjson.dumps(await gateway.health()), content_type="application/json"))

    @app.get("/_flux/metrics")
    async def _metrics() -> Response:
        return _own(Response(gateway.metrics.render(await gateway.health()), content_type="text/plain; version=0.0.4; charset=utf-8"))

    @app.get("/_flux/requests")
    async def _requests() -> Response:
        return _own(await _tenant_traces(gateway, None))

    @app.get("/_flux/requests/<request_id>")
    async def _request(request_id: str) -> Response:
        return _own(await _tenant_traces(gateway, request_id))

    @app.route("/", defaults={"path": ""}, methods=_METHODS)
    @app.route("/<path:path>", methods=_METHODS)
    async def _function(path: str) -> Response:
        return await gateway.handle(request.method, "/" + path)

    @app.errorhandler(MethodNotAllowed)
    async def _other_method(_: MethodNotAllowed) -> Response:
        # A method no rule lists (PROPFIND, TRACE, ...): Quart's answer was an HTML 405 with no request
        # id, unrecorded, whose Allow named every method. The gateway answers it as any unrouted request.
        return await gateway.handle(request.method, request.path)

    return app


def _body_unread() -> bool:
    """Whether the request is HTTP/1.1 with a body not read yet: an answer now leaves it behind, and
    Hypercorn then closes the connection."""
    return request.http_version == "1.1" and (
        bool(request.content_length) or "chunked" in request.headers.get("transfer-encoding", "").lower())


def _own(response: Response) -> Response:
    """An answer of Flux's own endpoints, which read no body: to a request that has one it says
    `connection: close`, as the gateway's answers do, or a keep-alive client (a proxy's pool,
    shared by every tenant's requests) would send the next request on a connection being closed."""
    if _body_unread():
        response.headers["connection"] = "close"
    return response


async def _tenant_traces(gateway: Gateway, request_id: str | None) -> Response:
    """A tenant's own traces, by API key; never another tenant's."""
    tenant = gateway.tenant_for(gateway.project, _api_key(_request_headers(request.scope["headers"])))
    if tenant is None:
        gateway.metrics.traces_api_refused += 1  # unrecorded (no trace of a read), so counted: key guessing shows
        return Response(orjson.dumps({"error": "missing or invalid API key"}), status=401, content_type="application/json")
    reader = gateway.trace_reader
    if reader is None:
        return Response(orjson.dumps({"error": "traces are not stored (no database)"}), status=404, content_type="application/json")
    args = request.args.to_dict()
    problem = _trace_query_problem(request_id, args)
    if problem is not None:
        return Response(orjson.dumps({"error": problem}), status=400, content_type="application/json")
    try:
        data = await reader(tenant.name, request_id, args)
    except SchemaVersionError as exc:
        # The operator's to fix, not the tenant's: in a rolling deploy, a newer Flux upgraded the schema
        # under this older one, whose replacement answers. Its hint (install Flux) is for the log.
        log.warning("reading traces for tenant %s refused: %s. %s", tenant.name, exc, exc.hint)
        return Response(orjson.dumps({"error": "reading traces failed: this server's Flux does not read the trace store's "
                                               "version (an upgrade in progress?)"}), status=503, content_type="application/json")
    except FluxError as exc:
        status = 404 if isinstance(exc, NotFoundError) else 400
        return Response(orjson.dumps({"error": exc.message, "hint": exc.hint}), status=status, content_type="application/json")
    except psycopg.OperationalError as exc:
        log.warning("reading traces for tenant %s failed: %s", tenant.name, exc)
        return Response(orjson.dumps({"error": "reading traces failed: the database did not answer"}), status=503,
                        content_type="application/json")
    except psycopg.Error as exc:  # it answered, and refused (a privilege the role lacks): not worth a retry
        log.error("reading traces for tenant %s failed: %s", tenant.name, from_psycopg(exc, "the database refused"))
        return Response(orjson.dumps({"error": "reading traces failed: the database refused the query (the server's log says why)"}),
                        status=500, content_type="application/json")
    return Response(orjson.dumps(data, default=str), content_type="application/json")


MAX_SINCE_SECONDS = 10 * 366 * 86400


def _trace_query_problem(request_id: str | None, args: dict[str, str]) -> str | None:
    """What is wrong with a GET /_flux/requests query, if anything."""
    if any("\x00" in text for text in [request_id or "", *args, *args.values()]):
        return "the query holds a NUL character"
    if "limit" in args:
        try:
            if int(args["limit"]) < 1:
                raise ValueError
        except ValueError:
            return f"limit must be a whole number of at least 1, not {args['limit']!r}"
    if args.get("since_seconds"):
        try:
            since = float(args["since_seconds"])
        except ValueError:
            since = -1.0
        if not 0 < since <= MAX_SINCE_SECONDS:  # also refuses nan and inf
            return f"since_seconds must be a number of seconds from 0 to {MAX_SINCE_SECONDS}, not {args['since_seconds']!r}"
    return None
