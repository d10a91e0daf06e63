"""The gateway end to end: real Quart app, real V8, real Postgres, traces written by the real writer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg
import pytest

from flux.gateway.traces import TraceWriter
from flux.store.schema import ensure_schema
from tests.functions import ListSink, Stub, running_gateway, write_project

SECRET = "sk_live_4f9a3b2c_DO_NOT_LEAK"

SIGNUP = """
export default async function (req, ctx) {
  const { rows } = await ctx.db.query("INSERT INTO users (email) VALUES ($1) RETURNING id", [req.body.email]);
  ctx.log("created", { id: rows[0].id });
  return { status: 200, body: { id: rows[0].id } };
}
"""


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def users(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE NOT NULL)")
    ensure_schema(conn)


def stored(conn: psycopg.Connection, request_id: str) -> dict:
    row = conn.execute("SELECT to_jsonb(t) FROM flux.trace_requests t WHERE id = %s", (request_id,)).fetchone()
    assert row is not None, f"no trace row for {request_id}"
    return row[0]


async def call(root: Path, dsn: str, requests: list[tuple], **kw) -> list[tuple[int, dict, bytes]]:
    """Send requests through a gateway whose traces go to the database; wait until they are written."""
    writer = TraceWriter(dsn, flush_interval=0.01)
    await writer.start()
    out = []
    async with running_gateway(root, dsn, sink=writer, **kw) as (_, client):
        for method, path, options in requests:
            response = await client.open(path, method=method, **options)
            out.append((response.status_code, dict(response.headers), await response.get_data()))
    await writer.close()
    return out


def test_every_answer_carries_a_request_id_that_names_its_trace_row(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"create_user": SIGNUP}, '[routes]\n"POST /signup" = "create_user"\n')
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/signup", {"json": {"email": "a@x"}})]))
    assert status == 200 and json.loads(body) == {"id": 1}
    trace = stored(conn, headers["x-flux-request-id"])
    assert (trace["tenant"], trace["function"], trace["method"], trace["path"], trace["status"]) == (
        "default", "create_user", "POST", "/signup", 200)
    assert trace["error"] is None and trace["replay_of"] is None and trace["duration_ms"] > 0
    assert [s["name"] for s in trace["spans"]] == ["gateway", "create_user", "db.insert(users)"]
    assert trace["request"]["body"] == {"email": "a@x"} and trace["response"]["body"] == {"id": 1}
    assert len(trace["code_version"]) == 16 and trace["recording"]["v"] == 1


def test_the_default_route_is_post_slash_function(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"create_user": SIGNUP})
    [(status, _, _)] = run(call(tmp_path, dsn, [("POST", "/create_user", {"json": {"email": "b@x"}})]))
    assert status == 200


@pytest.mark.parametrize(
    ("options", "status", "error"),
    [
        ({"data": "{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"data": "x" * 2048, "headers": {"content-type": "text/plain"}}, 413, "over the 1024-byte limit"),
    ],
    ids=["invalid-json", "body-over-limit"],
)
def test_bad_input_gets_a_clear_status_and_is_recorded(tmp_path, dsn, conn, users, options, status, error):
    write_project(tmp_path, {"create_user": SIGNUP}, "[limits]\nmax_body_bytes = 1024\n")
    [(got, headers, body)] = run(call(tmp_path, dsn, [("POST", "/create_user", options)]))
    assert got == status and error in json.loads(body)["error"]
    trace = stored(conn, headers["x-flux-request-id"])
    assert trace["status"] == status and error in trace["error"] and trace["spans"][0]["status"] == "error"
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_an_unknown_route_is_404_and_recorded(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"create_user": SIGNUP})
    [(status, headers, body)] = run(call(tmp_path, dsn, [("GET", "/nowhere", {})]))
    assert status == 404 and "no function is routed at GET /nowhere" in json.loads(body)["error"]
    assert stored(conn, headers["x-flux-request-id"])["function"] is None


def test_a_throwing_function_is_500_with_the_js_stack_recorded(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"boom": "export default async function () {\n  throw new Error('kaboom');\n}\n"})
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/boom", {})]))
    assert status == 500 and "functions/boom.js:2" in json.loads(body)["stack"]
    function_span = stored(conn, headers["x-flux-request-id"])["spans"][1]
    assert function_span["status"] == "error" and function_span["events"][-1]["name"] == "exception"


def test_a_non_serializable_return_is_500(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"bad": "export default async function () { return {status: 200, body: () => 1}; }"})
    [(status, _, body)] = run(call(tmp_path, dsn, [("POST", "/bad", {})]))
    assert status == 500 and "is a function, which JSON cannot represent" in json.loads(body)["error"]


def test_a_function_over_its_time_limit_is_504_and_its_writes_roll_back(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"slow": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["slow@x"]);
          await ctx.db.query("SELECT pg_sleep(10)", []);
        }
    """}, "[limits]\ntimeout_ms = 500\n")
    [(status, headers, _)] = run(call(tmp_path, dsn, [("POST", "/slow", {})]))
    assert status == 504
    assert stored(conn, headers["x-flux-request-id"])["status"] == 504
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_a_function_with_a_syntax_error_answers_500_and_the_others_still_work(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"broken": "export default async function () {\n  let = ;\n}\n", "create_user": SIGNUP})
    [(broken, _, body), (ok, _, _)] = run(call(tmp_path, dsn, [
        ("POST", "/broken", {}), ("POST", "/create_user", {"json": {"email": "c@x"}})]))
    assert broken == 500 and "functions/broken.js:2: SyntaxError" in json.loads(body)["error"]
    assert ok == 200


TENANTS = f"""
[tenants.acme]
api_keys = ["key-acme"]
[tenants.acme.secrets]
STRIPE_KEY = "{SECRET}"
[tenants.globex]
api_keys = ["key-globex"]
[tenants.globex.secrets]
STRIPE_KEY = "sk_globex_other"
"""


def test_without_a_valid_api_key_the_answer_is_401(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"create_user": SIGNUP}, TENANTS)
    results = run(call(tmp_path, dsn, [
        ("POST", "/create_user", {"json": {"email": "d@x"}}),
        ("POST", "/create_user", {"json": {"email": "d@x"}, "headers": {"authorization": "Bearer wrong"}}),
        ("POST", "/create_user", {"json": {"email": "d@x"}, "headers": {"x-flux-api-key": "key-acme"}}),
    ]))
    assert [r[0] for r in results] == [401, 401, 200]
    assert stored(conn, results[2][1]["x-flux-request-id"])["tenant"] == "acme"


def test_a_tenant_sees_only_its_own_traces_and_secrets(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"key": "export default async function (req, ctx) { return {status: 200, body: ctx.secrets.STRIPE_KEY.slice(0, 8)}; }"},
                  TENANTS)

    async def scenario():
        from flux.gateway.server import trace_reader

        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        async with running_gateway(tmp_path, dsn, sink=writer) as (gateway, client):
            gateway.trace_reader = trace_reader(dsn)
            acme = await client.post("/key", headers={"x-flux-api-key": "key-acme"})
            globex = await client.post("/key", headers={"x-flux-api-key": "key-globex"})
            await writer.flushed()
            acme_id = acme.headers["x-flux-request-id"]
            own = await client.get(f"/_flux/requests/{acme_id}", headers={"x-flux-api-key": "key-acme"})
            other = await client.get(f"/_flux/requests/{acme_id}", headers={"x-flux-api-key": "key-globex"})
            listed = await client.get("/_flux/requests", headers={"x-flux-api-key": "key-globex"})
            return await acme.get_data(as_text=True), await globex.get_data(as_text=True), own, other, await listed.get_json()

    acme_body, globex_body, own, other, listed = run(scenario())
    assert acme_body == SECRET[:8] and globex_body == "sk_globe"
    assert own.status_code == 200 and other.status_code == 404
    assert [t["tenant"] for t in listed] == ["globex"]


def test_secret_values_appear_in_no_stored_column(tmp_path, dsn, conn, users, stub: Stub):
    write_project(tmp_path, {"leak": f"""
        export default async function (req, ctx) {{
          const key = ctx.secrets.STRIPE_KEY;
          ctx.log("using key " + key, {{ key }});
          console.log("console", key);
          await ctx.db.query("SELECT $1::text AS k", [key]);
          await ctx.step("charge " + key, async () => {{
            await ctx.fetch("{stub.url}/echo", {{ method: "POST", headers: {{ authorization: "Bearer " + key, "x-key": key }}, body: {{ key }} }});
          }});
          throw new Error("failed with " + key);
        }}
    """}, TENANTS)
    [(status, headers, body)] = run(call(tmp_path, dsn, [
        ("POST", "/leak", {"json": {"echo": SECRET}, "headers": {"authorization": "Bearer key-acme", "x-extra": SECRET}})]))
    assert status == 500 and SECRET not in body.decode()
    assert stub.requests[0]["headers"]["x-key"] == SECRET  # the call itself did get the secret
    columns = [r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'flux' AND table_name = 'trace_requests'")]
    for column in columns:
        value = conn.execute(f'SELECT "{column}"::text FROM flux.trace_requests WHERE id = %s', (headers["x-flux-request-id"],)).fetchone()[0]
        assert value is None or SECRET not in value, f"secret leaked into {column}"
    trace = json.dumps(stored(conn, headers["x-flux-request-id"]))
    assert "[secret:STRIPE_KEY]" in trace


def test_replay_header_sets_ctx_replay(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"r": "export default async function (req, ctx) { return {status: 200, body: ctx.replay}; }"})
    results = run(call(tmp_path, dsn, [("POST", "/r", {}), ("POST", "/r", {"headers": {"x-flux-replay": "true"}})]))
    assert [json.loads(r[2]) for r in results] == [False, True]


def test_200_concurrent_requests_get_correct_separate_traces(tmp_path, dsn, conn, users, stub: Stub):
    write_project(tmp_path, {"create_user": f"""
        export default async function (req, ctx) {{
          const {{ rows }} = await ctx.db.query("INSERT INTO users (email) VALUES ($1) RETURNING id", [req.body.email]);
          await ctx.fetch("{stub.url}/slow?ms=20", {{ name: "stripe.create" }});
          return {{ status: 200, body: {{ id: rows[0].id, email: req.body.email }} }};
        }}
    """})

    async def scenario():
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        async with running_gateway(tmp_path, dsn, sink=writer, workers=64) as (_, client):
            async def one(n: int):
                response = await client.post("/create_user", json={"email": f"user{n}@x"})
                return n, response.status_code, response.headers["x-flux-request-id"], await response.get_json()
            results = await asyncio.gather(*(one(n) for n in range(200)))
        await writer.close()
        return results

    results = run(scenario())
    assert all(status == 200 for _, status, _, _ in results)
    assert len({rid for _, _, rid, _ in results}) == 200
    traces = {r[0]: r[1:] for r in conn.execute("SELECT id, request, response, spans FROM flux.trace_requests")}
    assert len(traces) == 200
    for n, _, rid, body in results:
        request, response, spans = traces[rid]
        assert body["email"] == f"user{n}@x"
        assert request["body"] == {"email": f"user{n}@x"} and response["body"] == body
        assert [s["name"] for s in spans] == ["gateway", "create_user", "db.insert(users)", "stripe.create"]
        ids = {s["id"] for s in spans}
        assert all(s["parent"] in ids for s in spans[1:])


def test_mutations_carry_the_request_id_end_to_end_through_the_engine(tmp_path, dsn, conn, users, capture):
    engine = capture(tables=["users"])
    write_project(tmp_path, {"create_user": SIGNUP})
    results = run(call(tmp_path, dsn, [("POST", "/create_user", {"json": {"email": f"e{n}@x"}}) for n in range(3)]))
    engine.caught_up()
    rows = conn.execute(
        "SELECT request_id, context->>'tenant', context->>'function', new->>'email' FROM flux.state_mutations ORDER BY id").fetchall()
    assert rows == [(h["x-flux-request-id"], "default", "create_user", f"e{n}@x") for n, (_, h, _) in enumerate(results)]
    traced = {r[0] for r in conn.execute("SELECT id FROM flux.trace_requests")}
    assert traced == {h["x-flux-request-id"] for _, h, _ in results}
    # the engine never captures Flux's own trace writes
    assert conn.execute("SELECT count(*) FROM flux.state_mutations WHERE schema_name = 'flux'").fetchone()[0] == 0


def test_trace_writes_stay_off_the_response_path(tmp_path, users):
    write_project(tmp_path, {"ok": "export default async function () { return {status: 200}; }"})
    sink = ListSink()

    async def scenario():
        async with running_gateway(tmp_path, None, sink=sink) as (_, client):
            response = await client.post("/ok")
            return response.status_code

    assert run(scenario()) == 200
    assert len(sink.records) == 1 and sink.records[0].status == 200
