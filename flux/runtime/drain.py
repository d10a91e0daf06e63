"""What a drain may hand the host: the check of the prelude's output before the executor uses it.

Why: the prelude makes each drain in the function's own realm, with built-ins the function can
replace (JSON.stringify, Array.prototype.splice, a setter on Object.prototype, a toJSON), so what
reaches the host is the function's to shape. Taken as it came, a forged drain could hand over
calls past the pending limit by the ten thousand (each a task on the loop every request shares),
or a result that made the executor raise after releasing the isolate, leaving the request's
transaction open and its connection out of the pool for good.

`check` raises `BrokenBridge` for anything the prelude never hands over; the executor then ends
the request with a 500 and discards the isolate. What this does not check: values the prelude
passes through as the function gave them (a query's parameters, a fetch body, log attributes), or
whether what is well-formed is true (a forged tape entry is the function's own recording).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

MAX_PENDING_CALLS = 1000  # as prelude.js
MAX_TIMER_MS = 2147483647  # as prelude.js
# What the prelude hands over over a whole request, at most (as prelude.js): tape entries, step
# spans, log events on the function span, and the hex of the entropy it used (ENTROPY_BYTES).
MAX_TAPE_EVENTS = 10_000
MAX_STEPS = 1000
MAX_EVENTS = 1000
MAX_ENTROPY_HEX = 2 * 1024
# Characters of JSON the host keeps of a request's tape, steps and logs from its drains: the
# prelude's limits keep them under about 12 MB (2 MB of logs, 1,000 steps, 10,000 small entries).
MAX_KEPT_CHARS = 32 * 1024 * 1024
_OPS = frozenset({"db", "fetch", "timer"})


class BrokenBridge(Exception):
    """A drain the prelude did not make as it is: the function replaced a built-in the prelude uses."""


def check(out: Any, pending: set[int]) -> dict[str, Any]:
    """`out`, a drain as JSON gave it, if it is one the prelude could have made with the calls
    `pending` (their ids) on the host; else BrokenBridge, saying what is wrong."""
    if not isinstance(out, dict):
        raise BrokenBridge("the drain is not an object")
    calls = out.get("calls")
    if not isinstance(calls, list) or not all(_is_call(call) for call in calls):
        raise BrokenBridge("a ctx call is not one the runtime makes")
    cancel = out.get("cancel", [])
    _require(_list_of(cancel, _is_int), "cancel")
    waiting = len(pending.difference(cancel)) + len(calls)  # timers cleared now no longer count, as in the prelude
    if waiting > MAX_PENDING_CALLS:
        raise BrokenBridge(f"{waiting} ctx calls and timers pending, past the limit of {MAX_PENDING_CALLS}")
    done = out.get("done")
    if done is not None and not _is_done(done):
        raise BrokenBridge("the function's result is not one the runtime makes")
    _require(_list_of(out.get("tape", []), lambda e: isinstance(e, list) and len(e) == 3 and _is_int(e[0]) and isinstance(e[1], str)),
             "tape")
    _require(_list_of(out.get("spans", []), _is_step), "spans")
    _require(_list_of(out.get("open", []), _is_step) and len(out.get("open", [])) <= MAX_STEPS, "open")
    _require(_list_of(out.get("events", []), _is_event), "events")
    _require(isinstance(out.get("entropy", ""), str), "entropy")
    for key in ("events_dropped", "steps_dropped"):
        _require(_is_int(out.get(key, 0)), key)
    return out


class Kept:
    """What the host has kept of one request's drains, against what the prelude can hand over in all."""

    __slots__ = ("chars", "entropy", "events", "steps", "tape")

    def __init__(self) -> None:
        self.tape = self.steps = self.events = self.entropy = self.chars = 0

    def add(self, out: dict[str, Any]) -> None:
        """Count a checked drain's `out`; BrokenBridge once a request's drains hold more than the prelude sends."""
        self.tape += len(out.get("tape", ()))
        self.steps += len(out.get("spans", ()))
        self.events += len(out.get("events", ()))
        self.entropy += len(out.get("entropy", ""))
        kept = [out[key] for key in ("tape", "spans", "events") if out.get(key)]
        if kept:
            try:
                self.chars += len(orjson.dumps(kept))
            except orjson.JSONEncodeError:  # past 254 levels: the prelude's entries, steps and logs are a few levels deep
                raise BrokenBridge("the drain's tape, steps or logs nest deeper than the runtime makes them") from None
        for count, limit, what in ((self.tape, MAX_TAPE_EVENTS, "tape entries"), (self.steps, MAX_STEPS, "steps"),
                                   (self.events, MAX_EVENTS, "log events"), (self.entropy, MAX_ENTROPY_HEX, "entropy"),
                                   (self.chars, MAX_KEPT_CHARS, "characters of tape, steps and logs")):
            if count > limit:
                raise BrokenBridge(f"the drains handed over {count:,} {what}, past the {limit:,} the runtime sends")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise BrokenBridge(f"the drain's {what} is not what the runtime makes")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _list_of(value: Any, each: Any) -> bool:
    return isinstance(value, list) and all(each(item) for item in value)


def _is_call(call: Any) -> bool:
    if not (isinstance(call, list) and len(call) == 6):
        return False
    call_id, op, args, parent, seq, site = call
    if not (_is_int(call_id) and op in _OPS and isinstance(args, dict) and _is_text(parent) and _is_int(seq) and _is_text(site)):
        return False
    if op == "timer":
        return _is_number(args.get("ms")) and 0 <= args["ms"] <= MAX_TIMER_MS
    if op == "db":
        sql, params, binary = args.get("sql"), args.get("params"), args.get("binary", [])
        marked = args.get("bigints", {"mark": "", "params": []})  # parameters sent as JSON text holding BigInts
        return (isinstance(sql, str) and isinstance(params, list) and isinstance(binary, list)
                and all(_is_int(i) and 0 <= i < len(params) and _latin1(params[i]) for i in binary)
                and isinstance(marked, dict) and isinstance(marked.get("mark"), str) and _list_of(marked.get("params"), _is_int)
                and all(0 <= i < len(params) and _json_text(params[i]) for i in marked["params"]))
    headers, body, timeout = args.get("headers"), args.get("body"), args.get("timeout_ms")
    return (isinstance(args.get("url"), str) and isinstance(args.get("method"), str) and isinstance(headers, dict)
            and all(isinstance(value, str) for value in headers.values())
            and (body is None or (_latin1(body) if args.get("binary") else isinstance(body, str)))
            and (timeout is None or (_is_number(timeout) and 0 < timeout <= MAX_TIMER_MS)))


def _json_text(text: Any) -> bool:
    """An array or object parameter as the prelude sends one holding BigInts: its JSON text."""
    try:
        return isinstance(text, str) and isinstance(json.loads(text), (list, dict))
    except (ValueError, RecursionError):
        return False


def _latin1(text: Any) -> bool:
    """Bytes as the prelude hands them over: one character per byte."""
    return isinstance(text, str) and (text.isascii() or max(text) <= "\xff")


def _is_done(done: Any) -> bool:
    if not isinstance(done, dict):
        return False
    if done.get("ok") is True:
        return isinstance(done.get("value"), str)
    error = done.get("error")
    return (done.get("ok") is False and isinstance(error, dict)
            and all(_is_text(error.get(key)) for key in ("name", "message", "stack", "sqlstate")))


def _is_step(step: Any) -> bool:
    return (isinstance(step, dict) and isinstance(step.get("id"), str) and _is_text(step.get("parent"))
            and _is_number(step.get("start")) and _is_number(step.get("duration_ms"))
            and isinstance(step.get("attributes", {}), dict) and _list_of(step.get("events", []), _is_event))


def _is_event(event: Any) -> bool:
    return isinstance(event, dict) and _is_number(event.get("time")) and isinstance(event.get("attributes", {}), dict)
