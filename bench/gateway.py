"""Gateway benchmark: Flux against a bare Quart handler doing the same work, in one run.

    .venv/bin/python bench/gateway.py            # about 3 minutes on 2 cores
    .venv/bin/python bench/gateway.py --quick    # about 80 seconds
    .venv/bin/python bench/gateway.py --out bench/results/gateway-mine.json

The work per request: one INSERT into PostgreSQL and one outbound HTTP call to a local stub.
Four servers run it, each its own process on 127.0.0.1, against the same throwaway cluster
and the same stub (also its own process):

- `bare`: a Quart handler in Python on Hypercorn (psycopg pool + aiohttp, as Flux uses): the floor;
- `flux`: `flux serve --no-engine` with recording on (trace rows with spans and replay tape);
- `flux-norecord`: the same with `--no-record`;
- `flux-isolates`: `flux` with `FLUX_REALMS=off`, so each request gets a whole new isolate instead
  of a fresh realm in a reused one. A diagnostic, not a target: what realms save, in the same run.

The load generator is this process: a minimal HTTP/1.1 keep-alive client (asyncio streams),
so the client's own cost stays small and equal for all of them. After a warm-up per server come
the latency rounds, then the throughput rounds. A latency round measures each server in turn with
two phases, one request at a time (started at a light fixed rate, then back to back), in an order
that alternates from round to round; a throughput round gives each server `--concurrency`
connections for `--seconds`. The figures are medians over rounds, because these machines are
noisy. Figures are judged against a peer measured in the same run (a ratio, or a difference from
`bare`), not as absolute numbers.

Isolate acquire time is measured two ways: in-process on a warm pool (acquire, release, let
the pool renew and refill, repeat), and from the `flux.isolate_acquire_ms` attribute of the function
spans the `flux` server recorded under load.

Where a `flux` request's time goes (start step, INSERT, settle step, stub call, last step and
COMMIT, gateway) is read back from the spans of the trace rows it recorded in its latency phases.

The CDC engine is not running in any of them: this measures the request path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FUNCTION = """
export default async function (req, ctx) {
  const { rows } = await ctx.db.query("INSERT INTO items (n) VALUES ($1) RETURNING id", [req.body.n]);
  const res = await ctx.fetch(STUB + "/v1/charges", { method: "POST", body: { id: rows[0].id } });
  return { status: 200, body: { id: rows[0].id, charge: (await res.json()).id } };
}
"""

TARGETS = {"recording_cost_max": 0.15, "p50_added_ms_max": 2.0, "acquire_p50_ms_max": 1.0}
# Added latency is measured two ways, one request at a time: back to back, and started at a light,
# fixed rate. Neither is clean on its own here: back to back, the work that readies the next
# request's fresh context (on other threads) competes with the next request on 2 cores; at a light
# rate, every p50 grows (the bare handler's from 1.0 to 1.3-3.5 ms, apparently waking idle CPUs).
# The target is judged on the worse of the two.
LIGHT_RATE = 50.0  # requests per second


# --- servers run as subprocesses of this script ----------------------------------------------

def run_stub(port: int) -> None:
    """A fixed-answer HTTP/1.1 keep-alive server: cheap, so it never becomes the bottleneck."""
    body = b'{"id": "ch_123"}'
    response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                writer.write(response)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def run_bare(port: int, dsn: str, stub: str) -> None:
    """The floor: the same insert and outbound call in a plain Quart handler, with the same
    HTTP client library as Flux's ctx.fetch (aiohttp), so that the difference is Flux's own."""
    import aiohttp
    from hypercorn.asyncio import serve
    from hypercorn.config import Config
    from psycopg_pool import AsyncConnectionPool
    from quart import Quart, request

    app = Quart("bare")
    state: dict = {}

    @app.before_serving
    async def start() -> None:
        state["pool"] = AsyncConnectionPool(dsn, min_size=4, max_size=32, open=False)
        await state["pool"].open(wait=True)
        state["http"] = aiohttp.ClientSession()

    @app.after_serving
    async def stop() -> None:
        await state["http"].close()

    async def insert(n: int) -> int:
        async with state["pool"].connection() as conn:
            cur = await conn.execute("INSERT INTO items (n) VALUES (%s) RETURNING id", (n,))
            (item_id,) = await cur.fetchone()
        return item_id

    async def charge(item_id: int) -> str:
        async with state["http"].post(stub + "/v1/charges", json={"id": item_id}, timeout=aiohttp.ClientTimeout(total=10)) as res:
            return (await res.json())["id"]

    @app.post("/item")
    async def item():
        item_id = await insert((await request.get_json())["n"])
        return {"id": item_id, "charge": await charge(item_id)}

    # One part of /item each, for bench/gateway_parts.py (PARTS).
    @app.post("/noop")
    async def noop():
        return {"n": (await request.get_json())["n"]}

    @app.post("/db")
    async def db():
        return {"id": await insert((await request.get_json())["n"])}

    @app.post("/fetch")
    async def fetch():
        return {"charge": await charge((await request.get_json())["n"])}

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    shutdown = asyncio.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, shutdown.set)
        await serve(app, config, shutdown_trigger=shutdown.wait)

    asyncio.run(main())


# --- the load generator ----------------------------------------------------------------------

class _Connection:
    """One HTTP/1.1 keep-alive connection that reopens when the server closes it (Hypercorn does
    after `keep_alive_max_requests`, 1000 by default); reconnecting is not counted in a request's time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, path: str, n: int) -> float:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        body = b'{"n": %d}' % n
        started = time.perf_counter()
        self.writer.write(b"POST %s HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                          % (path.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length, close = 0, False
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        await self.reader.readexactly(length)
        elapsed = time.perf_counter() - started
        if close:
            self.close()
        if status != 200:
            raise RuntimeError(f"{path} answered {status}")
        return elapsed

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def latency(port: int, path: str, count: int, rate: float | None = None) -> list[float]:
    """`count` requests one at a time on one connection: back to back, or started every 1/`rate`
    seconds (a request still running when the next is due delays it)."""
    connection = _Connection(port)
    out = []
    started = time.perf_counter()
    for i in range(count):
        if rate is not None:
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
        out.append(await connection.request(path, i))
    connection.close()
    return out


async def throughput(port: int, path: str, concurrency: int, seconds: float) -> tuple[int, list[float]]:
    deadline = time.perf_counter() + seconds
    times: list[float] = []

    async def worker(w: int) -> None:
        connection = _Connection(port)
        i = 0
        while time.perf_counter() < deadline:
            times.append(await connection.request(path, w * 1_000_000 + i))
            i += 1
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return len(times) / (time.perf_counter() - started), times


def python_loop_seconds() -> float:
    """How fast this machine runs Python now: 10 million additions at module level, as
    `python -c "s=0\nfor i in range(10_000_000): s+=i"` runs them (globals: about 2.6 times a
    function's locals), the figure bench/README.md quotes for the slow spells since 2026-12-06
    (1.15 to 1.8 s). Saved with each run, before and after its rounds, so that a run's figures can
    be read against the machine's spell."""
    started = time.perf_counter()
    exec("s = 0\nfor i in range(10_000_000): s += i", {})  # noqa: S102 -- a constant: module-level speed
    return round(time.perf_counter() - started, 3)


def save_results(out: Path | None, stem: str, data: dict, suffix: str = "") -> None:
    """`data` as JSON at `out`, or under bench/results/ as STEM-TIME(UTC)SUFFIX.json."""
    out = out or ROOT / "bench" / "results" / f"{stem}-{datetime.now(timezone.utc):%Y-%m-%d-%H%M}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": datetime.now(timezone.utc).isoformat(), **data}, indent=2))
    print(f"saved {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


# Where a `flux` request's time goes, from the spans of its trace row (ms): the gateway span holds
# the function span, which holds the INSERT's and the stub call's client spans; the gaps between
# them are the isolate's steps. The function span ends after the COMMIT.
PHASES = {
    "start_step": "acquire + start step, to the first ctx call",
    "insert": "INSERT (with BEGIN and the context message)",
    "settle_step": "settle step, to the second ctx call",
    "stub_call": "stub call",
    "last_step_and_commit": "last settle step + COMMIT",
    "gateway_outside_function": "gateway, outside the function span",
}


def span_phases(spans: list[dict]) -> dict[str, float] | None:
    kinds = {s["attributes"].get("flux.kind"): s for s in spans}
    if not {"gateway", "function", "db", "fetch"} <= kinds.keys():
        return None
    gateway, function, db, fetch = kinds["gateway"], kinds["function"], kinds["db"], kinds["fetch"]

    def end(span: dict) -> float:
        return span["start"] + span["duration_ms"]

    return {"start_step": db["start"] - function["start"], "insert": db["duration_ms"],
            "settle_step": fetch["start"] - end(db), "stub_call": fetch["duration_ms"],
            "last_step_and_commit": end(function) - end(fetch),
            "gateway_outside_function": gateway["duration_ms"] - function["duration_ms"]}


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for port {port} exited with {proc.returncode}: see {proc.args}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def acquire_in_process(project: Path, samples: int) -> dict:
    from flux.project import load_project
    from flux.runtime.isolate import IsolatePool, compile_function

    async def main() -> list[float]:
        fn = load_project(project).functions["item"]
        pool = IsolatePool(compile_function(fn), size=4, memory_mb=128)
        pool.warm_now()
        for _ in range(samples):
            pool.release(await pool.acquire())
            await asyncio.sleep(0.004)  # a request's worth of time: the pool renews and refills meanwhile
        times = list(pool.acquire_times)
        pool.close()
        empty = IsolatePool(compile_function(fn), size=0, memory_mb=128)
        for _ in range(50):
            empty.discard(await empty.acquire())
        cold = list(empty.acquire_times)
        return times, cold

    warm, cold = asyncio.run(main())
    return {"samples": len(warm), "warm_p50_ms": pct(warm, 0.5), "warm_p99_ms": pct(warm, 0.99),
            "cold_p50_ms": pct(cold, 0.5), "cold_p99_ms": pct(cold, 0.99)}


class Rig:
    """What every server is measured against: a throwaway cluster with the `items` table and
    Flux's trace store, the stub, the bare server, and a project whose function calls the stub.
    Servers run as subprocesses, each logging to a file (a full pipe would stall it)."""

    def __init__(self, prefix: str) -> None:
        from flux.pg.cluster import Cluster

        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        os.chmod(self.tmp, 0o755)
        (self.tmp / "cluster").mkdir()
        os.chmod(self.tmp / "cluster", 0o777)  # initdb runs as an unprivileged user under root
        self.cluster = Cluster(state_dir=self.tmp / "cluster", settings={"max_connections": "200"})
        self.project = self.tmp / "project"
        self.procs: list[subprocess.Popen] = []
        self.flux: list[subprocess.Popen] = []
        self.dsn = ""
        self.stub = ""
        self.bare_port = 0
        self.bare: subprocess.Popen | None = None

    def start(self) -> None:
        import psycopg

        from flux.gateway.server import ensure_store
        from flux.pg.cluster import free_port

        self.dsn = self.cluster.start().dsn
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, n bigint NOT NULL)")
        ensure_store(self.dsn)
        stub_port = free_port()
        stub = self.stub = f"http://127.0.0.1:{stub_port}"
        (self.project / "functions").mkdir(parents=True)
        (self.project / "flux.toml").write_text(f'[project]\nname = "bench"\n[tools]\n"127.0.0.1:{stub_port}" = "stub"\n')
        (self.project / "functions" / "item.js").write_text(f"const STUB = {json.dumps(stub)};\n" + FUNCTION)
        self.spawn([sys.executable, __file__, "--stub", str(stub_port)], stub_port)
        self.bare_port = free_port()
        self.bare = self.spawn([sys.executable, __file__, "--bare", str(self.bare_port), self.dsn, stub], self.bare_port)

    def spawn(self, argv: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"server-{len(self.procs)}.log", "w")
        proc = subprocess.Popen(argv, cwd=self.project, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})
        self.procs.append(proc)
        wait_listening(port, proc)
        return proc

    def spawn_flux(self, port: int, extra: list[str], env: dict[str, str] | None = None,
                   dsn: str | None = None) -> subprocess.Popen:
        """`flux serve` without the engine, as the bench runs it; `env` may point PYTHONPATH at another
        tree, and `dsn` at another database."""
        proc = self.spawn([sys.executable, "-m", "flux", "serve", "--database", dsn or self.dsn, "--no-engine", "--workers", "64",
                           "--port", str(port), "--pool-size", "8", *extra], port, env)
        self.flux.append(proc)
        return proc

    def stop_flux(self) -> None:
        """Stop the flux servers gracefully, so that they write the trace records they hold."""
        for proc in self.flux:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.flux:
            proc.wait(timeout=60)
        self.flux.clear()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        self.cluster.destroy()
        shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stub", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub:
        return run_stub(args.stub)
    if args.bare:
        return run_bare(int(args.bare[0]), args.bare[1], args.bare[2])

    seconds = args.seconds or (4.0 if args.quick else 8.0)
    rounds = args.rounds or (2 if args.quick else 3)
    latency_count = 200 if args.quick else 400
    light_count = 150 if args.quick else 250

    import psycopg

    from flux.pg.cluster import free_port

    rig = Rig("flux-bench-gateway-")
    try:
        loop_before = python_loop_seconds()
        print(f"a Python loop of 10 million additions: {loop_before:.2f} s", flush=True)
        print("starting PostgreSQL …", flush=True)
        rig.start()
        dsn, project = rig.dsn, rig.project
        # The isolate-per-request server's own project: its function has its own name, so its trace
        # rows stay out of the acquire figures read back below.
        isolates_project = rig.tmp / "project-isolates"
        (isolates_project / "functions").mkdir(parents=True)
        (isolates_project / "flux.toml").write_text((project / "flux.toml").read_text())
        (isolates_project / "functions" / "item_isolates.js").write_text((project / "functions" / "item.js").read_text())
        servers = {"bare": (rig.bare_port, "/item")}
        for name, extra, env, path in (
            ("flux", ["--project", str(project)], None, "/item"),
            ("flux-norecord", ["--project", str(project), "--no-record"], None, "/item"),
            ("flux-isolates", ["--project", str(isolates_project)], {"FLUX_REALMS": "off"}, "/item_isolates"),
        ):
            port = free_port()
            rig.spawn_flux(port, extra, env)
            servers[name] = (port, path)

        results: dict[str, list[dict]] = {name: [{} for _ in range(rounds)] for name in servers}
        for name, (port, path) in servers.items():  # warm-up, not counted
            asyncio.run(throughput(port, path, args.concurrency, 2.0))
        windows: dict[str, list[tuple[float, float]]] = {"light": [], "back_to_back": []}  # the flux server's, epoch s
        # Every latency round first, then every throughput round (see bench/README.md): a latency
        # phase that follows another server's 8 s at full load measures how this machine recovers
        # from it as much as the server. Latency rounds alternate the servers' order, so that no
        # server always runs first or after the same neighbour.
        for r in range(rounds):
            order = list(servers.items()) if r % 2 == 0 else list(reversed(servers.items()))
            for name, (port, path) in order:
                t0 = time.time()
                light = asyncio.run(latency(port, path, light_count, LIGHT_RATE))
                t1 = time.time()
                lat = asyncio.run(latency(port, path, latency_count))
                if name == "flux":
                    windows["light"].append((t0, t1))
                    windows["back_to_back"].append((t1, time.time()))
                row = results[name][r]
                row.update({"light_p50_ms": pct(light, 0.5), "light_p99_ms": pct(light, 0.99),
                            "latency_p50_ms": pct(lat, 0.5), "latency_p99_ms": pct(lat, 0.99)})
                print(f"round {r + 1} {name:14} at {LIGHT_RATE:.0f} req/s p50 {row['light_p50_ms']:5.2f} ms"
                      f" p99 {row['light_p99_ms']:5.2f}  back to back p50 {row['latency_p50_ms']:5.2f} p99 {row['latency_p99_ms']:5.2f}",
                      flush=True)
        for r in range(rounds):
            for name, (port, path) in servers.items():
                rps, times = asyncio.run(throughput(port, path, args.concurrency, seconds))
                row = results[name][r]
                row.update({"rps": rps, "load_p50_ms": pct(times, 0.5), "load_p99_ms": pct(times, 0.99)})
                print(f"round {r + 1} {name:14} {rps:8.0f} req/s at {args.concurrency} connections"
                      f"  p50 {row['load_p50_ms']:.1f} ms p99 {row['load_p99_ms']:.1f}", flush=True)
        rig.stop_flux()

        summary = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in results.items()}
        with psycopg.connect(dsn) as conn:
            served = [r[0] for r in conn.execute(
                "SELECT (s->'attributes'->>'flux.isolate_acquire_ms')::float FROM flux.trace_requests t,"
                " jsonb_array_elements(t.spans) s WHERE t.function = 'item' AND s->'attributes'->>'flux.kind' = 'function'")]
            traces = conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone()[0]
            rows = conn.execute("SELECT extract(epoch FROM started_at)::float, spans FROM flux.trace_requests"
                                " WHERE function = 'item' AND status = 200").fetchall()
        breakdown: dict[str, dict[str, float]] = {}
        for phase, spans_of_phase in windows.items():
            found = [span_phases(spans) for started, spans in rows if any(a <= started <= b for a, b in spans_of_phase)]
            found = [f for f in found if f is not None]
            breakdown[phase] = {k: statistics.median(f[k] for f in found) for k in PHASES} if found else {}
            breakdown[phase]["requests"] = len(found)
        acquire = acquire_in_process(project, 300 if args.quick else 1000)
        acquire["served_p50_ms"] = statistics.median(served) if served else None
        acquire["served_p99_ms"] = sorted(served)[int(len(served) * 0.99)] if served else None
        acquire["served_samples"] = len(served)

        recording_cost = 1 - summary["flux"]["rps"] / summary["flux-norecord"]["rps"]
        added_p50 = summary["flux"]["light_p50_ms"] - summary["bare"]["light_p50_ms"]
        added_back_to_back = summary["flux"]["latency_p50_ms"] - summary["bare"]["latency_p50_ms"]
        verdict = {
            "recording_cost": recording_cost,
            "recording_cost_ok": recording_cost <= TARGETS["recording_cost_max"],
            "p50_added_ms": added_p50,
            "p50_added_back_to_back_ms": added_back_to_back,
            "p50_added_ok": max(added_p50, added_back_to_back) <= TARGETS["p50_added_ms_max"],
            "flux_vs_bare_rps": summary["flux"]["rps"] / summary["bare"]["rps"],
            "acquire_p50_ms": acquire["warm_p50_ms"],
            "acquire_ok": acquire["warm_p50_ms"] <= TARGETS["acquire_p50_ms_max"],
            # Diagnostics, not targets: what realms save against a whole isolate per request.
            "realms_save_back_to_back_ms": summary["flux-isolates"]["latency_p50_ms"] - summary["flux"]["latency_p50_ms"],
            "realms_save_light_ms": summary["flux-isolates"]["light_p50_ms"] - summary["flux"]["light_p50_ms"],
            "realms_throughput_gain": summary["flux"]["rps"] / summary["flux-isolates"]["rps"],
        }
        print()
        print(f"recording cost        {recording_cost * 100:5.1f}% of throughput   (target <= 15%)  "
              f"{'MET' if verdict['recording_cost_ok'] else 'NOT MET'}")
        print(f"p50 added over bare   {added_p50:5.2f} ms at {LIGHT_RATE:.0f} req/s, {added_back_to_back:.2f} ms back to back"
              f"   (target <= 2 ms, both)  {'MET' if verdict['p50_added_ok'] else 'NOT MET'}")
        print(f"warm acquire p50      {acquire['warm_p50_ms']:5.3f} ms (p99 {acquire['warm_p99_ms']:.3f})   (target <= 1 ms)  "
              f"{'MET' if verdict['acquire_ok'] else 'NOT MET'}")
        print(f"  under load, from recorded spans: p50 {acquire['served_p50_ms'] or 0:.2f} ms, p99 {acquire['served_p99_ms'] or 0:.2f} ms;"
              f" cold (empty pool) p50 {acquire['cold_p50_ms']:.2f} ms")
        print(f"flux / bare throughput {verdict['flux_vs_bare_rps']:.2f}x; {traces} trace rows written")
        print(f"realms against an isolate per request (flux-isolates): p50 {verdict['realms_save_back_to_back_ms']:.2f} ms"
              f" less back to back, {verdict['realms_save_light_ms']:.2f} ms less at {LIGHT_RATE:.0f} req/s,"
              f" {verdict['realms_throughput_gain']:.2f}x the throughput")

        print(f"where a flux request's time goes, p50 from its spans (ms):  at {LIGHT_RATE:.0f} req/s | back to back")
        for key, label in PHASES.items():
            light_ms, b2b_ms = breakdown["light"].get(key), breakdown["back_to_back"].get(key)
            if light_ms is not None and b2b_ms is not None:
                print(f"  {label:55} {light_ms:6.2f} | {b2b_ms:6.2f}")

        loop_after = python_loop_seconds()
        print(f"a Python loop of 10 million additions: {loop_before:.2f} s before the rounds, {loop_after:.2f} s after")
        save_results(args.out, "gateway", {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "python_loop_10m_s": {"before": loop_before, "after": loop_after}},
            "config": {"concurrency": args.concurrency, "seconds": seconds, "rounds": rounds, "latency_requests": latency_count,
                       "phases": "latency rounds (alternating order), then throughput rounds",
                       "light_rate_per_s": LIGHT_RATE, "light_requests": light_count},
            "targets": TARGETS, "rounds": results, "median": summary, "acquire": acquire, "verdict": verdict,
            "breakdown": breakdown,
        }, "-quick" if args.quick else "")
    finally:
        rig.close()


if __name__ == "__main__":
    main()
