"""/_flux/metrics: Prometheus' text format, fed by every answer and by what /_flux/health shows."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import asynccontextmanager

from prometheus_client.parser import text_string_to_metric_families

from flux.gateway.metrics import BUCKETS, Metrics
from flux.gateway.traces import TraceWriter
from flux.project import load_project
from flux.store.schema import ensure_schema
from tests.functions import running_gateway, write_project

HELLO = "export default async function () { return {status: 200, body: 'hi'}; }"
TEAPOT = "export default async function () { return {status: 418, body: 'no'}; }"
BOOM = "export default async function () { throw new Error('boom'); }"
KEYED = '[tenants.acme]\napi_keys = ["key-acme"]\n[limits]\nmax_body_bytes = 100\n'


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_count_answers_by_function_and_status_with_their_durations(tmp_path, dsn):
    write_project(tmp_path, {"hello": HELLO, "teapot": TEAPOT})

    async def scenario():
        async with running_gateway(tmp_path, dsn) as (_, client):
            for _ in range(3):
                await client.post("/hello")
            await client.post("/teapot")
            await client.post("/nowhere")
            for _ in range(50):  # the database's gauge appears once its check has answered (0.25 s wait per scrape)
                response = await client.get("/_flux/metrics")
                text = await response.get_data(as_text=True)
                if "flux_database_reachable " in text:
                    break
                await asyncio.sleep(0.1)
            return response.status_code, response.content_type, text

    status, content_type, text = asyncio.run(scenario())
    samples = _samples(text)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert samples['flux_requests_total{function="hello",status="200"}'] == 3
    assert samples['flux_requests_total{function="teapot",status="418"}'] == 1
    assert samples['flux_requests_total{function="",status="404"}'] == 1  # routed to no function
    assert samples['flux_request_duration_seconds_count{function="hello"}'] == 3
    assert samples['flux_request_duration_seconds_bucket{function="hello",le="+Inf"}'] == 3
    assert 0 < samples['flux_request_duration_seconds_sum{function="hello"}'] < 30
    assert samples["flux_database_reachable"] == 1 and samples["flux_workers"] == 64
    assert "# TYPE flux_request_duration_seconds histogram" in text and "# TYPE flux_requests_total counter" in text


def test_a_duration_is_counted_in_every_bucket_at_or_above_it():
    metrics = Metrics()
    metrics.observe("f", 200, 0.005)  # on a bound: `le` is "less than or equal"
    metrics.observe("f", 200, 60.0)  # above every bound
    samples = _samples(metrics.render({}))
    assert samples['flux_request_duration_seconds_bucket{function="f",le="0.0025"}'] == 0
    assert samples['flux_request_duration_seconds_bucket{function="f",le="0.005"}'] == 1
    assert samples[f'flux_request_duration_seconds_bucket{{function="f",le="{BUCKETS[-1]}"}}'] == 1
    assert samples['flux_request_duration_seconds_bucket{function="f",le="+Inf"}'] == 2


def test_the_engine_state_is_one_gauge_per_state_with_the_current_one_at_1():
    samples = _samples(Metrics().render({"engine": {"state": "standby", "slot": "flux", "holder": None}}))
    assert samples['flux_engine_state{state="standby"}'] == 1
    assert samples['flux_engine_state{state="active"}'] == 0


def test_a_read_of_the_trace_api_refused_for_its_key_is_counted(tmp_path, dsn):
    """Such a 401 leaves no trace row, unlike a function route's: key guessing there showed nowhere."""
    write_project(tmp_path, {"hello": HELLO}, '[tenants.acme]\napi_keys = ["key-acme"]\n')

    async def scenario():
        async with running_gateway(tmp_path, dsn) as (_, client):
            guess = await client.get("/_flux/requests", headers={"x-flux-api-key": "guess"})
            return guess.status_code, await (await client.get("/_flux/metrics")).get_data(as_text=True)

    guessed, text = asyncio.run(scenario())
    assert guessed == 401
    assert _samples(text)["flux_traces_api_refused_total"] == 1


async def _traffic(client) -> None:
    """Answers of every kind: by functions (200, 418, 500) and by the gateway (401, 404, 405, 413)."""
    key = {"x-flux-api-key": "key-acme"}
    for _ in range(3):
        await client.post("/hello", headers=key)
    await client.post("/teapot", headers=key)
    await client.post("/boom", headers=key)
    await client.post("/hello", headers={"x-flux-api-key": "guess"})
    await client.post("/nowhere", headers=key)
    await client.get("/hello", headers=key)
    await client.open("/hello", method="PROPFIND", headers=key)
    await client.post("/hello", headers=key, data=b"x" * 200)


async def _scrape(client) -> str:
    for _ in range(50):  # until the database's check has answered, so that every family is there
        text = await (await client.get("/_flux/metrics")).get_data(as_text=True)
        if "flux_database_reachable " in text:
            return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"the database's check did not answer in 5 s:\n{text}")


@asynccontextmanager
async def _recording_gateway(root, dsn):
    """The project of these tests served with its traces written to the database (a real TraceWriter)."""
    writer = TraceWriter(dsn, flush_interval=0.01)
    await writer.start()
    try:
        async with running_gateway(root, dsn, sink=writer) as (gateway, client):
            yield gateway, client, writer
    finally:
        await writer.close()


def _scraped_after_traffic(root, dsn, conn) -> str:
    ensure_schema(conn)
    write_project(root, {"hello": HELLO, "teapot": TEAPOT, "boom": BOOM}, KEYED)

    async def scenario():
        async with _recording_gateway(root, dsn) as (_, client, writer):
            await _traffic(client)
            await writer.flushed()
            return await _scrape(client)

    return asyncio.run(scenario())


def test_the_exposition_parses_as_prometheus_text_with_one_help_and_type_per_family(tmp_path, dsn, conn):
    text = _scraped_after_traffic(tmp_path, dsn, conn)
    families = list(text_string_to_metric_families(text))  # raises on a line Prometheus would refuse
    names = [family.name for family in families]
    assert len(names) == len(set(names)), names
    comments = Counter(" ".join(line.split()[:3]) for line in text.splitlines() if line.startswith("#"))
    assert set(comments.values()) == {1}, comments
    assert {"flux_requests", "flux_request_duration_seconds", "flux_traces_written", "flux_database_reachable"} <= set(names)
    statuses = {s.labels["status"] for f in families if f.name == "flux_requests" for s in f.samples}
    assert {"200", "401", "404", "405", "413", "418", "500"} <= statuses, statuses


def test_each_histogram_counts_cumulatively_up_to_inf_which_equals_its_count(tmp_path, dsn, conn):
    text = _scraped_after_traffic(tmp_path, dsn, conn)
    [histogram] = [f for f in text_string_to_metric_families(text) if f.name == "flux_request_duration_seconds"]
    by_function: dict[str, dict[str, float]] = {}
    for sample in histogram.samples:
        by_function.setdefault(sample.labels["function"], {})[sample.name + sample.labels.get("le", "")] = sample.value
    assert set(by_function) == {"", "hello", "teapot", "boom"}
    for function, values in by_function.items():
        buckets = [values[f"flux_request_duration_seconds_bucket{bound}"] for bound in (*map(str, BUCKETS), "+Inf")]
        assert buckets == sorted(buckets), (function, buckets)
        assert buckets[-1] == values["flux_request_duration_seconds_count"] > 0, (function, values)


def test_counters_never_go_down_across_a_reload(tmp_path, dsn, conn):
    ensure_schema(conn)
    write_project(tmp_path, {"hello": HELLO, "teapot": TEAPOT, "boom": BOOM}, KEYED)

    def counters(text: str) -> dict[tuple, float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
                if f.type in ("counter", "histogram") for s in f.samples}

    async def scenario():
        async with _recording_gateway(tmp_path, dsn) as (gateway, client, _):
            await _traffic(client)
            before = await _scrape(client)
            (tmp_path / "functions" / "teapot.js").unlink()  # its series stay: a counter never goes
            (tmp_path / "functions" / "hello.js").write_text(HELLO.replace("'hi'", "'hello'"))
            assert not await gateway.reload(load_project(tmp_path))
            await client.post("/hello", headers={"x-flux-api-key": "key-acme"})
            return before, await _scrape(client)

    before, after = (counters(text) for text in asyncio.run(scenario()))
    assert before and all(after.get(key, -1) >= value for key, value in before.items()), \
        {key: (value, after.get(key)) for key, value in before.items() if after.get(key, -1) < value}
