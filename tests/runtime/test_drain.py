"""The host's check of what a drain hands over (flux.runtime.drain), against functions that replace
the built-ins the prelude uses, in real V8 and a real database."""

from __future__ import annotations

import pytest

from flux.runtime.drain import BrokenBridge, check
from tests.functions import write_project
from tests.runtime.test_executor import FAST, run1

# Replaces JSON.stringify, which the prelude's drain uses, to change what the host receives.
FORGE = """
    const stringify = JSON.stringify;
    JSON.stringify = function (value, ...rest) {
      if (value && Array.isArray(value.calls)) { FORGED }
      return stringify(value, ...rest);
    };
"""


def forging(tmp_path, forged: str, then: str = "await new Promise((resolve) => setTimeout(resolve, 1));"):
    write_project(tmp_path, {"forge": f"""
        export default async function (req, ctx) {{
          {FORGE.replace("FORGED", forged)}
          {then}
          return {{status: 200, body: "returned"}};
        }}
    """}, FAST)


def test_calls_past_the_pending_limit_end_the_request(tmp_path):
    """Each is a task on the loop every request shares: 20,000 forged timers per drain blocked it
    for about half a second each, and held their memory."""
    forging(tmp_path, 'for (let i = 0; i < 20000; i++) value.calls.push([1e9 + i, "timer", {ms: 100000}, null, 0, null]);')
    result = run1(tmp_path, "forge")
    assert result.status == 500 and result.error.startswith("BrokenBridge: the function replaced a built-in the runtime relies on")
    assert result.error.endswith("20001 ctx calls and timers pending, past the limit of 1000")


def test_a_forged_result_ends_the_request_and_rolls_its_writes_back(tmp_path, dsn, conn):
    """A result the executor could not read raised out of it after the isolate was released: the
    transaction stayed open and its connection never went back to the pool."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    forging(tmp_path, "if (value.done) value.done = {ok: true, value: 5};",
            then='await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);')
    result = run1(tmp_path, "forge", dsn=dsn)
    assert (result.status, result.error) == (500, "BrokenBridge: the function replaced a built-in the runtime relies on "
                                                  "(JSON.stringify, Array.prototype.splice, a toJSON ...): the function's "
                                                  "result is not one the runtime makes")
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


@pytest.mark.parametrize("call", [
    '[1, "timer", {ms: "soon"}, null, 0, null]',
    '[1, "db", {sql: "SELECT $1", params: [5], binary: [0]}, null, 0, null]',
    '[1, "db", {sql: "SELECT 1", params: "x"}, null, 0, null]',
    '[1, "db", {sql: "SELECT $1", params: ["not json"], bigints: {mark: "m", params: [0]}}, null, 0, null]',
    '[1, "fetch", {url: "http://127.0.0.1:9/", method: "GET", headers: {a: 1}, body: null}, null, 0, null]',
    '[1, "exec", {}, null, 0, null]',
    '[1, "timer", {ms: 5}]',
], ids=["timer ms", "bytes", "params", "bigints", "header", "op", "short"])
def test_a_call_the_runtime_never_makes_is_refused(call):
    with pytest.raises(BrokenBridge, match="a ctx call is not one the runtime makes"):
        check({"calls": [eval_js(call)], "done": None}, set())


def test_timers_cleared_in_the_same_drain_no_longer_count():
    calls = [[i, "timer", {"ms": 5}, None, i, None] for i in range(2000, 2500)]
    assert check({"calls": calls, "done": None, "cancel": list(range(600))}, set(range(1000)))["calls"] == calls
    with pytest.raises(BrokenBridge):
        check({"calls": calls, "done": None, "cancel": list(range(5000, 5600))}, set(range(1000)))


def eval_js(text: str):
    """The few JS literals above, as JSON would bring them."""
    import json
    import re

    return json.loads(re.sub(r"([{,]\s*)(\w+):", r'\1"\2":', text))


def test_a_forged_result_that_is_no_object_is_an_invalid_response_rolled_back(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    forging(tmp_path, 'if (value.done) value.done = {ok: true, value: "5"};',
            then='await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);')
    result = run1(tmp_path, "forge", dsn=dsn)
    assert (result.status, result.error) == (500, "InvalidResponse: the handler must return {status, headers, body}")
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_tape_entries_past_what_the_runtime_sends_end_the_request(tmp_path):
    """The host kept every drain's tape, steps and logs until the trace was written: a drain the
    function shaped could add a million entries a turn to the gateway's memory."""
    forging(tmp_path, 'value.tape = Array.from({length: 20000}, (_, i) => [i, "now", i]);')
    result = run1(tmp_path, "forge")
    assert (result.status, result.error.rsplit(": ", 1)[-1]) == (500, "the drains handed over 20,000 tape entries, past the 10,000 the runtime sends")


def test_a_tape_entry_nested_deeper_than_the_runtime_makes_ends_the_request(tmp_path):
    """Counting its size raised inside Flux (orjson writes 254 levels): an internal error, no tape."""
    forging(tmp_path, 'let deep = 1; for (let i = 0; i < 600; i++) deep = [deep]; (value.tape = value.tape || []).push([90, "now", deep]);')
    result = run1(tmp_path, "forge")
    assert (result.status, result.error.rsplit(": ", 1)[-1]) == (500, "the drain's tape, steps or logs nest deeper than the runtime makes them")
    assert result.recording is not None


def test_a_request_with_many_logs_steps_and_random_values_is_no_broken_bridge(tmp_path):
    """The host's limits are the prelude's own: what the prelude sends at its limits passes."""
    write_project(tmp_path, {"busy": """
        export default async function (req, ctx) {
          for (let i = 0; i < 1500; i++) ctx.log("line " + i);
          for (let i = 0; i < 1100; i++) await ctx.step("s" + i, async () => Math.random());
          for (let i = 0; i < 12000; i++) Date.now();
          for (let i = 0; i < 64; i++) crypto.randomUUID();
          return {status: 200};
        }
    """})
    result = run1(tmp_path, "busy")
    assert result.status == 200 and result.recording["truncated"] is True


@pytest.mark.parametrize("replacement", ['() => "garbage"', "() => 5", "() => undefined"], ids=["text", "number", "undefined"])
def test_a_drain_that_is_not_json_is_a_broken_bridge_rolled_back(tmp_path, dsn, conn, replacement):
    """A JSON.stringify that returns no JSON at all: the host's read of the drain raised out of the
    executor, answered as an internal error of Flux's with no function span in the trace."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    write_project(tmp_path, {"garble": f"""
        export default async function (req, ctx) {{
          JSON.stringify = {replacement};
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          return {{status: 200}};
        }}
    """}, FAST)
    result = run1(tmp_path, "garble", dsn=dsn)
    assert result.status == 500 and result.error.startswith("BrokenBridge: the function replaced a built-in the runtime relies on")
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0
