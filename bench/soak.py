"""A soak of `flux serve`: a sustained mixed load for minutes, sampling what could grow.

It makes a scratch project (functions that succeed with a DB write and a call to the payment
stub, throw, time out, run out of memory, return what JSON cannot hold, log a lot, use steps,
leave timers pending), starts a throwaway cluster and `flux serve --attach --reload` on it, and
drives a modest mixed load (bad requests and clients that hang up included), touching a function
file every minute. Every --sample seconds it records the gateway's RSS, fds and threads, what
lives in its Python heap (a probe loaded through bench/soak_probe/sitecustomize.py: objects by
type, V8 contexts and value handles, prepared statements per connection, asyncio tasks),
`/_flux/health` (trace writer), the connections in pg_stat_activity and what could hold back
vacuum, the slot's lag, and p50/p99 latency of the window; with --idle-minutes, then with no load.
The summary lists, per series, its first and last value and whether it only went up. JSON goes to
bench/results/soak-<date>-<time>.json. bench/README.md says more.

    .venv/bin/python bench/soak.py --minutes 10 --rate 60
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from flux.pg.cluster import Cluster  # noqa: E402

KEY = "key-soak"
FUNCTIONS = {
    "ok": """export default async function (req, ctx) {
  const { rows } = await ctx.db.query("INSERT INTO soak_items (note) VALUES ($1) RETURNING id", [req.body?.note ?? "x"]);
  const res = await ctx.fetch(ctx.secrets.STUB + "/v1/customers", { method: "POST", body: JSON.stringify({ email: "a@b" }) });
  const customer = await res.json();
  const again = await ctx.db.query("SELECT id, note FROM soak_items WHERE id = $1", [rows[0].id]);
  return { status: 201, body: { item: again.rows[0], customer: customer.id } };
}""",
    "throws": """export default async function (req, ctx) {
  await ctx.db.query("SELECT 1");
  throw new Error("boom " + Math.random());
}""",
    "sleepy": """export default async function (req, ctx) {
  await new Promise((resolve) => setTimeout(resolve, 60000));
  return { body: "never" };
}""",
    "spin": """export default async function (req, ctx) { for (;;) {} }""",
    "oom": """export default async function (req, ctx) {
  const keep = [];
  for (;;) keep.push(new Array(100000).fill(Math.random()));
}""",
    "unser": """export default async function (req, ctx) {
  return { body: { when: new Map([[1, 2]]), n: 10n } };
}""",
    "loud": """export default async function (req, ctx) {
  for (let i = 0; i < 200; i++) ctx.log("line " + i, { i, pad: "p".repeat(200) });
  console.log("big", "x".repeat(20000));
  return { body: { logged: 201 } };
}""",
    "steps": """export default async function (req, ctx) {
  const a = await ctx.step("first", async () => (await ctx.db.query("SELECT count(*) AS n FROM soak_items")).rows[0].n);
  const b = await ctx.step("second", async () => ctx.step("inner", async () => crypto.randomUUID()));
  return { body: { a, b } };
}""",
    "pending": """export default async function (req, ctx) {
  setTimeout(() => {}, 600000);
  new Promise(() => {});
  ctx.db.query("SELECT pg_sleep(0.01)").catch(() => {});
  return { body: "left things behind" };
}""",
    "dbslow": """export default async function (req, ctx) {
  await ctx.db.query("INSERT INTO soak_items (note) VALUES ('slow')");
  await ctx.db.query("SELECT pg_sleep(0.2)");
  return { body: "slow" };
}""",
    "hello": """export default async function (req, ctx) {
  return { body: { hello: req.body?.name ?? "world", now: new Date().toISOString() } };
}""",
}
# (weight, kind): kinds are functions by name or the bad-request forms below.
MIX = [(30, "ok"), (20, "hello"), (8, "throws"), (1, "sleepy"), (0.3, "spin"), (0.3, "oom"), (5, "unser"), (5, "loud"),
       (8, "steps"), (5, "pending"), (3, "401"), (3, "404"), (3, "405"), (2, "413"), (3, "bad-json"),
       (1, "hangup-body"), (1, "hangup-running"), (1, "hangup-db")]


def write_project(root: Path, stub_port: int) -> None:
    (root / "functions").mkdir(parents=True)
    for name, source in FUNCTIONS.items():
        (root / "functions" / f"{name}.js").write_text(source + "\n")
    (root / "flux.toml").write_text(f"""[project]
name = "soak"

[limits]
timeout_ms = 1000
memory_mb = 64
max_body_bytes = 65536

[fetch]
allow = ["127.0.0.1:{stub_port}"]
timeout_ms = 500

[secrets]
STUB = "http://127.0.0.1:{stub_port}"

[tenants.soak]
api_keys = ["{KEY}"]
""")


async def one(session: aiohttp.ClientSession, base: str, kind: str) -> tuple[str, int, float]:
    headers = {"x-flux-api-key": KEY, "content-type": "application/json"}
    started = time.perf_counter()
    status = -1
    try:
        if kind == "hangup-body":
            status = await _hangup(base, full=False)
        elif kind == "hangup-running":
            status = await _hangup(base, full=True)
        elif kind == "hangup-db":
            status = await _hangup(base, full=True, path=b"/dbslow")
        else:
            method, path, data, hdrs = "POST", f"/{kind}", json.dumps({"note": "n", "name": "s"}), headers
            if kind == "401":
                path, hdrs = "/hello", {"content-type": "application/json"}
            elif kind == "404":
                path = f"/nope/{random.randrange(10**9)}"
            elif kind == "405":
                method, path = "GET", "/hello"
            elif kind == "413":
                path, data = "/hello", json.dumps({"name": "x" * 70000})
            elif kind == "bad-json":
                path, data = "/hello", "{not json"
            async with session.request(method, base + path, data=data, headers=hdrs) as resp:
                await resp.read()
                status = resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        status = -1
    return kind, status, time.perf_counter() - started


async def _hangup(base: str, *, full: bool, path: bytes = b"/sleepy") -> int:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"name": "gone"}'
    path = path if full else b"/hello"
    writer.write(b"POST " + path + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-flux-api-key: " + KEY.encode()
                 + b"\r\ncontent-length: " + str(len(body) + (0 if full else 100)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()  # a reset, as a client that dies does
    return 0


def proc_stats(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    cpu_s = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "cpu_s": cpu_s}


def pg_stats(dsn: str) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conns = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE client_port IS NOT NULL AND pid <> pg_backend_pid()"
                             " AND backend_type IN ('client backend', 'walsender')").fetchone()[0]
        slot = conn.execute("SELECT confirmed_flush_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
                            " FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()
        # An open transaction left behind (a request cut off, a hangup) would hold back vacuum for good.
        xact = conn.execute("SELECT count(*) FILTER (WHERE state LIKE 'idle in transaction%'),"
                            " coalesce(extract(epoch FROM max(now() - xact_start)), 0)::float8"
                            " FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                            " AND datname = current_database()").fetchone()
        xmin = conn.execute("SELECT greatest(max(age(backend_xmin)), 0), max(age(catalog_xmin))::int"
                            " FROM pg_stat_activity, pg_replication_slots WHERE slot_name = 'flux'").fetchone()
        traces = conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone()[0]
        mutations = conn.execute("SELECT count(*) FROM flux.state_mutations").fetchone()[0]
    return {"pg_connections": conns, "confirmed_lsn": slot[0] if slot else None, "lag_bytes": slot[1] if slot else None,
            "traces_rows": traces, "mutation_rows": mutations, "idle_in_xact": xact[0], "oldest_xact_s": round(xact[1], 2),
            "xmin_age": xmin[0], "slot_catalog_xmin_age": xmin[1]}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


async def drive(args: argparse.Namespace, base: str, gateway_pid: int, dsn: str, project: Path, probe: Path) -> list[dict]:
    samples: list[dict] = []
    window: list[tuple[str, int, float]] = []
    statuses: dict[str, dict[int, int]] = {}
    kinds, weights = [k for _, k in MIX], [w for w, _ in MIX]
    end = time.monotonic() + args.minutes * 60
    next_sample = time.monotonic() + args.sample
    next_reload = time.monotonic() + 60
    inflight: set[asyncio.Task] = set()
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=15)) as session:
        def done(task: asyncio.Task) -> None:
            inflight.discard(task)
            kind, status, took = task.result()
            window.append((kind, status, took))
            statuses.setdefault(kind, {}).setdefault(status, 0)
            statuses[kind][status] += 1

        interval = 1 / args.rate
        tick = time.monotonic()
        while time.monotonic() < end:
            tick += interval
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
            if len(inflight) < 200:
                task = asyncio.ensure_future(one(session, base, random.choices(kinds, weights)[0]))
                inflight.add(task)
                task.add_done_callback(done)
            now = time.monotonic()
            if now >= next_reload:
                next_reload += 60
                target = project / "functions" / "hello.js"
                target.write_text(target.read_text() + f"// reload {int(time.time())}\n")
            if now >= next_sample:
                next_sample += args.sample
                samples.append(await asyncio.to_thread(sample, args, base, gateway_pid, dsn, probe, window, statuses))
                window = []
        await asyncio.gather(*inflight, return_exceptions=True)
        row = await asyncio.to_thread(sample, args, base, gateway_pid, dsn, probe, window, statuses)
        row["partial"] = True  # a shorter window, with the last requests' stragglers: not summarized
        samples.append(row)
        # Then idle: what the load grew (isolates past --pool-size, pool connections) should go back.
        idle_end = time.monotonic() + args.idle_minutes * 60
        while time.monotonic() < idle_end:
            await asyncio.sleep(min(args.sample, max(0.0, idle_end - time.monotonic())))
            row = await asyncio.to_thread(sample, args, base, gateway_pid, dsn, probe, [], statuses)
            row["idle"] = True
            samples.append(row)
    return samples


samples_cpu: list[tuple[float, float]] = []  # (time, the gateway's CPU seconds) at each sample


def sample(args, base, pid, dsn, probe, window, statuses) -> dict:
    import urllib.request
    row: dict = {"t": round(time.time(), 1), **proc_stats(pid), **pg_stats(dsn)}
    with urllib.request.urlopen(base + "/_flux/health", timeout=10) as resp:
        health = json.loads(resp.read())
    traces = health.get("traces") or {}
    row.update({f"traces_{k}": traces.get(k) for k in ("pending", "written", "dropped", "failed", "pending_bytes")})
    row["engine_state"] = (health.get("engine") or {}).get("state")
    quick = [took for kind, status, took in window if kind in ("hello", "ok", "steps") and status in (200, 201)]
    row.update({"requests": len(window), "p50_ms": pct(quick, 0.5), "p99_ms": pct(quick, 0.99)})
    if samples_cpu:  # the gateway's CPU per request over the window: work that grows per request shows here
        last_t, last_cpu = samples_cpu[-1]
        spent_ms = (row["cpu_s"] - last_cpu) * 1000
        if row["t"] - last_t >= 1:  # a rate over a sliver of time says nothing
            row["cpu_ms_per_s"] = round(spent_ms / (row["t"] - last_t), 2)
        if window:
            row["cpu_ms_per_req"] = round(spent_ms / len(window), 2)
    samples_cpu.append((row["t"], row["cpu_s"]))
    try:
        live = json.loads(probe.read_text())
        row.update({k: live[k] for k in ("objects", "v8_contexts", "isolates_since_freeze", "v8_value_handles",
                                          "threads", "tasks")})
        row["py_threads"] = row.pop("threads") if "threads" in live else None
        row["threads"] = proc_stats(pid)["threads"]
        row["prepared_max"] = max(live["prepared_per_conn"], default=0)
        row["top_types"] = live["top_types"][:15]
        row["gc_collections"] = [g["collections"] for g in live["gc_stats"]]
    except (OSError, ValueError, KeyError):
        pass
    row["statuses"] = json.loads(json.dumps(statuses))
    print(json.dumps({k: v for k, v in row.items() if k not in ("top_types", "statuses")}), flush=True)
    return row


SERIES = ["rss_kb", "fds", "threads", "py_threads", "objects", "v8_contexts", "isolates_since_freeze", "v8_value_handles",
          "tasks", "cpu_ms_per_req", "cpu_ms_per_s", "pg_connections", "idle_in_xact", "oldest_xact_s", "xmin_age", "slot_catalog_xmin_age", "prepared_max", "lag_bytes", "traces_pending", "traces_dropped", "p50_ms", "p99_ms"]


def summarize(samples: list[dict]) -> dict:
    out = {}
    body = [s for s in samples if not s.get("idle") and not s.get("partial")]
    body = body[1:] if len(body) > 2 else body  # the first sample is the warm-up
    for name in SERIES:
        values = [s.get(name) for s in body if s.get(name) is not None]
        if not values:
            continue
        rising = len(values) > 2 and all(b >= a for a, b in zip(values, values[1:])) and values[-1] > values[0]
        out[name] = {"first": values[0], "last": values[-1], "min": min(values), "max": max(values),
                     "median": statistics.median(values), "only_rises": rising}
        idle = [s.get(name) for s in samples if s.get("idle") and s.get(name) is not None]
        if idle:
            out[name]["after_idle"] = idle[-1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=80, help="requests per second")
    parser.add_argument("--idle-minutes", type=float, default=0, help="then sample this long with no load")
    parser.add_argument("--sample", type=float, default=30, help="seconds between samples")
    parser.add_argument("--port", type=int, default=56500, help="the gateway's; the next two for PostgreSQL and the stub")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/scratch-soak"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    if args.dir.exists():
        shutil.rmtree(args.dir)
    project, state = args.dir / "project", args.dir / "pg"
    state.mkdir(parents=True)
    (state / "cluster.json").write_text(json.dumps({"port": args.port + 1}))
    write_project(project, args.port + 2)
    probe = args.dir / "probe.json"
    cluster = Cluster(state_dir=state)
    procs: list[subprocess.Popen] = []
    try:
        dsn = cluster.start().dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE soak_items (id bigserial PRIMARY KEY, note text, at timestamptz DEFAULT now())")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "flux/scaffold/stubs/payments.py"), "--port",
                                       str(args.port + 2)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench/soak_probe'}:{ROOT}", "FLUX_SOAK_PROBE": str(probe),
               "FLUX_SOAK_PROBE_SECONDS": str(max(5.0, args.sample / 3))}
        log = open(args.dir / "gateway.log", "w")
        gateway = subprocess.Popen([sys.executable, "-m", "flux", "serve", "--database", dsn, "--project", str(project),
                                    "--port", str(args.port), "--attach", "--reload", "--pool-size", "2", "--workers", "32"],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(gateway)
        base = f"http://127.0.0.1:{args.port}"
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", args.port), timeout=1).close()
                break
            except OSError:
                if gateway.poll() is not None:
                    raise SystemExit(f"flux serve exited: see {args.dir / 'gateway.log'}")
                time.sleep(0.1)
        samples = asyncio.run(drive(args, base, gateway.pid, dsn, project, probe))
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.stop()
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summarize(samples), "samples": samples}
    out = args.out or ROOT / "bench/results" / time.strftime("soak-%Y-%m-%d-%H%M.json", time.gmtime())
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name, s in result["summary"].items():
        print(f"{name:21} {s['first']!s:>10} -> {s['last']!s:>10}  (min {s['min']}, max {s['max']})"
              + (f"  idle: {s['after_idle']}" if "after_idle" in s else "") + ("  ONLY RISES" if s["only_rises"] else ""))
    print(f"written {out}")


if __name__ == "__main__":
    main()
