"""Gateway A/B: does a change to Flux move its latency? Two source trees, served side by side.

    .venv/bin/python bench/gateway_ab.py                   # HEAD (A) against the working tree (B)
    .venv/bin/python bench/gateway_ab.py --a 65b06e5 --b . --sessions 4

`bench/gateway.py` judges the targets; this answers a narrower question with less noise. A flux
server's latency drifts over seconds to minutes with no change of work (the same process can be
0.5 to 0.8 ms slower for a while), so two servers measured once each differ by that much even when
their code is the same. Here:

- each session starts a fresh A server and a fresh B server (start order alternating), against the
  same cluster, stub and bare handler as `bench/gateway.py`;
- the session measures them in blocks, alternating the order: `--requests` back to back on each
  server per block, and every third block also requests at 50 per second;
- per block it records the p50 and, per request, the CPU time of each server's loop thread (from
  `/proc/PID/task/PID/schedstat`) and of its other threads (the rest of `/proc/PID/stat`'s total:
  isolates' threads and workers). Flux's p50 follows its loop thread's CPU per request closely
  (2026-12-06: p50 that CPU plus 0.8 to 1.25 ms, block by block).

The verdict is the median of B - A over paired blocks, with how many blocks B won. An A/A run (the
same code on both sides) shows what difference is noise: on 2026-12-06, 4 sessions gave -0.13 ms
back to back (B lower in 24 of 40 blocks) and -0.02 ms of loop CPU per request, so an effect
smaller than that needs more sessions. Results are saved under bench/results/.

Each side serves a database of its own on the same cluster (`flux serve` creates its `flux` schema),
so trees of different schema versions compare: a tree from before a schema change refuses a newer
schema, and before 2026-12-07 both sides shared one database and had to match.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway import LIGHT_RATE, Rig, latency, pct, save_results, throughput  # noqa: E402 -- after the path is set


def loop_cpu_ms(pid: int) -> float:
    """CPU time the process's main thread (the asyncio loop) has used so far, in ms."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e6


def process_cpu_ms(pid: int) -> float:
    """CPU time all of the process's threads have used so far, ended threads included, in ms
    (kernel ticks: 10 ms each, so read it over hundreds of requests)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def source_tree(side: str, ref_or_dir: str, scratch: Path) -> tuple[Path, bool]:
    """A directory holding `flux/`: the directory itself, or a git worktree of the ref (True: made here)."""
    path = Path(ref_or_dir)
    if (path / "flux").is_dir():
        return path.resolve(), False
    tree = scratch / f"tree-{side}"
    made = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), ref_or_dir],
                          capture_output=True, text=True)
    if made.returncode != 0:
        raise SystemExit(f"--{side.lower()} {ref_or_dir}: neither a directory holding flux/ nor a git ref of this"
                         f" repository ({made.stderr.strip()})")
    return tree, True


def measure(pid: int, port: int, count: int) -> tuple[float, float, float]:
    """p50 of `count` back-to-back requests (ms), and per request the CPU of the loop thread and of
    the process's other threads (isolates, workers) in ms."""
    loop_before, process_before = loop_cpu_ms(pid), process_cpu_ms(pid)
    times = asyncio.run(latency(port, "/item", count))
    loop = loop_cpu_ms(pid) - loop_before
    return pct(times, 0.5), loop / count, max(0.0, process_cpu_ms(pid) - process_before - loop) / count


def side_database(dsn: str, name: str) -> str:
    """A fresh database on the rig's cluster with the bench's table; its DSN."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    side = make_conninfo(dsn, dbname=name)
    with psycopg.connect(side, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, n bigint NOT NULL)")
    return side


KEYS = ("p50_ms", "loop_cpu_ms", "other_cpu_ms", "light_p50_ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", default="HEAD", help="a git ref, or a directory holding flux/ (default HEAD)")
    parser.add_argument("--b", default=str(ROOT), help="the same (default: the working tree)")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=10, help="blocks per session")
    parser.add_argument("--requests", type=int, default=300, help="back-to-back requests per server per block")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from flux.pg.cluster import free_port

    scratch = Path(tempfile.mkdtemp(prefix="flux-bench-ab-"))
    trees: dict[str, Path] = {}
    made: list[Path] = []
    rig = Rig("flux-bench-ab-")
    names = ("bare", "A", "B")
    blocks: list[dict[str, dict[str, float]]] = []
    try:
        for name, ref in (("A", args.a), ("B", args.b)):
            trees[name], was_made = source_tree(name, ref, scratch)
            if was_made:
                made.append(trees[name])
        print(f"A: {args.a} ({trees['A']})\nB: {args.b} ({trees['B']})\nstarting PostgreSQL …", flush=True)
        rig.start()
        dsns = {name: side_database(rig.dsn, f"bench_{name.lower()}") for name in ("A", "B")}
        asyncio.run(throughput(rig.bare_port, "/item", 16, 2.0))
        for session in range(args.sessions):
            servers = {"bare": (rig.bare.pid, rig.bare_port)}
            for name in ("A", "B") if session % 2 == 0 else ("B", "A"):
                port = free_port()
                proc = rig.spawn_flux(port, ["--project", str(rig.project)], {"PYTHONPATH": str(trees[name])},
                                      dsn=dsns[name])
                servers[name] = (proc.pid, port)
                asyncio.run(throughput(port, "/item", 16, 2.0))  # warm-up, not counted
            for block in range(args.blocks):
                row: dict[str, dict[str, float]] = {}
                for name in names if block % 2 == 0 else tuple(reversed(names)):
                    pid, port = servers[name]
                    p50, loop_cpu, other_cpu = measure(pid, port, args.requests)
                    row[name] = {"p50_ms": p50, "loop_cpu_ms": loop_cpu, "other_cpu_ms": other_cpu}
                    if block % 3 == 0:
                        row[name]["light_p50_ms"] = pct(asyncio.run(latency(port, "/item", 100, LIGHT_RATE)), 0.5)
                blocks.append(row)
            recent = blocks[-args.blocks:]
            print(f"session {session + 1}: " + "  ".join(
                f"{n} p50 {statistics.median(b[n]['p50_ms'] for b in recent):.2f} ms,"
                f" loop {statistics.median(b[n]['loop_cpu_ms'] for b in recent):.3f}"
                f" + other {statistics.median(b[n]['other_cpu_ms'] for b in recent):.3f} ms/req" for n in names), flush=True)
            rig.stop_flux()

        summary = {n: {k: statistics.median(b[n][k] for b in blocks if k in b[n]) for k in KEYS} for n in names}
        verdict = {}
        for key in KEYS:
            diffs = [b["B"][key] - b["A"][key] for b in blocks if key in b["A"]]
            verdict[key] = {"median_b_minus_a": statistics.median(diffs), "blocks": len(diffs),
                            "b_lower_in": sum(d < 0 for d in diffs)}
        print()
        for n in names:
            s = summary[n]
            print(f"{n:5} back to back p50 {s['p50_ms']:.3f} ms, CPU per request: loop {s['loop_cpu_ms']:.3f} ms,"
                  f" other threads {s['other_cpu_ms']:.3f} ms;"
                  f" at {LIGHT_RATE:.0f}/s p50 {s['light_p50_ms']:.3f} ms")
        for key, label in (("p50_ms", "back-to-back p50"), ("loop_cpu_ms", "loop CPU per request"),
                           ("other_cpu_ms", "other threads' CPU"), ("light_p50_ms", f"p50 at {LIGHT_RATE:.0f}/s")):
            v = verdict[key]
            print(f"B - A {label:22} {v['median_b_minus_a']:+.3f} ms (median over {v['blocks']} blocks; B lower in {v['b_lower_in']})")
        save_results(args.out, "gateway-ab", {
            "a": args.a, "b": args.b,
            "config": {"sessions": args.sessions, "blocks": args.blocks, "requests": args.requests, "light_rate_per_s": LIGHT_RATE},
            "median": summary, "verdict": verdict, "blocks": blocks,
        })
    finally:
        rig.close()
        for tree in made:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
