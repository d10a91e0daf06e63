"""The replay tape is enough to run a function again, exactly: each function runs once for real
(real V8, PostgreSQL and HTTP), then again from its recording alone (tests/runtime/replay.py),
and must answer the same, make the same calls and read the same values at the same points."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from flux.project import load_project
from flux.redaction import Redactor
from flux.runtime.executor import Execution, Executor, Invocation
from flux.runtime.fetch import AiohttpTransport, FetchPolicy
from flux.runtime.isolate import CompiledFunction, IsolatePool, compile_function
from flux.store.schema import ensure_schema
from tests.functions import Stub, write_project
from tests.runtime.replay import assert_replays, replay, stored_recording


def record(root: Path, name: str, body: Any = None, *, dsn: str | None = None, secrets: dict[str, str] | None = None,
           ) -> tuple[CompiledFunction, Execution, dict[str, Any]]:
    project = load_project(root)
    request = {"method": "POST", "path": f"/{name}", "query": {}, "headers": {}, "body": body, "ip": None}

    async def main() -> tuple[CompiledFunction, Execution]:
        db_pool = None
        if dsn is not None:
            db_pool = AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False)
            await db_pool.open(wait=True)
        transport = AiohttpTransport()
        executor = Executor(limits=project.limits, fetch_policy=FetchPolicy(project.fetch), transport=transport, db_pool=db_pool,
                            redactor=Redactor.of(project))
        compiled = compile_function(project.functions[name])
        pool = IsolatePool(compiled, size=1, memory_mb=project.limits.memory_mb)
        try:
            call = Invocation(request_id="req-0", tenant="default", secrets=secrets or {}, parent_span=None, request=request)
            return compiled, await executor.run(pool, call)
        finally:
            pool.close()
            await transport.aclose()
            if db_pool is not None:
                await db_pool.close()

    compiled, execution = asyncio.run(main())
    return compiled, execution, request


def test_every_clock_read_replays(tmp_path):
    write_project(tmp_path, {"clock": """
        const loaded = Date.now();
        export default async function () {
          const fmt = new Intl.DateTimeFormat("en-US", {timeZone: "UTC", dateStyle: "full", timeStyle: "long"});
          const d = new Date();
          return {status: 200, body: {loaded, now: Date.now(), iso: d.toISOString(), str: Date(), local: d.toLocaleString(),
            fmt: fmt.format(), parts: fmt.formatToParts().map((p) => p.value).join(""),
            ctor: new (d.constructor)().getTime(), ctorNow: d.constructor.now(), bound: Date.now.call(null),
            sub: new (class extends Date {})().getTime(), reflect: Reflect.construct(Date, []).getTime()}};
        }
    """})
    compiled, execution, request = record(tmp_path, "clock")
    assert execution.status == 200, execution.error
    assert_replays(compiled, execution, request)


def test_timers_replay_in_the_order_they_fired(tmp_path):
    write_project(tmp_path, {"timers": """
        export default async function () {
          const order = [];
          const done = [30, 5, 15, 0].map((ms) => new Promise((r) => setTimeout(() => { order.push(ms); r(); }, ms)));
          const cleared = setTimeout(() => order.push("cleared"), 1);
          clearTimeout(cleared);
          await Promise.all(done);
          return {status: 200, body: order};
        }
    """})
    compiled, execution, request = record(tmp_path, "timers")
    assert execution.body == [0, 5, 15, 30]
    assert_replays(compiled, execution, request)


def test_randomness_in_every_form_replays(tmp_path):
    write_project(tmp_path, {"rand": """
        export default async function () {
          const ints = crypto.getRandomValues(new Uint32Array(4));
          return {status: 200, body: {r: [Math.random(), Math.random()], u: crypto.randomUUID(), ints: Array.from(ints),
            bytes: Array.from(crypto.getRandomValues(new Uint8Array(3))), shuffled: [1, 2, 3, 4].sort(() => Math.random() - 0.5)}};
        }
    """})
    compiled, execution, request = record(tmp_path, "rand")
    assert execution.status == 200, execution.error
    assert_replays(compiled, execution, request)


def test_concurrent_calls_settling_out_of_order_replay(tmp_path, dsn, conn, stub: Stub):
    conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
    write_project(tmp_path, {"fan": f"""
        export default async function (req, ctx) {{
          const order = [];
          const slow = ctx.fetch("{stub.url}/slow?ms=150").then((r) => {{ order.push("slow " + r.status); return r.json(); }});
          const fast = ctx.fetch("{stub.url}/ok").then((r) => {{ order.push("fast"); return r.text(); }});
          const db = ctx.db.query("INSERT INTO t (v) VALUES ($1) RETURNING id, now() AS at", [crypto.randomUUID()])
            .then((r) => {{ order.push("db"); return r.rows[0].id; }});
          const first = await Promise.race([slow, fast, db]);
          const all = await Promise.all([slow, fast, db]);
          order.push(Date.now() > 0);
          return {{status: 200, body: {{order, first, all}}}};
        }}
    """})
    compiled, execution, request = record(tmp_path, "fan", dsn=dsn)
    assert execution.status == 200, execution.error
    assert_replays(compiled, execution, request)


def test_fetch_failures_replay_as_the_function_saw_them(tmp_path, stub: Stub):
    write_project(tmp_path, {"fail": f"""
        export default async function (req, ctx) {{
          const seen = [];
          for (const url of ["http://127.0.0.1:9/refused", "{stub.url}/slow?ms=500", "{stub.url}/status/429", "ftp://x/y",
                             "http://not-allowed.example/"]) {{
            try {{
              const r = await ctx.fetch(url, {{timeout_ms: 100}});
              seen.push([r.status, r.ok, r.statusText, await r.json()]);
            }} catch (e) {{ seen.push([e.name, e.message, e.timeout ?? null]); }}
          }}
          return {{status: 200, body: seen}};
        }}
    """}, f'[fetch]\nallow = ["{stub.host}", "127.0.0.1:9"]\n')
    compiled, execution, request = record(tmp_path, "fail")
    assert execution.status == 200, execution.error
    assert_replays(compiled, execution, request)


def test_binary_gzip_and_odd_responses_replay_byte_for_byte(tmp_path, stub: Stub):
    write_project(tmp_path, {"bin": f"""
        export default async function (req, ctx) {{
          const out = {{}};
          for (const p of ["bytes", "gzip", "chunked", "headers", "empty", "cookie"]) {{
            const r = await ctx.fetch("{stub.url}/" + p);
            // Set-Cookie values are redacted on the tape: a replay knows how many there were.
            const headers = [...r.headers].map(([k, v]) => (k === "set-cookie" ? k : [k, v]));
            out[p] = [r.status, r.url, headers, r.headers.getSetCookie().length, await r.text(), Array.from(await r.bytes())];
          }}
          return {{status: 200, body: out}};
        }}
    """})
    compiled, execution, request = record(tmp_path, "bin")
    assert execution.status == 200, execution.error
    assert_replays(compiled, execution, request)


def test_a_caught_db_error_replays(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE u (id int PRIMARY KEY)")
    write_project(tmp_path, {"dup": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO u VALUES (1)");
          try { await ctx.db.query("INSERT INTO u VALUES (1)"); } catch (e) {
            return {status: 409, body: [e.name, e.message, e.sqlstate, e.detail, e.stack]};
          }
        }
    """})
    compiled, execution, request = record(tmp_path, "dup", dsn=dsn)
    assert execution.status == 409, execution.error
    assert_replays(compiled, execution, request)


def test_steps_and_a_thrown_error_replay(tmp_path, dsn, conn):
    write_project(tmp_path, {"steps": """
        export default async function (req, ctx) {
          const a = await ctx.step("one", async (s) => (await s.db.query("SELECT $1::int AS x", [Math.floor(Math.random() * 100)])).rows[0].x);
          await ctx.step("two", async () => { await new Promise((r) => setTimeout(r, 1)); });
          throw new Error(`failed after ${a} at ${Date.now()}`);
        }
    """})
    compiled, execution, request = record(tmp_path, "steps", dsn=dsn)
    assert execution.status == 500
    assert_replays(compiled, execution, request)


def test_a_request_cut_at_its_time_limit_replays_up_to_where_it_stopped(tmp_path, stub: Stub):
    write_project(tmp_path, {"spin": f"""
        export default async function (req, ctx) {{
          const t = Date.now();
          await ctx.fetch("{stub.url}/ok");
          ctx.fetch("{stub.url}/slow?ms=2000");
          for (;;) {{ Math.random(); }}
        }}
    """}, "[limits]\ntimeout_ms = 500\n")
    compiled, execution, request = record(tmp_path, "spin")
    assert execution.status == 504 and execution.recording["incomplete"] is True
    result = assert_replays(compiled, execution, request)
    assert result.incomplete


def test_results_that_reach_the_function_in_one_turn_replay_interleaved_as_they_ran(tmp_path):
    """Two timers of 0 ms fire together: both results resolve before any callback runs, so the
    callbacks interleave (a1, b2, a3). Settled one by one, they would not (a1, a3, b2 or b2, a1,
    a3): the tape must say which results came together."""
    write_project(tmp_path, {"turn": """
        export default async function () {
          const order = [];
          const a = new Promise((r) => setTimeout(r, 0)).then(() => order.push("a1")).then(() => null).then(() => order.push("a3"));
          const b = new Promise((r) => setTimeout(r, 0)).then(() => null).then(() => order.push("b2"));
          await Promise.all([a, b]);
          return {status: 200, body: order};
        }
    """})
    compiled, execution, request = record(tmp_path, "turn")
    assert execution.body == ["a1", "b2", "a3"]
    assert_replays(compiled, execution, request)


def test_results_that_reach_the_function_in_turns_of_their_own_replay_one_by_one(tmp_path):
    write_project(tmp_path, {"turns": """
        export default async function () {
          const order = [];
          const a = new Promise((r) => setTimeout(r, 0)).then(() => order.push("a1")).then(() => null).then(() => order.push("a3"));
          const b = new Promise((r) => setTimeout(r, 80)).then(() => null).then(() => order.push("b2"));
          await Promise.all([a, b]);
          return {status: 200, body: order};
        }
    """})
    compiled, execution, request = record(tmp_path, "turns")
    assert execution.body == ["a1", "a3", "b2"]
    assert_replays(compiled, execution, request)


def test_date_now_taken_from_its_property_descriptor_replays(tmp_path):
    write_project(tmp_path, {"desc": """
        export default async function () {
          return {status: 200, body: [Object.getOwnPropertyDescriptor(Date, "now").value(),
                                      Object.getOwnPropertyDescriptors(Date).now.value()]};
        }
    """})
    compiled, execution, request = record(tmp_path, "desc")
    assert [e[1] for e in execution.recording["events"]] == ["now", "now"]
    assert_replays(compiled, execution, request)


def test_a_tape_read_back_from_the_trace_store_replays_row_order_and_zero_bytes(tmp_path, dsn, conn, stub: Stub):
    """The store keeps the tape as jsonb, which sorts an object's keys and cannot hold U+0000: a
    row's column order and a 0 byte (written one character per byte) came back otherwise."""
    write_project(tmp_path, {"stored": f"""
        export default async function (req, ctx) {{
          const {{ rows }} = await ctx.db.query("SELECT 'x' AS zeta, 1 AS a, $1::bytea AS b", [new Uint8Array([0, 1])]);
          const r = await ctx.fetch("{stub.url}/mirror", {{method: "POST", body: new Uint8Array([0, 7, 0])}});
          return {{status: 200, body: {{row: JSON.stringify(rows[0]), bytes: Array.from(await r.bytes())}}}};
        }}
    """})
    compiled, execution, request = record(tmp_path, "stored", dsn=dsn)
    assert execution.body["row"].startswith('{"zeta":"x","a":1,"b":') and execution.body["bytes"] == [0, 7, 0], execution.error
    ensure_schema(conn)
    assert_replays(compiled, dataclasses.replace(execution, recording=stored_recording(conn, "req-0", execution)), request)


def test_a_redacted_secret_is_what_a_replay_hands_the_function(tmp_path, stub: Stub):
    """The stored tape has each secret as `[secret:NAME]`: a replay given the secrets sends the
    same calls, but what upstream echoed of a secret comes back as its label. Not replayable
    exactly: the function's answer differs where it holds what it received."""
    write_project(tmp_path, {"sec": f"""
        export default async function (req, ctx) {{
          const r = await ctx.fetch("{stub.url}/echo", {{method: "POST", body: "key=" + ctx.secrets.KEY,
                                                     headers: {{authorization: "Bearer " + ctx.secrets.KEY}}}});
          return {{status: 200, body: (await r.json()).body}};
        }}
    """}, '[secrets]\nKEY = "sk_live_abcdefghijkl"\n')
    redactor = Redactor.of(load_project(tmp_path))
    compiled, execution, request = record(tmp_path, "sec", secrets={"KEY": "sk_live_abcdefghijkl"})
    assert execution.body == "key=sk_live_abcdefghijkl"
    stored = redactor.redact(execution.recording, {"KEY": "sk_live_abcdefghijkl"})
    result = replay(compiled, stored, request, secrets={"KEY": "sk_live_abcdefghijkl"}, redactor=redactor)
    assert result.body == "key=[secret:KEY]"


def test_a_negative_zero_from_the_database_replays_from_the_trace_store(tmp_path, dsn, conn):
    """jsonb numbers are numeric, which has no negative zero: a float8 -0 read back as 0."""
    write_project(tmp_path, {"negzero": """
        export default async function (req, ctx) {
          const { rows } = await ctx.db.query("SELECT '-0'::float8 AS z, ceil(-0.5::float8) AS c, ARRAY[1, '-0'::float8] AS a");
          return {status: 200, body: [Object.is(rows[0].z, -0), Object.is(rows[0].c, -0), Object.is(rows[0].a[1], -0), Math.sign(1 / rows[0].z)]};
        }
    """})
    compiled, execution, request = record(tmp_path, "negzero", dsn=dsn)
    assert execution.body == [True, True, True, -1], execution.error
    ensure_schema(conn)
    assert_replays(compiled, dataclasses.replace(execution, recording=stored_recording(conn, "req-0", execution)), request)


def test_a_commit_that_failed_after_the_function_returned_is_on_the_tape_and_replays_as_answered(tmp_path, dsn, conn):
    """The handler returned 201; its deferred foreign key failed at the COMMIT, which made the answer
    a 500. The tape said nothing of it: a replay answered 201 and could not tell it had not committed."""
    conn.execute("CREATE TABLE parent (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)")
    write_project(tmp_path, {"orphan": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO child VALUES (1, 99)");
          return {status: 201, body: {at: Date.now()}};
        }
    """})
    compiled, execution, request = record(tmp_path, "orphan", dsn=dsn)
    assert execution.status == 500 and execution.error.startswith("DatabaseError: commit failed"), execution.error
    commit = execution.recording["commit"]
    assert (commit["transaction"], commit["status"], commit["error"]["name"], commit["error"]["sqlstate"]) == (
        "rolled_back", 500, "DatabaseError", "23503")
    result = assert_replays(compiled, execution, request)
    assert (result.status, result.error) == (500, commit["error"])


def test_a_commit_that_went_through_is_on_the_tape_and_so_is_a_request_without_statements(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    write_project(tmp_path, {"w": """
        export default async function (req, ctx) {
          if (req.body.write) await ctx.db.query("INSERT INTO t VALUES (1)");
          return {status: 200, body: "ok"};
        }
    """})
    assert record(tmp_path, "w", {"write": True}, dsn=dsn)[1].recording["commit"] == {"transaction": "committed"}
    assert record(tmp_path, "w", {"write": False}, dsn=dsn)[1].recording["commit"] == {"transaction": None}


def test_a_first_turn_that_ran_out_of_memory_keeps_the_reads_before_it(tmp_path):
    """The tape had no event: the top-level code's clock read and the handler's, made before the
    memory bomb, were in the drain that V8's stop of the turn left unread."""
    write_project(tmp_path, {"bomb": """
        const loaded = Date.now();
        export default async function () {
          const seed = Math.random();
          globalThis.kept = [];
          for (;;) globalThis.kept.push(new Array(1e5).fill(seed + loaded));
        }
    """}, "[limits]\nmemory_mb = 32\n")
    compiled, execution, request = record(tmp_path, "bomb")
    assert execution.status == 500 and execution.body["type"] == "MemoryLimitExceeded"
    assert [e[1] for e in execution.recording["events"]] == ["now", "random"] and execution.recording["incomplete"] is True
    assert assert_replays(compiled, execution, request, memory_mb=32).incomplete


def test_a_first_turn_cut_at_its_time_limit_replays_its_reads_the_top_level_codes_included(tmp_path):
    write_project(tmp_path, {"spin": """
        const loaded = Date.now();
        export default async function () {
          const seed = Math.random();
          for (;;) { if (seed + loaded < 0) break; }
        }
    """}, "[limits]\ntimeout_ms = 300\n")
    compiled, execution, request = record(tmp_path, "spin")
    assert execution.status == 504 and [e[1] for e in execution.recording["events"]] == ["now", "random"]
    assert assert_replays(compiled, execution, request, timeout_ms=300).incomplete


def test_an_int8_past_2_53_replays_as_the_same_bigint_from_the_trace_store(tmp_path, dsn, conn):
    """The tape has the exact integer (jsonb's numbers are numeric) and where the function got a BigInt."""
    ensure_schema(conn)
    write_project(tmp_path, {"big": """
        export default async function (req, ctx) {
          const { rows } = await ctx.db.query("SELECT 1234567890123456789::int8 AS id, ARRAY[NULL, '-9223372036854775808']::int8[] AS a, 7::int8 AS n");
          return {status: 200, body: [typeof rows[0].id, String(rows[0].id), typeof rows[0].a[1], String(rows[0].a[1]), typeof rows[0].n]};
        }
    """})
    compiled, execution, request = record(tmp_path, "big", dsn=dsn)
    assert execution.body == ["bigint", "1234567890123456789", "bigint", "-9223372036854775808", "number"], execution.error
    [db] = [e[2] for e in execution.recording["events"] if e[1] == "db"]
    assert (db["result"]["rows"], db["bigints"]) == ([{"id": 1234567890123456789, "a": [None, -2 ** 63], "n": 7}], [[0, "id"], [0, "a", 1]])
    assert_replays(compiled, execution, request)
    assert_replays(compiled, dataclasses.replace(execution, recording=stored_recording(conn, "req-0", execution)), request)


def test_bigints_inside_array_and_object_params_are_on_the_tape_exactly_and_replay(tmp_path, dsn, conn):
    """The tape's parameters hold the exact integers, `param_bigints` says where BigInts were."""
    ensure_schema(conn)
    write_project(tmp_path, {"sent": """
        export default async function (req, ctx) {
          const { rows } = await ctx.db.query("SELECT $1::int8[]::text AS a, $2::jsonb->>'id' AS id",
                                              [[1234567890123456789n, 7, null], {id: -(2n ** 70n), n: 1}]);
          return {status: 200, body: rows[0]};
        }
    """})
    compiled, execution, request = record(tmp_path, "sent", dsn=dsn)
    assert execution.body == {"a": "{1234567890123456789,7,NULL}", "id": str(-2 ** 70)}, execution.error
    [db] = [e[2] for e in execution.recording["events"] if e[1] == "db"]
    assert (db["params"], db["param_bigints"]) == ([[1234567890123456789, 7, None], {"id": -2 ** 70, "n": 1}], [[0, 0], [1, "id"]])
    assert_replays(compiled, execution, request)
    assert_replays(compiled, dataclasses.replace(execution, recording=stored_recording(conn, "req-0", execution)), request)
