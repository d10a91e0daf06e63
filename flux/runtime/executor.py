"""Run one request in a fresh JS context from the isolate pool: the runtime's core loop.

    start the handler -> drain the outbox -> run host calls -> settle them -> ... -> result

The loop runs under the request's deadline. Each step posts an eval and waits on the drain eval
behind it, which is cancelable; when the deadline passes the isolate is discarded (closing it
stops JS still running in it, in an eval or in a microtask), the database transaction is
cancelled and rolled back, and the request ends with 504. An out-of-memory isolate ends its own
request with 500. Neither touches any other request: a discarded isolate is never handed out
again, and the pool renews only isolates released by a request that ended cleanly.

The result carries the function's span (with its step children and client spans), the
replay tape and the response. The executor does not write traces, and redacts only where it
summarises (a V8 error's first line) or cuts (a fetch body); the gateway redacts the whole
record, once.

Recording format (`Execution.recording`, stored in `flux.trace_requests.recording`), v4:
    {"v": 4, "truncated": bool, "entropy": hex, "env": {time_zone, locale, v8}, "events": [[seq, kind, data], ...]}
and "incomplete": true when the request ended before the function did (a limit, or a failure inside Flux or a
stop, whose tape reaches the gateway in FailedInsideFlux or CutShort); "truncated": true when the
tape stopped, past MAX_TAPE_EVENTS events or MAX_TAPE_CHARS of db and fetch events; "commit" once
the function's answer went to its COMMIT: {"transaction": "committed" | "rolled_back" | null (no
statement)}, or, when the host answered an error instead (the COMMIT failed or timed out, or a
caught failure had aborted the transaction), {"transaction": "rolled_back", "status", "error"}:
the request's answer, which a replay of the function alone cannot tell. `seq` is one counter over
everything the function observed, in order. Kinds: "now" (ms), "random" (float), "uuid" (str),
"random_bytes" (hex), "db" ({sql, params, result | error}), "fetch" ({url, method, headers, body,
status, status_text, url_final, response_headers, response_body} or {url, method, headers, body,
error}), "timer" (ms), and "settled" (the seqs of the calls whose results reached the function
together, in one turn, in order: results arrive in the order the host settles them, not the order
of the calls, and whether two came in one turn changes how their callbacks interleave). `env` is
what the function reads of the machine without a call: the default time zone and locale (Date's
local time, toLocaleString) and the V8 version (its ICU data formats them). A call the
request ended before has "abandoned": true and neither result nor error; one that finished after
the function returned keeps its outcome and is in no "settled" event (the function never got it).
An error is what the function's Error got: {name, message, ...} (sqlstate, detail, hint, position,
timeout).
Bytes are written one character per byte (U+0001 to U+00FF, and a 0 byte as U+0100, since jsonb
cannot hold U+0000): a db event's "binary" lists the
parameters that were bytes; a fetch event's "binary": true says its body was; its
"response_bytes", there when the response's bytes are not the UTF-8 of response_body (what text()
gave) or that text holds U+0000, are what arrayBuffer() gave, cut at 1 MB like response_body. `entropy` is the part of the
host-supplied randomness that crypto.randomUUID and getRandomValues consumed, in order (hex).
A fetch's `url_final` is its `url` as the function wrote it (redirects are not followed, and the
HTTP client's rewrite of a URL would hide a secret in it from redaction), which is also the
response's `url` the function got; in `headers` and `response_headers`, sensitive headers
(authorization, cookies, API keys) are "[redacted]", so a replay hands the function that text;
`set_cookies` has one "[redacted]" per Set-Cookie value (getSetCookie() and iteration give each).
A db event's `columns` are its rows' keys in their order, which jsonb (storing the trace) does not keep,
and its `negative_zeros`, there when a float in its rows was -0.0 (jsonb's numbers have no negative
zero: a stored tape has 0 there), the paths of those floats: [row index, column, keys and indexes
inside the value...]. A tape written before `negative_zeros` has a -0.0 from the database as 0.
Its `bigints`, there when an int8 in its rows was past Number's safe range (the function got a
BigInt; the tape has the exact integer), are those values' paths: [row index, column, array
indexes...]. A tape written before `bigints` has none: such a value reached the function as the
nearest double.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import re
import secrets as secrets_module
from dataclasses import dataclass, field
from typing import Any

import orjson
from py_mini_racer import JSEvalException, JSOOMException

from flux.errors import INTERNAL_ERROR
from flux.project import Limits
from flux.redaction import REDACTED, Redactor, as_text, one_line, redact_headers
from flux.runtime.dbvalues import bigint_texts, marked_bigints
from flux.runtime.drain import BrokenBridge, Kept, check
from flux.runtime.fetch import MAX_RECORDED_FETCH_BODY, FetchPolicy, Transport
from flux.runtime.host import Clock, DbSession, HostCallError, Span, db_span_name
from flux.runtime.isolate import CompiledFunction, Isolate, IsolatePool

log = logging.getLogger("flux.runtime")

RECORDING_VERSION = 4  # README, "The replay tape": when the version goes up
MAX_TAPE_EVENTS = 10_000  # as prelude.js: the JS side stops recording there, and so does the host
# What the host keeps of a request's db and fetch events (SQL, parameters, results, bodies), in
# characters of their JSON: held in the gateway's memory, which no isolate limit covers, until the
# trace is written; and a stored trace holds 8 MB at most (flux.gateway.traces), a larger tape
# being left out of it anyway. Past it the tape is cut, as at MAX_TAPE_EVENTS.
MAX_TAPE_CHARS = 8 * 1024 * 1024
# ctx.db and ctx.fetch spans a request records, at most (as the prelude's MAX_STEPS): past it they
# are counted on the function span (`flux.spans_dropped`), for the gateway's memory and trace queue.
MAX_CLIENT_SPANS = 1000
MAX_SPAN_TEXT = 64 * 1024  # of a span's db.statement or http.url; the tape has them whole, within MAX_TAPE_CHARS
# Of a fetch's init.name, its span's name: the function's own text, held for every call and repeated
# in its error (300 fetches named with a 1 MB string held 300 MB until the trace was written).
MAX_FETCH_NAME = 1024
# ctx.fetch calls of one request on the wire at once; the others wait their turn. The HTTP client's
# connections (aiohttp's 100) serve every request, and each response is read whole into the
# gateway's memory (up to 16 MB): one request with 100 fetches in flight held every connection
# (another tenant's fetch waited out its timeout) and 1.5 GB.
MAX_CONCURRENT_FETCHES = 16
SALVAGE_S = 0.1  # past the deadline, for the last drain of a request cut short (about 1 ms)
ENTROPY_BYTES = 1024  # 64 crypto.randomUUID() calls per request; sent to the isolate at start


@dataclass(slots=True)
class Execution:
    status: int
    headers: list[tuple[str, str]]  # lower-cased names, a repeated header as several pairs
    body: Any  # None: no body
    error: str | None = None
    spans: list[dict[str, Any]] = field(default_factory=list)
    recording: dict[str, Any] | None = None
    db_outcome: str | None = None


@dataclass(frozen=True, slots=True)
class Invocation:
    request_id: str
    tenant: str
    request: dict[str, Any]  # {method, path, query, headers, body, ip}; body: bytes for a body that is not text
    secrets: dict[str, str]
    parent_span: str | None
    replay: bool = False
    record: bool = True


def new_span_id() -> str:
    return secrets_module.token_hex(8)


# The most characters an eval's code may have. V8 makes no string longer than 2^29 - 24 UTF-16
# units, and mini-racer then aborts the whole process (a fatal ToLocalChecked), every tenant's
# requests with it: 16 fetch responses of 16 MB of quotes, settled in one turn, are 1 G characters
# once written as JSON inside a JS string literal. Half of V8's limit, for text two units a character.
MAX_EVAL_CHARS = 256 * 1024 * 1024


class _EvalTooLarge(Exception):
    pass


async def _then_drain(isolate: Isolate, op: str, arg: Any, *, literal: str | None = None) -> dict[str, Any]:
    """Run the bridge's `op` with `arg` (`literal`: `arg` already as `_eval_arg` writes it), then
    its drain once the microtasks `op` queued have run: what the function did meanwhile. Microtasks
    run only when an eval ends, so the drain is an eval of its own."""
    literal = _eval_arg(arg) if literal is None else literal
    if len(literal) > MAX_EVAL_CHARS:
        raise _EvalTooLarge(f"{len(literal):,} characters")
    return _drain(await isolate.eval_then(f'{isolate.bridge}("{op}",{literal})', isolate.drain_code))


def _drain(text: Any) -> Any:
    """A drain's JSON text as data. A JSON.stringify the function replaced can give anything (text
    that is no JSON, a number, undefined): that is a broken bridge, not an error of Flux's."""
    if not isinstance(text, str):
        raise BrokenBridge(f"the drain is {type(text).__name__}, not JSON text")
    try:
        return _from_js(text)
    except (ValueError, RecursionError) as exc:
        raise BrokenBridge(f"the drain is not JSON ({exc})") from exc


def _within_eval_limit(settled: list[list[Any]]) -> tuple[list[list[Any]], str]:
    """`settled` as the function can get it in one eval, and `_eval_arg`'s text of it: the largest
    results past MAX_EVAL_CHARS become a RangeError for their call."""
    literal = _eval_arg(settled)
    if len(literal) <= MAX_EVAL_CHARS:
        return settled, literal
    sizes = [len(_eval_arg(item)) for item in settled]
    total = sum(sizes)
    fitted = list(settled)
    for index in sorted(range(len(settled)), key=sizes.__getitem__, reverse=True):
        if total <= MAX_EVAL_CHARS // 2:  # the list's own commas and escapes, with room to spare
            break
        call_id = settled[index][0]
        fitted[index] = [call_id, False, {"name": "RangeError", "message": (
            f"this result is {sizes[index]:,} characters as the function would receive it, more than the "
            f"{MAX_EVAL_CHARS:,} that can reach it in one turn with the results that came with it")}]
        total -= sizes[index]
    return fitted, _eval_arg(fitted)


def _from_js(text: str) -> Any:
    """JSON text from the isolate. A JS string may hold a lone surrogate, which JSON escapes and
    orjson refuses: the rare text that holds one is read again, each made U+FFFD."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _well_formed(json.loads(text))


def _well_formed(value: Any) -> Any:
    """`value` with each lone UTF-16 surrogate (a JS string may hold one; JSON escapes it, and
    orjson refuses it) made U+FFFD, as `String.prototype.toWellFormed` does."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_well_formed(k): _well_formed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_well_formed(v) for v in value]
    return value


def _eval_arg(value: Any) -> str:
    """A JSON document as a JS string literal, for JSON.parse on the JS side (never an object literal)."""
    return orjson.dumps(orjson.dumps(value).decode()).decode()


class Executor:
    def __init__(
        self, *, limits: Limits, fetch_policy: FetchPolicy, transport: Transport, db_pool: Any | None,
        redactor: Redactor | None = None,
    ) -> None:
        self.limits = limits
        self.fetch_policy = fetch_policy
        self.transport = transport
        self.db_pool = db_pool
        self.redactor = redactor or Redactor(())  # the project's secrets, every tenant's

    async def run(self, pool: IsolatePool, call: Invocation) -> Execution:
        compiled = pool.compiled
        clock = Clock()
        span = Span(id=new_span_id(), parent=call.parent_span, name=compiled.name, kind="internal",
                    start=clock.now_ms(), attributes={"flux.kind": "function", "code.filepath": compiled.function.display_path,
                                                      "flux.code_version": compiled.function.code_version})
        if compiled.script is None:
            return self._finish_error(span, clock, 500, "FunctionLoadError", compiled.error or "the function did not load", "")
        run = _Run(self, compiled, call, span, clock)
        isolate = await pool.acquire()
        span.attributes["flux.isolate_acquire_ms"] = round(pool.acquire_times[-1] * 1000, 3)
        deadline = asyncio.get_running_loop().time() + self.limits.timeout_ms / 1000  # the COMMIT too
        try:
            async with asyncio.timeout_at(deadline):
                # Microtasks the function queued from inside its last drain count within its limits
                # too: eval_then answers once they have run.
                done = await run.loop(isolate)
        except TimeoutError:
            await run.salvage(isolate)
            pool.discard(isolate)  # stops JS even mid-microtask
            await run.cancel()
            return self._finish_error(
                span, clock, 504, "TimeoutError", f"the function exceeded its time limit ({self.limits.timeout_ms} ms)", "",
                run=run,
            )
        except (JSOOMException, _MemoryExhausted):
            pool.discard(isolate)
            await run.cancel()
            return self._out_of_memory(span, clock, run)
        except BrokenBridge as exc:  # see flux.runtime.drain
            pool.discard(isolate)
            await run.cancel()
            return self._finish_error(span, clock, 500, "BrokenBridge", f"the function replaced a built-in the runtime relies "
                                      f"on (JSON.stringify, Array.prototype.splice, a toJSON ...): {exc}", "", run=run)
        except _EvalTooLarge as exc:  # the request itself, with a max_body_bytes far above the default
            pool.discard(isolate)
            await run.cancel()
            return self._finish_error(span, clock, 413, "PayloadTooLarge", f"the request is too large to hand to the "
                                      f"function ({exc} as JSON, over {MAX_EVAL_CHARS:,}): lower max_body_bytes", "", run=run)
        except _Stuck as exc:
            exhausted = isolate.memory_exhausted()  # V8 stopped a microtask at the limit, so nothing settles
            pool.discard(isolate)
            await run.cancel()
            if exhausted:
                return self._out_of_memory(span, clock, run)
            return self._finish_error(span, clock, 500, "FunctionStuck", str(exc), "", run=run)
        except JSEvalException as exc:
            exhausted = isolate.memory_exhausted()  # stopped for its ArrayBuffers (flux.runtime.external)
            pool.discard(isolate)
            await run.cancel()
            if exhausted:
                return self._out_of_memory(span, clock, run)
            # Redacted whole, then cut to its first line: a cut secret (a PEM key's first line) is
            # past what redaction recognises.
            message = one_line(self.redactor.redact(str(exc), call.secrets))
            return self._finish_error(span, clock, 500, type(exc).__name__, message, "", run=run)
        except asyncio.CancelledError:  # the server stops without waiting for it: free the isolate, roll back
            pool.discard(isolate)
            await asyncio.shield(run.cancel())
            raise CutShort(self._finish_error(span, clock, 503, "Stopped", "the server stopped before the function finished",
                                              "", run=run)) from None
        except Exception as exc:  # a bug in Flux: the isolate is not reused and the pool stays counted; the gateway reports it
            pool.discard(isolate)
            await run.cancel()
            raise FailedInsideFlux(self._finish_error(span, clock, 500, "InternalError", INTERNAL_ERROR, "", run=run)) from exc
        if isolate.memory_exhausted():  # the limit was hit in a microtask, after the handler's result
            pool.discard(isolate)
            await run.cancel()
            return self._out_of_memory(span, clock, run)
        pool.release(isolate)
        try:
            return await self._answer(run, span, clock, done, deadline)
        except Exception as exc:  # a bug in Flux: its transaction must not stay open, holding its connection and locks
            if run.db.outcome is None:
                await run.cancel()
            # The function had answered: the tape says the host answered this instead, as for a failed COMMIT.
            run.commit = {"transaction": run.db.outcome if run.db.statements else None, "status": 500,
                          "error": {"name": "InternalError", "message": INTERNAL_ERROR}}
            raise FailedInsideFlux(self._finish_error(span, clock, 500, "InternalError", INTERNAL_ERROR, "", run=run)) from exc

    async def _answer(self, run: _Run, span: Span, clock: Clock, done: dict[str, Any], deadline: float) -> Execution:
        """The request once the function is done and its isolate released: its response, and its COMMIT."""
        if not done["ok"]:
            await run.cancel()
            error = done["error"]
            status = 500
            return self._finish_error(span, clock, status, error.get("name", "Error"), error.get("message", ""),
                                      error.get("stack", ""), run=run)
        try:
            status, headers, body = _response(_from_js(done["value"]))
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON deeper than the prelude lets through
            await run.cancel()
            return self._finish_error(span, clock, 500, "InvalidResponse", str(exc), "", run=run)
        await run.cancel_inflight()

        def not_committed(status: int, name: str, message: str, sqlstate: str | None = None) -> Execution:
            # The function's answer is replaced by the host's: on the tape, which a replay of the
            # function alone could not tell (it ends with the function's answer).
            error = {"name": name, "message": message, **({"sqlstate": sqlstate} if sqlstate else {})}
            run.commit = {"transaction": "rolled_back", "status": status, "error": error}
            if sqlstate:  # a COMMIT's failure, labelled by it in `flux why` as a statement's is
                span.attributes["db.sqlstate"] = sqlstate
            return self._finish_error(span, clock, status, name, message, "", run=run)

        try:
            await run.db.finish(commit=True, deadline=deadline)
        except HostCallError as exc:
            if run.db.commit_timed_out and exc.info.get("sqlstate") == "57014":  # cancelled at the deadline: rolled back
                return not_committed(504, "TimeoutError", f"the function exceeded its time limit ({self.limits.timeout_ms} ms) "
                                     "while its transaction committed (deferred triggers run then); it was rolled back")
            return not_committed(500, "DatabaseError", str(exc), exc.info.get("sqlstate"))
        if run.db.lost_writes is not None and status < 400:  # never answer a success whose writes are gone
            return not_committed(500, "TransactionAborted", f"the handler returned {status}, but {run.db.lost_writes}")
        run.commit = {"transaction": run.db.outcome if run.db.statements else None}
        span.duration_ms = clock.now_ms() - span.start
        span.attributes["db.transaction"] = run.db.outcome if run.db.statements else None
        span.attributes = {k: v for k, v in span.attributes.items() if v is not None}
        return Execution(status=status, headers=headers, body=body, spans=run.spans(),
                         recording=run.recording(), db_outcome=run.db.outcome if run.db.statements else None)

    def _out_of_memory(self, span: Span, clock: Clock, run: _Run) -> Execution:
        return self._finish_error(span, clock, 500, "MemoryLimitExceeded",
                                  f"the function exceeded its memory limit ({self.limits.memory_mb} MB)", "", run=run)

    def _finish_error(self, span: Span, clock: Clock, status: int, name: str, message: str, stack: str,
                      *, run: _Run | None = None) -> Execution:
        span.status = "error"
        summary = message if name in ("Error", "") else f"{name}: {message}"
        span.error = summary
        span.events.append({"name": "exception", "time": clock.now_ms(), "attributes": {
            "exception.type": name, "exception.message": message, "exception.stacktrace": stack}})
        span.duration_ms = clock.now_ms() - span.start
        if run is not None:
            span.attributes["db.transaction"] = run.db.outcome if run.db.statements else None
            span.attributes = {k: v for k, v in span.attributes.items() if v is not None}
        body = {"error": summary, "type": name}
        if stack:
            body["stack"] = stack
        return Execution(status=status, headers=[], body=body, error=summary,
                         spans=run.spans() if run else [span.to_dict()],
                         recording=run.recording() if run else None,
                         db_outcome=run.db.outcome if run and run.db.statements else None)


class FailedInsideFlux(Exception):
    """Running a request failed inside Flux (a bug; the cause is the original error). `partial` is
    the request as far as it got: its tape up to the failure (`incomplete` when the function had
    not finished; `commit` naming the host's 500 when it had), for the trace of the gateway's 500."""

    def __init__(self, partial: Execution) -> None:
        super().__init__(INTERNAL_ERROR)
        self.partial = partial


class CutShort(asyncio.CancelledError):
    """The request was cancelled while its function ran (a stop that could not wait for it), and
    rolled back: `partial` holds its tape up to there, `incomplete`. A cancel during the COMMIT
    is a plain CancelledError: whether the COMMIT went through is not known, so there is no tape
    that could say what became of the function's answer."""

    def __init__(self, partial: Execution) -> None:
        super().__init__("the request was cancelled while its function ran")
        self.partial = partial


class _Stuck(Exception):
    pass


class _MemoryExhausted(Exception):
    pass


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CR, LF, NUL and other controls
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})  # the server's to set


def _response(value: dict[str, Any]) -> tuple[int, list[tuple[str, str]], Any]:
    """The handler's {status, headers, body}, checked before its transaction commits: a response
    the HTTP server would refuse must not leave a write behind it. Header names come back lower-cased
    (HTTP's are case-insensitive), one pair per value: an array is a repeated header, and so are
    case variants of one name. The prelude has made numbers their JS text."""
    if not isinstance(value, dict):  # the prelude never hands over anything else; a drain the function shaped could
        raise ValueError("the handler must return {status, headers, body}")
    status = value.get("status", 200)
    # A 1xx is an interim answer (101 switches protocols): sent as the final one, it breaks the
    # connection after the transaction has committed.
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise ValueError(f"the handler returned status {status!r}; it must be an integer from 200 to 599")
    headers = value.get("headers") or {}
    if not isinstance(headers, dict):
        raise ValueError("the handler returned headers that are not an object of name: value")
    checked: list[tuple[str, str]] = []
    for name, values in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"the handler returned the header name {name!r}, which HTTP does not allow")
        lower = name.lower()
        for header in values if isinstance(values, list) else (values,):
            if not isinstance(header, str):
                what = f"an array holding {_js_type(header)}" if isinstance(values, list) else _js_type(header)
                raise ValueError(f"the handler returned header {name!r} as {what}; a header's value must be "
                                 "a string, a number, or an array of them (a repeated header)")
            if _HEADER_VALUE_FORBIDDEN.search(header):
                raise ValueError(f"the handler returned header {name!r} with a control character (such as a line break) in its value")
            if lower not in _FRAMING_HEADERS:
                checked.append((lower, header))
    return status, checked, value.get("body")


def _js_type(value: Any) -> str:
    """What a JSON value that is not a string was in JS, for an error."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return orjson.dumps(value).decode()  # null, true, false


class _Run:
    """The state of one execution: in-flight host calls, the client spans and the tape."""

    def __init__(self, executor: Executor, compiled: CompiledFunction, call: Invocation, span: Span, clock: Clock) -> None:
        self.x = executor
        self.compiled = compiled
        self.call = call
        self.span = span
        self.clock = clock
        self.entropy = os.urandom(ENTROPY_BYTES).hex()
        self.db = DbSession(executor.db_pool, {
            "request_id": call.request_id, "tenant": call.tenant, "function": compiled.name,
            **({"replay": True} if call.replay else {}),
        })
        self.secret_forms = executor.redactor.forms
        self.inflight: dict[asyncio.Task, int] = {}
        self.fetch_turns = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)
        self.timers: dict[int, list[Any]] = {}  # call id -> its tape event, for timers not yet settled
        self.client_spans: list[Span] = []
        self.host_events: list[list[Any]] = []
        self.tape_chars = 0  # of the db and fetch events in host_events
        self.tape_cut: int | None = None  # the seq from which the tape is cut, past MAX_TAPE_CHARS
        # What the JS side has handed over, drain by drain: kept when the request is cut short.
        self.js_tape: list[list[Any]] = []
        self.kept = Kept()
        self.js_spans: list[dict[str, Any]] = []
        self.js_events: list[dict[str, Any]] = []
        self.open_steps: list[dict[str, Any]] = []
        self.truncated = False
        self.entropy_used = ""
        self.finished = False  # the function ran to its end (returned or threw)
        self.commit: dict[str, Any] | None = None  # what the COMMIT made of the function's answer (the tape's "commit")

    async def loop(self, isolate: Isolate) -> dict[str, Any]:
        start = {
            "entropy": self.entropy, "span_id": self.span.id, "file": self.compiled.function.display_path,
            "request": self.call.request, "request_id": self.call.request_id, "tenant": self.call.tenant,
            "function": self.compiled.name, "replay": self.call.replay, "secrets": self.call.secrets,
        }
        if isinstance(self.call.request.get("body"), bytes):  # JSON carries bytes as base64; JS gets a Uint8Array
            start["request"] = {**self.call.request, "body": base64.b64encode(self.call.request["body"]).decode()}
            start["body_base64"] = True
        out = await self._turn(isolate, "start", start)
        while True:
            calls = out["calls"]
            if "cancel" in out:
                self._clear(out["cancel"])
            for call_id, op, args, _, seq, _ in calls:
                if op == "timer":  # on the tape once it reaches the function
                    self.timers[call_id] = [seq, "timer", args["ms"]]
            if out["done"] is None and len(calls) == 1 and not self.inflight:
                # The function waits on this one call alone: it runs here, without a task of its
                # own and a wait on it (in-process, 0.03 to 0.04 ms less per call).
                call_id, *call = calls[0]
                settled = [[call_id, *await self._host_call(*call)]]
            else:
                if out["done"] is not None:  # calls made and not awaited as the function ended: never run
                    for _, *call in calls:
                        self._abandoned(*call)
                    self.finished = True
                    return out["done"]
                for call_id, *call in calls:
                    self.inflight[asyncio.ensure_future(self._host_call(*call))] = call_id
                if not self.inflight:
                    raise _Stuck("the function is awaiting a Promise that nothing will settle")
                finished, _ = await asyncio.wait(self.inflight, return_when=asyncio.FIRST_COMPLETED)
                settled = [[self.inflight.pop(task), *task.result()] for task in finished]
            for call_id, *_ in settled:
                if call_id in self.timers:
                    self.host_events.append(self.timers.pop(call_id))
            settled, literal = _within_eval_limit(settled)
            out = await self._turn(isolate, "settle", settled, literal=literal)

    async def _turn(self, isolate: Isolate, op: str, arg: Any, *, literal: str | None = None) -> dict[str, Any]:
        """One turn of the function: `op`, then its drain, kept. A microtask that reached the memory
        limit was stopped by V8, but the drain behind it answers: the request ends here, or the
        host would settle the function's calls and run its callbacks (timers, fetches) past the limit."""
        try:
            out = self._take(await _then_drain(isolate, op, arg, literal=literal))
        except JSEvalException as exc:  # V8 stopped `op` (at the memory limit): the drain behind it may still have answered
            self._keep_last(getattr(exc, "then_result", None))
            raise
        if isolate.memory_exhausted():
            for _, *call in out["calls"]:  # made in that turn, never run: on the tape as a time limit leaves them
                self._abandoned(*call)
            raise _MemoryExhausted()
        return out

    def _clear(self, call_ids: list[int]) -> None:
        """Timers the function cleared once they were on the host: their tasks end now, unsettled,
        and leave nothing on the tape (each would hold a task on the shared loop until it fired)."""
        cleared = set(call_ids)
        for task, call_id in list(self.inflight.items()):
            if call_id in cleared:
                task.cancel()
                del self.inflight[task]
        for call_id in cleared:
            self.timers.pop(call_id, None)

    async def salvage(self, isolate: Isolate) -> None:
        """After the deadline: what the function did since the last drain (its logs, tape, spans, the
        steps it was in), so that a function stopped mid-loop still shows where it was. Calls it
        made meanwhile never ran: they are recorded as abandoned."""
        self._keep_last(await isolate.salvage(isolate.drain_code, timeout_s=SALVAGE_S))

    def _keep_last(self, text: object) -> None:
        """The last drain of a request that has ended (None: there is none): its tape, logs and
        spans kept, its calls recorded as abandoned. Without it the first turn's reads, the file's
        top-level code's among them, were lost with a memory limit reached in that turn."""
        if text is None:
            return
        try:
            out = self._take(_drain(text))
        except (BrokenBridge, ValueError, RecursionError):  # the request has ended anyway: keep what came before
            return
        for _, *call in out.get("calls", ()):
            self._abandoned(*call)

    def _take(self, out: Any) -> dict[str, Any]:
        """Keep what a drain handed over of the recording and the spans, once it is checked (flux.runtime.drain)."""
        out = check(out, set(self.inflight.values()))
        self.kept.add(out)  # before it is kept: a forged drain leaves nothing in memory
        self.js_tape.extend(out.get("tape", ()))
        self.js_spans.extend(out.get("spans", ()))
        self.js_events.extend(out.get("events", ()))
        if "open" in out:  # only when they changed
            self.open_steps = out["open"]
        self.truncated = self.truncated or bool(out.get("truncated"))
        for key in ("events_dropped", "steps_dropped"):  # past the prelude's limits: counted, not kept
            if key in out:
                self.span.attributes[f"flux.{key}"] = out[key]
        self.entropy_used += out.get("entropy", "")
        return out

    def _abandoned(self, op: str, args: dict[str, Any], parent: str | None, seq: int, site: str | None) -> None:
        """A call the request ended before running: its span and its tape entry say so (a timer
        that never fired has neither)."""
        if op == "timer":
            return
        name = db_span_name(args.get("sql", "")) if op == "db" else op
        span = Span(id=new_span_id(), parent=parent or self.span.id, name=name, kind="client", start=self.clock.now_ms(),
                    attributes={"flux.abandoned": True, **({"code.location": site} if site else {})})
        self._keep_span(span)
        # Written as a call that ran is: its sensitive headers redacted, its bytes as the tape writes them.
        event = _db_event(with_param_bigints(args)) if op == "db" else _fetch_event(args)
        self._on_tape([seq, op, {**event, "abandoned": True}])

    async def _host_call(self, op: str, args: dict[str, Any], parent: str | None, seq: int, site: str | None) -> tuple[Any, ...]:
        """(ok, result or error), what the settle hands the function; a db result with BigInts adds their texts."""
        if op == "timer":
            await asyncio.sleep(args["ms"] / 1000)
            return True, None
        span = Span(id=new_span_id(), parent=parent or self.span.id, name=op, kind="client", start=self.clock.now_ms())
        if site:
            span.attributes["code.location"] = site
        self._keep_span(span)
        try:
            if op == "db":
                return (True, *await self._db(span, args, seq))
            if op == "fetch":
                return True, await self._fetch(span, args, seq)
            raise HostCallError({"name": "TypeError", "message": f"unknown ctx operation {op!r}"})
        except HostCallError as exc:
            span.status = "error"
            span.error = exc.info.get("message")
            return False, exc.info
        except asyncio.CancelledError:
            span.attributes["flux.abandoned"] = True  # the request ended before this call did
            raise
        finally:
            span.duration_ms = self.clock.now_ms() - span.start

    async def _db(self, span: Span, args: dict[str, Any], seq: int) -> tuple[Any, ...]:
        args = with_param_bigints(args)
        sql, params, binary = args["sql"], args["params"], args.get("binary")
        span.name = db_span_name(sql)
        span.attributes.update({"flux.kind": "db", "db.system": "postgresql", "db.statement": self._span_text(sql)})
        event = _db_event(args)
        entry = [seq, "db", event]
        self._on_tape(entry)
        if binary:  # bytea parameters: one character per byte (prelude.js)
            params = [p.encode("latin-1") if i in binary else p for i, p in enumerate(params)]
        try:
            result = await self.db.query(sql, params)
        except HostCallError as exc:
            event["error"] = exc.info
            if exc.info.get("sqlstate"):
                span.attributes["db.sqlstate"] = exc.info["sqlstate"]
            raise
        except BaseException:  # cancelled, or a failure inside Flux: the request ends before this call did
            event["abandoned"] = True
            raise
        span.attributes["db.rows"] = result["rowCount"]
        bigints = result.pop("bigints", None)
        event["result"] = result
        dumped = orjson.dumps(result)
        self._grew(entry, result, size=len(dumped))
        if result["rows"]:  # jsonb, which stores the trace, keeps an object's keys in an order of its own
            event["columns"] = list(result["rows"][0])
        if b"-0.0" in dumped:  # orjson's only text for a float's negative zero, which jsonb (numeric) makes 0
            zeros = _negative_zeros(result["rows"], [])
            if zeros:
                event["negative_zeros"] = zeros
        if bigints:  # int8s past 2^53, exact on the tape: the function gets BigInts of their text
            event["bigints"] = bigints
            return result, bigint_texts(result["rows"], bigints)
        return (result,)

    async def _fetch(self, span: Span, args: dict[str, Any], seq: int) -> Any:
        url, method, body, binary = args["url"], args["method"], args["body"], args.get("binary")
        span.attributes.update({"flux.kind": "fetch", "http.method": method, "http.url": self._span_text(url)})
        event = _fetch_event(args)
        entry = [seq, "fetch", event]
        self._on_tape(entry)
        policy = self.x.fetch_policy
        name = args.get("name") and as_text(str(args["name"]), MAX_FETCH_NAME, self.secret_forms)[0]
        span.name = name or "fetch"  # until the URL names the tool
        try:
            host, hostport = policy.parse(url)
            span.name = policy.span_name(url, host, hostport, name)
            policy.check(host, hostport)
            # A binary body crossed as one character per byte (prelude.js).
            sent = None if body is None else body.encode("latin-1" if binary else "utf-8")
            policy.check_request(url, method, args["headers"], len(sent or b""))
            timeout_ms = args.get("timeout_ms") or policy.config.timeout_ms
            try:
                async with self.fetch_turns:  # its timeout counts from its turn
                    result = await self.x.transport.send(method, url, args["headers"], sent, timeout_ms / 1000)
            except TimeoutError:
                span.attributes["timeout"] = True
                raise HostCallError({"name": "TimeoutError", "message": f"{span.name}: no response within {timeout_ms} ms",
                                     "timeout": True}) from None
            except OSError as exc:
                raise HostCallError({"name": "FetchError", "message": f"{span.name}: {exc}"}) from None
        except HostCallError as exc:
            event["error"] = exc.info  # what the function's Error got
            raise
        except BaseException:  # cancelled, or a failure inside Flux: the request ends before this call did
            event["abandoned"] = True
            raise
        span.attributes["http.status_code"] = result.status
        if result.status >= 400:
            span.status = "error"
            span.error = f"HTTP {result.status} {result.reason}".strip()
        response = {"status": result.status, "statusText": result.reason, "headers": result.headers, "body": result.text, "url": url}
        if result.set_cookies:
            response["setCookie"] = list(result.set_cookies)
            event["set_cookies"] = [REDACTED] * len(result.set_cookies)  # as many as getSetCookie() gave
        recorded, truncated = as_text(result.text, MAX_RECORDED_FETCH_BODY, self.secret_forms)
        event.update(status=result.status, status_text=result.reason, url_final=url, response_headers=redact_headers(result.headers),
                     response_body=recorded)
        if result.text.encode("utf-8", "surrogatepass") != result.body or "\x00" in result.text:
            # Bytes the text is not the UTF-8 of (binary, or another charset): arrayBuffer() gets
            # them exactly, one character per byte, as JSON carries them and redaction reads them.
            # So do bytes whose text holds U+0000, which the stored tape (jsonb) makes U+FFFD.
            response["binary"] = result.body.decode("latin-1")
            recorded, cut = as_text(response["binary"], MAX_RECORDED_FETCH_BODY, self.secret_forms)
            event["response_bytes"] = _tape_bytes(recorded)
            truncated = truncated or cut
        if truncated:
            event["response_truncated"] = True
        self._grew(entry, [event.get("response_headers"), event.get("response_body"), event.get("response_bytes")])
        return response

    def _keep_span(self, span: Span) -> None:
        if len(self.client_spans) < MAX_CLIENT_SPANS:
            self.client_spans.append(span)
        else:
            self.span.attributes["flux.spans_dropped"] = self.span.attributes.get("flux.spans_dropped", 0) + 1

    def _span_text(self, text: str) -> str:
        """A span's copy of a statement or URL, cut at MAX_SPAN_TEXT (never inside a secret)."""
        return as_text(text, MAX_SPAN_TEXT, self.secret_forms)[0]

    def _on_tape(self, entry: list[Any]) -> None:
        """A db or fetch event onto the tape while the tape is under MAX_TAPE_CHARS; else the tape is cut there."""
        if self.tape_cut is None:
            self.tape_chars += _json_size(entry[2])
            if self.tape_chars <= MAX_TAPE_CHARS:
                self.host_events.append(entry)
                return
        self._cut_tape(entry[0])

    def _grew(self, entry: list[Any], added: Any, *, size: int | None = None) -> None:
        """What a call's answer added to its event on the tape (`size`: its JSON's, when known); past
        MAX_TAPE_CHARS the event leaves it."""
        if self.tape_cut is not None and entry[0] >= self.tape_cut:
            return
        self.tape_chars += len(orjson.dumps(added)) if size is None else size
        if self.tape_chars > MAX_TAPE_CHARS:
            self._cut_tape(entry[0])

    def _cut_tape(self, seq: int) -> None:
        """The tape ends before `seq`: the events from there leave the host's memory now, and the recording says truncated."""
        if self.tape_cut is None or seq < self.tape_cut:
            self.tape_cut = seq
            self.host_events = [event for event in self.host_events if event[0] < seq]

    async def cancel_inflight(self) -> None:
        for task in self.inflight:
            task.cancel()
        for task in list(self.inflight):
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 -- abandoned calls: outcome no longer matters
                pass
        self.inflight.clear()

    async def cancel(self) -> None:
        await self.cancel_inflight()
        await self.db.abort()

    def spans(self) -> list[dict[str, Any]]:
        out = [self.span.to_dict()]
        out[0]["events"] = sorted([*self.span.events, *self.js_events], key=lambda e: e.get("time") or 0)
        steps = [*self.js_spans, *(self._unfinished(step) for step in self.open_steps)]
        clients = [s.to_dict() for s in sorted(self.client_spans, key=lambda s: s.start)]
        _cover_children(steps, [*steps, *clients])
        return [*out, *steps, *clients]

    def _unfinished(self, step: dict[str, Any]) -> dict[str, Any]:
        """A step still open when the request ended: over by now, and failed if the function did not finish."""
        step = {**step, "duration_ms": self.clock.now_ms() - step["start"]}
        if not self.finished:
            step.update(status="error", error="the request ended before this step did")
        return step

    def recording(self) -> dict[str, Any] | None:
        if not self.call.record:
            return None
        events = sorted([*self.js_tape, *self.host_events], key=lambda e: e[0])
        truncated = self.truncated or len(events) > MAX_TAPE_EVENTS
        if self.tape_cut is not None:  # past MAX_TAPE_CHARS
            events = [event for event in events if event[0] < self.tape_cut]
            truncated = True
        # Only the entropy the function consumed: replay supplies the same bytes in the same order.
        recording = {"v": RECORDING_VERSION, "truncated": truncated, "entropy": self.entropy_used,
                     "env": self.compiled.environment, "events": events[:MAX_TAPE_EVENTS]}
        if not self.finished:  # a time limit, a memory limit, a Promise nothing settles: up to the last step
            recording["incomplete"] = True
        if self.commit is not None:
            recording["commit"] = self.commit
        return recording


def with_param_bigints(args: dict[str, Any]) -> dict[str, Any]:
    """A db call's `args` with each parameter the prelude sent as JSON text, an array or object
    holding BigInts, decoded and those BigInts exact ints; their paths in `param_bigints`."""
    marked = args.get("bigints")
    if marked is None:
        return args
    params, paths = list(args["params"]), []
    for index in marked["params"]:
        params[index] = marked_bigints(_from_js(params[index]), marked["mark"], [index], paths)
    return {**args, "params": params, "param_bigints": paths}


def _db_event(args: dict[str, Any]) -> dict[str, Any]:
    """A db call's tape event before its answer: bytea parameters one character per byte, and where
    BigInts were inside the parameters."""
    params, binary = args["params"], args.get("binary")
    event = {"sql": args["sql"], "params": params}
    if binary:
        event.update(params=[_tape_bytes(p) if i in binary else p for i, p in enumerate(params)], binary=binary)
    if "param_bigints" in args:
        event["param_bigints"] = args["param_bigints"]
    return event


def _fetch_event(args: dict[str, Any]) -> dict[str, Any]:
    """A fetch call's tape event before its answer: sensitive headers redacted, a body of bytes one
    character per byte."""
    event = {"url": args["url"], "method": args["method"], "headers": redact_headers(args["headers"]), "body": args["body"]}
    if args.get("binary"):
        event.update(body=_tape_bytes(args["body"]), binary=True)
    return event


def _json_size(value: Any) -> int:
    """Characters of `value` as JSON. A parameter may nest 254 levels (prelude.js), as many as orjson
    writes, and its event holds it two levels down: the standard library's encoder goes deeper."""
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        return len(json.dumps(value, ensure_ascii=False))


def _negative_zeros(value: Any, path: list[Any]) -> list[list[Any]]:
    """The paths (row index, column, then keys and indexes inside a value) of the floats in `value`
    that are -0.0: jsonb, which stores the trace, has no negative zero, and a function can tell
    one (`Object.is(x, -0)`, `1 / x`)."""
    if isinstance(value, float):
        return [path] if value == 0 and math.copysign(1.0, value) < 0 else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [found for key, item in items for found in _negative_zeros(item, [*path, key])]


def _tape_bytes(text: str) -> str:
    """Bytes as the tape writes them, one character per byte, a 0 byte as U+0100: jsonb, which
    stores the trace, cannot hold U+0000 (the store would make it U+FFFD, another byte), and no
    other byte is written U+0100."""
    return text.replace("\x00", "\u0100") if "\x00" in text else text


def _cover_children(steps: list[dict[str, Any]], spans: list[dict[str, Any]]) -> None:
    """Stretch each step span over its children. Steps are timed in JS, by Date.now()'s whole
    milliseconds; calls on the host, to the microsecond, so a step could seem shorter than a call in it.

    One pass, deepest steps first, so that a stretched child stretches its parent in turn: this runs
    on the loop every request shares, and a pass per level took seconds for a chain of 1,000 steps
    (each started inside the one before)."""
    ends: dict[str, tuple[float, float]] = {}  # a parent's id -> the extent of its children so far
    step_ids = {step["id"] for step in steps}

    def reach(parent: str | None, start: float, end: float) -> None:
        if parent is not None:
            known = ends.get(parent)
            ends[parent] = (min(start, known[0]), max(end, known[1])) if known else (start, end)

    for span in spans:
        if span["id"] not in step_ids:
            reach(span.get("parent"), span["start"], span["start"] + span["duration_ms"])
    parents = {step["id"]: step.get("parent") for step in steps}
    depths: dict[str, int] = {}
    for step in steps:
        chain, at = [], step["id"]
        while at in parents and at not in depths and at not in chain:  # a cycle is no nesting
            chain.append(at)
            at = parents[at]
        depth = depths.get(at, -1) if at in parents else -1
        for known in reversed(chain):
            depth += 1
            depths[known] = depth
    for step in sorted(steps, key=lambda step: depths[step["id"]], reverse=True):
        start, end = step["start"], step["start"] + step["duration_ms"]
        extent = ends.get(step["id"])
        if extent is not None:
            start, end = min(start, extent[0]), max(end, extent[1])
            step["start"], step["duration_ms"] = start, end - start
        reach(step.get("parent"), start, end)
