"""Gateway parts: what Flux adds to each part of the bench's request, against the same part in Python.

    .venv/bin/python bench/gateway_parts.py              # back to back, about 2 minutes
    .venv/bin/python bench/gateway_parts.py --rate 50    # requests started at 50 per second

`bench/gateway.py` measures one function, an INSERT and then a call to the stub. This splits it:
four functions, each served by `flux serve` and by the bare Quart handler (the same code as
`bench/gateway.py`'s), against the same cluster and stub:

- `noop`: returns at once (the gateway, the start step in a fresh realm, the trace record);
- `db`: the INSERT only (with Flux's BEGIN, context message and COMMIT);
- `fetch`: the stub call only;
- `item`: both, as `bench/gateway.py` runs it.

The servers are measured in blocks that alternate between them, path by path, and the added
latency is the median over blocks of Flux's p50 minus the bare handler's. Afterwards the `flux`
server's trace rows of the measured blocks (not the warm-up's) give where its time went: each
step (the isolate's turns, between `ctx` calls), each `ctx` call, and the gateway around the
function. Results go to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway import Rig, latency, pct, save_results, throughput  # noqa: E402 -- after the path is set

# The functions beside the bench's `item` (bench/gateway.py FUNCTION); the bare server has the same routes.
PARTS = {
    "noop": "export default async function (req, ctx) {\n  return { status: 200, body: { n: req.body.n } };\n}\n",
    "db": """export default async function (req, ctx) {
  const { rows } = await ctx.db.query("INSERT INTO items (n) VALUES ($1) RETURNING id", [req.body.n]);
  return { status: 200, body: { id: rows[0].id } };
}
""",
    "fetch": """export default async function (req, ctx) {
  const res = await ctx.fetch(STUB + "/v1/charges", { method: "POST", body: { id: req.body.n } });
  return { status: 200, body: { charge: (await res.json()).id } };
}
""",
}
PATHS = ("noop", "db", "fetch", "item")


def phases(spans: list[dict]) -> dict[str, float]:
    """Where one request's time went, from its trace row's spans (ms): `step 1` runs from the
    function's start (acquire and start step) to its first ctx call, `step N+1` from the end of
    call N to the next call or the function's end (the last one includes the COMMIT)."""
    kinds = {s["attributes"].get("flux.kind"): s for s in spans if s["kind"] != "client"}
    gateway, function = kinds["gateway"], kinds["function"]
    calls = sorted((s for s in spans if s["kind"] == "client"), key=lambda s: s["start"])
    out = {"gateway outside the function": gateway["duration_ms"] - function["duration_ms"]}
    at = function["start"]
    for number, call in enumerate(calls, 1):
        out[f"step {number}"] = call["start"] - at
        out[call["name"].split("(")[0]] = call["duration_ms"]
        at = call["start"] + call["duration_ms"]
    out[f"step {len(calls) + 1}" + (" + COMMIT" if any(c["name"].startswith("db.") for c in calls) else "")] = (
        function["start"] + function["duration_ms"] - at)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=8, help="blocks per path (default 8)")
    parser.add_argument("--requests", type=int, default=200, help="requests per server per block (default 200; with --rate, at most 2 seconds' worth)")
    parser.add_argument("--rate", type=float, default=None, help="start requests at this rate per second (default: back to back)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    requests = args.requests if args.rate is None else min(args.requests, int(args.rate * 2))

    import psycopg

    from flux.pg.cluster import free_port

    rig = Rig("flux-bench-parts-")
    try:
        print("starting PostgreSQL …", flush=True)
        rig.start()
        for name, source in PARTS.items():
            (rig.project / "functions" / f"{name}.js").write_text(f"const STUB = {json.dumps(rig.stub)};\n{source}")
        port = free_port()
        rig.spawn_flux(port, ["--project", str(rig.project)])
        servers = {"flux": port, "bare": rig.bare_port}
        for path in PATHS:  # warm-up, not counted
            for server_port in servers.values():
                asyncio.run(throughput(server_port, f"/{path}", 4, 1.0))
        blocks: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}
        measured_from = datetime.now(timezone.utc)  # the warm-up's trace rows are left out of the parts
        for block in range(args.blocks):
            for path in PATHS:
                row = {}
                for name in servers if block % 2 == 0 else reversed(servers):
                    times = asyncio.run(latency(servers[name], f"/{path}", requests, args.rate))
                    row[name] = pct(times[2:], 0.5)  # a block's first requests follow the other server's
                blocks[path].append(row)
            print(f"block {block + 1}/{args.blocks}", flush=True)
        rig.stop_flux()  # writes the trace rows it holds
        with psycopg.connect(rig.dsn) as conn:
            rows = conn.execute("SELECT function, spans FROM flux.trace_requests WHERE status = 200 AND started_at >= %s",
                                (measured_from,)).fetchall()

        summary: dict[str, dict] = {}
        for path in PATHS:
            added = [b["flux"] - b["bare"] for b in blocks[path]]
            split: dict[str, list[float]] = {}
            for function, spans in rows:
                if function == path:
                    for part, ms in phases(spans).items():
                        split.setdefault(part, []).append(ms)
            summary[path] = {
                "flux_p50_ms": statistics.median(b["flux"] for b in blocks[path]),
                "bare_p50_ms": statistics.median(b["bare"] for b in blocks[path]),
                "added_p50_ms": statistics.median(added), "added_min_ms": min(added), "added_max_ms": max(added),
                "flux_parts_p50_ms": {part: statistics.median(ms) for part, ms in split.items()},
            }
        mode = "back to back" if args.rate is None else f"started at {args.rate:g}/s"
        print(f"\np50, {mode}, median over {args.blocks} blocks of {requests} requests per server and path")
        print(f"{'path':6} {'flux':>7} {'bare':>7} {'added':>7}  {'added over blocks':>18}")
        for path, s in summary.items():
            print(f"/{path:5} {s['flux_p50_ms']:7.2f} {s['bare_p50_ms']:7.2f} {s['added_p50_ms']:+7.2f}"
                  f"  {s['added_min_ms']:+.2f} to {s['added_max_ms']:+.2f} ms")
        print("\nwhere a flux request's time went (p50 of each part over its trace rows, ms)")
        for path, s in summary.items():
            print(f"/{path:5} " + ", ".join(f"{part} {ms:.2f}" for part, ms in s["flux_parts_p50_ms"].items()))
        save_results(args.out, "gateway-parts", {
            "config": {"blocks": args.blocks, "requests": requests, "rate_per_s": args.rate},
            "summary": summary, "blocks": blocks,
        })
    finally:
        rig.close()


if __name__ == "__main__":
    main()
