"""Exactly-once capture under crashes: a randomized fault harness for the CDC engine.

    .venv/bin/python bench/chaos.py --seed 1 --rounds 30
    .venv/bin/python bench/chaos.py --seed 1 --rounds 30 --faults kill9,pg_immediate   # replay a subset

Writers (`chaos_workload.py`) commit, roll back and interleave transactions on a throwaway
cluster while `flux cdc run`, reaching the server through a proxy that can cut its replication
connection, suffers faults at random moments: one to two per round, drawn with a seeded RNG
(printed, and saved), so a failing run replays with the same `--seed` and arguments. At the end
the engine catches up and `flux.state_mutations` is compared with the writers' log of what
committed. It prints a summary and writes JSON to bench/results/chaos-<date>-<time>-s<seed>.json.
A run that found a defect exits 1. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import psycopg  # noqa: E402
from chaos_workload import PUBLISHED, SCHEMA, Workload, compare  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from flux.cdc.attach import attach  # noqa: E402
from flux.pg.cluster import Cluster  # noqa: E402
from tests.proxy import ProxyProcess  # noqa: E402

FAULTS = ("kill9", "sigterm", "stall", "pg_immediate", "cut", "sink_kill", "walsender_kill", "lock_store", "store_fail")
# The store failing (disk full) for a while: as its COPY starts, or at its COMMIT (a deferred trigger).
STORE_FAIL = """
CREATE TABLE chaos_fail (mode text PRIMARY KEY, until timestamptz NOT NULL);
CREATE FUNCTION chaos_fail() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM public.chaos_fail WHERE mode = TG_ARGV[0] AND until > clock_timestamp()) THEN
        RAISE EXCEPTION 'chaos: the store fails (%)', TG_ARGV[0] USING ERRCODE = 'disk_full';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_fail_write BEFORE INSERT ON flux.state_mutations FOR EACH STATEMENT EXECUTE FUNCTION chaos_fail('write');
CREATE CONSTRAINT TRIGGER chaos_fail_commit AFTER INSERT OR UPDATE ON flux.cdc_progress DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION chaos_fail('commit');
"""
SETTINGS = {
    "fsync": "off", "full_page_writes": "off", "shared_buffers": "'256MB'", "max_wal_size": "'4GB'",
    "wal_sender_timeout": "'10s'",  # a cut connection's walsender holds the slot this long at most
    "logical_decoding_work_mem": "'4MB'",  # large transactions spill to disk on the server
}
ENGINE_STATEMENT_TIMEOUT_MS = 3000  # the store's locks, held longer than this, fail the engine's statements
SLOT = "SELECT confirmed_flush_lsn::text, restart_lsn::text, active, pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = 'flux'"


def lsn(text: str | None) -> int:
    if not text:
        return 0
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


class EngineProcess:
    """`flux cdc run`, or `flux serve` with its engine (`command`); every run logs to one file."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.command, self.log_path = command, log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "flux", *self.command], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int, timeout: float = 90.0) -> tuple[int | None, float]:
        began = time.monotonic()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout), time.monotonic() - began
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None, time.monotonic() - began

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()


class Monitor(threading.Thread):
    """Samples the slot each second: how much WAL it retains, and whether restart_lsn moves."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.halt = threading.Event()
        self.max_retained = 0
        self.max_restart_behind_confirmed = 0  # WAL the server keeps beyond what the engine has confirmed
        self.restart_moves = 0
        self.samples = 0
        self.last_restart = 0
        self.last_move = time.monotonic()
        self.longest_stall = 0.0

    def run(self) -> None:
        while not self.halt.wait(1.0):
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2) as conn:
                    row = conn.execute(SLOT).fetchone()
            except psycopg.Error:
                continue  # the server is restarting
            if row is None:
                continue
            confirmed, restart, current = lsn(row[0]), lsn(row[1]), lsn(row[3])
            self.samples += 1
            self.max_retained = max(self.max_retained, current - restart)
            self.max_restart_behind_confirmed = max(self.max_restart_behind_confirmed, confirmed - restart)
            now = time.monotonic()
            if restart > self.last_restart:
                self.restart_moves += 1
                self.last_restart, self.last_move = restart, now
            self.longest_stall = max(self.longest_stall, now - self.last_move)


def hold_lock(dsn: str, table: str, seconds: float) -> None:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            time.sleep(seconds)
            conn.rollback()
    except psycopg.Error:
        pass  # the server restarted meanwhile


def terminate(dsn: str, query: str) -> int:
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(f"SELECT count(pg_terminate_backend(pid)) FROM ({query}) q").fetchone()[0]
    except psycopg.Error:
        return 0


def wait_caught_up(dsn: str, engines: list[EngineProcess], timeout: float) -> float:
    began = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        target = lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
        while lsn(conn.execute(SLOT).fetchone()[0]) < target:
            for engine in engines:
                if not engine.alive():
                    engine.start()
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"the slot did not confirm {target:X} within {timeout}s")
            time.sleep(0.2)
    return time.monotonic() - began


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    faults = tuple(args.faults.split(",")) if args.faults else FAULTS
    scratch = Path(args.scratch) / f"chaos-s{args.seed}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for path in (scratch, *scratch.parents):
        if path == Path("/"):
            break
        os.chmod(path, os.stat(path).st_mode | 0o011)  # the server account traverses to its data directory
    (scratch / "cluster.json").write_text(json.dumps({"port": args.port}))
    cluster = Cluster(state_dir=scratch, settings=SETTINGS)
    info = cluster.start()
    dsn = info.dsn
    proxy = workload = monitor = None
    engines: list[EngineProcess] = []
    report: dict = {"seed": args.seed, "args": vars(args), "faults": [], "engine_exits": [], "sigterm": [], "stops": []}
    began = time.monotonic()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
        attach(dsn, tables=PUBLISHED)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(STORE_FAIL)
        proxy = ProxyProcess(dsn, port=args.port + 1)
        engine_dsn = make_conninfo(proxy.dsn, options=f"-c statement_timeout={ENGINE_STATEMENT_TIMEOUT_MS}")
        if args.engine == "serve":  # the engine inside the gateway's process; its DSN alone goes through the proxy
            subprocess.run([sys.executable, "-m", "flux", "init", str(scratch / "project")], check=True, capture_output=True,
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            commands = [["serve", "--project", str(scratch / "project"), "--database", dsn, "--engine-database", engine_dsn,
                         "--port", str(args.port + 2 + i), "--pool-size", "0"] for i in range(args.engines)]
        else:
            commands = [["cdc", "run", "--database", engine_dsn, "--batch-rows", str(args.batch_rows)]] * args.engines
        # Two or more: one streams, the others stand by and take over when it stops.
        engines = [EngineProcess(command, scratch / f"engine{i}.log") for i, command in enumerate(commands)]
        for engine in engines:
            engine.start()
        workload = Workload(dsn, writers=args.writers, seed=args.seed, large_every=args.large_every).start()
        monitor = Monitor(dsn)
        monitor.start()
        for round_ in range(args.rounds):
            length = rng.uniform(args.round_seconds * 0.5, args.round_seconds * 1.5)
            moments = sorted(rng.uniform(0, length) for _ in range(rng.randint(1, 2)))
            start = time.monotonic()
            for at in moments:
                time.sleep(max(0.0, start + at - time.monotonic()))
                fault = rng.choice(faults)
                detail = inject(fault, rng, dsn, cluster, proxy, engines, report)
                report["faults"].append({"round": round_, "fault": fault, "at": round(time.monotonic() - began, 2), **detail})
                print(f"round {round_:3d} t={time.monotonic() - began:7.1f}s {fault} {detail}", flush=True)
            time.sleep(max(0.0, start + length - time.monotonic()))
            for engine in engines:
                if engine.alive():
                    continue
                if args.engine == "serve" and engine.proc.returncode == 4:  # `flux serve` refuses to start on a server that is down
                    report["serve_refused_to_start"] = report.get("serve_refused_to_start", 0) + 1
                else:  # it exited on its own: a defect
                    report["engine_exits"].append({"round": round_, "code": engine.proc.returncode, "log": engine.tail()})
                    print(f"round {round_}: an engine exited on its own (code {engine.proc.returncode})\n{engine.tail()}", flush=True)
                engine.start()
            if workload.errors:
                raise workload.errors[0]
        # A healthy phase: the same load, no faults. restart_lsn must keep moving (WAL not piling up).
        healthy = Monitor(dsn)
        healthy.start()
        time.sleep(args.healthy_seconds)
        healthy.halt.set()
        healthy.join()
        report["healthy"] = {"seconds": args.healthy_seconds, "restart_lsn_moves": healthy.restart_moves,
                             "max_retained_wal_bytes": healthy.max_retained,
                             "max_restart_lsn_behind_confirmed_bytes": healthy.max_restart_behind_confirmed,
                             "longest_restart_lsn_stall_seconds": healthy.longest_stall}
        workload.stop()
        report["catch_up_seconds"] = round(wait_caught_up(dsn, engines, args.catch_up_timeout), 2)
        report["slot"] = slot_liveness(dsn)
        monitor.halt.set()
        report["slot"].update(max_retained_wal_bytes=monitor.max_retained, restart_lsn_moves=monitor.restart_moves,
                              max_restart_lsn_behind_confirmed_bytes=monitor.max_restart_behind_confirmed,
                              samples=monitor.samples)
        report["volumes"] = workload.volumes()
        report["problems"] = compare(dsn, workload)
        if report["slot"]["restart_lsn_pinned"]:
            report["problems"]["restart_lsn pinned while idle"] = report["slot"]
        if report["healthy"]["longest_restart_lsn_stall_seconds"] > 60:
            report["problems"]["restart_lsn stalled under healthy load"] = report["healthy"]
        if past := confirmed_past_store(dsn, report["stops"]):
            report["problems"]["confirmed before recorded (at a stop)"] = past
        report["stops_checked"] = sum("confirmed" in s for s in report["stops"])
        del report["stops"]
        report["engine_starts"] = sum(engine.starts for engine in engines)
        for engine in engines:
            if engine.alive():
                code, took = engine.signal(signal.SIGTERM)
                report["sigterm"].append({"final": True, "code": code, "seconds": round(took, 2)})
    finally:
        if monitor is not None:
            monitor.halt.set()
        if workload is not None:
            workload.stop()
        for engine in engines:
            engine.stop()
        if proxy is not None:
            proxy.close()
        if args.keep:
            cluster.stop()
        else:
            for log in scratch.glob("engine*.log"):
                shutil.copy(log, Path(args.scratch) / f"chaos-s{args.seed}-{log.name}")
            cluster.destroy()
            shutil.rmtree(scratch, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - began, 1)
    # -15: the signal came while Python was still importing, before the engine installed its
    # handlers; nothing had been read, so nothing is lost (counted, not a defect).
    report["sigterm_during_startup"] = sum(s["code"] == -signal.SIGTERM for s in report["sigterm"])
    bad_stops = [s for s in report["sigterm"] if s["code"] not in (0, -signal.SIGTERM) or s["seconds"] > 10]
    if bad_stops:
        report.setdefault("problems", {})["SIGTERM not a prompt clean exit"] = bad_stops
    if report["engine_exits"]:
        report.setdefault("problems", {})["engine exited on its own"] = report["engine_exits"]
    return report


def inject(fault: str, rng: random.Random, dsn: str, cluster: Cluster, proxy: ProxyProcess, engines: list[EngineProcess],
           report: dict) -> dict:
    if fault == "stall":  # a paused process (a VM frozen, a long GC): its walsender times out meanwhile
        engine = rng.choice(engines)
        if not engine.alive():
            return {"skipped": "engine was not running"}
        seconds = rng.uniform(1.0, 15.0)
        os.kill(engine.proc.pid, signal.SIGSTOP)
        threading.Timer(seconds, lambda proc=engine.proc: proc.poll() is None and proc.send_signal(signal.SIGCONT)).start()
        return {"engine": engines.index(engine), "seconds": round(seconds, 2)}
    if fault in ("kill9", "sigterm"):
        engine = rng.choice(engines)
        if not engine.alive():
            engine.start()
            return {"skipped": "engine was not running"}
        if fault == "kill9":
            os.kill(engine.proc.pid, signal.SIGKILL)
            engine.proc.wait()
            report["stops"].append(recorded_at_stop(dsn, single=len(engines) == 1))
            pause = rng.uniform(0, 1.0)
            time.sleep(pause)
            engine.start()
            return {"restart_after": round(pause, 2)}
        code, took = engine.signal(signal.SIGTERM)
        report["sigterm"].append({"code": code, "seconds": round(took, 2)})
        report["stops"].append(recorded_at_stop(dsn, single=len(engines) == 1))
        engine.start()
        return {"exit": code, "seconds": round(took, 2)}
    if fault == "pg_immediate":
        down = rng.uniform(0, 2.0)
        cluster.stop(mode="immediate")
        time.sleep(down)
        cluster.start()
        return {"down": round(down, 2)}
    if fault == "cut":
        proxy.cut_replication()
        return {}
    if fault == "sink_kill":
        return {"terminated": terminate(dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = 'flux-sink'")}
    if fault == "walsender_kill":
        return {"terminated": terminate(dsn, "SELECT active_pid AS pid FROM pg_replication_slots WHERE active_pid IS NOT NULL")}
    if fault == "lock_store":
        table = rng.choice(["flux.state_mutations", "flux.cdc_progress"])
        seconds = rng.uniform(0.5, 2 * ENGINE_STATEMENT_TIMEOUT_MS / 1000)
        threading.Thread(target=hold_lock, args=(dsn, table, seconds), daemon=True).start()
        return {"table": table, "seconds": round(seconds, 2)}
    if fault == "store_fail":
        mode, seconds = rng.choice(["write", "commit"]), rng.uniform(0.5, 3.0)
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute("INSERT INTO chaos_fail VALUES (%s, clock_timestamp() + %s * interval '1 second')"
                             " ON CONFLICT (mode) DO UPDATE SET until = excluded.until", (mode, seconds))
        except psycopg.Error:
            return {"skipped": "server down"}
        return {"mode": mode, "seconds": round(seconds, 2)}
    raise ValueError(fault)


CONFIRMED_WINDOW = 512 * 2**20  # bytes of WAL before the confirmed position whose transactions are checked


def recorded_at_stop(dsn: str, *, single: bool) -> dict:
    """Right after the engine stopped: the slot's confirmed position, and the transactions the
    store held just before it. Every one recorded later with a commit before that position must be
    among them: the server does not send again what was confirmed, so one missing was acknowledged
    before it was durable (`confirmed_past_store`)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            deadline = time.monotonic() + 10
            while single and conn.execute(SLOT).fetchone()[2] and time.monotonic() < deadline:
                time.sleep(0.02)  # the walsender has not noticed yet: it may still take an acknowledgement
            confirmed = conn.execute(SLOT).fetchone()[0]
            xids = [r[0] for r in conn.execute(
                "SELECT DISTINCT xid FROM flux.state_mutations WHERE commit_lsn < %s::pg_lsn AND commit_lsn >= %s::pg_lsn",
                (confirmed, format_lsn(max(0, lsn(confirmed) - CONFIRMED_WINDOW)))).fetchall()]
    except psycopg.Error:
        return {"skipped": "server down"}
    return {"confirmed": confirmed, "xids": xids}


def confirmed_past_store(dsn: str, stops: list[dict]) -> list[dict]:
    out = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for stop in stops:
            if "confirmed" not in stop:
                continue
            low = format_lsn(max(0, lsn(stop["confirmed"]) - CONFIRMED_WINDOW))
            later = conn.execute(
                "SELECT DISTINCT xid, commit_lsn::text FROM flux.state_mutations WHERE commit_lsn < %s::pg_lsn"
                " AND commit_lsn >= %s::pg_lsn AND NOT xid = ANY(%s)", (stop["confirmed"], low, stop["xids"])).fetchall()
            if later:
                out.append({"confirmed": stop["confirmed"], "recorded_later": later[:5], "count": len(later)})
    return out


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def slot_liveness(dsn: str, wait: float = 60.0) -> dict:
    """With the engine healthy and idle, restart_lsn must come close to the WAL's end (nothing pinned)
    on its own: the server logs the running transactions every 15 s, which lets it move."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        first = conn.execute(SLOT).fetchone()
        began = time.monotonic()
        deadline = time.monotonic() + wait
        while True:
            confirmed, restart, active, current = conn.execute(SLOT).fetchone()
            retained = lsn(current) - lsn(restart)
            if retained < 16 * 2**20 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    return {"restart_lsn_at_end": restart, "restart_lsn_before_idle": first[1], "confirmed_flush_lsn": confirmed,
            "retained_wal_bytes_idle": retained, "restart_lsn_pinned": retained >= 16 * 2**20,
            "idle_seconds_to_release": round(time.monotonic() - began, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--round-seconds", type=float, default=5.0, help="mean length of a round")
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=500, help="the engine's --batch-rows")
    parser.add_argument("--large-every", type=int, default=60, help="about one transaction in N is large")
    parser.add_argument("--engine", choices=["cdc", "serve"], default="cdc", help="`flux cdc run`, or the engine in `flux serve`")
    parser.add_argument("--engines", type=int, default=1, help="engine processes on the one slot (one streams, the others stand by)")
    parser.add_argument("--faults", help=f"comma-separated subset of {','.join(FAULTS)}")
    parser.add_argument("--port", type=int, default=56800, help="the cluster's port; the proxy takes the next one")
    parser.add_argument("--scratch", default="/tmp/flux-chaos", help="where the cluster and the engine's log go")
    parser.add_argument("--healthy-seconds", type=float, default=60.0, help="the load without faults, at the end")
    parser.add_argument("--catch-up-timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the cluster (stopped) and its data for a post-mortem")
    parser.add_argument("--out", help="JSON path (default bench/results/chaos-<date>-<time>-s<seed>.json)")
    args = parser.parse_args()
    print(f"chaos: seed {args.seed} (replay with --seed {args.seed} and the same arguments)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    report = run(args)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d-%H%M")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"chaos-{stamp}-s{args.seed}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    counts: dict[str, int] = {}
    for f in report["faults"]:
        counts[f["fault"]] = counts.get(f["fault"], 0) + 1
    print(f"\nseed {args.seed}: {args.rounds} rounds in {report['seconds']}s; faults {counts}")
    print(f"volumes {report.get('volumes')}")
    print(f"slot {report.get('slot')}")
    print(f"healthy phase {report.get('healthy')}")
    print(f"problems: {json.dumps(report.get('problems'), default=str)[:4000] if report.get('problems') else 'none'}")
    print(f"written to {out}")
    sys.exit(1 if report.get("problems") else 0)


if __name__ == "__main__":
    main()
