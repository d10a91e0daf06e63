"""The runtime's core loop with real V8 isolates, a real database and real HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from flux.pg.cluster import free_port
from flux.project import load_project
from flux.runtime.executor import Execution, Executor, Invocation
from flux.runtime import fetch, host
from flux.runtime.fetch import AiohttpTransport, FetchPolicy
from flux.runtime.isolate import IsolatePool, compile_function
from tests.functions import Stub, write_project


def execute(root: Path, name: str, body: Any = None, *, dsn: str | None = None, times: int = 1, **invocation: Any) -> list[Execution]:
    project = load_project(root)

    async def main() -> list[Execution]:
        db_pool = None
        if dsn is not None:
            db_pool = AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False)
            await db_pool.open(wait=True)
        transport = AiohttpTransport()
        executor = Executor(limits=project.limits, fetch_policy=FetchPolicy(project.fetch), transport=transport, db_pool=db_pool)
        pool = IsolatePool(compile_function(project.functions[name]), size=1, memory_mb=project.limits.memory_mb)
        try:
            results = []
            for i in range(times):
                call = Invocation(request_id=f"req-{i}", tenant="default", secrets=invocation.pop("secrets", {}),
                                  parent_span=None, request={"method": "POST", "path": f"/{name}", "query": {}, "headers": {}, "body": body},
                                  **invocation)
                results.append(await executor.run(pool, call))
            return results
        finally:
            pool.close()
            await transport.aclose()
            if db_pool is not None:
                await db_pool.close()

    return asyncio.run(main())


def run1(root: Path, name: str, body: Any = None, **kw: Any) -> Execution:
    return execute(root, name, body, **kw)[0]


def execute_waves(root: Path, name: str, waves: list[list[Any]], *, size: int) -> list[list[Execution]]:
    """Each wave's request bodies run at once, wave after wave, all on one isolate pool and one executor."""
    project = load_project(root)

    async def main() -> list[list[Execution]]:
        transport = AiohttpTransport()
        executor = Executor(limits=project.limits, fetch_policy=FetchPolicy(project.fetch), transport=transport, db_pool=None)
        pool = IsolatePool(compile_function(project.functions[name]), size=size, memory_mb=project.limits.memory_mb)
        pool.warm_now()
        try:
            results = []
            for w, bodies in enumerate(waves):
                calls = [Invocation(request_id=f"req-{w}-{i}", tenant="default", secrets={}, parent_span=None,
                                    request={"method": "POST", "path": f"/{name}", "query": {}, "headers": {}, "body": body})
                         for i, body in enumerate(bodies)]
                results.append(list(await asyncio.gather(*(executor.run(pool, c) for c in calls))))
            return results
        finally:
            pool.close()
            await transport.aclose()

    return asyncio.run(main())


def overlap(a: Execution, b: Execution) -> bool:
    first, second = a.spans[0], b.spans[0]
    return first["start"] < second["start"] + second["duration_ms"] and second["start"] < first["start"] + first["duration_ms"]


def spans_by_name(execution: Execution) -> dict[str, dict]:
    return {s["name"]: s for s in execution.spans}


FAST = '[limits]\ntimeout_ms = 1000\nmemory_mb = 32\n'


@pytest.mark.parametrize("size", [1, 3])
def test_an_infinite_loop_ends_with_504_within_the_time_limit(tmp_path, size):
    write_project(tmp_path, {"spin": """
        export default async function (req) {
          if (req.body === "spin") { while (true) {} }
          return {status: 200, body: "fine"};
        }
    """}, FAST)
    # The spin shares its pool with normal requests, during it and after it.
    [[spin, during], after] = execute_waves(tmp_path, "spin", [["spin", "ok"], ["ok"] * (size + 1)], size=size)
    assert spin.status == 504 and "time limit (1000 ms)" in spin.error
    assert spin.spans[0]["duration_ms"] < 3000
    assert overlap(spin, during)
    assert [(r.status, r.body) for r in [during, *after]] == [(200, "fine")] * (size + 2)


def test_an_infinite_loop_inside_a_microtask_is_stopped_too(tmp_path):
    write_project(tmp_path, {"spin": "export default async function () { await null; for (;;) {} }"}, FAST)
    result = run1(tmp_path, "spin")
    assert result.status == 504


def test_a_function_stopped_mid_loop_keeps_what_it_did_and_the_step_it_was_in(tmp_path):
    write_project(tmp_path, {"spin": """
        export default async function (req, ctx) {
          ctx.log("before the loop");
          const started = Date.now();
          await ctx.step("busy", async () => { ctx.fetch("http://127.0.0.1:9/never"); for (;;) {} });
        }
    """}, FAST)
    result = run1(tmp_path, "spin")
    assert result.status == 504
    [busy] = [span for span in result.spans if span["name"] == "busy"]
    assert (busy["status"], busy["error"]) == ("error", "the request ended before this step did")
    assert [e["attributes"]["message"] for e in result.spans[0]["events"] if e["name"] == "log"] == ["before the loop"]
    kinds = [(kind, data.get("abandoned")) for _, kind, data in result.recording["events"] if kind != "now"]
    assert kinds == [("fetch", True)] and result.recording["incomplete"] is True
    assert any(kind == "now" for _, kind, _ in result.recording["events"])  # Date.now() before the loop


@pytest.mark.parametrize("size", [1, 3])
def test_a_memory_bomb_ends_that_request_only(tmp_path, size):
    write_project(tmp_path, {"bomb": """
        export default async function (req) {
          if (req.body === "bomb") { const a = []; for (;;) a.push(new Array(100000).fill('x' + a.length)); }
          return {status: 200, body: "fine"};
        }
    """}, FAST.replace("timeout_ms = 1000", "timeout_ms = 20000"))
    # The bomb shares its pool with normal requests, during it and after it.
    [[bomb, during], after] = execute_waves(tmp_path, "bomb", [["bomb", "ok"], ["ok"] * (size + 1)], size=size)
    assert bomb.status == 500 and "memory limit (32 MB)" in bomb.error
    assert overlap(bomb, during)
    assert [(r.status, r.body) for r in [during, *after]] == [(200, "fine")] * (size + 2)


def test_a_function_sees_no_host_objects(tmp_path):
    write_project(tmp_path, {"probe": """
        export default async function () {
          const names = ["require", "process", "fetch", "XMLHttpRequest", "Deno", "Bun", "module", "exports", "__dirname", "WebSocket"];
          const found = names.filter((n) => typeof globalThis[n] !== "undefined");
          let imported = "no";
          try { await import("fs"); imported = "yes"; } catch (e) { imported = "refused"; }
          return {status: 200, body: {found, imported}};
        }
    """})
    result = run1(tmp_path, "probe")
    assert result.body == {"found": [], "imported": "refused"}


def test_the_host_bridge_is_out_of_the_functions_reach(tmp_path):
    """A function that could call the bridge could settle its own calls with forged results, off the tape."""
    write_project(tmp_path, {"probe": """
        export default async function () {
          const names = Object.getOwnPropertyNames(globalThis).filter((n) => n.includes("flux"));
          return {status: 200, body: {names, start: typeof __flux_start, settle: typeof __flux_settle, bridge: typeof __flux}};
        }
    """})
    body = run1(tmp_path, "probe").body
    assert body == {"names": [], "start": "undefined", "settle": "undefined", "bridge": "undefined"}


def test_a_function_can_make_functions_from_strings(tmp_path):
    write_project(tmp_path, {"dynamic": """
        export default async function () {
          const AsyncFunction = (async () => {}).constructor;
          const twice = await new AsyncFunction("x", "return x * 2")(21);
          return {status: 200, body: [new Function("a", "return a + 1")(1), (0, eval)("1 + 2"), twice]};
        }
    """})
    assert run1(tmp_path, "dynamic").body == [2, 3, 42]


def test_nothing_a_request_starts_can_run_after_it_ends(tmp_path):
    """Its isolate serves the next request: V8's own task queue must hold none of its callbacks."""
    write_project(tmp_path, {"probe": """
        export default async function () {
          const { instance } = await WebAssembly.instantiate(new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0]));
          const gone = [typeof FinalizationRegistry, typeof Atomics.waitAsync, typeof ShadowRealm,
                        typeof WebAssembly.instantiateStreaming, typeof WebAssembly.compileStreaming];
          return {status: 200, body: {wasm: instance instanceof WebAssembly.Instance, gone}};
        }
    """})
    assert run1(tmp_path, "probe").body == {"wasm": True, "gone": ["undefined"] * 5}


def test_no_state_carries_over_between_requests(tmp_path):
    write_project(tmp_path, {"count": """
        globalThis.hits = (globalThis.hits || 0);
        export default async function () { globalThis.hits += 1; return {status: 200, body: globalThis.hits}; }
    """})
    assert [r.body for r in execute(tmp_path, "count", times=3)] == [1, 1, 1]


def test_a_thrown_error_is_500_with_its_js_stack(tmp_path):
    write_project(tmp_path, {"boom": """
        export default async function () {
          throw new Error("kaboom");
        }
    """})
    result = run1(tmp_path, "boom")
    assert result.status == 500 and result.error == "kaboom"
    assert "functions/boom.js:2" in result.body["stack"]
    [event] = [e for e in result.spans[0]["events"] if e["name"] == "exception"]
    assert "functions/boom.js:2" in event["attributes"]["exception.stacktrace"]


def test_a_non_serializable_return_is_500_naming_the_value(tmp_path):
    write_project(tmp_path, {"bad": "export default async function () { return {status: 200, body: {when: new Map()}}; }"})
    result = run1(tmp_path, "bad")
    assert result.status == 500 and "the return value's body.when is a Map" in result.error


def test_a_file_that_ends_too_soon_is_reported_at_its_last_line(tmp_path):
    write_project(tmp_path, {"cut": "export default async function () {\n  return {status: 200};\n"})
    compiled = compile_function(load_project(tmp_path).functions["cut"])
    assert compiled.error.startswith("functions/cut.js:2: SyntaxError: Unexpected end of input"), compiled.error


def test_awaiting_a_promise_nothing_settles_is_a_clear_500(tmp_path):
    write_project(tmp_path, {"stuck": "export default async function () { await new Promise(() => {}); }"})
    result = run1(tmp_path, "stuck")
    assert result.status == 500 and "nothing will settle" in result.error


def test_a_syntax_error_is_reported_with_file_and_line(tmp_path):
    write_project(tmp_path, {"broken": "export default async function () {\n  let x = ;\n}\n"})
    compiled = compile_function(load_project(tmp_path).functions["broken"])
    assert compiled.error.startswith("functions/broken.js:2: SyntaxError")
    result = run1(tmp_path, "broken")
    assert result.status == 500 and "functions/broken.js:2" in result.error


def test_top_level_code_that_never_finishes_is_a_load_error(tmp_path):
    write_project(tmp_path, {"hang": "for (;;) {}\nexport default async function () { return {status: 200}; }\n"})
    function = load_project(tmp_path).functions["hang"]
    started = time.monotonic()
    compiled = compile_function(function, timeout_ms=300)
    assert compiled.error == "functions/hang.js: its top-level code did not finish within 300 ms"
    assert time.monotonic() - started < 5


def test_the_load_time_limit_holds_inside_a_running_loop(tmp_path):
    """`flux dev` reloads functions from its event loop, where mini-racer cannot time an eval."""
    write_project(tmp_path, {"hang": "while (true) {}\nexport default async function () { return {status: 200}; }\n"})

    async def main() -> str | None:
        return compile_function(load_project(tmp_path).functions["hang"], timeout_ms=300).error

    assert asyncio.run(main()) == "functions/hang.js: its top-level code did not finish within 300 ms"


def test_db_statements_commit_together_when_the_handler_succeeds(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    write_project(tmp_path, {"two": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          const { rows } = await ctx.db.query("SELECT count(*)::int AS n FROM users", []);
          return {status: 201, body: rows[0].n};
        }
    """})
    result = run1(tmp_path, "two", dsn=dsn)
    assert result.status == 201 and result.body == 1 and result.db_outcome == "committed"
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 1


def test_a_commit_that_outruns_the_time_limit_is_cancelled_rolled_back_and_answers_504(tmp_path, dsn, conn):
    """Deferred constraint triggers run in the COMMIT: the request's limit covers them too."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    conn.execute("CREATE FUNCTION slow_check() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$")
    conn.execute("CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON users DEFERRABLE INITIALLY DEFERRED"
                  " FOR EACH ROW EXECUTE FUNCTION slow_check()")
    write_project(tmp_path, {"slow": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          return {status: 201};
        }
    """}, "[limits]\ntimeout_ms = 500\n")
    started = time.monotonic()
    first, second = execute(tmp_path, "slow", dsn=dsn, times=2)
    assert time.monotonic() - started < 4  # two requests, each cut at its limit rather than after 5 s
    assert (first.status, first.db_outcome) == (504, "rolled_back") and "while its transaction committed" in first.error
    commit = first.recording["commit"]  # the function returned 201: only the tape's commit says what became of it
    assert (commit["transaction"], commit["status"], commit["error"]["name"]) == ("rolled_back", 504, "TimeoutError")
    assert second.status == 504  # a cancel at the deadline leaves the pool able to serve the next request
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_db_statements_roll_back_when_the_handler_throws(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    write_project(tmp_path, {"fail": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          throw new Error("after the insert");
        }
    """})
    result = run1(tmp_path, "fail", dsn=dsn)
    assert result.status == 500 and result.db_outcome == "rolled_back"
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_a_success_whose_writes_a_caught_failure_rolled_back_answers_500(tmp_path, dsn, conn):
    """PostgreSQL aborts the transaction at the failed statement: the client must not be told 201."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    write_project(tmp_path, {"caught": """
        export default async function (req, ctx) {
          const { rows } = await ctx.db.query("INSERT INTO users (email) VALUES ($1) RETURNING id", ["a@x"]);
          try { await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]); } catch (e) {}
          return {status: 201, body: {id: rows[0].id}};
        }
    """})
    result = run1(tmp_path, "caught", dsn=dsn)
    assert result.status == 500 and result.db_outcome == "rolled_back"
    assert result.error.startswith("TransactionAborted: the handler returned 201, but its transaction was rolled back")
    assert "SQLSTATE 23505" in result.error
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_a_conflict_answered_after_a_caught_failure_keeps_its_status(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
    conn.execute("INSERT INTO users (email) VALUES ('a@x')")
    write_project(tmp_path, {"signup": """
        export default async function (req, ctx) {
          try {
            await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          } catch (e) {
            if (e.sqlstate === "23505") return {status: 409, body: "taken"};
            throw e;
          }
          return {status: 201};
        }
    """})
    result = run1(tmp_path, "signup", dsn=dsn)
    assert (result.status, result.body, result.error) == (409, "taken", None)


def test_the_transaction_starts_with_the_flux_context_message(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    conn.execute("SELECT pg_create_logical_replication_slot('peek', 'test_decoding')")
    write_project(tmp_path, {"w": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          return {status: 200};
        }
    """})
    run1(tmp_path, "w", dsn=dsn)
    changes = [r[0] for r in conn.execute("SELECT data FROM pg_logical_slot_get_changes('peek', NULL, NULL)")]
    body = [c for c in changes if not c.startswith(("BEGIN", "COMMIT"))]
    assert body[0].startswith("message: transactional: 1 prefix: flux")
    assert '"request_id":"req-0"' in body[0] and '"function":"w"' in body[0] and '"tenant":"default"' in body[0]
    assert body[1].startswith("table public.users: INSERT")


def test_a_serializable_transaction_still_starts_with_the_flux_context_message(tmp_path, dsn, conn):
    """The isolation level goes ahead of the message (PostgreSQL takes it only before a query); the
    message still comes before the first write, so the engine attributes every write."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    conn.execute("SELECT pg_create_logical_replication_slot('peek', 'test_decoding')")
    write_project(tmp_path, {"w": """
        export default async function (req, ctx) {
          await ctx.db.query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE");
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          const { rows } = await ctx.db.query("SELECT current_setting('transaction_isolation') AS iso");
          return {status: 200, body: rows[0].iso};
        }
    """})
    result = run1(tmp_path, "w", dsn=dsn)
    assert (result.status, result.body, result.db_outcome) == (200, "serializable", "committed")
    changes = [r[0] for r in conn.execute("SELECT data FROM pg_logical_slot_get_changes('peek', NULL, NULL)")]
    body = [c for c in changes if not c.startswith(("BEGIN", "COMMIT"))]
    assert body[0].startswith("message: transactional: 1 prefix: flux") and '"request_id":"req-0"' in body[0]
    assert body[1].startswith("table public.users: INSERT")


def test_a_commit_a_deferred_constraint_refuses_is_a_500_with_its_sqlstate(tmp_path, dsn, conn):
    """The COMMIT's error was recorded as `commit failed: ...` with DETAIL and HINT lines, no SQLSTATE
    in its text or on the span: `flux why` labelled it `error`, `flux requests` showed no code."""
    conn.execute("CREATE TABLE users (email text UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    write_project(tmp_path, {"dup": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1), ($1)", ["a@x"]);
          return {status: 201};
        }
    """})
    result = run1(tmp_path, "dup", dsn=dsn)
    assert (result.status, result.db_outcome) == (500, "rolled_back")
    assert result.error == ('DatabaseError: commit failed: duplicate key value violates unique constraint '
                            '"users_email_key" (SQLSTATE 23505)')
    assert result.spans[0]["attributes"]["db.sqlstate"] == "23505"
    assert result.recording["commit"]["error"]["sqlstate"] == "23505"


def test_a_transaction_the_servers_idle_timeout_ended_is_named_as_such(tmp_path, dsn, conn):
    """A DBA's idle_in_transaction_session_timeout, passed while the function awaited something
    else: the error read `consuming input failed: server closed the connection unexpectedly`
    over three lines, and naming neither the idle time nor the setting."""
    conn.execute("CREATE TABLE users (id int)")
    conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET idle_in_transaction_session_timeout = 200')
    write_project(tmp_path, {"slow": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users VALUES (1)");
          await new Promise((resolve) => setTimeout(resolve, 600));  // a slow call between two writes
          await ctx.db.query("INSERT INTO users VALUES (2)");
          return {status: 201};
        }
    """})
    result = run1(tmp_path, "slow", dsn=dsn)
    assert (result.status, result.db_outcome) == (500, "rolled_back")
    assert result.error.startswith("DatabaseError: ctx.db: the connection to the database was lost after its transaction "
                                   "had been idle for ") and "idle_in_transaction_session_timeout" in result.error
    assert "\n" not in result.error
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_a_statement_running_at_the_time_limit_is_stopped_on_the_server_and_its_locks_released(tmp_path, dsn, conn):
    """Closing the connection alone would leave the server running it (PostgreSQL notices a gone
    client only when it next writes), holding the request's row locks: psycopg cancels it first."""
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int)")
    conn.execute("INSERT INTO accounts VALUES (1, 100)")
    write_project(tmp_path, {"slow": """
        export default async function (req, ctx) {
          await ctx.db.query("UPDATE accounts SET balance = balance - 1 WHERE id = 1");
          await ctx.db.query("SELECT pg_sleep(30)");
        }
    """}, "[limits]\ntimeout_ms = 500\n")
    started = time.monotonic()
    assert run1(tmp_path, "slow", dsn=dsn).status == 504
    assert time.monotonic() - started < 2
    assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'").fetchone() == (0,)
    conn.execute("SET lock_timeout = '1s'")
    conn.execute("UPDATE accounts SET balance = 0 WHERE id = 1")  # the row is free: no LockNotAvailable


def test_a_result_over_the_size_limit_is_refused_before_it_is_converted_and_its_writes_stand(tmp_path, dsn, conn, monkeypatch):
    monkeypatch.setattr(host, "MAX_QUERY_RESULT_BYTES", 100_000)
    conn.execute("CREATE TABLE items (id serial PRIMARY KEY, pad text)")
    write_project(tmp_path, {"big": """
        export default async function (req, ctx) {
          try {
            await ctx.db.query("INSERT INTO items (pad) SELECT repeat('x', 100) FROM generate_series(1, 20000) RETURNING *", []);
          } catch (e) { return {status: 200, body: e.name + ": " + e.message}; }
          return {status: 200, body: "read"};
        }
    """})
    result = run1(tmp_path, "big", dsn=dsn)
    assert result.status == 200 and result.body.startswith("RangeError: ctx.db.query: the result (20,000 rows) is over ")
    assert "select fewer rows (LIMIT" in result.body
    assert result.db_outcome == "committed" and conn.execute("SELECT count(*) FROM items").fetchone() == (20000,)


def test_sql_errors_carry_their_sqlstate(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (email text UNIQUE)")
    conn.execute("INSERT INTO users VALUES ('a@x')")
    write_project(tmp_path, {"dup": """
        export default async function (req, ctx) {
          try { await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]); }
          catch (e) { return {status: 409, body: {sqlstate: e.sqlstate, message: e.message}}; }
        }
    """})
    result = run1(tmp_path, "dup", dsn=dsn)
    assert result.body["sqlstate"] == "23505" and "SQLSTATE 23505" in result.body["message"]
    db = spans_by_name(result)["db.insert(users)"]
    assert db["status"] == "error" and db["attributes"]["db.sqlstate"] == "23505"


def test_spans_nest_steps_and_name_db_and_tool_calls(tmp_path, dsn, conn, stub: Stub):
    conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, total int)")
    write_project(tmp_path, {"create_order": f"""
        export default async function (req, ctx) {{
          await ctx.db.query("INSERT INTO orders (total) VALUES ($1)", [10]);
          await ctx.step("charge", async () => {{
            await ctx.fetch("{stub.url}/v1/charges", {{method: "POST"}});
          }});
          await ctx.fetch("{stub.url}/status/429", {{name: "slack.notify"}});
          await ctx.db.query("SELECT * FROM orders", []);
          return {{status: 200}};
        }}
    """}, f'[tools]\n"{stub.host}" = "stripe"\n')
    result = run1(tmp_path, "create_order", dsn=dsn)
    spans = spans_by_name(result)
    function = spans["create_order"]
    assert set(spans) == {"create_order", "db.insert(orders)", "charge", "stripe.charges", "slack.notify", "db.select(orders)"}
    assert spans["charge"]["parent"] == function["id"] and spans["charge"]["kind"] == "internal"
    assert spans["stripe.charges"]["parent"] == spans["charge"]["id"] and spans["stripe.charges"]["kind"] == "client"
    assert spans["db.insert(orders)"]["parent"] == function["id"]
    assert spans["slack.notify"]["status"] == "error" and spans["slack.notify"]["attributes"]["http.status_code"] == 429
    assert spans["stripe.charges"]["attributes"]["http.status_code"] == 200
    for span in result.spans:
        assert set(span) == {"id", "parent", "name", "kind", "start", "duration_ms", "status", "error", "attributes", "events"}


def test_a_statement_behind_leading_comments_is_named_by_its_verb_and_table(tmp_path, dsn, conn):
    """Query tools and ORMs put comments first (sqlc's `-- name: ...`, sqlcommenter's `/* ... */`)."""
    conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, total int)")
    write_project(tmp_path, {"create_order": """
        export default async function (req, ctx) {
          await ctx.db.query("-- name: CreateOrder :exec\\nINSERT INTO orders (total) VALUES ($1)", [10]);
          await ctx.db.query("/* app='web' */ ; SELECT * FROM orders", []);
          return {status: 200};
        }
    """})
    result = run1(tmp_path, "create_order", dsn=dsn)
    assert {s["name"] for s in result.spans} == {"create_order", "db.insert(orders)", "db.select(orders)"}


def test_a_fetch_timeout_rejects_with_a_timeout_error_span(tmp_path, stub: Stub):
    write_project(tmp_path, {"slow": f"""
        export default async function (req, ctx) {{
          await ctx.fetch("{stub.url}/slow?ms=3000", {{name: "stripe.create", timeout_ms: 200}});
        }}
    """})
    result = run1(tmp_path, "slow")
    assert result.status == 500 and "stripe.create: no response within 200 ms" in result.error
    span = spans_by_name(result)["stripe.create"]
    assert span["status"] == "error" and span["attributes"]["timeout"] is True
    assert span["attributes"]["code.location"].startswith("functions/slow.js:2")


def test_a_call_in_flight_at_the_time_limit_is_recorded_as_abandoned(tmp_path, stub: Stub):
    write_project(tmp_path, {"slow": f"""
        export default async function (req, ctx) {{
          await ctx.fetch("{stub.url}/slow?ms=3000", {{name: "stripe.create"}});
        }}
    """}, "[limits]\ntimeout_ms = 300\n")
    started = time.monotonic()
    result = run1(tmp_path, "slow")
    assert result.status == 504 and time.monotonic() - started < 2
    assert spans_by_name(result)["stripe.create"]["attributes"]["flux.abandoned"] is True


def test_calls_made_together_run_concurrently_and_each_settles_as_it_finishes(tmp_path, stub: Stub):
    write_project(tmp_path, {"fan": f"""
        export default async function (req, ctx) {{
          const slow = ctx.fetch("{stub.url}/slow?ms=400", {{name: "slow"}});
          await ctx.fetch("{stub.url}/slow?ms=200", {{name: "first"}});
          const order = ["first"];
          await ctx.fetch("{stub.url}/ok", {{name: "second"}});  // while "slow" is still in flight
          order.push("second");
          await slow;
          order.push("slow");
          return {{status: 200, body: order}};
        }}
    """})
    result = run1(tmp_path, "fan")
    assert result.status == 200 and result.body == ["first", "second", "slow"]
    spans = spans_by_name(result)
    end = {name: span["start"] + span["duration_ms"] for name, span in spans.items()}
    # The spans' own times, so that a loaded machine cannot make the check pass or fail.
    assert spans["slow"]["start"] < end["first"] and spans["first"]["start"] < end["slow"]
    assert spans["second"]["start"] < end["slow"]


def test_each_ctx_call_span_has_the_file_line_and_column_of_the_call(tmp_path, stub: Stub):
    write_project(tmp_path, {"where": f"""
        async function helper(ctx) {{
          return ctx.fetch("{stub.url}/ok", {{name: "a"}});
        }}
        export default async function (req, ctx) {{
          await helper(ctx);
          await ctx.step("s", async (c) => {{ await c.fetch("{stub.url}/ok", {{name: "b"}}); }});
          await Promise.all([1].map(() => ctx.fetch("{stub.url}/ok", {{name: "c"}})));
          return {{status: 200}};
        }}
    """})
    spans = spans_by_name(run1(tmp_path, "where"))
    assert spans["a"]["attributes"]["code.location"] == "functions/where.js:2:14"
    assert spans["b"]["attributes"]["code.location"] == "functions/where.js:6:46"
    assert spans["c"]["attributes"]["code.location"] == "functions/where.js:7:39"  # V8 points at the called name


def test_a_function_that_sets_its_own_stack_hook_or_freezes_error_keeps_working(tmp_path, stub: Stub):
    write_project(tmp_path, {"hooked": f"""
        export default async function (req, ctx) {{
          Error.prepareStackTrace = () => "mine";
          await ctx.fetch("{stub.url}/ok", {{name: "hooked"}});
          const mine = new Error("x").stack;
          Object.freeze(Error);
          await ctx.fetch("{stub.url}/ok", {{name: "frozen"}});
          return {{status: 200, body: {{mine}}}};
        }}
    """})
    result = run1(tmp_path, "hooked")
    assert result.status == 200 and result.body == {"mine": "mine"}
    spans = spans_by_name(result)
    assert spans["hooked"]["attributes"]["code.location"] == "functions/hooked.js:3:13"
    assert "code.location" not in spans["frozen"]["attributes"] and spans["frozen"]["status"] == "ok"


def test_fetch_outside_the_allow_list_is_refused(tmp_path, stub: Stub):
    write_project(tmp_path, {"out": """
        export default async function (req, ctx) {
          try { await ctx.fetch("http://10.255.255.1/x"); } catch (e) { return {status: 200, body: e.message}; }
        }
    """}, f'[fetch]\nallow = ["{stub.host}"]\n')
    result = run1(tmp_path, "out")
    assert "10.255.255.1:80 are not allowed" in result.body
    assert stub.requests == []


def test_a_function_sees_the_request_secrets_and_replay_flag(tmp_path, stub: Stub):
    write_project(tmp_path, {"who": f"""
        export default async function (req, ctx) {{
          const r = await ctx.fetch("{stub.url}/echo", {{method: "POST", headers: {{authorization: "Bearer " + ctx.secrets.KEY}}, body: req.body}});
          return {{status: 200, body: {{replay: ctx.replay, echoed: (await r.json()).authorization, id: ctx.requestId}}}};
        }}
    """})
    result = run1(tmp_path, "who", {"a": 1}, secrets={"KEY": "s3cr3t"}, replay=True)
    assert result.body == {"replay": True, "echoed": "Bearer s3cr3t", "id": "req-0"}
    assert stub.requests[0]["body"] == '{"a":1}'


def test_recording_has_time_random_uuid_db_and_fetch_in_order(tmp_path, dsn, conn, stub: Stub):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    write_project(tmp_path, {"all": f"""
        export default async function (req, ctx) {{
          const t = Date.now();
          const d = new Date().toISOString();
          const r = Math.random();
          const u = crypto.randomUUID();
          const {{ rows }} = await ctx.db.query("INSERT INTO users (email) VALUES ($1) RETURNING id", [u]);
          const res = await ctx.fetch("{stub.url}/ok");
          await new Promise((resolve) => setTimeout(resolve, 5));
          return {{status: 200, body: {{t, d, r, u, id: rows[0].id, paid: (await res.json()).id}}}};
        }}
    """})
    result = run1(tmp_path, "all", dsn=dsn)
    tape = result.recording
    assert tape["v"] == 4 and tape["truncated"] is False and "incomplete" not in tape
    assert tape["commit"] == {"transaction": "committed"}
    kinds = [e[1] for e in tape["events"]]
    assert kinds == ["now", "now", "random", "uuid", "db", "settled", "fetch", "settled", "timer", "settled"]
    assert [e[0] for e in tape["events"]] == sorted(e[0] for e in tape["events"])
    calls = [e[0] for e in tape["events"] if e[1] in ("db", "fetch", "timer")]
    assert [e[2] for e in tape["events"] if e[1] == "settled"] == [[c] for c in calls]  # each result arrived before the next call
    values = {e[1]: e[2] for e in tape["events"]}
    body = result.body
    assert tape["events"][0][2] == body["t"] and values["random"] == body["r"] and values["uuid"] == body["u"]
    assert values["db"]["params"] == [body["u"]] and values["db"]["result"]["rows"] == [{"id": body["id"]}]
    assert values["fetch"]["status"] == 200 and '"cus_123"' in values["fetch"]["response_body"]
    assert values["timer"] == 5
    assert len(tape["entropy"]) == 32  # one uuid's 16 bytes, as hex


def test_every_clock_the_function_can_read_is_recorded(tmp_path):
    # Intl's format() without a date and Date reached through an instance's constructor read the
    # clock; each read is a "now" event holding what the function saw. Temporal, whose Now would
    # read it past the tape, is not there.
    write_project(tmp_path, {"clocks": """
        export default async function () {
          const seen = [new (new Date(0).constructor)().getTime(), new Date(0).constructor.now()];
          const year = new Intl.DateTimeFormat("en-US", {timeZone: "UTC", year: "numeric"});
          return {status: 200, body: {seen, year: year.format(), parts: year.formatToParts()[0].value,
                                      sameFormat: year.format === year.format, temporal: typeof Temporal}};
        }
    """})
    result = run1(tmp_path, "clocks")
    assert result.status == 200, result.error
    events = result.recording["events"]
    assert [e[1] for e in events] == ["now"] * 4
    body = result.body
    assert [e[2] for e in events[:2]] == body["seen"]
    assert body["year"] == str(time.gmtime(events[2][2] / 1000).tm_year)
    assert body["parts"] == str(time.gmtime(events[3][2] / 1000).tm_year)
    assert body["sameFormat"] is True and body["temporal"] == "undefined"


def test_the_tape_says_the_time_zone_locale_and_v8_the_function_saw(tmp_path):
    # Local time and locale formats come from the machine (TZ, LANG), not from a recorded call.
    write_project(tmp_path, {"env": """
        export default async function () {
          const o = new Intl.DateTimeFormat().resolvedOptions();
          return {status: 200, body: {time_zone: o.timeZone, locale: o.locale, local: new Date(0).toString()}};
        }
    """})
    result = run1(tmp_path, "env")
    env = result.recording["env"]
    assert {"time_zone": env["time_zone"], "locale": env["locale"]} == {k: result.body[k] for k in ("time_zone", "locale")}
    assert env["v8"].count(".") == 3


def test_date_now_taken_from_its_property_descriptor_is_recorded(tmp_path):
    write_project(tmp_path, {"desc": """
        export default async function () {
          return {status: 200, body: Object.getOwnPropertyDescriptor(Date, "now").value()};
        }
    """})
    result = run1(tmp_path, "desc")
    assert result.recording["events"] == [[0, "now", result.body]]


def test_a_fetch_on_the_tape_says_how_many_set_cookie_values_it_got(tmp_path, stub: Stub):
    write_project(tmp_path, {"cookies": f"""
        export default async function (req, ctx) {{
          return {{status: 200, body: (await ctx.fetch("{stub.url}/headers")).headers.getSetCookie().length}};
        }}
    """})
    result = run1(tmp_path, "cookies")
    [event] = [e[2] for e in result.recording["events"] if e[1] == "fetch"]
    assert result.body == 2 and event["set_cookies"] == ["[redacted]", "[redacted]"]


def test_crypto_in_top_level_code_is_a_load_error_that_says_why(tmp_path):
    # Top-level code runs before the request that brings the host's randomness; it used to be
    # told it had "used up its 1 KB of randomness".
    write_project(tmp_path, {"early": """
        const id = crypto.randomUUID();
        export default async function () { return {status: 200, body: id}; }
    """})
    result = run1(tmp_path, "early")
    assert result.status == 500 and "work inside the handler, not in the file's top-level code" in result.error


def test_recording_off_keeps_no_tape(tmp_path):
    write_project(tmp_path, {"t": "export default async function () { return {status: 200, body: Date.now()}; }"})
    assert run1(tmp_path, "t", record=False).recording is None


def test_concurrent_requests_in_one_isolate_pool_stay_separate(tmp_path, stub: Stub):
    write_project(tmp_path, {"echo": f"""
        export default async function (req, ctx) {{
          globalThis.seen = (globalThis.seen || []).concat(req.body.n);
          await ctx.fetch("{stub.url}/slow?ms=50");
          return {{status: 200, body: {{n: req.body.n, seen: globalThis.seen}}}};
        }}
    """})
    project = load_project(tmp_path)

    async def main() -> list[Execution]:
        transport = AiohttpTransport()
        executor = Executor(limits=project.limits, fetch_policy=FetchPolicy(project.fetch), transport=transport, db_pool=None)
        pool = IsolatePool(compile_function(project.functions["echo"]), size=4, memory_mb=64)
        pool.warm_now()
        calls = [Invocation(request_id=f"r{n}", tenant="default", secrets={}, parent_span=None,
                            request={"method": "POST", "path": "/echo", "query": {}, "headers": {}, "body": {"n": n}})
                 for n in range(20)]
        try:
            return await asyncio.gather(*(executor.run(pool, c) for c in calls))
        finally:
            pool.close()
            await transport.aclose()

    results = asyncio.run(main())
    assert [r.body for r in results] == [{"n": n, "seen": [n]} for n in range(20)]


def test_a_refused_fetch_span_is_named_as_the_call_asked(tmp_path, stub: Stub):
    write_project(tmp_path, {"out": """
        export default async function (req, ctx) {
          for (const init of [{name: "stripe.create"}, {}]) {
            try { await ctx.fetch("http://10.255.255.1/x", init); } catch (e) {}
          }
          return {status: 200};
        }
    """}, f'[fetch]\nallow = ["{stub.host}"]\n')
    spans = run1(tmp_path, "out").spans
    assert [s["name"] for s in spans if s["kind"] == "client"] == ["stripe.create", "fetch 10.255.255.1:80"]


def test_a_fetch_name_is_its_text_cut_to_a_span_names_length(tmp_path):
    """A name of 1 MB was kept whole in every call's span and error (300 such calls held 300 MB),
    and an object was named as Python writes a dict ("{'tool': 'x'}")."""
    port = free_port()  # nothing listens there: each call fails at once, its error naming its span
    write_project(tmp_path, {"named": f"""
        export default async function (req, ctx) {{
          const out = [];
          for (const name of ["n".repeat(1000000), {{tool: "x"}}]) {{
            try {{ await ctx.fetch("http://127.0.0.1:{port}/x", {{name}}); }} catch (e) {{ out.push(e.message.length); }}
          }}
          return {{status: 200, body: out}};
        }}
    """})
    result = run1(tmp_path, "named")
    reason = len(f": could not connect to 127.0.0.1:{port}: connection refused")
    assert result.body == [1024 + reason, len("[object Object]") + reason]
    assert [s["name"] for s in result.spans[1:]] == ["n" * 1024, "[object Object]"]


def test_a_refused_fetch_names_its_host_as_the_url_spells_it(tmp_path, stub: Stub):
    """A secret in the host is then the text redaction knows, not its lower-cased form."""
    write_project(tmp_path, {"out": """
        export default async function (req, ctx) {
          try { await ctx.fetch("http://SecretHostMK7:18151/h"); } catch (e) { return {status: 200, body: e.message}; }
        }
    """}, f'[fetch]\nallow = ["{stub.host}"]\n')
    result = run1(tmp_path, "out")
    assert result.body.startswith("outbound calls to SecretHostMK7:18151 are not allowed")
    assert [s["name"] for s in result.spans if s["kind"] == "client"] == ["fetch SecretHostMK7:18151"]


def test_the_allow_list_and_tools_match_a_host_in_any_case(tmp_path, stub: Stub):
    write_project(tmp_path, {"out": f"""
        export default async function (req, ctx) {{
          const res = await ctx.fetch("http://LocalHost:{stub.port}/v1/charges");
          return {{status: 200, body: res.status}};
        }}
    """}, f'[fetch]\nallow = ["localhost:{stub.port}"]\n[tools]\n"localhost:{stub.port}" = "stripe"\n')
    result = run1(tmp_path, "out")
    assert result.body == 200 and [s["name"] for s in result.spans if s["kind"] == "client"] == ["stripe.charges"]


def test_sensitive_fetch_headers_are_redacted_on_the_tape_by_name(tmp_path, stub: Stub):
    """The call itself carries them; the tape, which a replay reads, has `[redacted]` in their place."""
    write_project(tmp_path, {"call": f"""
        export default async function (req, ctx) {{
          const res = await ctx.fetch("{stub.url}/cookie", {{headers: {{Authorization: "Basic dXNlcjpwdw==", Cookie: "a=1", "x-trace": "t1"}}}});
          return {{status: 200, body: res.headers.get("set-cookie")}};
        }}
    """})
    result = run1(tmp_path, "call")
    [event] = [e[2] for e in result.recording["events"] if e[1] == "fetch"]
    assert result.body.startswith("session=") and stub.requests[0]["headers"]["authorization"] == "Basic dXNlcjpwdw=="
    assert event["headers"] == {"authorization": "[redacted]", "cookie": "[redacted]", "x-trace": "t1"}
    assert event["response_headers"]["set-cookie"] == "[redacted]"
    assert event["response_headers"]["content-type"] == "application/json"


def test_a_fetch_on_the_tape_keeps_its_url_as_the_function_wrote_it(tmp_path, stub: Stub):
    """Redirects are not followed; the HTTP client's rewrite (a space as +, %2F as /) would hide a secret."""
    write_project(tmp_path, {"call": f"""
        export default async function (req, ctx) {{
          const res = await ctx.fetch("{stub.url}/echo?k=a b%2Fc");
          return {{status: 200, body: res.url}};
        }}
    """})
    result = run1(tmp_path, "call")
    [event] = [e[2] for e in result.recording["events"] if e[1] == "fetch"]
    assert event["url"] == event["url_final"] == result.body == f"{stub.url}/echo?k=a b%2Fc"


def test_an_invalid_fetch_url_or_timeout_is_an_error_the_function_can_catch(tmp_path, stub: Stub):
    write_project(tmp_path, {"bad": f"""
        export default async function (req, ctx) {{
          const errors = [];
          for (const [url, init] of [["http://127.0.0.1:99999/", {{}}], ["{stub.url}/ok", {{timeout_ms: "abc"}}],
                                     ["{stub.url}/ok", {{timeout_ms: -5}}]]) {{
            try {{ await ctx.fetch(url, init); errors.push("none"); }} catch (e) {{ errors.push(e.name + ": " + e.message); }}
          }}
          return {{status: 200, body: errors}};
        }}
    """})
    result = run1(tmp_path, "bad")
    assert result.status == 200
    assert result.body[0].startswith("TypeError: ctx.fetch: 'http://127.0.0.1:99999/' is not a valid URL")
    assert result.body[1:] == ["TypeError: ctx.fetch: timeout_ms must be a positive number of milliseconds, not abc",
                               "TypeError: ctx.fetch: timeout_ms must be a positive number of milliseconds, not -5"]
    assert stub.requests == []


def test_a_fetch_response_over_the_size_limit_is_refused(tmp_path, stub: Stub, monkeypatch):
    """The response is read into the gateway's memory, which the isolate's limit does not cover."""
    monkeypatch.setattr(fetch, "MAX_FETCH_RESPONSE_BYTES", 10)
    write_project(tmp_path, {"big": f"""
        export default async function (req, ctx) {{
          try {{ await ctx.fetch("{stub.url}/ok"); }} catch (e) {{ return {{status: 200, body: e.name + ": " + e.message}}; }}
          return {{status: 200, body: "read"}};
        }}
    """})
    assert "the response body is over" in run1(tmp_path, "big").body


def test_a_fetch_response_with_no_length_or_charset_is_text(tmp_path, stub: Stub):
    """A 204 without a content-type, a chunked text/html: no Content-Length, no charset, UTF-8."""
    write_project(tmp_path, {"read": f"""
        export default async function (req, ctx) {{
          const gone = await ctx.fetch("{stub.url}/empty", {{method: "DELETE"}});
          const page = await ctx.fetch("{stub.url}/chunked");
          return {{status: 200, body: [gone.status, await gone.text(), await page.text()]}};
        }}
    """})
    assert run1(tmp_path, "read").body == [204, "", "<p>héllo</p>"]


def test_fetch_response_headers_keep_every_value_as_fetch_does(tmp_path, stub: Stub):
    """Repeated headers joined (Set-Cookie apart, by getSetCookie), a latin-1 byte as its character,
    a Headers object's iteration, and no name from Object.prototype."""
    write_project(tmp_path, {"read": f"""
        export default async function (req, ctx) {{
          const h = (await ctx.fetch("{stub.url}/headers")).headers;
          const seen = [];
          h.forEach((value, name) => seen.push(name));
          return {{status: 200, body: {{
            multi: h.get("X-Multi"), cookies: h.getSetCookie(), cookie: h.get("set-cookie"), name: h.get("x-name"),
            constructor: [h.has("constructor"), h.get("constructor"), h.get("__proto__")],
            entries: [...h].filter(([name]) => name !== "date" && name !== "server"),
            keys: Array.from(h.keys()).length === seen.length && seen.length === Array.from(h.values()).length,
          }}}};
        }}
    """})
    body = run1(tmp_path, "read").body
    assert body == {
        "multi": "one, two", "cookies": ["a=1; Path=/", "b=2; Path=/"], "cookie": "a=1; Path=/, b=2; Path=/", "name": "café",
        "constructor": [False, None, None],
        "entries": [["content-length", "0"], ["set-cookie", "a=1; Path=/"], ["set-cookie", "b=2; Path=/"],
                    ["x-multi", "one, two"], ["x-name", "café"]],
        "keys": True,
    }


def test_a_binary_fetch_response_reads_as_its_exact_bytes_and_is_on_the_tape(tmp_path, stub: Stub):
    write_project(tmp_path, {"read": f"""
        export default async function (req, ctx) {{
          const res = await ctx.fetch("{stub.url}/bytes");
          const buffer = await res.arrayBuffer(), bytes = await res.bytes();
          const json = await (await ctx.fetch("{stub.url}/chunked")).bytes();
          return {{status: 200, body: {{
            length: buffer.byteLength, exact: bytes.every((b, i) => b === i), isView: bytes instanceof Uint8Array,
            text: (await res.text()).length, utf8: Array.from(json.subarray(3, 6)),
          }}}};
        }}
    """})
    result = run1(tmp_path, "read")
    assert result.body == {"length": 256, "exact": True, "isView": True, "text": 128 + 128, "utf8": [104, 0xC3, 0xA9]}
    binary, text = [e[2] for e in result.recording["events"] if e[1] == "fetch"]
    # One character per byte, a 0 byte as U+0100 (the stored tape is jsonb, which cannot hold U+0000).
    assert binary["response_bytes"] == "\u0100" + bytes(range(1, 256)).decode("latin-1") and "response_bytes" not in text


def test_fetch_request_bodies_and_headers_are_sent_as_fetch_sends_them(tmp_path, stub: Stub):
    write_project(tmp_path, {"send": f"""
        export default async function (req, ctx) {{
          const bytes = new Uint8Array([0, 1, 255]);
          for (const [body, headers] of [[bytes, {{}}], [bytes.buffer, [["X-A", "1"], ["x-a", "2"]]], ["héllo", {{}}],
                                         [{{a: 1}}, {{}}], [{{a: 1}}, {{"Content-Type": "application/vnd.x+json"}}]]) {{
            await ctx.fetch("{stub.url}/echo", {{method: "POST", body, headers}});
          }}
          return {{status: 200}};
        }}
    """})
    assert run1(tmp_path, "send").status == 200
    heads = [{k.lower(): v for k, v in r["headers"].items()} for r in stub.requests]
    sent = [(r["raw"], h.get("content-type"), h.get("x-a")) for r, h in zip(stub.requests, heads)]
    assert sent == [(b"\x00\x01\xff", None, None), (b"\x00\x01\xff", None, "1, 2"),
                    ("héllo".encode(), "text/plain;charset=UTF-8", None), (b'{"a":1}', "application/json", None),
                    (b'{"a":1}', "application/vnd.x+json", None)]


def fetch_outcomes(tmp_path: Path, stub: Stub, inits: str, toml: str = "") -> list[str]:
    """What each ctx.fetch to the stub, with each init of the JS array `inits`, came to: "sent",
    or the error's name and message."""
    write_project(tmp_path, {"calls": f"""
        export default async function (req, ctx) {{
          const out = [];
          for (const init of {inits}) {{
            try {{ await ctx.fetch("{stub.url}/echo", init); out.push("sent"); }} catch (e) {{ out.push(e.name + ": " + e.message); }}
          }}
          return {{status: 200, body: out}};
        }}
    """}, toml)
    return run1(tmp_path, "calls").body


@pytest.mark.parametrize(("init", "said"), [
    ('{headers: {"x-a": "v\\r\\nx-injected: 1"}}', "the value of header 'x-a' holds a NUL, CR or LF"),
    ('{headers: {"x-a": "v\\u0000w"}}', "the value of header 'x-a' holds a NUL, CR or LF"),
    ('{headers: {"transfer-encoding ": "chunked"}}', "'transfer-encoding ' is not a valid header name"),
    ('{headers: [["", "v"]]}', "'' is not a valid header name"),
    ('{method: "GET / HTTP/1.1\\r\\nX:"}', "'GET / HTTP/1.1\\r\\nX:' is not a valid HTTP method"),
    ('{method: "CONNECT"}', "CONNECT is a method fetch refuses"),
    ('{method: "POST", body: "abcdef", headers: {"content-length": "3"}}',
     "the content-length header says '3', and the body is 6 bytes: leave it to ctx.fetch"),
    ('{method: "POST", body: "abc", headers: {"content-length": "10"}}',
     "the content-length header says '10', and the body is 3 bytes: leave it to ctx.fetch"),
    ('{method: "POST", body: "0\\r\\n\\r\\nGET /admin HTTP/1.1\\r\\nhost: x\\r\\n\\r\\n", headers: {"transfer-encoding": "chunked"}}',
     "the transfer-encoding header is the HTTP client's to set"),
    ('{headers: {upgrade: "h2c"}}', "the upgrade header is the HTTP client's to set"),
    ('{headers: {connection: "upgrade"}}', "the connection header can only be close or keep-alive"),
], ids=["crlf-value", "nul-value", "name-with-space", "empty-name", "method-with-crlf", "connect", "content-length-short",
        "content-length-long", "chunked-smuggling", "upgrade", "connection-upgrade"])
def test_a_request_http_cannot_carry_as_written_is_a_type_error_and_nothing_is_sent(tmp_path, stub: Stub, init, said):
    """aiohttp sent a header name with a space (`transfer-encoding : chunked`, which some servers
    read as the framing header) and an empty one, cut the body to a content-length of the
    function's or sent less than it said (the upstream then read the next call on that connection
    as the rest), and sent transfer-encoding: chunked with the body unchunked: a request smuggled
    onto a connection other tenants share. CR, LF and NUL it refused, as a FetchError."""
    assert fetch_outcomes(tmp_path, stub, f"[{init}]") == [f"TypeError: ctx.fetch: {said}"]
    assert stub.requests == []


def test_a_fetch_with_a_bad_init_rejects_so_catch_takes_it_up_as_fetchs_does(tmp_path, stub: Stub):
    """ctx.fetch threw at once: `ctx.fetch(...).catch(fallback)` did not catch it, and the request was a 500."""
    write_project(tmp_path, {"bad": f"""
        export default async function (req, ctx) {{
          const fallback = (e) => e.name + ": " + e.message;
          const timeout = await ctx.fetch("{stub.url}/ok", {{timeout_ms: -5}}).catch(fallback);
          const getter = await ctx.fetch("{stub.url}/ok", {{get headers() {{ throw new RangeError("no headers"); }}}}).catch(fallback);
          return {{status: 200, body: [timeout, getter]}};
        }}
    """})
    result = run1(tmp_path, "bad")
    assert result.body == ["TypeError: ctx.fetch: timeout_ms must be a positive number of milliseconds, not -5", "RangeError: no headers"]
    assert stub.requests == []


def test_a_bad_fetch_nothing_takes_up_is_logged_as_an_unhandled_rejection(tmp_path, stub: Stub):
    write_project(tmp_path, {"bad": f"""
        export default async function (req, ctx) {{
          ctx.fetch("{stub.url}/ok", {{timeout_ms: "soon"}});
          return {{status: 200}};
        }}
    """})
    result = run1(tmp_path, "bad")
    logged = [e["attributes"]["message"] for s in result.spans for e in s.get("events", []) if e["name"] == "log"]
    assert result.status == 200
    assert logged == ["Unhandled promise rejection: TypeError: ctx.fetch: timeout_ms must be a positive number of milliseconds, not soon"]


def test_a_content_length_that_is_the_bodys_and_connection_close_are_sent(tmp_path, stub: Stub):
    write_project(tmp_path, {"frame": f"""
        export default async function (req, ctx) {{
          await ctx.fetch("{stub.url}/echo", {{method: "POST", body: "héllo", headers: {{"content-length": "6", connection: "close"}}}});
          return {{status: 200}};
        }}
    """})
    assert run1(tmp_path, "frame").status == 200
    assert [r["raw"] for r in stub.requests] == ["héllo".encode()]


def test_a_host_header_is_held_to_the_allow_list_as_the_url_is(tmp_path, stub: Stub):
    """The upstream serves the host the header names, when it serves several (a CDN, a proxy):
    `host: admin.internal` on a call to an allowed address reached a host the list leaves out."""
    inits = f"""[{{headers: {{host: "admin.internal"}}}}, {{headers: {{host: "{stub.host}"}}}}, {{headers: {{host: "API.example:443"}}}}]"""
    assert fetch_outcomes(tmp_path, stub, inits, f'[fetch]\nallow = ["{stub.host}", "api.example:443"]\n') == [
        "FetchNotAllowed: outbound calls to admin.internal:80 are not allowed: add it to [fetch] allow in flux.toml", "sent", "sent"]
    assert [r["headers"]["host"] for r in stub.requests] == [stub.host, "API.example:443"]


def test_a_header_value_loses_its_surrounding_whitespace_as_fetch_trims_it(tmp_path, stub: Stub):
    """A secret read with its final newline: aiohttp refused the line break inside Flux."""
    write_project(tmp_path, {"trim": f"""
        export default async function (req, ctx) {{
          await ctx.fetch("{stub.url}/echo", {{headers: {{authorization: " Bearer tok-1\\n"}}}});
          return {{status: 200}};
        }}
    """})
    assert run1(tmp_path, "trim").status == 200
    assert stub.requests[0]["headers"]["authorization"] == "Bearer tok-1"


def test_a_timer_longer_than_any_delay_waits_as_the_longest(tmp_path):
    write_project(tmp_path, {"later": """
        export default async function () {
          setTimeout(() => {}, Infinity);
          return {status: 200, body: "not waited for"};
        }
    """})
    result = run1(tmp_path, "later")
    assert (result.status, result.body) == (200, "not waited for")


def test_a_timer_cleared_once_on_the_host_is_cancelled_there(tmp_path):
    """Its task would hold the shared loop (and this request) until it fired."""
    write_project(tmp_path, {"cleared": """
        export default async function () {
          const long = setTimeout(() => {}, 60000);
          await new Promise((resolve) => setTimeout(resolve, 10));  // the long timer is on the host by now
          clearTimeout(long);
          await new Promise(() => {});  // nothing left that could settle it
        }
    """}, FAST)
    result = run1(tmp_path, "cleared")
    assert result.status == 500 and "nothing will settle" in result.error
    assert [kind for _, kind, _ in result.recording["events"]] == ["timer", "settled"]  # the short timer only


def test_more_pending_calls_than_the_limit_is_an_error_the_function_can_catch(tmp_path):
    write_project(tmp_path, {"many": """
        export default async function () {
          try {
            for (let i = 0; i < 5000; i++) setTimeout(() => {}, 1);
          } catch (e) {
            return {status: 200, body: e.name + ": " + e.message};
          }
          return {status: 200, body: "all set"};
        }
    """})
    assert run1(tmp_path, "many").body == "RangeError: Flux: at most 1000 ctx calls and timers can be pending at once in a request"


def test_a_lone_surrogate_in_what_the_function_reports_becomes_a_replacement_character(tmp_path):
    write_project(tmp_path, {"odd": """
        export default async function (req, ctx) {
          ctx.log("half \\uD800 a pair");
          return {status: 200, body: "ok"};
        }
    """})
    result = run1(tmp_path, "odd")
    assert result.status == 200
    [log] = [e for e in result.spans[0]["events"] if e["name"] == "log"]
    assert log["attributes"]["message"] == "half \ufffd a pair"


def test_db_params_json_cannot_carry_are_an_error_the_function_can_catch(tmp_path):
    write_project(tmp_path, {"cyclic": """
        export default async function (req, ctx) {
          const a = {}; a.self = a;
          try { await ctx.db.query("SELECT $1::jsonb", [a]); } catch (e) { return {status: 200, body: e.name}; }
        }
    """})
    assert run1(tmp_path, "cyclic").body == "TypeError"


def test_a_bigint_param_is_sent_as_its_decimal_text(tmp_path, dsn, conn):
    write_project(tmp_path, {"big": """
        export default async function (req, ctx) {
          const { rows } = await ctx.db.query("SELECT ($1::numeric + 1)::text AS n", [2n ** 70n]);
          return {status: 200, body: rows[0].n};
        }
    """})
    assert run1(tmp_path, "big", dsn=dsn).body == str(2**70 + 1)


@pytest.mark.parametrize("param", ["NaN", "Infinity", "-Infinity", "[1, NaN]", "{x: Infinity}"])
def test_a_non_finite_number_param_is_a_type_error_not_null(tmp_path, dsn, conn, param):
    """JSON would carry it as null: SQL NULL, silently."""
    write_project(tmp_path, {"nan": f"""
        export default async function (req, ctx) {{
          try {{ await ctx.db.query("SELECT $1::text AS v", [{param}]); }}
          catch (e) {{ return {{status: 200, body: e.name + ": " + e.message}}; }}
          return {{status: 200, body: "sent"}};
        }}
    """})
    body = run1(tmp_path, "nan", dsn=dsn).body
    assert body.startswith("TypeError: ctx.db.query(sql, params): $1 ") and "which a parameter cannot carry" in body


def test_array_params_are_postgresql_arrays_of_one_type(tmp_path, dsn, conn):
    """Numbers of one array are one type, nested arrays are multi-dimensional, objects are jsonb."""
    write_project(tmp_path, {"arrays": """
        export default async function (req, ctx) {
          const { rows } = await ctx.db.query(
            "SELECT $1::float8[] AS mixed, $2::int[] AS grid, $3::jsonb AS objects, $4::text[] AS texts",
            [[0.5, 1], [[1, 2], [3, 4]], [{a: 1}, [2]], ["x", null]]);
          return {status: 200, body: rows[0]};
        }
    """})
    assert run1(tmp_path, "arrays", dsn=dsn).body == {"mixed": [0.5, 1], "grid": [[1, 2], [3, 4]], "objects": [{"a": 1}, [2]],
                                                      "texts": ["x", None]}


def test_an_array_param_of_strings_and_numbers_is_a_type_error(tmp_path, dsn, conn):
    write_project(tmp_path, {"mixed": """
        export default async function (req, ctx) {
          try { await ctx.db.query("SELECT $1::text[] AS v", [["a", 1]]); }
          catch (e) { return {status: 200, body: e.name + ": " + e.message}; }
        }
    """})
    assert run1(tmp_path, "mixed", dsn=dsn).body == (
        "TypeError: ctx.db.query: $1 is an array of numbers and strings; a PostgreSQL array holds values of one type")


def test_a_uint8array_param_is_bytea_byte_for_byte(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE blobs (b bytea)")
    write_project(tmp_path, {"bytes": """
        export default async function (req, ctx) {
          const bytes = new Uint8Array([0, 1, 127, 128, 255]);
          await ctx.db.query("INSERT INTO blobs VALUES ($1)", [bytes]);
          await ctx.db.query("INSERT INTO blobs VALUES ($1)", [bytes.buffer]);
          let nested;
          try { await ctx.db.query("SELECT $1::jsonb", [{b: bytes}]); } catch (e) { nested = e.name; }
          const { rows } = await ctx.db.query("SELECT $1::bytea = '\\\\x00017f80ff'::bytea AS same", [bytes]);
          return {status: 200, body: {same: rows[0].same, nested}};
        }
    """})
    result = run1(tmp_path, "bytes", dsn=dsn)
    assert result.body == {"same": True, "nested": "TypeError"}
    assert conn.execute("SELECT b FROM blobs").fetchall() == [(b"\x00\x01\x7f\x80\xff",)] * 2


def test_a_database_error_gives_the_function_its_detail_and_hint(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (email text UNIQUE)")
    conn.execute("INSERT INTO users VALUES ('a@x')")
    write_project(tmp_path, {"dup": """
        export default async function (req, ctx) {
          const errors = [];
          for (const sql of ["INSERT INTO users (email) VALUES ('a@x')",
                             "DO $$ BEGIN RAISE EXCEPTION 'no plan' USING DETAIL = 'plan 7 is gone', HINT = 'pick another'; END $$"]) {
            try { await ctx.db.query("SAVEPOINT s"); await ctx.db.query(sql); }
            catch (e) { errors.push({detail: e.detail, hint: e.hint ?? null}); await ctx.db.query("ROLLBACK TO SAVEPOINT s"); }
          }
          return {status: 200, body: errors};
        }
    """})
    assert run1(tmp_path, "dup", dsn=dsn).body == [{"detail": "Key (email)=(a@x) already exists.", "hint": None},
                                                   {"detail": "plan 7 is gone", "hint": "pick another"}]


def test_a_response_header_http_refuses_is_a_500_and_its_writes_roll_back(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    write_project(tmp_path, {"split": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          return {status: 200, headers: {"x-next": "a\\r\\nset-cookie: evil=1"}};
        }
    """})
    result = run1(tmp_path, "split", dsn=dsn)
    assert result.status == 500 and result.error.startswith("InvalidResponse: the handler returned header 'x-next'")
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


@pytest.mark.parametrize("status", [100, 101, 199])
def test_an_interim_status_is_a_500_and_its_writes_roll_back(tmp_path, dsn, conn, status):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    write_project(tmp_path, {"interim": f"""
        export default async function (req, ctx) {{
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          return {{status: {status}}};
        }}
    """})
    result = run1(tmp_path, "interim", dsn=dsn)
    assert (result.status, result.error) == (
        500, f"InvalidResponse: the handler returned status {status}; it must be an integer from 200 to 599")
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_framing_headers_the_function_returns_are_left_to_the_server(tmp_path):
    write_project(tmp_path, {"framed": """
        export default async function () {
          return {status: 200, headers: {"Content-Length": "1", "x-kept": "yes"}, body: "longer than one byte"};
        }
    """})
    assert run1(tmp_path, "framed").headers == [("x-kept", "yes")]


@pytest.mark.parametrize(("value", "said"), [("null", "null"), ("true", "true"), ("{a: 1}", "an object"),
                                           ('["a=1", null]', "an array holding null")])
def test_a_header_value_that_is_not_text_is_a_500_naming_the_header_and_its_writes_roll_back(tmp_path, dsn, conn, value, said):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    write_project(tmp_path, {"odd": f"""
        export default async function (req, ctx) {{
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          return {{status: 200, headers: {{"x-odd": {value}}}}};
        }}
    """})
    result = run1(tmp_path, "odd", dsn=dsn)
    assert (result.status, result.error) == (500, f"InvalidResponse: the handler returned header 'x-odd' as {said}; a header's "
                                                  "value must be a string, a number, or an array of them (a repeated header)")
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_a_number_in_a_header_is_sent_as_its_js_text(tmp_path):
    write_project(tmp_path, {"n": """
        export default async function () {
          return {status: 200, headers: {"x-small": 1e-7, "x-whole": 2.0, "x-big": 1e21, "x-list": [1.5, "two"]}};
        }
    """})
    assert run1(tmp_path, "n").headers == [("x-small", "1e-7"), ("x-whole", "2"), ("x-big", "1e+21"),
                                           ("x-list", "1.5"), ("x-list", "two")]


def test_header_names_are_case_insensitive_and_each_value_of_one_name_is_sent(tmp_path):
    write_project(tmp_path, {"cookies": """
        export default async function () {
          return {status: 200, headers: {"Set-Cookie": ["a=1", "b=2"], "set-cookie": "c=3", "X-Kept": "yes"}};
        }
    """})
    assert run1(tmp_path, "cookies").headers == [("set-cookie", "a=1"), ("set-cookie", "b=2"), ("set-cookie", "c=3"),
                                                 ("x-kept", "yes")]


def test_a_lone_surrogate_in_the_returned_body_becomes_a_replacement_character(tmp_path):
    write_project(tmp_path, {"odd": 'export default async function () { return {status: 200, body: {text: "half \\uD800 a pair"}}; }'})
    result = run1(tmp_path, "odd")
    assert (result.status, result.body) == (200, {"text": "half \ufffd a pair"})


def test_a_query_left_running_when_the_handler_returns_rolls_back_with_a_clear_error(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    write_project(tmp_path, {"floating": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          ctx.db.query("SELECT pg_sleep(5)");
          await new Promise((resolve) => setTimeout(resolve, 200));  // the query is on its way meanwhile
          return {status: 200};
        }
    """})
    result = run1(tmp_path, "floating", dsn=dsn)
    assert result.status == 500 and "a ctx.db query was still running when the handler returned" in result.error
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_an_export_default_that_is_not_at_a_line_start_is_named_in_the_load_error(tmp_path):
    write_project(tmp_path, {"inline": "const f = 1; export default async function () { return {status: 200}; }\n"})
    compiled = compile_function(load_project(tmp_path).functions["inline"])
    assert compiled.error == "functions/inline.js: put `export default` at the start of a line (Flux finds the handler there)"


def test_a_default_export_that_is_not_a_function_is_a_load_error(tmp_path):
    """It failed every call with a TypeError, while the load said nothing (health listed no error)."""
    write_project(tmp_path, {"number": "export default 42;\n", "nothing": "let handler;\nexport default handler;\n"})
    functions = load_project(tmp_path).functions
    assert compile_function(functions["number"]).error == \
        "functions/number.js: its default export is a number, not `async function (req, ctx)`"
    assert compile_function(functions["nothing"]).error == \
        "functions/nothing.js: its default export is undefined, not `async function (req, ctx)`"


def test_running_out_of_memory_in_a_microtask_after_returning_is_a_memory_error(tmp_path):
    """V8 stops the microtask at the limit after the handler's eval has answered; the isolate is not reused."""
    write_project(tmp_path, {"grow": """
        export default async function () {
          const kept = [];
          const grow = () => { kept.push(new Array(200000).fill(kept.length)); return Promise.resolve().then(grow); };
          grow();
          return {status: 200};
        }
    """}, FAST)
    result = run1(tmp_path, "grow")
    assert result.status == 500 and result.error == "MemoryLimitExceeded: the function exceeded its memory limit (32 MB)"


def test_nothing_of_the_function_runs_after_v8_stopped_it_at_the_memory_limit(tmp_path, stub: Stub):
    """V8 stops the microtask that reached the limit, and the drain after it answers: the host went
    on settling the function's calls, so a timer's callback ran after the limit and sent a fetch."""
    write_project(tmp_path, {"grow": f"""
        export default async function (req, ctx) {{
          setTimeout(() => {{ Math.random(); ctx.fetch("{stub.url}/ok"); }}, 0);
          await null;
          ctx.fetch("{stub.url}/ok?in-the-last-turn");  // made in the turn the limit stops: never sent
          const kept = [];
          for (;;) kept.push(new Array(200000).fill(kept.length));
        }}
    """}, FAST)
    result = run1(tmp_path, "grow")
    assert result.status == 500 and result.error == "MemoryLimitExceeded: the function exceeded its memory limit (32 MB)"
    assert stub.requests == []
    assert result.recording["incomplete"] is True
    assert [(e[1], e[2]["url"], e[2].get("abandoned")) for e in result.recording["events"]] == [("fetch", f"{stub.url}/ok?in-the-last-turn", True)]


def test_the_tape_says_when_each_result_reached_the_function(tmp_path, stub: Stub):
    """Results arrive in the order the host settles them, not the order of the calls: a replay
    that settled them by call order would run the function differently."""
    write_project(tmp_path, {"race": f"""
        export default async function (req, ctx) {{
          const order = [];
          const slow = ctx.fetch("{stub.url}/slow?ms=200").then(() => order.push("slow"));
          const fast = ctx.fetch("{stub.url}/ok").then(() => order.push("fast"));
          await Promise.all([slow, fast]);
          return {{status: 200, body: order}};
        }}
    """})
    result = run1(tmp_path, "race")
    assert result.body == ["fast", "slow"]
    events = result.recording["events"]
    [slow_call, fast_call] = [e[0] for e in events if e[1] == "fetch"]
    assert [e[2] for e in events if e[1] == "settled"] == [[fast_call], [slow_call]]


def test_a_request_cut_short_keeps_its_recording_and_steps_up_to_its_last_step(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    write_project(tmp_path, {"spin": """
        export default async function (req, ctx) {
          const t = Date.now();
          const r = Math.random();
          await ctx.step("spinning", async (s) => {
            s.log("about to spin");
            await s.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
            for (;;) {}
          });
        }
    """}, FAST)
    result = run1(tmp_path, "spin", dsn=dsn)
    assert result.status == 504
    tape = result.recording
    assert tape["incomplete"] is True
    # The INSERT's result reached the function, in the turn that spun (in a microtask, after the
    # await): that turn is on the tape too, stopped where it was.
    assert [e[1] for e in tape["events"]] == ["now", "random", "db", "settled"]
    step = next(s for s in result.spans if s["name"] == "spinning")
    assert step["status"] == "error" and step["error"] == "the request ended before this step did"
    assert [e["attributes"]["message"] for e in step["events"]] == ["about to spin"]
    [db] = [s for s in result.spans if s["name"] == "db.insert(users)"]
    assert db["parent"] == step["id"]


def test_a_loop_after_an_await_cut_at_the_time_limit_keeps_the_reads_of_its_turn(tmp_path):
    """Code after an `await` runs in a microtask, after its eval has answered: cancelling the eval
    did not stop it, the drain behind it waited past its budget, and the turn's reads (all of a
    first turn's, the top-level code's included) were lost."""
    write_project(tmp_path, {"spin": """
        const loaded = Date.now();
        export default async function () {
          await null;
          const r = Math.random();
          for (;;) { if (r + loaded < 0) break; }
        }
    """}, FAST)
    result = run1(tmp_path, "spin")
    assert result.status == 504 and [e[1] for e in result.recording["events"]] == ["now", "random"]


def test_a_fetch_error_on_the_tape_is_what_the_functions_error_got(tmp_path, stub: Stub):
    write_project(tmp_path, {"fail": f"""
        export default async function (req, ctx) {{
          const seen = [];
          for (const url of ["http://10.255.255.1/x", "{stub.url}/slow?ms=500"]) {{
            try {{ await ctx.fetch(url, {{timeout_ms: 100}}); }} catch (e) {{ seen.push([e.name, e.message]); }}
          }}
          return {{status: 200, body: seen}};
        }}
    """}, f'[fetch]\nallow = ["{stub.host}"]\n')
    result = run1(tmp_path, "fail")
    errors = [e[2]["error"] for e in result.recording["events"] if e[1] == "fetch"]
    assert [[e["name"], e["message"]] for e in errors] == result.body
    assert errors[1]["timeout"] is True


def test_a_call_the_function_did_not_wait_for_is_recorded_as_abandoned(tmp_path, stub: Stub):
    write_project(tmp_path, {"leave": f"""
        export default async function (req, ctx) {{
          ctx.fetch("{stub.url}/ok");
          return {{status: 200}};
        }}
    """})
    result = run1(tmp_path, "leave")
    [event] = [e[2] for e in result.recording["events"] if e[1] == "fetch"]
    assert event["abandoned"] is True and "error" not in event and "status" not in event
    [span] = [s for s in result.spans if s["kind"] == "client"]
    assert span["attributes"]["flux.abandoned"] is True
    assert stub.requests == []


def test_a_call_never_run_is_taped_as_a_run_one_is_its_sensitive_headers_redacted_and_its_bytes_escaped(tmp_path, stub: Stub):
    """A call still in the outbox when the function returned was written as the function passed
    it: an Authorization header in clear, and a 0 byte as U+0000 (the trace store makes it U+FFFD)."""
    write_project(tmp_path, {"leave": f"""
        export default async function (req, ctx) {{
          ctx.fetch("{stub.url}/mirror", {{method: "PUT", headers: {{authorization: "Bearer tok_123"}}, body: new Uint8Array([0, 1])}});
          ctx.db.query("SELECT $1::bytea", [new Uint8Array([0, 2])]);
          return {{status: 200}};
        }}
    """})
    result = run1(tmp_path, "leave")
    events = {e[1]: e[2] for e in result.recording["events"]}
    assert events["fetch"] == {"url": f"{stub.url}/mirror", "method": "PUT", "headers": {"authorization": "[redacted]"},
                               "body": "\u0100\u0001", "binary": True, "abandoned": True}
    assert events["db"] == {"sql": "SELECT $1::bytea", "params": ["\u0100\u0002"], "binary": [0], "abandoned": True}


def test_a_step_span_covers_the_calls_made_in_it(tmp_path, stub: Stub):
    """Steps are timed by Date.now()'s whole milliseconds, calls to the microsecond."""
    write_project(tmp_path, {"steps": f"""
        export default async function (req, ctx) {{
          await ctx.step("outer", (s) => s.step("inner", (t) => t.fetch("{stub.url}/ok")));
          return {{status: 200}};
        }}
    """})
    spans = {s["name"]: s for s in run1(tmp_path, "steps").spans}
    for parent, child in [("outer", "inner"), ("inner", f"fetch {stub.host}")]:
        p, c = spans[parent], spans[child]
        assert p["start"] <= c["start"] and c["start"] + c["duration_ms"] <= p["start"] + p["duration_ms"]


def test_weak_references_are_not_there(tmp_path):
    """deref() would tell when V8 collected the target: GC timing, which no replay reproduces."""
    write_project(tmp_path, {"weak": "export default async function () { return {status: 200, body: typeof WeakRef}; }"})
    assert run1(tmp_path, "weak").body == "undefined"


def test_shared_memory_is_not_there(tmp_path):
    """A SharedArrayBuffer and a shared WebAssembly memory are the process's, outside any isolate's memory limit."""
    write_project(tmp_path, {"shared": """
        export default async function () {
          const tried = (make) => { try { return make().buffer.constructor.name; } catch (e) { return e.constructor.name; } };
          const sharedModule = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 5, 4, 1, 3, 1, 2]); // (memory 1 2 shared)
          const plainModule = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 5, 4, 1, 1, 1, 2]); // (memory 1 2)
          const exported = (bytes) => new WebAssembly.Instance(new WebAssembly.Module(bytes)).exports;
          return {status: 200, body: [
            typeof SharedArrayBuffer,
            tried(() => new WebAssembly.Memory({initial: 1, maximum: 2, shared: true})),
            tried(() => new (new WebAssembly.Memory({initial: 1})).constructor({initial: 1, maximum: 2, shared: true})),
            tried(() => ({buffer: exported(sharedModule)})),
            await WebAssembly.instantiate(sharedModule).then(() => "instantiated", (e) => e.constructor.name),
            tried(() => new WebAssembly.Memory({initial: 1, maximum: 2})),
            typeof exported(plainModule),
          ]};
        }
    """})
    assert run1(tmp_path, "shared").body == ["undefined", "TypeError", "TypeError", "TypeError", "TypeError", "ArrayBuffer", "object"]


@pytest.mark.parametrize("levels", [255, 1100])
def test_a_body_nested_deeper_than_a_response_carries_is_a_500_and_its_writes_roll_back(tmp_path, dsn, conn, levels):
    """Found before the commit: past about 1,000 levels the host could not even read it, and the
    request's transaction and connection were left open."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    write_project(tmp_path, {"deep": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["a@x"]);
          let body = 1;
          for (let i = 0; i < req.body; i++) body = [body];
          return {status: 200, body};
        }
    """})
    [deep, fine] = [run1(tmp_path, "deep", n, dsn=dsn) for n in (levels, 254)]
    assert (deep.status, deep.error) == (500, "NonSerializableReturn: the return value is nested deeper than 255 levels "
                                              "(a body deeper than 254), more than a response can carry")
    assert fine.status == 200
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 1


def test_a_db_param_nested_deeper_than_the_host_writes_is_an_error_the_function_can_catch(tmp_path):
    write_project(tmp_path, {"deep": """
        export default async function (req, ctx) {
          let param = {};
          for (let i = 0; i < 1100; i++) param = {a: param};
          try { await ctx.db.query("SELECT $1::jsonb", [param]); } catch (e) { return {status: 200, body: `${e.name}: ${e.message}`}; }
        }
    """})
    result = run1(tmp_path, "deep")
    assert (result.status, result.body) == (200, "TypeError: ctx.db.query(sql, params): $1 cannot be sent: it is nested deeper than 254 levels")


def test_logs_past_the_limit_are_counted_on_the_function_span_not_kept(tmp_path):
    """Every tenant's traces share the gateway's memory and its trace queue: 300,000 logs made a 27 MB trace."""
    write_project(tmp_path, {"chatty": """
        export default async function (req, ctx) {
          for (let i = 0; i < 1200; i++) ctx.log(`line ${i}`);
          await ctx.step("inside", async (step) => { step.log("in a step"); console.log("to the console"); });
          ctx.log("x".repeat(3 << 20));  // past the events' 2 MB, on its own
          return {status: 200};
        }
    """})
    result = run1(tmp_path, "chatty")
    function, inside = result.spans[0], spans_by_name(result)["inside"]
    assert [e["attributes"]["message"] for e in function["events"]] == [f"line {i}" for i in range(1000)]
    assert inside["events"] == [] and function["attributes"]["flux.events_dropped"] == 200 + 3


def test_a_big_log_past_the_events_size_limit_is_dropped_whole(tmp_path):
    """Never cut: a secret cut in two is past what redaction recognises."""
    write_project(tmp_path, {"big": """
        export default async function (req, ctx) {
          const line = "y".repeat(1 << 20);
          for (let i = 0; i < 3; i++) ctx.log(line);
          return {status: 200};
        }
    """})
    function = run1(tmp_path, "big").spans[0]
    assert [len(e["attributes"]["message"]) for e in function["events"]] == [1 << 20]
    assert function["attributes"]["flux.events_dropped"] == 2


def test_steps_past_the_limit_run_unrecorded_and_are_counted(tmp_path):
    write_project(tmp_path, {"steps": """
        export default async function (req, ctx) {
          let ran = 0;
          await ctx.step("outer", async (outer) => {
            for (let i = 0; i < 1100; i++) await outer.step(`s${i}`, async (s) => { ran++; if (i === 1050) s.log("late"); });
          });
          return {status: 200, body: ran};
        }
    """})
    result = run1(tmp_path, "steps")
    steps = [s for s in result.spans if s["attributes"].get("flux.kind") == "step"]
    assert result.body == 1100 and len(steps) == 1000 and result.spans[0]["attributes"]["flux.steps_dropped"] == 101
    # A log in an unrecorded step goes where the step's own ctx would put it: the step around it.
    assert [e["attributes"]["message"] for e in spans_by_name(result)["outer"]["events"]] == ["late"]


def test_log_attributes_nested_too_deep_are_noted_where_they_stop(tmp_path):
    """Past about 1,000 levels the host could not read the drain: an internal error, and no trace."""
    write_project(tmp_path, {"deep": """
        export default async function (req, ctx) {
          let v = 1;
          for (let i = 0; i < 1100; i++) v = [v];
          ctx.log("deep", {v});
          return {status: 200};
        }
    """})
    result = run1(tmp_path, "deep")
    [event] = result.spans[0]["events"]
    v = event["attributes"]["v"]
    for _ in range(62):  # the attributes are the first level, `v` the second
        [v] = v
    assert result.status == 200 and v == ["[not recorded: nested deeper than 64 levels]"]


def test_the_tape_is_cut_where_its_db_and_fetch_events_pass_its_size_limit(tmp_path):
    """The host held every call's SQL, parameters and results until the trace was written: 20 MB
    parameters sent 11 times in 3 s made a 230 MB tape in the gateway's memory."""
    write_project(tmp_path, {"big": """
        export default async function (req, ctx) {
          const big = "p".repeat(3 << 20);
          for (let i = 0; i < 4; i++) { try { await ctx.db.query("SELECT $1", [big]); } catch (e) {} }
          return {status: 200, body: Date.now() > 0};
        }
    """})
    result = run1(tmp_path, "big")
    kinds = [kind for _, kind, _ in result.recording["events"]]
    assert result.status == 200 and result.recording["truncated"] is True
    # 6 MB of the 8 MB; the third passes it, and the tape ends before it (the Date.now() after it too).
    assert kinds == ["db", "settled", "db", "settled"]
    assert [len(data["params"][0]) for _, kind, data in result.recording["events"] if kind == "db"] == [3 << 20] * 2


def test_a_db_span_keeps_the_start_of_a_long_statement(tmp_path):
    write_project(tmp_path, {"long": """
        export default async function (req, ctx) {
          try { await ctx.db.query("SELECT 1 -- " + "s".repeat(200000)); } catch (e) {}
          return {status: 200};
        }
    """})
    result = run1(tmp_path, "long")
    [db] = [span for span in result.spans if span["attributes"].get("flux.kind") == "db"]
    statement, taped = db["attributes"]["db.statement"], result.recording["events"][0][2]["sql"]
    assert (len(statement), statement.startswith("SELECT 1 -- s")) == (64 * 1024, True)
    assert len(taped) == len("SELECT 1 -- ") + 200000  # the tape has it whole


def test_db_and_fetch_spans_past_the_limit_are_counted_on_the_function_span(tmp_path):
    write_project(tmp_path, {"calls": """
        export default async function (req, ctx) {
          for (let i = 0; i < 3; i++) {
            await Promise.all(Array.from({length: 400}, () => ctx.db.query("SELECT 1").catch(() => 0)));
          }
          return {status: 200};
        }
    """})
    result = run1(tmp_path, "calls")
    clients = [span for span in result.spans if span["kind"] == "client"]
    assert len(clients) == 1000 and result.spans[0]["attributes"]["flux.spans_dropped"] == 200


@pytest.mark.parametrize("thrown, said", [
    ('Object.defineProperty(new Error("x"), "message", {get() { throw new RangeError("no message"); }})', "RangeError: no message"),
    ("{toJSON() { throw 1; }, toString() { throw 2; }}", "2"),
])
def test_a_thrown_value_that_cannot_be_read_is_a_500_that_says_so(tmp_path, thrown, said):
    """It answered "awaits a Promise that nothing will settle", which hid what the function did."""
    write_project(tmp_path, {"odd": f"export default async function () {{ throw {thrown}; }}"})
    result = run1(tmp_path, "odd")
    assert (result.status, result.error) == (
        500, f"UnreadableThrow: the function threw a value that could not be read (reading it threw {said})")


def test_an_error_name_that_is_not_text_is_written_as_text(tmp_path):
    """A deep object as the name reached the host as it was: past about 1,000 levels, an internal error."""
    write_project(tmp_path, {"named": """
        export default async function () {
          let name = 1;
          for (let i = 0; i < 1100; i++) name = [name];
          throw Object.assign(new Error("x"), {name});
        }
    """})
    result = run1(tmp_path, "named")
    assert (result.status, result.error) == (500, "1: x")


def test_one_request_cannot_take_every_outbound_connection(tmp_path, stub: Stub):
    """The gateway's HTTP client has 100 connections for every request; a request with 100 slow
    fetches in flight held them all, and another request's fetch waited out its timeout."""
    write_project(tmp_path, {"fan": f"""
        export default async function (req, ctx) {{
          if (req.body === "hog") {{
            await Promise.all(Array.from({{length: 100}}, () => ctx.fetch("{stub.url}/slow?ms=1500").catch(() => 0)));
            return {{status: 200, body: "hogged"}};
          }}
          await new Promise((resolve) => setTimeout(resolve, 200));  // once the hog's calls are out
          const answer = await ctx.fetch("{stub.url}/ok", {{timeout_ms: 1000}});
          return {{status: 200, body: answer.status}};
        }}
    """}, '[limits]\ntimeout_ms = 2500\n')
    [[_, other]] = execute_waves(tmp_path, "fan", [["hog", "other"]], size=2)
    assert (other.status, other.body) == (200, 200)


def test_steps_nested_a_thousand_deep_are_covered_in_one_pass():
    """It runs on the loop every request shares: a pass per level took seconds for a chain of 1,000."""
    from flux.runtime.executor import _cover_children

    steps = [{"id": f"s{i}", "parent": f"s{i - 1}" if i else "fn", "start": 1000.0 + i, "duration_ms": 1.0} for i in range(1000)]
    call = {"id": "c", "parent": "s999", "start": 900.0, "duration_ms": 2000.0}
    started = time.perf_counter()
    _cover_children(steps, [*steps, call])
    assert time.perf_counter() - started < 0.5
    assert {(step["start"], step["duration_ms"]) for step in steps} == {(900.0, 2000.0)}


def test_a_step_is_stretched_over_its_children_and_theirs():
    from flux.runtime.executor import _cover_children

    outer = {"id": "o", "parent": "fn", "start": 100.0, "duration_ms": 10.0}
    inner = {"id": "i", "parent": "o", "start": 102.0, "duration_ms": 1.0}
    beside = {"id": "b", "parent": "fn", "start": 100.0, "duration_ms": 1.0}
    calls = [{"id": "c1", "parent": "i", "start": 101.5, "duration_ms": 12.0}, {"id": "c2", "parent": "o", "start": 99.0, "duration_ms": 1.0}]
    _cover_children([inner, outer, beside], [inner, outer, beside, *calls])
    assert [(s["start"], s["duration_ms"]) for s in (outer, inner, beside)] == [(99.0, 14.5), (101.5, 12.0), (100.0, 1.0)]


def test_a_drain_carries_the_open_steps_only_when_they_changed(tmp_path, monkeypatch):
    """The host reads every drain on the loop all requests share: a step holding 2 MB of logs open
    across a thousand timer turns made it read 2 GB."""
    from flux.runtime import executor

    read: list[int] = []
    real = executor._from_js
    monkeypatch.setattr(executor, "_from_js", lambda text: read.append(len(text)) or real(text))
    write_project(tmp_path, {"open": """
        export default async function (req, ctx) {
          await ctx.step("holder", async (step) => {
            for (let i = 0; i < 1000; i++) step.log("e".repeat(1000));
            for (let i = 0; i < 50; i++) await new Promise((resolve) => setTimeout(resolve, 0));
          });
          return {status: 200};
        }
    """})
    result = run1(tmp_path, "open")
    assert len(spans_by_name(result)["holder"]["events"]) == 1000
    assert sum(read) < 3_000_000  # the 1 MB of logs once (with the step's end), not once per turn


def test_results_too_large_to_hand_to_the_function_in_one_turn_reject_its_call(tmp_path, stub: Stub, monkeypatch):
    """Past V8's longest string mini-racer aborts the process (every tenant's requests with it): 16
    fetches of 15 MB of quotes, settled together, did. The limit is lowered here to keep the test small."""
    from flux.runtime import executor

    monkeypatch.setattr(executor, "MAX_EVAL_CHARS", 200_000)
    write_project(tmp_path, {"big": f"""
        export default async function (req, ctx) {{
          const small = await ctx.fetch("{stub.url}/mirror", {{body: "fine"}});
          try {{ await ctx.fetch("{stub.url}/mirror", {{body: '"'.repeat(60000)}}); }}
          catch (e) {{ return {{status: 200, body: [await small.text(), e.name, e.message]}}; }}
        }}
    """})
    small, name, message = run1(tmp_path, "big").body
    assert (small, name) == ("fine", "RangeError") and message.startswith("this result is 240,")
    assert message.endswith(" characters as the function would receive it, more than the 200,000 that can reach it in one "
                            "turn with the results that came with it")


def test_a_request_too_large_to_hand_to_the_function_is_a_413(tmp_path, monkeypatch):
    from flux.runtime import executor

    monkeypatch.setattr(executor, "MAX_EVAL_CHARS", 200_000)
    write_project(tmp_path, {"echo": "export default async function (req) { return {status: 200, body: req.body.length}; }"})
    assert run1(tmp_path, "echo", "a" * 1000).body == 1000
    result = run1(tmp_path, "echo", '"' * 60000)
    assert result.status == 413 and result.error.startswith("PayloadTooLarge: the request is too large to hand to the function")


def test_a_db_result_nested_deeper_than_the_host_writes_rejects_its_query(tmp_path, dsn, conn):
    """It raised out of the executor: an internal error, with a traceback in the gateway's log."""
    write_project(tmp_path, {"deep": """
        export default async function (req, ctx) {
          const ok = await ctx.db.query("SELECT 1 AS one");
          try { await ctx.db.query("SELECT (repeat('[', 300) || repeat(']', 300))::jsonb AS deep"); }
          catch (e) { return {status: 200, body: [ok.rows[0].one, e.name, e.message]}; }
        }
    """})
    result = run1(tmp_path, "deep", dsn=dsn)
    assert result.body == [1, "RangeError", "ctx.db.query: a value of the result is nested deeper than 249 levels, the most that "
                                            "can reach the function"]


def test_a_db_value_nested_as_deep_as_can_reach_the_function_reaches_it_and_one_level_more_is_refused(tmp_path, dsn, conn):
    """A value of 250 or 251 levels passed the host's check, then failed as the host wrote the
    results for the function, deeper by their own two levels: a TypeError out of the executor."""
    write_project(tmp_path, {"deep": """
        export default async function (req, ctx) {
          const depth = (v) => (Array.isArray(v) ? 1 + depth(v[0]) : 0);
          const { rows } = await ctx.db.query("SELECT (repeat('[', 249) || repeat(']', 249))::jsonb AS deep");
          try { await ctx.db.query("SELECT (repeat('[', 250) || repeat(']', 250))::jsonb AS deep"); }
          catch (e) { return {status: 200, body: [depth(rows[0].deep), e.name]}; }
        }
    """})
    result = run1(tmp_path, "deep", dsn=dsn)
    assert result.body == [249, "RangeError"], result.error


def test_work_queued_from_inside_the_last_drain_counts_within_the_request(tmp_path):
    """The drain runs built-ins the function can replace: a JSON.stringify that queued a microtask
    let the function run on after its 200, and the next request waited for it."""
    write_project(tmp_path, {"after": """
        export default async function (req) {
          if (req.body !== "poison") return {status: 200, body: "fine"};
          const stringify = JSON.stringify;
          JSON.stringify = function (value, ...rest) {
            if (value && value.done) Promise.resolve().then(() => { const t = Date.now(); while (Date.now() - t < 2000) {} });
            return stringify(value, ...rest);
          };
          return {status: 200, body: "returned"};
        }
    """}, FAST)
    [[poisoned], [after]] = execute_waves(tmp_path, "after", [["poison"], ["ok"]], size=1)
    assert (poisoned.status, poisoned.error) == (504, "TimeoutError: the function exceeded its time limit (1000 ms)")
    assert (after.status, after.body) == (200, "fine")


def test_a_db_param_nested_as_deep_as_allowed_runs_and_is_on_the_tape(tmp_path, dsn):
    """254 levels may be sent; past 252 the tape's sizing of the call's event (orjson, 254 levels
    with the event's own two) raised inside Flux: an internal error, and a trace with no tape."""
    write_project(tmp_path, {"deep": """
        export default async function (req, ctx) {
          let param = {};
          for (let i = 1; i < 254; i++) param = [param];
          const { rows } = await ctx.db.query("SELECT jsonb_typeof($1::jsonb) AS t", [param]);
          return {status: 200, body: rows[0].t};
        }
    """})
    result = run1(tmp_path, "deep", dsn=dsn)
    assert (result.status, result.body) == (200, "array"), result.error
    [db] = [e for e in result.recording["events"] if e[1] == "db"]
    value, levels = db[2]["params"][0], 0
    while isinstance(value, list):
        value, levels = value[0], levels + 1
    assert (levels, value, db[2]["result"]["rows"]) == (253, {}, [{"t": "array"}])


def test_bigints_inside_an_array_param_are_sent_exactly(tmp_path, dsn, conn):
    """An int8[] a query gave, BigInts past 2^53 among its numbers, passed back whole finds its rows."""
    conn.execute("CREATE TABLE big (id int8 PRIMARY KEY)")
    conn.execute("INSERT INTO big VALUES (1234567890123456789), (1234567890123456790), (7), (9007199254740993)")
    write_project(tmp_path, {"any": """
        export default async function (req, ctx) {
          const { rows: [{ ids }] } = await ctx.db.query("SELECT array_agg(id ORDER BY id) FILTER (WHERE id <> 1234567890123456790) AS ids FROM big");
          const { rows } = await ctx.db.query("SELECT id::text FROM big WHERE id = ANY($1) ORDER BY big.id", [ids]);
          const grid = await ctx.db.query("SELECT $1::numeric[]::text AS v", [[[2n ** 70n, null], [-3n, 0.5]]]);
          return {status: 200, body: {types: ids.map((id) => typeof id), found: rows.map((r) => r.id), grid: grid.rows[0].v}};
        }
    """})
    result = run1(tmp_path, "any", dsn=dsn)
    assert result.body == {"types": ["number", "bigint", "bigint"], "found": ["7", "9007199254740993", "1234567890123456789"],
                           "grid": "{{1180591620717411303424,NULL},{-3,0.5}}"}, result.error


def test_a_bigint_inside_an_object_param_is_a_json_number_of_its_exact_digits(tmp_path, dsn, conn):
    write_project(tmp_path, {"doc": """
        export default async function (req, ctx) {
          const doc = {id: 1234567890123456789n, list: [1n, {deep: -(2n ** 80n)}], text: "1234567890123456789n", n: 0.5};
          const { rows } = await ctx.db.query("SELECT $1::jsonb::text AS v, jsonb_typeof($1::jsonb->'id') AS t", [doc]);
          return {status: 200, body: rows[0]};
        }
    """})
    assert run1(tmp_path, "doc", dsn=dsn).body == {
        "v": '{"n": 0.5, "id": 1234567890123456789, "list": [1, {"deep": -1208925819614629174706176}], "text": "1234567890123456789n"}',
        "t": "number"}
