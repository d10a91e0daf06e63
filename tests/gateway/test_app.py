"""The gateway end to end: real Quart app, real V8, real Postgres, traces written by the real writer."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from pathlib import Path

import psycopg
import pytest

from flux.gateway.traces import TraceWriter
from flux.store.schema import ensure_schema
from tests.functions import SESSION_COOKIE, Stub, running_gateway, served_gateway, write_project

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
def trace_store(conn: psycopg.Connection) -> None:
    ensure_schema(conn)


@pytest.fixture
def users(conn: psycopg.Connection, trace_store: None) -> None:
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE NOT NULL)")


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
    assert len(trace["code_version"]) == 16 and trace["recording"]["v"] == 4


def http(method: str, path: str, headers: list[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    """One raw HTTP/1.1 request, after which the server closes the connection."""
    lines = [f"{method} {path} HTTP/1.1", "host: flux", f"content-length: {len(body)}", "connection: close",
             *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def on_the_wire(root: Path, dsn: str, requests: list[bytes]) -> list[tuple[int, list[tuple[str, str]], bytes]]:
    """Send raw requests to the gateway served by Hypercorn, as they come back on the wire; wait
    until their traces are written."""
    writer = TraceWriter(dsn, flush_interval=0.01)
    await writer.start()
    async with served_gateway(root, dsn, sink=writer) as (_, exchange):
        out = [await exchange(raw) for raw in requests]
    await writer.close()
    return out


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [name for name, _ in headers]


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
    assert [s["name"] for s in trace["spans"]] == ["gateway"]  # the function never ran


def test_an_unknown_route_is_404_and_recorded(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"create_user": SIGNUP})
    [(status, headers, body)] = run(call(tmp_path, dsn, [("GET", "/nowhere", {})]))
    assert status == 404 and "no function is routed at GET /nowhere" in json.loads(body)["error"]
    trace = stored(conn, headers["x-flux-request-id"])
    assert trace["function"] is None and trace["status"] == 404
    assert "no function is routed at GET /nowhere" in trace["error"]


ECHO = "export default async function (req) { return {status: 200, body: {headers: req.headers, query: req.query, ip: req.ip}}; }"


def test_a_repeated_request_header_is_joined_as_node_joins_it(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"echo": ECHO})
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/echo", {"headers": [
        ("x-rep", "one"), ("X-Rep", "two"), ("cookie", "a=1"), ("cookie", "b=2")]})]))
    seen = json.loads(body)["headers"]
    assert status == 200 and (seen["x-rep"], seen["cookie"]) == ("one, two", "a=1; b=2")
    assert stored(conn, headers["x-flux-request-id"])["request"]["headers"]["x-rep"] == "one, two"


def test_a_query_key_given_more_than_once_has_the_list_of_its_values(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"echo": ECHO})
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/echo?a=1&a=2&b=3", {})]))
    assert status == 200 and json.loads(body)["query"] == {"a": ["1", "2"], "b": "3"}
    assert stored(conn, headers["x-flux-request-id"])["request"]["query"] == {"a": ["1", "2"], "b": "3"}


def test_the_client_address_is_req_ip_from_the_socket_and_never_a_header(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"echo": ECHO})
    [(_, headers, plain), (_, _, claimed)] = run(on_the_wire(tmp_path, dsn, [
        http("POST", "/echo"), http("POST", "/echo", [("Remote-Addr", "6.6.6.6")])]))
    plain, claimed = json.loads(plain), json.loads(claimed)
    assert (plain["ip"], "remote-addr" in plain["headers"]) == ("127.0.0.1", False)
    assert (claimed["ip"], claimed["headers"]["remote-addr"]) == ("127.0.0.1", "6.6.6.6")  # the client's own header, as sent
    assert stored(conn, dict(headers)["x-flux-request-id"])["request"]["ip"] == "127.0.0.1"


BODY = """
export default async function (req) {
  const body = req.body;
  return {status: 200, body: body instanceof Uint8Array ? {bytes: Array.from(body)} : {text: body}};
}
"""


def test_a_binary_body_reaches_the_function_as_its_bytes_and_the_trace_as_base64(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"body": BODY})
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/body", {
        "data": b"\x00\x01\xff\xfe\x80", "headers": {"content-type": "application/octet-stream"}})]))
    assert status == 200 and json.loads(body) == {"bytes": [0, 1, 255, 254, 128]}
    recorded = stored(conn, headers["x-flux-request-id"])["request"]
    assert (recorded["body"], recorded["body_encoding"], recorded["body_bytes"]) == ("AAH//oA=", "base64", 5)


def test_a_text_body_is_read_in_its_declared_charset(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"body": BODY})
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/body", {
        "data": b"caf\xe9", "headers": {"content-type": "text/plain; charset=iso-8859-1"}})]))
    assert status == 200 and json.loads(body) == {"text": "caf\u00e9"}
    assert stored(conn, headers["x-flux-request-id"])["request"]["body"] == "caf\u00e9"


def test_a_text_body_not_valid_in_its_charset_reaches_the_function_as_its_bytes(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"body": BODY})
    [(status, _, body)] = run(call(tmp_path, dsn, [("POST", "/body", {"data": b"caf\xe9", "headers": {"content-type": "text/plain"}})]))
    assert status == 200 and json.loads(body) == {"bytes": [99, 97, 102, 233]}


def test_an_empty_text_body_is_an_empty_string(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"body": BODY})
    [(status, _, body)] = run(call(tmp_path, dsn, [("POST", "/body", {"data": b"", "headers": {"content-type": "text/plain"}})]))
    assert status == 200 and json.loads(body) == {"text": ""}


def test_a_binary_body_is_recorded_within_the_body_limit(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"body": BODY}, "[limits]\nrecord_body_bytes = 64\n")
    [(status, headers, _)] = run(call(tmp_path, dsn, [("POST", "/body", {
        "data": bytes(range(100)), "headers": {"content-type": "image/png"}})]))
    recorded = stored(conn, headers["x-flux-request-id"])["request"]
    assert status == 200 and len(recorded["body"]) <= 64
    assert (base64.b64decode(recorded["body"]), recorded["body_truncated"], recorded["body_bytes"]) == (bytes(range(48)), True, 100)


def test_a_throwing_function_is_500_with_the_js_stack_recorded(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"boom": "export default async function () {\n  throw new Error('kaboom');\n}\n"})
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/boom", {})]))
    assert status == 500 and "functions/boom.js:2" in json.loads(body)["stack"]
    trace = stored(conn, headers["x-flux-request-id"])
    assert trace["status"] == 500 and trace["error"] == "kaboom"
    function_span = trace["spans"][1]
    event = function_span["events"][-1]
    assert function_span["status"] == "error" and event["name"] == "exception"
    assert "functions/boom.js:2" in event["attributes"]["exception.stacktrace"]


def test_a_non_serializable_return_is_500(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"bad": "export default async function () { return {status: 200, body: () => 1}; }"})
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/bad", {})]))
    assert status == 500 and "is a function, which JSON cannot represent" in json.loads(body)["error"]
    trace = stored(conn, headers["x-flux-request-id"])
    assert trace["status"] == 500 and "is a function, which JSON cannot represent" in trace["error"]


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


@pytest.mark.parametrize("status", [204, 304])
def test_a_204_or_304_goes_without_a_body_or_its_length_and_the_trace_says_its_body_was_dropped(tmp_path, dsn, conn, trace_store, status):
    write_project(tmp_path, {"gone": f"export default async function () {{ return {{status: {status}, body: 'ignored'}}; }}"})
    [(got, headers, body)] = run(on_the_wire(tmp_path, dsn, [http("POST", "/gone")]))
    assert (got, body) == (status, b"")
    assert "content-length" not in names(headers) and "content-type" not in names(headers)
    trace = stored(conn, dict(headers)["x-flux-request-id"])
    assert trace["spans"][0]["attributes"]["flux.response_body_dropped"] == f"a {status} response has no body; the function's was not sent"
    assert (trace["response"]["body"], trace["response"]["body_bytes"]) == (None, 0)


def test_an_answer_without_a_body_is_empty_and_has_no_content_type(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"moved": "export default async function () { return {status: 302, headers: {Location: '/next'}}; }"})
    [(status, headers, body)] = run(on_the_wire(tmp_path, dsn, [http("POST", "/moved")]))
    assert (status, body, dict(headers)["location"], dict(headers)["content-length"]) == (302, b"", "/next", "0")
    assert "content-type" not in names(headers)


def test_the_functions_content_type_replaces_the_default_in_any_case(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"page": "export default async function () { return {status: 200, headers: {'Content-Type': 'text/html'}, body: '<p>hi</p>'}; }"})
    [(status, headers, body)] = run(on_the_wire(tmp_path, dsn, [http("POST", "/page")]))
    assert (status, body) == (200, b"<p>hi</p>")
    assert [value for name, value in headers if name == "content-type"] == ["text/html"]


def test_the_request_id_header_is_flux_own_and_sent_once(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"own": "export default async function () { return {status: 200, headers: {'X-Flux-Request-Id': 'mine'}}; }"})
    [(status, headers, _)] = run(on_the_wire(tmp_path, dsn, [http("POST", "/own")]))
    [request_id] = [value for name, value in headers if name == "x-flux-request-id"]
    assert status == 200 and stored(conn, request_id)["status"] == 200


def test_an_array_header_is_sent_repeated_and_recorded_as_a_list(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"many": """
        export default async function () {
          return {status: 200, headers: {"set-cookie": ["a=1", "b=2"], "x-rep": ["one", 2]}};
        }
    """})
    [(status, headers, _)] = run(on_the_wire(tmp_path, dsn, [http("POST", "/many")]))
    assert [(name, value) for name, value in headers if name in ("set-cookie", "x-rep")] == [
        ("set-cookie", "a=1"), ("set-cookie", "b=2"), ("x-rep", "one"), ("x-rep", "2")]
    recorded = stored(conn, dict(headers)["x-flux-request-id"])["response"]["headers"]
    assert (recorded["set-cookie"], recorded["x-rep"]) == ("[redacted]", ["one", "2"])


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
    refused = [stored(conn, headers["x-flux-request-id"]) for _, headers, _ in results[:2]]
    assert [(t["status"], t["tenant"], t["function"]) for t in refused] == [(401, None, None)] * 2
    assert all("missing or invalid API key" in t["error"] for t in refused)
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
            ids = {"acme": acme.headers["x-flux-request-id"], "globex": globex.headers["x-flux-request-id"]}
            keys = {"acme": "key-acme", "globex": "key-globex"}
            reads = {}
            for reader, key in keys.items():
                for owner, request_id in ids.items():
                    answer = await client.get(f"/_flux/requests/{request_id}", headers={"x-flux-api-key": key})
                    reads[reader, owner] = (answer.status_code, await answer.get_json())
            listed = {t: await (await client.get("/_flux/requests", headers={"x-flux-api-key": k})).get_json()
                      for t, k in keys.items()}
            await writer.close()
            bodies = (await acme.get_data(as_text=True), await globex.get_data(as_text=True))
            return bodies, ids, reads, listed

    (acme_body, globex_body), ids, reads, listed = run(scenario())
    assert acme_body == SECRET[:8] and globex_body == "sk_globe"
    for tenant in ("acme", "globex"):
        status, own = reads[tenant, tenant]
        assert status == 200 and (own["id"], own["tenant"], own["status"]) == (ids[tenant], tenant, 200)
        assert [(t["id"], t["tenant"]) for t in listed[tenant]] == [(ids[tenant], tenant)]
    assert reads["acme", "globex"][0] == 404 and reads["globex", "acme"][0] == 404


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


def test_secret_values_appear_in_no_log_record(tmp_path, dsn, conn, users, caplog):
    write_project(tmp_path, {
        "throws": "export default async function (req, ctx) { throw new Error('failed with ' + ctx.secrets.STRIPE_KEY); }",
        "logs": """
            export default async function (req, ctx) {
              ctx.log("using key " + ctx.secrets.STRIPE_KEY, { key: ctx.secrets.STRIPE_KEY });
              console.log("console", ctx.secrets.STRIPE_KEY);
              return { status: 200 };
            }
        """,
        "broken": "export default async function () {\n  let = ;\n}\n",
    }, TENANTS)
    caplog.set_level(logging.DEBUG)  # every logger, the flux ones included
    acme = {"headers": {"x-flux-api-key": "key-acme"}}
    results = run(call(tmp_path, dsn, [("POST", "/throws", acme), ("POST", "/logs", acme)]))
    assert [status for status, _, _ in results] == [500, 200]
    # The broken function's load error shows flux records reach caplog: the check below is not blind.
    assert any(r.name.startswith("flux") and "functions/broken.js" in r.getMessage() for r in caplog.records)
    leaked = [r.getMessage() for r in caplog.records if SECRET in repr(vars(r))]  # message, args, exception
    assert leaked == [] and SECRET not in caplog.text


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
    traces = {r[0]: r[1:] for r in conn.execute("SELECT id, request, response, spans, recording FROM flux.trace_requests")}
    assert len(traces) == 200
    # The requests really ran at the same time: some gateway span starts before the one before it ends.
    intervals = sorted((spans[0]["start"], spans[0]["start"] + spans[0]["duration_ms"]) for _, _, spans, _ in traces.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(intervals, intervals[1:]))
    for n, _, rid, body in results:
        request, response, spans, recording = traces[rid]
        assert body["email"] == f"user{n}@x"
        assert request["body"] == {"email": f"user{n}@x"} and response["body"] == body
        gateway, function, db, fetch = spans
        assert [s["name"] for s in spans] == ["gateway", "create_user", "db.insert(users)", "stripe.create"]
        assert gateway["parent"] is None and function["parent"] == gateway["id"]
        assert db["parent"] == function["id"] and fetch["parent"] == function["id"]
        assert len({s["id"] for s in spans}) == 4 and all(s["parent"] != s["id"] for s in spans)
        [db_event] = [e[2] for e in recording["events"] if e[1] == "db"]
        assert db_event["params"] == [f"user{n}@x"] and db_event["result"]["rows"] == [{"id": body["id"]}]


def test_concurrent_mutations_are_each_attributed_to_their_own_request(tmp_path, dsn, conn, users, capture, stub: Stub):
    engine = capture(tables=["users"])
    write_project(tmp_path, {"create_user": f"""
        export default async function (req, ctx) {{
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", [req.body.email]);
          await ctx.fetch("{stub.url}/slow?ms=20");  // keeps many transactions open at once, their changes interleaved
          return {{ status: 200 }};
        }}
    """})

    async def scenario():
        async with running_gateway(tmp_path, dsn, workers=64) as (_, client):
            async def one(n: int):
                response = await client.post("/create_user", json={"email": f"user{n}@x"})
                return response.status_code, response.headers["x-flux-request-id"], f"user{n}@x"
            return await asyncio.gather(*(one(n) for n in range(50)))

    results = run(scenario())
    assert all(status == 200 for status, _, _ in results)
    engine.caught_up()
    rows = conn.execute("SELECT request_id, new->>'email' FROM flux.state_mutations WHERE table_name = 'users'").fetchall()
    assert sorted(rows) == sorted((rid, email) for _, rid, email in results)


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


LOCK_S = 5.0


def test_trace_writes_stay_off_the_response_path(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"ok": "export default async function () { return {status: 200}; }"})
    locked, unlock = threading.Event(), threading.Event()

    def hold_the_trace_table() -> None:
        # Released after LOCK_S at the latest: a writer on the response path would hold the response that long.
        with psycopg.connect(dsn) as locker:
            locker.execute("LOCK TABLE flux.trace_requests IN ACCESS EXCLUSIVE MODE")
            locked.set()
            unlock.wait(LOCK_S)
            locker.rollback()

    holder = threading.Thread(target=hold_the_trace_table, daemon=True)
    holder.start()
    assert locked.wait(10)

    async def scenario():
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        async with running_gateway(tmp_path, None, sink=writer) as (_, client):
            started = time.monotonic()
            response = await client.post("/ok")
            assert response.status_code == 200
            assert time.monotonic() - started < LOCK_S / 5, "the response waited for its trace to be written"
            # The writer's insert is waiting on the lock while the response is already out.
            deadline = time.monotonic() + 10
            while not conn.execute("SELECT EXISTS (SELECT FROM pg_locks WHERE relation = 'flux.trace_requests'::regclass"
                                   " AND NOT granted)").fetchone()[0]:
                assert time.monotonic() < deadline, "the trace writer never tried to write"
                await asyncio.sleep(0.02)
            unlock.set()
            await asyncio.wait_for(writer.close(), 10)
        return response.headers["x-flux-request-id"]

    try:
        request_id = run(scenario())
    finally:
        unlock.set()
        holder.join(10)
    assert stored(conn, request_id)["status"] == 200  # written once the lock is gone


class _BrokenTransport:
    """A transport with a bug in it: what the gateway does when Flux itself fails mid-request."""

    async def send(self, *args: object) -> None:
        raise RuntimeError("a bug in the transport")

    async def aclose(self) -> None:
        pass


def _post_with_a_broken_transport(tmp_path, dsn, path: str) -> tuple[int, str | None, dict]:
    """POST `path` to a gateway whose transport fails inside Flux, its traces written: the status, the
    request id and the body."""
    async def scenario():
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        async with running_gateway(tmp_path, dsn, sink=writer) as (gateway, client):
            gateway.executor.transport = _BrokenTransport()
            response = await client.post(path)
            answer = (response.status_code, response.headers.get("x-flux-request-id"), await response.get_json())
        await writer.close()
        return answer

    return run(scenario())


def test_a_failure_inside_flux_still_answers_with_its_request_id_and_is_recorded(tmp_path, dsn, conn, trace_store, stub: Stub):
    write_project(tmp_path, {"call": f'export default async function (req, ctx) {{ await ctx.fetch("{stub.url}/ok"); return {{status: 200}}; }}'})

    status, request_id, body = _post_with_a_broken_transport(tmp_path, dsn, "/call")
    assert status == 500 and body["error"] == "Flux failed while running the function (an internal error)"
    assert body["request_id"] == request_id
    trace = stored(conn, request_id)
    assert (trace["status"], trace["function"], trace["error"]) == (500, "call", body["error"])


def test_a_failure_inside_flux_keeps_the_tape_up_to_the_failure(tmp_path, dsn, conn, trace_store, stub: Stub):
    """The trace of Flux's own 500 was stored with no recording: the one a replay needs most. Here
    the transport fails inside Flux mid-request, after the function's query."""
    conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
    write_project(tmp_path, {"odd": f"""
        export default async function (req, ctx) {{
          const at = Date.now();
          await ctx.db.query("INSERT INTO notes (body) VALUES ($1)", [String(at)]);
          await ctx.fetch("{stub.url}/ok");
          return {{status: 200}};
        }}
    """})

    status, request_id, _ = _post_with_a_broken_transport(tmp_path, dsn, "/odd")
    trace = stored(conn, request_id)
    recording = trace["recording"]
    assert (status, trace["error"]) == (500, "Flux failed while running the function (an internal error)")
    assert (recording["v"], recording["incomplete"], "commit" in recording) == (4, True, False)
    assert [kind for _, kind, _ in recording["events"]] == ["now", "db", "settled", "fetch"]
    fetch = recording["events"][3][2]
    assert (fetch["url"], fetch["abandoned"], "status" in fetch) == (f"{stub.url}/ok", True, False)
    assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 0  # rolled back, as the tape's lack of commit says


def test_a_request_a_stop_cuts_short_keeps_its_tape_up_to_there(tmp_path, dsn, conn, trace_store, stub: Stub):
    """A second Ctrl-C cancels the functions still running: their 503 was stored with no recording."""
    write_project(tmp_path, {"slow": f"""
        export default async function (req, ctx) {{
          const at = Date.now();
          await ctx.fetch("{stub.url}/slow?ms=3000");
          return {{status: 200, body: at}};
        }}
    """})

    async def scenario():
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        async with running_gateway(tmp_path, dsn, sink=writer) as (gateway, client):
            sent = asyncio.ensure_future(client.post("/slow"))
            while not stub.requests:
                await asyncio.sleep(0.01)
            assert gateway.cut_short() == 1
            response = await sent
            answer = (response.status_code, response.headers.get("x-flux-request-id"))
        await writer.close()
        return answer

    status, request_id = run(scenario())
    recording = stored(conn, request_id)["recording"]
    assert status == 503 and recording["incomplete"] is True
    assert [(kind, data.get("abandoned") if kind == "fetch" else None) for _, kind, data in recording["events"]] == [
        ("now", None), ("fetch", True)]


@pytest.mark.parametrize("query", ["?limit=abc", "?limit=0", "?since_seconds=nan", "?since_seconds=1e20", "?function=%00",
                                   "/%00%00%00%00"])
def test_a_bad_trace_query_is_a_400_with_the_reason(tmp_path, dsn, conn, trace_store, query):
    write_project(tmp_path, {"f": "export default async function () { return {status: 200}; }"}, TENANTS)

    async def scenario():
        from flux.gateway.server import trace_reader

        async with running_gateway(tmp_path, dsn) as (gateway, client):
            gateway.trace_reader = trace_reader(dsn)
            response = await client.get(f"/_flux/requests{query}", headers={"x-flux-api-key": "key-acme"})
            return response.status_code, await response.get_json()

    status, body = run(scenario())
    assert status == 400 and body["error"]


ACME_TOKEN = "acme-token-7Hq2Lx9Pz4"
ACME_PIN = "90817263544"
ACME_HOST = "SecretHostMK7"
ACME_URL_TOKEN = "tok en%2Fsecret_9z"
PEM_LINES = ["-----BEGIN TEST KEY-----", "MIIEvQIBADANBgkqhkiG9w0B", "AQEFAASCBKcwggSjAgEAAoIB", "-----END TEST KEY-----"]
SHARED_KEY = "shared-key-5d8e2c91"
PEM_IN_TOML = r"\n".join(PEM_LINES)  # a TOML basic string's escapes
SECRETS = f"""
[secrets]
SHARED_KEY = "{SHARED_KEY}"
[tenants.acme]
api_keys = ["key-acme"]
[tenants.acme.secrets]
ACME_TOKEN = "{ACME_TOKEN}"
ACME_PIN = "{ACME_PIN}"
ACME_HOST = "{ACME_HOST}"
ACME_URL_TOKEN = "{ACME_URL_TOKEN}"
ACME_PEM = "{PEM_IN_TOML}"
[tenants.globex]
api_keys = ["key-globex"]
"""
ACME = {"headers": {"x-flux-api-key": "key-acme"}}
GLOBEX = {"headers": {"x-flux-api-key": "key-globex"}}


def leaks(conn: psycopg.Connection, request_id: str, *needles: str) -> list[str]:
    """The columns of a stored trace that hold any of `needles`."""
    row = stored(conn, request_id)
    return [column for column, value in row.items()
            if value is not None and any(n in json.dumps(value, ensure_ascii=False) for n in needles)]


async def call_and_read(root: Path, dsn: str, requests: list[tuple], key: str) -> tuple[list[tuple[int, dict, bytes]], list[tuple[int, str]]]:
    """`call`, then each request's trace as `GET /_flux/requests/<id>` answers it to API key `key`."""
    from flux.gateway.server import trace_reader

    writer = TraceWriter(dsn, flush_interval=0.01)
    await writer.start()
    out, read = [], []
    async with running_gateway(root, dsn, sink=writer) as (gateway, client):
        gateway.trace_reader = trace_reader(dsn)
        for method, path, options in requests:
            response = await client.open(path, method=method, **options)
            out.append((response.status_code, dict(response.headers), await response.get_data()))
        await writer.flushed()
        for _, headers, _ in out:
            answer = await client.get(f"/_flux/requests/{headers['x-flux-request-id']}", headers={"x-flux-api-key": key})
            read.append((answer.status_code, await answer.get_data(as_text=True)))
    await writer.close()
    return out, read


def test_a_tenant_never_reads_another_tenants_secret_from_the_connections_prepared_statements(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {
        "inline": """
            export default async function (req, ctx) {
              for (let i = 0; i < 3; i++) await ctx.db.query("SELECT 'inline:" + ctx.secrets.ACME_TOKEN + "' AS v");
              return { status: 200 };
            }
        """,
        "prepared": """
            export default async function (req, ctx) {
              const { rows } = await ctx.db.query("SELECT name, statement FROM pg_prepared_statements");
              return { status: 200, body: rows };
            }
        """,
    }, SECRETS)
    [_, (status, headers, body)], [_, (read_status, read)] = run(call_and_read(
        tmp_path, dsn, [("POST", "/inline", ACME), ("POST", "/prepared", GLOBEX)], "key-globex"))
    assert status == 200 and read_status == 200
    assert ACME_TOKEN not in body.decode() and ACME_TOKEN not in read
    assert leaks(conn, headers["x-flux-request-id"], ACME_TOKEN) == []


def test_another_tenants_secret_is_redacted_from_a_trace_without_its_name(tmp_path, dsn, conn, trace_store):
    """Defence in depth: a function may come by another tenant's secret in data (here, a row)."""
    conn.execute("CREATE TABLE notes (v text)")
    write_project(tmp_path, {
        "keep": "export default async function (req, ctx) { await ctx.db.query('INSERT INTO notes VALUES ($1)', [ctx.secrets.ACME_TOKEN]); return {status: 200}; }",
        "read": "export default async function (req, ctx) { const { rows } = await ctx.db.query('SELECT v FROM notes'); return {status: 200, body: rows}; }",
    }, SECRETS)
    [_, (status, headers, _)], [_, (read_status, read)] = run(call_and_read(
        tmp_path, dsn, [("POST", "/keep", ACME), ("POST", "/read", GLOBEX)], "key-globex"))
    assert status == 200 and read_status == 200
    assert leaks(conn, headers["x-flux-request-id"], ACME_TOKEN, "ACME_TOKEN") == []
    assert ACME_TOKEN not in read and "ACME_TOKEN" not in read and '"body": [{"v": "[secret]"}]' in json.dumps(json.loads(read))


def test_a_long_returned_error_is_cut_only_after_its_secret_is_redacted(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"fail": """
        export default async function (req, ctx) {
          return { status: 500, body: { error: "x".repeat(485) + ctx.secrets.ACME_TOKEN } };
        }
    """}, SECRETS)
    [(status, headers, _)] = run(call(tmp_path, dsn, [("POST", "/fail", ACME)]))
    trace = stored(conn, headers["x-flux-request-id"])
    assert status == 500 and trace["error"] == "x" * 485 and trace["spans"][0]["error"] == "x" * 485
    assert leaks(conn, headers["x-flux-request-id"], ACME_TOKEN[:8]) == []


def test_a_multi_line_secret_returned_as_the_error_leaves_no_line_of_it(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"fail": "export default async function (req, ctx) { return {status: 500, body: {error: ctx.secrets.ACME_PEM}}; }"},
                  SECRETS)
    [(status, headers, _)] = run(call(tmp_path, dsn, [("POST", "/fail", ACME)]))
    assert status == 500 and stored(conn, headers["x-flux-request-id"])["error"] == "[secret:ACME_PEM]"
    assert leaks(conn, headers["x-flux-request-id"], *PEM_LINES) == []


def test_a_v8_error_through_the_bridge_leaves_no_line_of_a_secret(tmp_path, dsn, conn, users):
    """A db param whose toJSON throws when the host reads the call: V8's error, not the function's."""
    write_project(tmp_path, {"tj": """
        export default async function (req, ctx) {
          let calls = 0;
          const param = { toJSON() { if (++calls > 1) throw new Error("tj " + ctx.secrets.ACME_PEM); return 1; } };
          await ctx.db.query("SELECT $1::int AS v", [param]);
          return { status: 200 };
        }
    """}, SECRETS)
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/tj", ACME)]))
    assert status == 500 and "JSEvalException" in body.decode()
    assert not [line for line in PEM_LINES if line in body.decode()]
    assert leaks(conn, headers["x-flux-request-id"], *PEM_LINES) == []


def test_a_numeric_secret_that_comes_back_as_a_number_is_redacted(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"pin": """
        export default async function (req, ctx) {
          const { rows } = await ctx.db.query("SELECT $1::bigint AS pin", [ctx.secrets.ACME_PIN]);
          ctx.log("pin", { pin: Number(ctx.secrets.ACME_PIN) });
          return { status: 200, body: rows[0] };
        }
    """}, SECRETS)
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/pin", ACME)]))
    assert status == 200 and json.loads(body) == {"pin": int(ACME_PIN)}  # the function's answer is its own
    assert leaks(conn, headers["x-flux-request-id"], ACME_PIN) == []


def test_a_secret_in_a_binary_body_is_redacted_before_it_is_recorded(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"f": "export default async function () { return {status: 200}; }"}, SECRETS)
    [(status, headers, _)] = run(call(tmp_path, dsn, [("POST", "/f", {
        "data": b"\x00" + ACME_TOKEN.encode() + b"\xff", "headers": {"content-type": "application/octet-stream", **ACME["headers"]}})]))
    recorded = stored(conn, headers["x-flux-request-id"])["request"]["body"]
    assert status == 200 and base64.b64decode(recorded) == b"\x00[secret:ACME_TOKEN]\xff"


def test_a_secret_in_a_database_errors_detail_and_hint_is_redacted(tmp_path, dsn, conn, users):
    """PostgreSQL puts the values in them: a unique violation's key, a RAISE's HINT."""
    conn.execute("CREATE FUNCTION fail_with(h text) RETURNS void LANGUAGE plpgsql AS "
                 "$$ BEGIN RAISE EXCEPTION 'refused' USING HINT = h; END $$")
    write_project(tmp_path, {"dup": """
        export default async function (req, ctx) {
          const token = ctx.secrets.ACME_TOKEN, seen = [];
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", [token]);
          for (const sql of ["INSERT INTO users (email) VALUES ($1)", "SELECT fail_with($1)"]) {
            await ctx.db.query("SAVEPOINT s");
            try { await ctx.db.query(sql, [token]); } catch (e) { seen.push(e.detail ?? e.hint); }
            await ctx.db.query("ROLLBACK TO SAVEPOINT s");
          }
          return { status: 409, body: seen };
        }
    """}, SECRETS)
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/dup", ACME)]))
    assert status == 409 and json.loads(body) == [f"Key (email)=({ACME_TOKEN}) already exists.", ACME_TOKEN]
    assert leaks(conn, headers["x-flux-request-id"], ACME_TOKEN) == []
    errors = [data["error"] for _, kind, data in stored(conn, headers["x-flux-request-id"])["recording"]["events"]
              if kind == "db" and "error" in data]
    assert [(e["detail"], e.get("hint")) for e in errors] == [("Key (email)=([secret:ACME_TOKEN]) already exists.", None),
                                                              (None, "[secret:ACME_TOKEN]")]


def test_a_secret_sent_as_the_http_method_is_redacted_from_the_method_column(tmp_path, dsn, conn, trace_store):
    """Any HTTP token is a method, and reaches the gateway's 405 (the server upper-cases it)."""
    secret = "SK-UPPER-77QX9ZT3"
    write_project(tmp_path, {"f": "export default async function () { return {status: 200}; }"},
                  f'[tenants.acme]\napi_keys = ["key-acme"]\n[tenants.acme.secrets]\nUP = "{secret}"\n')
    [(status, headers, body)] = run(on_the_wire(tmp_path, dsn, [http(secret, "/f", [("x-flux-api-key", "key-acme")])]))
    request_id = dict(headers)["x-flux-request-id"]
    assert status == 405 and secret not in body.decode()
    assert leaks(conn, request_id, secret) == [] and stored(conn, request_id)["method"] == "[secret:UP]"


def test_a_long_secret_that_postgresql_cuts_in_its_errors_is_redacted(tmp_path, dsn, conn, users):
    """A 107-character API key (a Stripe live key's length) in a row that breaks a NOT NULL
    constraint: the DETAIL holds its first 64 bytes; as an identifier, its first 63."""
    key = "sk_live_" + "51HxQ2eZvKYlo2C" * 6 + "abcdefghi"
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, api_key text, name text NOT NULL)")
    write_project(tmp_path, {"save": """
        export default async function (req, ctx) {
          const seen = [];
          for (const [sql, params] of [["INSERT INTO accounts VALUES (1, $1, NULL)", [ctx.secrets.STRIPE_KEY]],
                                       ['SELECT * FROM "' + ctx.secrets.STRIPE_KEY + '"', []]]) {
            await ctx.db.query("SAVEPOINT s");
            try { await ctx.db.query(sql, params); } catch (e) { seen.push(e.detail ?? e.message); }
            await ctx.db.query("ROLLBACK TO SAVEPOINT s");
          }
          ctx.log("failed", { seen });
          return { status: 200, body: seen };
        }
    """}, f'[tenants.acme]\napi_keys = ["key-acme"]\n[tenants.acme.secrets]\nSTRIPE_KEY = "{key}"\n')
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/save", ACME)]))
    assert status == 200 and json.loads(body) == [f"Failing row contains (1, {key[:64]}..., null).",
                                                  f'relation "{key[:63]}" does not exist (SQLSTATE 42P01)']
    assert leaks(conn, headers["x-flux-request-id"], key[:40]) == []


def test_a_secret_in_a_fetch_url_is_redacted_from_the_tape(tmp_path, dsn, conn, users, stub: Stub):
    """The HTTP client's rewrite of the URL (a space as +, %2F as /) is not the secret's text."""
    write_project(tmp_path, {"call": f"""
        export default async function (req, ctx) {{
          const res = await ctx.fetch("{stub.url}/echo?k=" + ctx.secrets.ACME_URL_TOKEN);
          return {{ status: 200, body: res.url.endsWith(ctx.secrets.ACME_URL_TOKEN) }};
        }}
    """}, SECRETS)
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/call", ACME)]))
    assert status == 200 and leaks(conn, headers["x-flux-request-id"], "secret_9z") == []
    assert json.loads(body) is True  # the response's url is the one the function asked for, as on the tape


def test_a_fetch_url_with_credentials_is_refused_so_no_basic_form_of_a_secret_reaches_the_tape(tmp_path, dsn, conn, users, stub: Stub):
    """aiohttp would send `user:SECRET@` as `Authorization: Basic base64(...)`, which /echo answers
    back onto the tape, where redaction cannot know it."""
    write_project(tmp_path, {"call": f"""
        export default async function (req, ctx) {{
          try {{ await ctx.fetch("http://user:" + ctx.secrets.ACME_TOKEN + "@{stub.host}/echo"); }} catch (e) {{ return {{ status: 200, body: e.name }}; }}
          return {{ status: 200, body: "sent" }};
        }}
    """}, SECRETS)
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/call", ACME)]))
    assert (status, body) == (200, b"TypeError") and stub.requests == []
    basic = base64.b64encode(f"user:{ACME_TOKEN}".encode()).decode()
    assert leaks(conn, headers["x-flux-request-id"], ACME_TOKEN, basic[8:-4]) == []


def test_a_secret_in_a_fetch_url_is_redacted_from_an_upstreams_echo_of_the_url(tmp_path, dsn, conn, users, stub: Stub):
    """The HTTP client sends a raw URL percent-encoded as encodeURI would (`odd%20sec:ret@...`),
    and /ok answers the path it got."""
    secret = "odd sec:ret@v&al=1"
    write_project(tmp_path, {"call": f"""
        export default async function (req, ctx) {{
          const res = await ctx.fetch("{stub.url}/ok/" + ctx.secrets.ODD);
          return {{ status: 200, body: (await res.json()).path }};
        }}
    """}, f'[tenants.acme]\napi_keys = ["key-acme"]\n[tenants.acme.secrets]\nODD = "{secret}"\n')
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/call", ACME)]))
    assert (status, body) == (200, b"/ok/odd%20sec:ret@v&al=1")  # what the upstream got
    assert leaks(conn, headers["x-flux-request-id"], "sec:ret@v") == []


def test_a_secret_in_binary_fetch_bodies_is_redacted_from_the_tape(tmp_path, dsn, conn, users, stub: Stub):
    """Bytes are on the tape as one character per byte, where redaction finds an ASCII secret."""
    write_project(tmp_path, {"call": f"""
        export default async function (req, ctx) {{
          const token = ctx.secrets.ACME_TOKEN;
          const bytes = new Uint8Array([0xff, ...Array.from(token, (c) => c.charCodeAt(0))]);
          const res = await ctx.fetch("{stub.url}/mirror", {{ method: "POST", body: bytes }});
          const back = await res.bytes();
          return {{ status: 200, body: back.length === bytes.length && back.every((b, i) => b === bytes[i]) }};
        }}
    """}, SECRETS)
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/call", ACME)]))
    assert status == 200 and json.loads(body) is True
    assert stub.requests[0]["raw"] == b"\xff" + ACME_TOKEN.encode()
    assert leaks(conn, headers["x-flux-request-id"], ACME_TOKEN) == []
    [event] = [data for _, kind, data in stored(conn, headers["x-flux-request-id"])["recording"]["events"] if kind == "fetch"]
    assert event["body"] == event["response_bytes"] == "\xff[secret:ACME_TOKEN]" and event["binary"] is True


def test_sensitive_headers_of_a_fetch_are_redacted_from_the_tape(tmp_path, dsn, conn, users, stub: Stub):
    """A Basic credential is the secret base64-encoded; a cookie the upstream sets is a credential too."""
    write_project(tmp_path, {"call": f"""
        const A = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        function base64(text) {{  // V8 alone has no btoa
          let out = "";
          for (let i = 0; i < text.length; i += 3) {{
            const n = (text.charCodeAt(i) << 16) | ((text.charCodeAt(i + 1) || 0) << 8) | (text.charCodeAt(i + 2) || 0);
            out += A[n >> 18] + A[(n >> 12) & 63] + (i + 1 < text.length ? A[(n >> 6) & 63] : "=") + (i + 2 < text.length ? A[n & 63] : "=");
          }}
          return out;
        }}
        export default async function (req, ctx) {{
          await ctx.fetch("{stub.url}/cookie", {{ headers: {{ authorization: "Basic " + base64("user:" + ctx.secrets.ACME_TOKEN) }} }});
          return {{ status: 200 }};
        }}
    """}, SECRETS)
    [(status, headers, _)] = run(call(tmp_path, dsn, [("POST", "/call", ACME)]))
    basic = base64.b64encode(f"user:{ACME_TOKEN}".encode()).decode()
    assert status == 200 and stub.requests[0]["headers"]["authorization"] == f"Basic {basic}"
    assert leaks(conn, headers["x-flux-request-id"], basic, SESSION_COOKIE) == []


def test_a_secret_in_the_path_or_query_is_redacted_with_a_tenant_or_without(tmp_path, dsn, conn, users):
    write_project(tmp_path, {"f": "export default async function () { return {status: 200}; }"}, SECRETS)
    results = run(call(tmp_path, dsn, [
        ("GET", f"/nope/{ACME_TOKEN}", ACME),  # 404
        ("POST", f"/f/{SHARED_KEY}?k={SHARED_KEY}", {}),  # 401: no tenant, every secret is still redacted
    ]))
    assert [status for status, _, _ in results] == [404, 401]
    for _, headers, body in results:
        assert ACME_TOKEN not in body.decode() and SHARED_KEY not in body.decode()
        assert leaks(conn, headers["x-flux-request-id"], ACME_TOKEN, SHARED_KEY) == []
    assert stored(conn, results[0][1]["x-flux-request-id"])["path"] == "/nope/[secret:ACME_TOKEN]"
    assert stored(conn, results[1][1]["x-flux-request-id"])["request"]["query"] == {"k": "[secret]"}


def test_a_secret_host_is_redacted_in_any_case(tmp_path, dsn, conn, users, stub: Stub):
    """yarl and aiohttp lower-case a host; Flux names it as the URL spells it."""
    write_project(tmp_path, {"call": """
        export default async function (req, ctx) {
          try { await ctx.fetch("http://" + ctx.secrets.ACME_HOST + ":18151/h"); } catch (e) { return {status: 200, body: e.message}; }
        }
    """}, SECRETS + f'[fetch]\nallow = ["{stub.host}"]\n')
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/call", ACME)]))
    assert status == 200 and f"{ACME_HOST}:18151 are not allowed" in body.decode()
    assert leaks(conn, headers["x-flux-request-id"], ACME_HOST, ACME_HOST.lower()) == []


def test_a_function_sees_no_api_key_in_any_header(tmp_path, dsn, conn, users):
    """A request may carry another tenant's key beside its own; neither reaches the function or the trace."""
    write_project(tmp_path, {"echo": "export default async function (req) { return {status: 200, body: req.headers}; }"}, SECRETS)
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/echo", {"headers": [
        ("x-flux-api-key", "key-acme"), ("authorization", "Bearer key-globex"), ("x-forwarded-key", "key-globex"),
        ("x-repeated", "one"), ("x-repeated", "key-globex")]})]))  # joined, the key is one of its values
    assert status == 200 and stored(conn, headers["x-flux-request-id"])["tenant"] == "acme"
    assert "key-" not in body.decode()
    assert leaks(conn, headers["x-flux-request-id"], "key-acme", "key-globex") == []


def test_reading_traces_a_role_may_not_read_is_a_refusal_not_an_unanswering_database(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"f": "export default async function () { return {status: 200}; }"})
    conn.execute("CREATE ROLE trace_unreader LOGIN")
    conn.execute("GRANT USAGE ON SCHEMA flux TO trace_unreader")

    async def scenario():
        from flux.gateway.server import trace_reader

        async with running_gateway(tmp_path, dsn) as (gateway, client):
            gateway.trace_reader = trace_reader(dsn.replace("postgres@", "trace_unreader@"))
            answer = await client.get("/_flux/requests")
            return answer.status_code, await answer.get_json()

    try:
        status, body = run(scenario())
    finally:
        conn.execute("DROP OWNED BY trace_unreader")
        conn.execute("DROP ROLE trace_unreader")
    # Before: 503 "the database did not answer", for a permission denied.
    assert (status, body) == (500, {"error": "reading traces failed: the database refused the query (the server's log says why)"})


def test_reading_traces_from_a_schema_a_newer_flux_upgraded_is_a_503_the_log_explains(tmp_path, dsn, conn, trace_store, caplog):
    """A rolling deploy's older gateway answered its tenants 400, as if their query were wrong, with the
    operator's hint to install Flux, and logged nothing."""
    from flux.store.schema import SCHEMA_VERSION

    write_project(tmp_path, {"f": "export default async function () { return {status: 200}; }"}, TENANTS)
    conn.execute("UPDATE flux.meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))

    async def scenario():
        from flux.gateway.server import trace_reader

        async with running_gateway(tmp_path, dsn) as (gateway, client):
            gateway.trace_reader = trace_reader(dsn)
            answer = await client.get("/_flux/requests", headers={"x-flux-api-key": "key-acme"})
            return answer.status_code, await answer.get_json()

    with caplog.at_level(logging.WARNING, logger="flux.gateway"):
        status, body = run(scenario())
    assert status == 503 and "version" in body["error"] and "hint" not in body
    assert any("newer than this Flux" in r.getMessage() and "Upgrade Flux" in r.getMessage() for r in caplog.records)


def test_health_reports_traces_waiting_and_dropped(tmp_path):
    """An SRE's probe saw `ok` and nothing else while the database took no traces and the queue dropped them."""
    write_project(tmp_path, {"hi": "export default async function () { return {status: 200}; }"})
    writer = TraceWriter("postgresql://nobody@127.0.0.1:1/none", max_queue=1)  # not started: nothing is written

    async def main() -> dict:
        async with running_gateway(tmp_path, None, sink=writer) as (_, client):
            for _ in range(3):
                assert (await client.post("/hi")).status_code == 200
            return await (await client.get("/_flux/health")).get_json()

    health = run(main())
    assert health["ok"] is True
    assert {k: health["traces"][k] for k in ("pending", "written", "dropped", "failed")} == {
        "pending": 1, "written": 0, "dropped": 2, "failed": 0}


@pytest.mark.slow
def test_while_the_database_is_away_ctx_db_fails_within_a_second_and_recovers_when_it_is_back(tmp_path):
    """A request waited for a connection to its time limit and answered 504, as if the function were slow."""
    from flux.pg.cluster import Cluster

    cluster = Cluster(state_dir=tmp_path / "pg")
    project = write_project(tmp_path / "app", {"q": """
        export default async function (req, ctx) {
          const { rows } = await ctx.db.query("SELECT 1 AS one", []);
          return { status: 200, body: rows[0] };
        }
    """}, "[limits]\ntimeout_ms = 5000\n")

    async def ask(client) -> tuple[int, float, dict]:
        started = time.monotonic()
        answer = await client.post("/q")
        return answer.status_code, time.monotonic() - started, await answer.get_json()

    async def main():
        async with running_gateway(project, info.dsn) as (_, client):
            before = await ask(client)
            await asyncio.to_thread(cluster.stop, mode="immediate")
            await ask(client)  # the pool's idle connection is found broken: a DatabaseError of its own
            await asyncio.sleep(1.5)  # the pool has tried to reconnect, and failed
            away = await ask(client)
            await asyncio.to_thread(cluster.start)
            deadline = time.monotonic() + 6  # the README: within about 5 s of the database's return
            while (back := await ask(client))[0] != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            return before, away, back

    try:
        info = cluster.start()
        before, away, back = run(main())
    finally:
        cluster.destroy()
    assert before[0] == 200 and back[0] == 200, (before, back)
    status, took, body = away
    assert status == 500 and took < 3, away
    assert "ctx.db: no connection to the database within 1 s" in body["error"]


@pytest.mark.slow
def test_after_a_long_outage_requests_succeed_again_within_seconds_of_the_database_return(tmp_path):
    """psycopg_pool's backoff doubled for five minutes: after 20 s away, the gateway found the
    database back about 10 s after it was."""
    from flux.pg.cluster import Cluster

    cluster = Cluster(state_dir=tmp_path / "pg")
    project = write_project(tmp_path / "app", {"q": """
        export default async function (req, ctx) {
          const { rows } = await ctx.db.query("SELECT 1 AS one", []);
          return { status: 200, body: rows[0] };
        }
    """})

    async def main() -> float:
        async with running_gateway(project, info.dsn) as (_, client):
            assert (await client.post("/q")).status_code == 200
            await asyncio.to_thread(cluster.stop, mode="immediate")
            for _ in range(4):  # requests come and fail meanwhile
                await client.post("/q")
                await asyncio.sleep(5)
            await asyncio.to_thread(cluster.start)
            back = time.monotonic()
            while (await client.post("/q")).status_code != 200:
                assert time.monotonic() - back < 30
                await asyncio.sleep(0.2)
            return time.monotonic() - back

    try:
        info = cluster.start()
        assert run(main()) < 4
    finally:
        cluster.destroy()


def test_a_request_body_nested_too_deep_is_a_400_with_its_request_id_and_recorded(tmp_path, dsn, conn, trace_store):
    """It was Quart's HTML 500, with no request id and no trace: redacting the record overflowed the stack."""
    write_project(tmp_path, {"hi": "export default async function () { return {status: 200}; }"})
    deep = b"[" * 1000 + b"]" * 1000
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/hi", {"data": deep, "headers": {"content-type": "application/json"}})]))
    assert status == 400 and "nested deeper than 200 levels" in json.loads(body)["error"]
    trace = stored(conn, headers["x-flux-request-id"])
    assert trace["status"] == 400 and "[not recorded: nested deeper than 64 levels]" in json.dumps(trace["request"]["body"])


def test_a_tape_capped_for_depth_with_the_rest_of_the_record_stops_there_and_says_truncated(tmp_path, dsn, conn, trace_store):
    """A step the function forged through JSON.stringify, nested too deep to redact, capped the whole
    record at 64 levels: the tape's 70-level query result became a note, on a tape still whole."""
    write_project(tmp_path, {"deep": """
        export default async function (req, ctx) {
          const t = Date.now();
          await ctx.db.query("SELECT (repeat('[', 70) || repeat(']', 70))::jsonb AS k");
          const stringify = JSON.stringify;
          JSON.stringify = function (value, ...rest) {
            if (value && Array.isArray(value.calls)) {
              let deep = ctx.secrets.KEY;
              for (let i = 0; i < 900; i++) deep = [deep];
              value.open = [{id: "x", parent: null, start: 1, duration_ms: 1, attributes: {deep}, events: []}];
              JSON.stringify = stringify;
            }
            return stringify(value, ...rest);
          };
          await new Promise((resolve) => setTimeout(resolve, 1));
          return {status: 200, body: t};
        }
    """}, '[secrets]\nKEY = "sk_live_abcdefghijkl"\n')
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/deep", {})]))
    recording = stored(conn, headers["x-flux-request-id"])["recording"]
    assert status == 200 and (recording["truncated"], recording["events"]) == (True, [[0, "now", json.loads(body)]])


def _nested(levels: int, container: str) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value] if container == "list" else {"k": value}
    return value


@pytest.mark.parametrize("container", ["list", "object"])
def test_a_body_is_refused_past_200_levels_and_not_before(container):
    from flux.gateway.app import MAX_BODY_DEPTH, _deeper_than

    assert not _deeper_than(_nested(MAX_BODY_DEPTH, container), MAX_BODY_DEPTH)
    assert _deeper_than(_nested(MAX_BODY_DEPTH + 1, container), MAX_BODY_DEPTH)
    assert not _deeper_than({"items": [{"id": n, "tags": ["a"], "meta": {"x": [1]}} for n in range(500)]}, MAX_BODY_DEPTH)


def test_the_depth_check_knows_how_deep_orjson_writes():
    """The check asks orjson.dumps, so it rests on orjson's limit: another orjson must not move it silently."""
    import orjson

    from flux.gateway.app import ORJSON_MAX_DEPTH

    orjson.dumps(_nested(ORJSON_MAX_DEPTH, "list"))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(_nested(ORJSON_MAX_DEPTH + 1, "list"))


def test_a_function_returning_a_body_nested_too_deep_is_a_500_with_its_request_id_and_recorded(tmp_path, dsn, conn, trace_store):
    """It was Quart's HTML 500, with no request id and no trace."""
    write_project(tmp_path, {"deep": """
        export default async function () {
          let v = []; for (let i = 0; i < 1000; i++) v = [v];
          return {status: 200, body: v};
        }
    """})
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/deep", {})]))
    assert status == 500 and "the return value is nested deeper than 255 levels" in json.loads(body)["error"]
    assert stored(conn, headers["x-flux-request-id"])["status"] == 500


SLOW = "export default async function () { await new Promise(r => setTimeout(r, 1000)); return {status: 200}; }"


async def _three_at_once(root: Path, dsn: str, **queue) -> tuple[list, dict]:
    """Three requests at once on one worker; each answer with when it came (seconds), then the health."""
    writer = TraceWriter(dsn, flush_interval=0.01)
    await writer.start()
    async with running_gateway(root, dsn, sink=writer, workers=1, **queue) as (_, client):
        started = time.monotonic()

        async def one() -> tuple:
            response = await client.post("/slow")
            return response.status_code, dict(response.headers), await response.get_json(), time.monotonic() - started

        answers = await asyncio.gather(one(), one(), one())
        health = await (await client.get("/_flux/health")).get_json()
    await writer.close()
    return sorted(answers, key=lambda a: a[0]), health


def test_beyond_max_queue_a_request_is_answered_503_at_once_with_retry_after_and_recorded(tmp_path, dsn, conn, trace_store):
    """The wait for a worker had no bound: every request beyond --workers waited, holding its body."""
    write_project(tmp_path, {"slow": SLOW})
    answers, health = run(_three_at_once(tmp_path, dsn, max_queue=1))
    assert [a[0] for a in answers] == [200, 200, 503]
    _, headers, body, took = answers[2]
    assert took < 0.9  # at once, not after the running function's second
    assert headers["retry-after"] == "1"
    assert body == {"error": "the server is at capacity: 1 request(s) already wait for one of 1 workers",
                    "hint": "Nothing ran. Send it again after Retry-After (or to another instance); to queue more, "
                            "raise --workers or --max-queue.", "status": "Service Unavailable",
                    "request_id": headers["x-flux-request-id"]}
    row = stored(conn, headers["x-flux-request-id"])
    assert (row["status"], row["function"], row["error"]) == (503, "slow", body["error"])
    assert (health["max_queue"], health["refused"], health["queue_timeout_seconds"]) == (1, 1, None)


def test_a_request_that_waits_past_queue_timeout_is_answered_503_and_recorded(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"slow": SLOW})
    answers, health = run(_three_at_once(tmp_path, dsn, queue_timeout=0.3))
    assert [a[0] for a in answers] == [200, 503, 503]
    for _, headers, body, took in answers[1:]:
        assert 0.3 <= took < 0.9 and headers["retry-after"] == "1"
        assert body["error"] == "the server is at capacity: no worker came free within 0.3 s"
        assert stored(conn, headers["x-flux-request-id"])["status"] == 503
    assert (health["max_queue"], health["refused"], health["queue_timeout_seconds"]) == (4, 2, 0.3)  # 4 per worker by default


def test_requests_within_max_queue_wait_for_a_worker_and_run(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"slow": SLOW})
    answers, health = run(_three_at_once(tmp_path, dsn, max_queue=2))
    assert [a[0] for a in answers] == [200, 200, 200] and health["refused"] == 0


def test_health_answers_at_once_while_every_worker_is_busy_and_the_queue_is_full(tmp_path, dsn):
    """A load balancer's probe must not wait behind the functions: it would take a busy instance for a dead one."""
    write_project(tmp_path, {"slow": SLOW.replace("1000", "3000")})

    async def scenario():
        async with running_gateway(tmp_path, dsn, workers=1, max_queue=1) as (_, client):
            busy = [asyncio.ensure_future(client.post("/slow")) for _ in range(2)]
            await asyncio.sleep(0.3)  # one runs, one waits
            started = time.monotonic()
            response = await client.get("/_flux/health")
            took = time.monotonic() - started
            await asyncio.gather(*busy)
            return response.status_code, await response.get_json(), took

    status, health, took = run(scenario())
    assert status == 200 and (health["running"], health["queued"]) == (1, 1)
    assert took < 1.5  # not after the running function's 3 s (0.25 s at most for the database's check)


ECHO_BODY = """
export default async function (req) {
  return {status: 200, body: {body: req.body instanceof Uint8Array ? Array.from(req.body) : req.body}};
}
"""


@pytest.mark.parametrize("method", ["DELETE", "OPTIONS", "PROPFIND", "FOO"])
def test_a_method_the_path_has_no_route_for_is_a_405_that_lists_the_routed_methods_and_is_recorded(tmp_path, dsn, conn, trace_store, method):
    write_project(tmp_path, {"echo": ECHO_BODY}, '[routes]\n"GET /echo" = "echo"\n')
    [(status, headers, body)] = run(on_the_wire(tmp_path, dsn, [http(method, "/echo/")]))
    assert (status, dict(headers)["allow"]) == (405, "GET, HEAD, POST")
    assert json.loads(body)["error"].startswith(f"no function is routed at {method} /echo/;")
    trace = stored(conn, dict(headers)["x-flux-request-id"])
    assert (trace["method"], trace["status"], trace["function"], trace["response"]["headers"]["allow"]) == (
        method, 405, None, "GET, HEAD, POST")


def test_a_get_route_answers_head_with_the_gets_headers_and_no_body(tmp_path, dsn, conn, trace_store):
    """HEAD on a GET route was a 405 (a 404 before that): `curl -I` and health checks that send HEAD failed."""
    write_project(tmp_path, {"echo": """
        export default async function (req) { return {status: 200, body: {method: req.method}}; }
    """}, '[routes]\n"GET /echo" = "echo"\n')
    [(got, got_headers, got_body), (status, headers, body)] = run(on_the_wire(tmp_path, dsn, [http("GET", "/echo"), http("HEAD", "/echo")]))
    assert (got, json.loads(got_body)) == (200, {"method": "GET"})
    assert (status, body, dict(headers)["content-length"]) == (200, b"", str(len(b'{"method":"HEAD"}')))
    trace = stored(conn, dict(headers)["x-flux-request-id"])
    assert (trace["method"], trace["function"], trace["response"]["body"]) == ("HEAD", "echo", {"method": "HEAD"})


@pytest.mark.parametrize("method", ["GET", "PROPFIND"])
def test_a_path_with_no_route_is_a_404_for_any_method_with_its_request_id_and_recorded(tmp_path, dsn, conn, trace_store, method):
    write_project(tmp_path, {"echo": ECHO_BODY})
    [(status, headers, body)] = run(on_the_wire(tmp_path, dsn, [http(method, "/nowhere")]))
    assert status == 404 and "allow" not in dict(headers)
    assert json.loads(body)["error"] == f"no function is routed at {method} /nowhere"
    assert stored(conn, dict(headers)["x-flux-request-id"])["status"] == 404


@pytest.mark.parametrize(("content_type", "seen"), [
    ("application/x-ndjson", {"text": '{"a":1}\n{"a":2}\n'}),
    ("application/jsonl", {"text": '{"a":1}\n{"a":2}\n'}),
    ("application/json-seq", {"text": '{"a":1}\n{"a":2}\n'}),
])
def test_a_json_lines_body_is_text_not_one_json_document(tmp_path, dsn, conn, trace_store, content_type, seen):
    write_project(tmp_path, {"body": BODY})
    [(status, _, body)] = run(call(tmp_path, dsn, [("POST", "/body", {
        "data": b'{"a":1}\n{"a":2}\n', "headers": {"content-type": content_type}})]))
    assert (status, json.loads(body)) == (200, seen)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json", "Text/JSON"])
def test_a_json_type_in_any_form_is_parsed(tmp_path, dsn, conn, trace_store, content_type):
    write_project(tmp_path, {"body": BODY})
    [(status, _, body)] = run(call(tmp_path, dsn, [("POST", "/body", {"data": b'{"a": 1}', "headers": {"content-type": content_type}})]))
    assert (status, json.loads(body)) == (200, {"text": {"a": 1}})


@pytest.mark.parametrize("path", ["/echo", "/nowhere"])
def test_an_answer_given_before_the_body_is_read_tells_the_client_the_connection_closes(tmp_path, dsn, conn, trace_store, path):
    # A 413 (the announced length is over the limit) or a 404 does not read the body; the server then
    # closes the connection, and a keep-alive client (a proxy's pool) must be told not to reuse it.
    write_project(tmp_path, {"echo": ECHO_BODY}, "[limits]\nmax_body_bytes = 1024\n")
    head = f"POST {path} HTTP/1.1\r\nhost: flux\r\ncontent-type: text/plain\r\ncontent-length: 1000000\r\n\r\n".encode()
    [(status, headers, _)] = run(on_the_wire(tmp_path, dsn, [head]))  # the body never comes
    assert status in (404, 413) and dict(headers)["connection"] == "close"
    trace = stored(conn, dict(headers)["x-flux-request-id"])
    assert trace["status"] == status and trace["response"]["headers"]["connection"] == "close"


@pytest.mark.parametrize("path", ["/_flux/requests", "/_flux/requests/abcd", "/_flux/health", "/_flux/metrics"])
def test_flux_endpoints_tell_a_client_whose_body_they_leave_unread_that_the_connection_closes(tmp_path, dsn, conn, trace_store, path):
    # They read no body, and the server closes such a connection: a proxy's pool reused it for
    # the next request, another client's or tenant's, which then failed.
    write_project(tmp_path, {"echo": ECHO_BODY}, '[tenants.acme]\napi_keys = ["key-acme"]\n')
    head = f"GET {path} HTTP/1.1\r\nhost: flux\r\nx-flux-api-key: key-acme\r\ncontent-length: 1000000\r\n\r\n".encode()
    [(status, headers, _)] = run(on_the_wire(tmp_path, dsn, [head]))  # the body never comes
    assert status in (200, 404) and dict(headers)["connection"] == "close"


def test_an_answer_after_the_body_was_read_keeps_the_connection_open(tmp_path, dsn, conn, trace_store):
    write_project(tmp_path, {"echo": ECHO_BODY})

    requests = (b"POST /echo HTTP/1.1\r\nhost: flux\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nhi"
                + http("POST", "/nowhere", body=b"x"))
    [(status, headers, body)] = run(on_the_wire(tmp_path, dsn, [requests]))
    assert status == 200 and "connection" not in dict(headers)
    assert b"HTTP/1.1 404" in body  # the second answer came on the same connection


def test_a_gzip_or_deflate_body_reaches_the_function_and_the_trace_decompressed(tmp_path, dsn, conn, trace_store):
    import gzip
    import zlib

    write_project(tmp_path, {"body": BODY})
    results = run(call(tmp_path, dsn, [
        ("POST", "/body", {"data": gzip.compress(b'{"a": 1}'), "headers": {"content-type": "application/json", "content-encoding": "gzip"}}),
        ("POST", "/body", {"data": gzip.compress(b"one ") + gzip.compress(b"two"),
                           "headers": {"content-type": "text/plain", "content-encoding": "GZIP"}}),
        ("POST", "/body", {"data": zlib.compress(b"caf\xe9"), "headers": {"content-type": "text/plain; charset=latin-1",
                                                                          "content-encoding": "deflate"}}),
    ]))
    assert [(status, json.loads(body)) for status, _, body in results] == [
        (200, {"text": {"a": 1}}), (200, {"text": "one two"}), (200, {"text": "caf\u00e9"})]
    assert stored(conn, results[0][1]["x-flux-request-id"])["request"]["body"] == {"a": 1}


def test_a_compressed_body_over_the_limit_once_decompressed_is_413_without_decompressing_the_rest(tmp_path, dsn, conn, trace_store):
    import gzip

    write_project(tmp_path, {"body": BODY}, "[limits]\nmax_body_bytes = 65536\n")
    bomb = gzip.compress(bytes(50_000_000))  # 48 KB that expands to 50 MB
    started = time.monotonic()
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/body", {
        "data": bomb, "headers": {"content-type": "application/octet-stream", "content-encoding": "gzip"}})]))
    assert status == 413 and json.loads(body)["error"] == "the request body is over the 65536-byte limit once decompressed"
    assert time.monotonic() - started < 5  # 50 MB is never made
    assert stored(conn, headers["x-flux-request-id"])["status"] == 413


@pytest.mark.parametrize(("coding", "data", "status", "error"), [
    ("br", b"\x0b\x02\x80hi\x03", 415, "the request body's content-encoding 'br' is not supported"),
    ("gzip, gzip", b"x", 415, "the request body's content-encoding 'gzip, gzip' is not supported"),
    ("gzip", b"not gzip at all", 400, "the request body is not valid gzip: incorrect header check"),
    ("gzip", __import__("gzip").compress(b"cut short")[:-9], 400, "the request body is not valid gzip: it ends before its compressed data does"),
], ids=["br", "two-codings", "not-gzip", "cut-short"])
def test_a_body_in_a_coding_flux_cannot_decode_is_refused_and_recorded_as_sent(tmp_path, dsn, conn, trace_store, coding, data, status, error):
    write_project(tmp_path, {"body": BODY})
    [(got, headers, body)] = run(call(tmp_path, dsn, [("POST", "/body", {
        "data": data, "headers": {"content-type": "text/plain", "content-encoding": coding}})]))
    assert (got, json.loads(body)["error"]) == (status, error)
    assert status == 400 or headers["accept-encoding"] == "gzip, deflate"
    trace = stored(conn, headers["x-flux-request-id"])
    assert (trace["status"], trace["error"], trace["function"]) == (status, error, "body")
    assert base64.b64decode(trace["request"]["body"]) == data


def test_a_body_slower_than_the_body_timeout_is_a_408_with_its_request_id_and_recorded(tmp_path, dsn, conn, trace_store):
    """It was Quart's HTML 408, with no request id and no trace."""
    write_project(tmp_path, {"body": BODY})

    async def scenario():
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        async with running_gateway(tmp_path, dsn, sink=writer) as (_, client):
            client.app.config["BODY_TIMEOUT"] = 0.5  # Quart's default is 60 s
            async with client.request("/body", method="POST", headers={"content-type": "text/plain"}) as connection:
                await connection.send(b"the first part, and never the rest")
                body = await asyncio.wait_for(connection.receive(), 5)
        await writer.close()
        return connection.status_code, body

    status, body = run(scenario())
    error = "the request body did not arrive within 0.5 s"
    assert status == 408 and json.loads(body)["error"] == error
    trace = stored(conn, json.loads(body)["request_id"])
    assert (trace["status"], trace["function"], trace["error"]) == (408, "body", error)


def test_a_compressed_body_that_is_not_json_once_decompressed_is_a_400_recorded_as_its_text(tmp_path, dsn, conn, trace_store):
    import gzip

    write_project(tmp_path, {"body": BODY})
    [(status, headers, body)] = run(call(tmp_path, dsn, [("POST", "/body", {
        "data": gzip.compress(b"{not json"), "headers": {"content-type": "application/json", "content-encoding": "gzip"}})]))
    assert status == 400 and json.loads(body)["error"].startswith("the request body is not valid JSON")
    recorded = stored(conn, headers["x-flux-request-id"])["request"]
    assert (recorded["body"], recorded["body_bytes"], "body_encoding" in recorded) == ("{not json", 9, False)


@pytest.mark.parametrize("charset", ["unicode_escape", "raw-unicode-escape", "idna", "punycode"])
def test_a_body_declared_in_a_python_codec_that_is_no_charset_reaches_the_function_as_its_bytes(tmp_path, dsn, conn, trace_store, charset):
    write_project(tmp_path, {"body": BODY})
    [(status, _, body)] = run(call(tmp_path, dsn, [("POST", "/body", {
        "data": b"\\x41-b", "headers": {"content-type": f"text/plain; charset={charset}"}})]))
    assert (status, json.loads(body)) == (200, {"bytes": list(b"\\x41-b")})


def test_a_secret_rotated_by_a_reload_stays_redacted(tmp_path, dsn, conn, trace_store):
    """The old value left the redaction with the reload, though it is often still valid for a while,
    and can still arrive: here in the request body, as an upstream's echo would bring it."""
    old, new = "rotated-out-4f1e9c2a", "rotated-in-8b7d6e5f"
    tenant = '[tenants.acme]\napi_keys = ["key-acme"]\n[tenants.acme.secrets]\nTOKEN = "{}"\n'
    write_project(tmp_path, {"echo": "export default async function (req) { return {status: 200, body: req.body}; }"},
                  tenant.format(old))

    async def scenario() -> str:
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        async with running_gateway(tmp_path, dsn, sink=writer) as (gateway, client):
            (tmp_path / "flux.toml").write_text(tenant.format(new))
            assert not await gateway.reload(gateway.project.reload())
            answer = await client.post("/echo", json={"seen": old}, headers={"x-flux-api-key": "key-acme"})
        await writer.close()
        return answer.headers["x-flux-request-id"]

    request_id = run(scenario())
    assert leaks(conn, request_id, old) == []
    assert stored(conn, request_id)["request"]["body"] == {"seen": "[secret]"}


def test_a_key_a_reload_revokes_is_refused_while_the_reload_still_compiles(tmp_path):
    """A revoked key was served until every function had compiled and warmed: here about a second,
    and with slow top-level code, many functions and a large --pool-size, minutes."""
    slow = "const t0 = Date.now(); while (Date.now() - t0 < 400) {}\nexport default async function () { return {status: 200}; }"
    who = "export default async function (req, ctx) { return {status: 200, body: ctx.tenant}; }"
    tenants = '[tenants.acme]\napi_keys = [{}]\n[tenants.globex]\napi_keys = ["key-globex"]\n'
    write_project(tmp_path, {"slow": slow, "who": who}, tenants.format('"key-acme", "key-acme-leaked"'))

    async def scenario() -> tuple[dict[str, int], bool, int]:
        async with running_gateway(tmp_path, None, pool_size=1) as (gateway, client):
            (tmp_path / "flux.toml").write_text(tenants.format('"key-acme"'))
            reload = asyncio.ensure_future(gateway.reload(gateway.project.reload()))
            await asyncio.sleep(0.1)  # flux.toml is read; the functions compile on a worker thread
            answers = {key: (await client.post("/who", headers={"x-flux-api-key": key})).status_code
                       for key in ("key-acme", "key-acme-leaked", "key-globex")}
            under_way = not reload.done()
            assert await reload == []
            after = (await client.post("/who", headers={"x-flux-api-key": "key-acme-leaked"})).status_code
            return answers, under_way, after

    answers, under_way, after = run(scenario())
    assert under_way  # the answers above came while the old version still served
    assert answers == {"key-acme": 200, "key-acme-leaked": 401, "key-globex": 200}
    assert after == 401
