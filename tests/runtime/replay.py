"""A replay harness for tests: runs a function again from its recording alone, to prove the tape
is enough to reproduce what the function did.

The function runs in a fresh isolate whose prelude answers the clock and Math.random from the
tape (the prelude's text, patched here: the product's prelude stays as it is), whose crypto
draws on the tape's entropy, and whose ctx.db, ctx.fetch and timers are settled from the tape,
turn by turn, as the `settled` events say. No clock, network or database is touched. Any read
or call the tape does not have at that point in the order is a divergence.

What it does not do: redaction (a test redacts the recording as the gateway does, if it wants
to), or give the function the original request (the caller passes it, as the `request` column
holds it).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson
from py_mini_racer import JSEvalException, JSOOMException, JSTimeoutException, MiniRacer

from flux.redaction import Redactor, redact_headers
from flux.runtime.dbvalues import bigint_texts
from flux.runtime.executor import Execution, _from_js, _response, with_param_bigints
from flux.runtime.isolate import PRELUDE, CompiledFunction
from flux.store.traces import TraceRecord, get_trace, insert_traces

_PATCHES = (
    # The clock and Math.random read the tape at the function's current position in the order.
    ("function now() {\n    const t = realNow();", "function now() {\n    const t = replayed(\"now\");"),
    ("const v = realRandom();\n    record(\"random\", v);", "const v = replayed(\"random\");\n    record(\"random\", v);"),
    ("  let seq = 0;\n", "  let seq = 0;\n  const feed = new Map(__FEED__);\n"
     "  function replayed(kind) {\n    const e = feed.get(seq);\n"
     "    if (!e || e[0] !== kind) throw new Error(`replay diverged at seq ${seq}: the function read ${kind}, the tape has ${e ? e[0] : 'nothing'}`);\n"
     "    return e[1];\n  }\n"),
)


_PAST_THE_END = re.compile(r"replay diverged at seq (\d+): ")  # what replayed() throws

_ENVIRONMENT = "JSON.stringify({time_zone: Intl.DateTimeFormat().resolvedOptions().timeZone, locale: Intl.DateTimeFormat().resolvedOptions().locale})"


class Diverged(AssertionError):
    pass


class _PastTheEnd(Exception):
    pass


@dataclass
class Replay:
    """What the function did when replayed: its response (as Execution's status, headers, body, or
    the error it ended with; the host's, from the tape's `commit`, when its COMMIT replaced the
    function's answer), its calls ([seq, op, args]) and the events it produced on the JS side."""

    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: Any = None
    error: dict[str, Any] | None = None
    calls: list[list[Any]] = field(default_factory=list)
    js_events: list[list[Any]] = field(default_factory=list)
    incomplete: bool = False  # the tape ran out (or the function spun) before the function finished


def _prelude(recording: dict[str, Any]) -> str:
    source = PRELUDE
    for old, new in _PATCHES:
        assert source.count(old) == 1, f"the replay harness no longer fits prelude.js: {old!r}"
        source = source.replace(old, new)
    feed = [[e[0], [e[1], e[2]]] for e in recording["events"] if e[1] in ("now", "random")]
    return source.replace("__FEED__", orjson.dumps(feed).decode())


def _bytes(text: str) -> str:
    """Bytes as the tape writes them (a 0 byte as U+0100) as the function had them."""
    return text.replace("\u0100", "\x00")


def _result_of(event: dict[str, Any]) -> dict[str, Any]:
    """A db result as the function got it: its rows' keys in their order and its negative zeros (a
    stored tape is jsonb)."""
    result = event["result"]
    if "columns" in event:
        result = {**result, "rows": [{k: row[k] for k in event["columns"]} for row in result["rows"]]}
    for path in event.get("negative_zeros", ()):  # jsonb keeps no negative zero
        *inside, last = path
        holder = result["rows"]
        for key in inside:
            holder = holder[key]
        holder[last] = -0.0
    return result


def _response_of(event: dict[str, Any]) -> dict[str, Any]:
    """The Response the host handed the function, rebuilt from a fetch event."""
    headers = event["response_headers"]
    r = {"status": event["status"], "statusText": event["status_text"], "headers": headers,
         "body": event["response_body"], "url": event["url_final"]}
    if "set_cookies" in event:
        r["setCookie"] = event["set_cookies"]
    elif "set-cookie" in headers:  # a v2 tape: how many values there were is not on it
        r["setCookie"] = [headers["set-cookie"]]
    if "response_bytes" in event:
        r["binary"] = _bytes(event["response_bytes"])
    return r


def _turns(data: Any) -> list[int]:
    return data if isinstance(data, list) else [data]


def replay(compiled: CompiledFunction, recording: dict[str, Any], request: dict[str, Any], *,
           secrets: dict[str, str] | None = None, request_id: str = "req-0", tenant: str = "default",
           timeout_ms: int = 2000, memory_mb: int = 128, redactor: Redactor | None = None) -> Replay:
    assert compiled.script is not None
    by_seq = {e[0]: e for e in recording["events"]}
    order = sorted(by_seq)
    # A tape cut short (a time or memory limit, past its 10,000 events) ends there: a call the function
    # makes past its last event ends the replay (its reads past the end already threw, which it may
    # catch; uncaught, the replay ends there too), and so does a read past it in the file's
    # top-level code (a tape with no event).
    cut = bool(recording.get("incomplete") or recording.get("truncated"))
    end = (order[-1] if order else -1) if cut else None
    mr = MiniRacer()
    mr.set_hard_memory_limit(memory_mb * 1024 * 1024)  # the function's: a tape a memory limit cut ends where it did
    try:
        here = {**orjson.loads(mr.eval(_ENVIRONMENT)), "v8": mr.v8_version}
        env = recording.get("env") or here  # a v2 tape does not say
        if env != here:
            raise Diverged(f"the tape was made with {env}, this replay would run with {here}")
        # PRELUDE is several files (statements): an indirect eval gives the last one's value, the bridge.
        mr.eval(f"const __b = (0, eval)({orjson.dumps(_prelude(recording)).decode()});")
        try:
            mr.eval(compiled.script)
        except JSEvalException:
            if not cut:
                raise
            return Replay(incomplete=True)
        start = {"entropy": recording["entropy"], "span_id": "0" * 16, "file": compiled.function.display_path,
                 "request": request, "request_id": request_id, "tenant": tenant, "function": compiled.name,
                 "replay": False, "secrets": secrets or {}}
        if isinstance(request.get("body"), bytes):
            start["request"] = {**request, "body": base64.b64encode(request["body"]).decode()}
            start["body_base64"] = True
        out = Replay()
        calls: dict[int, list[Any]] = {}  # callSeq -> [id, op, args]
        last = -1

        def bridge(op: str, arg: Any = None) -> dict[str, Any]:
            nonlocal last
            stopped = None
            if arg is not None:
                try:
                    mr.eval(f"__b({orjson.dumps(op).decode()}, {orjson.dumps(orjson.dumps(arg).decode()).decode()})", timeout=timeout_ms)
                except (JSOOMException, JSTimeoutException) as exc:  # the executor drains all the same (a salvage at the
                    stopped = exc                                          # time limit): what came before is on the tape
            drained = orjson.loads(mr.eval('__b("drain")', timeout=timeout_ms))
            for e in drained.get("tape", ()):
                out.js_events.append(e)
                last = max(last, e[0])
            for call_id, op_, args, _, seq, _ in drained.get("calls", ()):
                if end is not None and seq > end:
                    raise _PastTheEnd()
                calls[seq] = [call_id, op_, args]
                out.calls.append([seq, op_, args])
                # A stored tape is redacted: so are the calls it is compared with.
                _check_call(by_seq.get(seq), seq, op_, redactor.redact(args, secrets) if redactor else args)
                last = max(last, seq)
            if stopped is not None or mr.was_hard_memory_limit_reached():  # V8 stopped the turn; the executor ends the request there
                raise _PastTheEnd()
            return drained

        try:
            drained = bridge("start", start)
            while drained["done"] is None:
                # The next thing on the tape (a cleared timer's seq leaves a gap) must be a turn's results.
                nxt = next((by_seq[s] for s in order if s > last), None)
                if nxt is None or nxt[1] != "settled":
                    out.incomplete = True  # the tape has nothing more for the function: it ended here
                    return out
                settled = []
                for seq in _turns(nxt[2]):
                    call_id, op, _ = calls[seq]
                    event = by_seq.get(seq)
                    if op == "timer":
                        settled.append([call_id, True, None])
                    elif "error" in event[2]:
                        settled.append([call_id, False, event[2]["error"]])
                    elif op == "db":
                        result = _result_of(event[2])
                        # int8s past 2^53 reached the function as BigInts of the tape's exact integers
                        bigints = [bigint_texts(result["rows"], event[2]["bigints"])] if "bigints" in event[2] else []
                        settled.append([call_id, True, result, *bigints])
                    else:
                        settled.append([call_id, True, _response_of(event[2])])
                last = max(last, nxt[0] - 1)  # the JS side records the settled event itself
                drained = bridge("settle", settled)
        except (JSTimeoutException, JSOOMException, _PastTheEnd):
            out.incomplete = True
            return out
        done = drained["done"]
        past = None if done["ok"] else _PAST_THE_END.match(str(done["error"].get("message")))
        if end is not None and past is not None and int(past[1]) > end:  # a read past the end of a tape cut short, uncaught
            out.incomplete = True
            return out
        commit = recording.get("commit") or {}
        if done["ok"] and "error" in commit:  # the COMMIT made the function's answer this error (the host's)
            _response(_from_js(done["value"]))  # the answer it replaced passed the host's checks, as it had
            out.status, out.error = commit["status"], commit["error"]
        elif done["ok"]:
            out.status, out.headers, out.body = _response(_from_js(done["value"]))
        else:
            out.status, out.error = 500, done["error"]
        return out
    finally:
        mr.close()


def _check_call(event: list[Any] | None, seq: int, op: str, args: dict[str, Any]) -> None:
    if op == "timer":
        if event is not None and (event[1] != "timer" or event[2] != args["ms"]):
            raise Diverged(f"seq {seq}: setTimeout({args['ms']}), the tape has {event}")
        return
    if event is None or event[1] != op:
        raise Diverged(f"seq {seq}: the function called {op}, the tape has {event}")
    recorded = event[2]
    if op == "db":
        args = with_param_bigints(args)  # as the executor reads them: the BigInts' marks are the replay's own
        params = [_bytes(p) if i in recorded.get("binary", ()) else p for i, p in enumerate(recorded["params"])]
        same = (recorded["sql"], params) == (args["sql"], args["params"])
    else:
        body = _bytes(recorded["body"]) if recorded.get("binary") else recorded["body"]
        same = (recorded["url"], recorded["method"], recorded["headers"], body) == (
            args["url"], args["method"], redact_headers(args["headers"]), args["body"])
    if not same:
        raise Diverged(f"seq {seq}: the function's {op} call {args} is not the tape's {recorded}")


def assert_replays(compiled: CompiledFunction, execution: Execution, request: dict[str, Any], **kw: Any) -> Replay:
    """Replay `execution`'s recording and check the function did the same: the same response, the
    same calls, and the same JS-side events, each at the same point in the order."""
    recording = execution.recording
    assert recording is not None
    result = replay(compiled, recording, request, **kw)
    recorded_js = [e for e in recording["events"] if e[1] in ("now", "random", "uuid", "random_bytes", "settled")]
    cut = recording.get("incomplete") or recording.get("truncated")
    # A whole tape is matched whole: a replay that read the clock once more did not do the same.
    assert (result.js_events[:len(recorded_js)] if cut else result.js_events) == recorded_js
    recorded_calls = [[e[0], e[1]] for e in recording["events"] if e[1] in ("db", "fetch", "timer")]
    replayed_calls = [[seq, op] for seq, op, _ in result.calls if op != "timer" or seq in {e[0] for e in recording["events"]}]
    assert replayed_calls == recorded_calls
    if cut:
        assert result.incomplete or result.status is not None
        return result
    assert not result.incomplete, "the tape ran out before the function finished"
    if execution.error is None:
        assert (result.status, result.headers, result.body) == (execution.status, execution.headers, execution.body)
    else:
        assert result.error is not None and result.status == execution.status
        assert [result.error.get("name"), result.error.get("message")] == [execution.body["type"], execution.body["error"].removeprefix(f"{execution.body['type']}: ")]
    return result


def stored_recording(conn: Any, request_id: str, execution: Execution) -> dict[str, Any]:
    """`execution`'s recording as the trace store gives it back (jsonb: keys reordered, U+0000 made
    U+FFFD), stored under `request_id` in a schema `conn` already has."""
    insert_traces(conn, [TraceRecord(id=request_id, tenant="default", function="f", method="POST", path="/f",
                                     status=execution.status, duration_ms=1.0, started_at=datetime.now(timezone.utc),
                                     error=execution.error, spans=[], request={}, response={}, recording=execution.recording)])
    conn.commit()
    recording = get_trace(conn, request_id).recording
    assert recording is not None
    return recording
