"""/_flux/metrics: Prometheus' text format, fed by every answer and by what /_flux/health shows."""

from __future__ import annotations

import asyncio

from flux.gateway.metrics import BUCKETS, Metrics
from tests.functions import running_gateway, write_project

HELLO = "export default async function () { return {status: 200, body: 'hi'}; }"
TEAPOT = "export default async function () { return {status: 418, body: 'no'}; }"


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
