"""CDC benchmark: what capturing costs the write path, and how fast the engine drains a backlog.

    .venv/bin/python bench/cdc.py [--quick] [--out bench/results/cdc-DATE.json] [--profile] [--prepared]

One run starts its own throwaway PostgreSQL cluster (fsync, synchronous_commit and
full_page_writes on), runs two phases, prints a summary with the issue's targets judged on this
run, writes JSON, and destroys the cluster:

1. Steady state. pgbench's tpcb-like workload at full speed in these configurations: no capture
   (wal_level=replica, no slot, default replica identity); a generic row-audit trigger; Flux
   attached with the engine stopped (the write path's own cost: logical WAL, full old rows and a
   request-context message per transaction), after which the engine drains what piled up; Flux
   attached with the engine consuming concurrently (on this machine it competes with pgbench
   for the same cores); Flux attached, engine stopped, without the message (a diagnostic that
   splits the write path's cost). No capture and Flux attached (engine stopped) alternate in rounds;
   with `--prepared` each round also runs both with prepared statements (`pgbench -M prepared`).
2. Backlog. With the engine stopped, a server-side loop commits many tpcb-like transactions;
   then `pg_recvlogical` (the same pgoutput stream to a file: the limit of decoding here), the
   engine and pypgoutput's reader (in a virtualenv of its own) each drain it from their own slot,
   created at the same point. Decode-only peers then decode the same payloads in-process: Flux's
   decoder, pypgoutput's decoder, and Flux's decoder plus assembler (everything the engine does
   but I/O).

The machine is shared and noisy: compare figures within one run (the ratios), not across runs.
See bench/README.md for what each figure means. It does not measure a remote sink, network
latency between the engine and the server, or wide rows; the rows are pgbench's.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# flux/ is measured as it was when the run started: others may edit the tree meanwhile, and one
# run must not mix engines. The engine processes and the in-process peers import this copy.
SNAPSHOT = Path(tempfile.mkdtemp(prefix="flux-bench-src-"))
shutil.copytree(ROOT / "flux", SNAPSHOT / "flux", ignore=shutil.ignore_patterns("__pycache__"))
atexit.register(shutil.rmtree, SNAPSHOT, ignore_errors=True)
sys.path[:0] = [str(SNAPSHOT), str(ROOT / "bench")]

import psycopg  # noqa: E402
from cdc_probe import (  # noqa: E402
    BATCH_SQL, CONTEXT_SQL, LAG_SQL, BenchError, CpuWindow, Monitor, batching, context_summary, cpu_seconds,
    latency_summary, machine_info, parse_pgbench, peak_rss_mib, source_fingerprint, time_decoders, top_functions,
)  # fmt: skip
from cdc_pypgoutput import ensure_venv  # noqa: E402
from cdc_report import summary, targets  # noqa: E402
from cdc_workload import (  # noqa: E402
    AUDIT_INSTALL_SQL, AUDIT_REMOVE_SQL, BACKLOG_SQL, CHANGES_PER_TXN, TABLES, with_context_message,
)  # fmt: skip

from flux.cdc.attach import attach, detach  # noqa: E402
from flux.cdc.sink import PostgresCatalog  # noqa: E402
from flux.pg.cluster import Cluster, wait_until_accepting  # noqa: E402

PYTHON = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
SLOT = PUBLICATION = "flux"
PEEK_SLOT = "bench_peek"
PYPGOUTPUT_SLOT = "bench_pypgoutput"

# Normal durability, stated explicitly. A large max_wal_size and a long checkpoint_timeout keep
# checkpoints out of the measured windows; every measured run starts right after a CHECKPOINT.
SERVER_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "'512MB'",
    "max_wal_size": "'8GB'",
    "checkpoint_timeout": "'30min'",
}


@dataclass(frozen=True)
class Params:
    scale: int = 10  # pgbench -i -s
    clients: int = 8  # pgbench -c (2 cores: 8 clients saturate the CPU)
    threads: int = 2  # pgbench -j
    warmup_s: int = 5  # unmeasured pgbench run before each measured one
    run_s: int = 15  # each measured pgbench run
    # Rounds of (a) against (b), alternating which goes first (even: as often each). One round's ratio
    # had a standard deviation of 0.04 to 0.09 between runs here, so a median of 6 could be off by
    # 0.05 itself, as much as the cost judged; 12 rounds halve the variance.
    write_path_rounds: int = 12
    prepared: bool = False  # also (a') and (b') in every round: prepared statements, a diagnostic
    backlog_txns: int = 150_000  # x4 changes
    backlog_sessions: int = 2
    drain_rounds: int = 2  # pg_recvlogical and the engine alternate, each round on fresh slots; the best counts
    decode_repeats: int = 3  # decode peers alternate; the best time of each counts
    catchup_timeout_s: float = 180.0
    drain_timeout_s: float = 300.0
    pypgoutput_timeout_s: float = 900.0  # pypgoutput's reader is the slow peer: one round only


QUICK = Params(warmup_s=3, run_s=10, write_path_rounds=6, backlog_txns=125_000, drain_rounds=1, decode_repeats=2)


# -- the benchmark ---------------------------------------------------------------------------


class Bench:
    def __init__(self, params: Params, workdir: Path, *, profile: bool, pypgoutput: tuple[str | None, str | None]) -> None:
        self.params = params
        self.pypgoutput = pypgoutput  # (python of its virtualenv, or None and why not)
        self.workdir = workdir
        self.profile = profile
        self.children: list[subprocess.Popen] = []
        self.groups: list[int] = []  # process groups to end on cleanup (pypgoutput's reader forks)
        self.cluster: Cluster | None = None
        self.wal_level = ""
        self.port = 0
        self.bindir = ""

    # plumbing

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def sql(self, query: str, params: tuple | None = None) -> list[tuple]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def spawn(self, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(args, **kwargs)
        self.children.append(proc)
        return proc

    def start_cluster(self, wal_level: str) -> None:
        """(Re)start the one cluster of this run with `wal_level`."""
        cluster = Cluster(state_dir=self.workdir / "cluster", settings={**SERVER_SETTINGS, "wal_level": wal_level})
        if self.cluster is not None:
            self.cluster.stop()
        self.cluster = cluster
        info = cluster.start()
        self.port, self.bindir, self.wal_level = info.port, info.bindir, wal_level
        wait_until_accepting(self.dsn)

    def pgbench(self, seconds: int, script: Path | None = None, protocol: str = "simple") -> dict:
        """pgbench's built-in tpcb-like script, or `script` (a file) when given; `protocol` is pgbench's -M."""
        p = self.params
        # A custom script gets :scale only from -s (pgbench reads it from pgbench_branches for built-ins alone).
        workload = ["-f", str(script), "-s", str(p.scale)] if script else ["-b", "tpcb-like"]
        proc = self.spawn(
            [f"{self.bindir}/pgbench", "-n", "-M", protocol, *workload, "-c", str(p.clients), "-j", str(p.threads), "-T", str(seconds), self.dsn],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise BenchError(f"pgbench failed ({proc.returncode}): {err[-2000:]}")
        return parse_pgbench(out)

    def wait_confirmed(self, slot: str, target_lsn: str, timeout: float) -> float | None:
        """Seconds until `slot` confirmed `target_lsn`, or None on timeout."""
        t0 = time.monotonic()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() - t0 < timeout:
                done = conn.execute(
                    "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s", (target_lsn, slot)
                ).fetchone()
                if done and done[0]:
                    return time.monotonic() - t0
                time.sleep(0.05)
        return None

    def start_engine(self, name: str, slot: str = SLOT) -> subprocess.Popen:
        with (self.workdir / f"{name}.log").open("wb") as log:
            return self.spawn(
                [PYTHON, "-m", "flux", "cdc", "run", "--database", self.dsn, "--slot", slot, "--publication", PUBLICATION],
                cwd=SNAPSHOT, env={**os.environ, "PYTHONPATH": str(SNAPSHOT)}, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def engine_log(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def wait_streaming(self, proc: subprocess.Popen, name: str, timeout: float = 30) -> int:
        """The walsender pid once the engine's slot is active."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"engine exited with {proc.returncode}:\n{self.engine_log(name)}")
            row = self.sql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (SLOT,))
            if row and row[0][0]:
                return row[0][0]
            time.sleep(0.02)
        raise BenchError(f"engine did not start streaming within {timeout}s:\n{self.engine_log(name)}")

    def sink_pid(self) -> int | None:
        row = self.sql("SELECT pid FROM pg_stat_activity WHERE application_name = 'flux-sink' LIMIT 1")
        return row[0][0] if row else None

    def stop_process(self, proc: subprocess.Popen, timeout: float = 30) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cleanup(self) -> None:
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass  # already gone
        for proc in self.children:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.cluster is not None:
            self.cluster.destroy()
            self.cluster = None

    # phase 1: steady state

    def snapshot(self, *, flux: bool) -> tuple:
        """(server time, WAL position as int and text, mutations persisted so far)."""
        row = self.sql("SELECT clock_timestamp(), (pg_current_wal_lsn() - '0/0')::bigint, pg_current_wal_lsn()::text")[0]
        mutations = None
        if flux:
            got = self.sql("SELECT mutations FROM flux.cdc_progress WHERE slot_name = %s", (SLOT,))
            mutations = got[0][0] if got else 0
        return (*row, mutations)

    def wal_stats(self) -> tuple[int, int]:
        """(WAL records, full-page images) written by the server so far (pg_stat_wal, PostgreSQL 14+)."""
        return self.sql("SELECT wal_records, wal_fpi FROM pg_stat_wal")[0]

    def measured_run(
        self, label: str, *, script: Path | None = None, captured: bool = False,
        engine: subprocess.Popen | None = None, walsender: int | None = None, protocol: str = "simple",
    ) -> dict:  # fmt: skip
        """One pgbench window after a warm-up. `captured`: Flux's slot exists; `engine`: the engine
        consumes it meanwhile (it must have caught up with the warm-up before the window starts)."""
        p = self.params
        self.sql("VACUUM pgbench_branches, pgbench_tellers")
        self.sql("CHECKPOINT")
        warmup = self.pgbench(p.warmup_s, script, protocol)
        if engine is not None and self.wait_confirmed(SLOT, self.sql("SELECT pg_current_wal_lsn()::text")[0][0], p.catchup_timeout_s) is None:
            raise BenchError("the engine did not catch up with the warm-up run")
        print(f"  {label}: pgbench {p.clients} clients, {p.run_s}s ...", flush=True)
        pids = {"engine": engine.pid, "walsender": walsender, "sink_backend": self.sink_pid()} if engine else {}
        monitor = Monitor(self.dsn, flux=captured)
        monitor.start()
        ts0, lsn0, _, mut0 = self.snapshot(flux=captured)
        wal0 = self.wal_stats()
        window = CpuWindow(pids).start()
        bench = self.pgbench(p.run_s, script, protocol)
        cpu = window.stop()
        ts1, lsn1, lsn1_text, mut1 = self.snapshot(flux=captured)
        wal1 = self.wal_stats()
        txns = bench["transactions"] or None
        samples = monitor.stop()
        wall = cpu["wall_s"]
        run = {
            "wal_level": self.wal_level,
            "workload": f"tpcb-like + flux context message ({script.name})" if script else "tpcb-like (built-in)",
            "protocol": protocol,
            "pgbench": bench,
            "warmup_transactions": warmup["transactions"],
            "source_changes_per_s": round(CHANGES_PER_TXN * bench["transactions"] / wall),
            "wal_bytes_per_txn": round((lsn1 - lsn0) / txns) if txns else None,
            "wal_records_per_txn": round((wal1[0] - wal0[0]) / txns, 2) if txns else None,
            "wal_full_page_images_per_txn": round((wal1[1] - wal0[1]) / txns, 3) if txns else None,
            "cpu": cpu,
        }
        if captured:
            run["max_slot_lag_bytes"] = max((s[3] or 0 for s in samples), default=None)
        if engine is not None:
            catchup = self.wait_confirmed(SLOT, lsn1_text, p.catchup_timeout_s)
            ts_window = (ts0, ts1)
            run["persisted_changes_per_s"] = round((mut1 - mut0) / wall)
            run["persisted_in_window"] = mut1 - mut0
            run["catch_up_after_load_s"] = round(catchup, 2) if catchup is not None else None
            run["lag_by_commit_time"] = latency_summary(self.sql(LAG_SQL.format(column="commit_time"), ts_window))
            run["lag_by_recorded_at"] = latency_summary(self.sql(LAG_SQL.format(column="recorded_at"), ts_window))
            run["batching"] = batching(self.sql(BATCH_SQL.format(where="WHERE commit_time BETWEEN %s AND %s"), ts_window))
            recorded = run["lag_by_commit_time"]["rows"]
            run["recorded_vs_expected"] = {"recorded": recorded, "expected": CHANGES_PER_TXN * bench["transactions"]}
            if script:
                run["request_context"] = context_summary(self.sql(CONTEXT_SQL, ts_window))
            run["engine_peak_rss_mib"] = peak_rss_mib(engine.pid)
        run["timeline"] = {
            "columns": ["t_s", "wal_lsn_bytes"] + (["persisted_mutations", "slot_lag_bytes"] if captured else []),
            "samples": samples,
        }
        return run

    def audit_run(self) -> dict:
        """(d): the generic row-audit trigger on the four tables, no Flux."""
        self.sql(AUDIT_INSTALL_SQL)
        run = self.measured_run("(d) row-audit trigger (wal_level=replica)")
        rows, size = self.sql("SELECT count(*), pg_total_relation_size('audit_log') FROM audit_log")[0]
        expected = CHANGES_PER_TXN * (run["warmup_transactions"] + run["pgbench"]["transactions"])
        run["audit_log"] = {"rows": rows, "expected_rows": expected, "bytes": size}
        self.sql(AUDIT_REMOVE_SQL)
        return run

    def drain_after_stopped_window(self, stopped: dict) -> tuple[subprocess.Popen, int, dict]:
        """Start the engine after window (b) and time it until it has confirmed all of it.

        Returns the engine (left running for window (c)), its walsender, and the figures."""
        p = self.params
        target, lag = self.sql(
            "SELECT pg_current_wal_lsn()::text, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)
        )[0]  # fmt: skip
        mut0 = self.snapshot(flux=True)[3]
        print(f"  engine draining what window (b) left ({lag / 2**20:.0f} MiB of WAL) ...", flush=True)
        t0 = time.monotonic()
        engine = self.start_engine("engine-steady")
        walsender = self.wait_streaming(engine, "engine-steady")
        streaming = time.monotonic() - t0
        done = self.wait_confirmed(SLOT, target, p.catchup_timeout_s)
        seconds = time.monotonic() - t0
        if done is None:
            self.stop_process(engine)
            raise BenchError(f"the engine did not drain window (b) within {p.catchup_timeout_s:.0f}s: it falls behind")
        drained = self.snapshot(flux=True)[3] - mut0
        expected = CHANGES_PER_TXN * (stopped["warmup_transactions"] + stopped["pgbench"]["transactions"])
        return engine, walsender, {
            "seconds": round(seconds, 2),
            "streaming_after_s": round(streaming, 2),
            "slot_lag_bytes_at_start": lag,
            "changes": drained,
            "expected_changes": expected,
            "changes_per_s": round(drained / seconds) if seconds else None,
            "vs_load_seconds": round(seconds / (p.warmup_s + stopped["cpu"]["wall_s"]), 2),
        }

    def use_capture(self, captured: bool) -> None:
        """Restart the cluster as Flux attached (wal_level=logical, `flux attach`) or as no capture
        (wal_level=replica, no slot, the tables' own replica identity). Either way it restarts, so
        that both start alike."""
        if captured:
            self.start_cluster("logical")
            attach(self.dsn, tables=TABLES, slot=SLOT, publication=PUBLICATION)
        else:
            if self.wal_level == "logical":
                detach(self.dsn, slot=SLOT)  # a logical slot keeps the server from starting at wal_level=replica
            self.start_cluster("replica")

    def write_path(self, script: Path, prepared_script: Path) -> list[dict]:
        """Target (iii): rounds of no capture against Flux attached with the engine stopped (with
        `--prepared`, each also with prepared statements). Which goes first alternates, so that
        drift over the run falls on both alike; the last window is Flux's (b), so that the engine's
        drain of it follows."""
        p = self.params
        rounds = []
        for r in range(p.write_path_rounds):
            flux_first = (p.write_path_rounds - r) % 2 == 0  # the last round runs (a) first
            tag = f"round {r + 1}/{p.write_path_rounds}"
            got: dict = {"flux_first": flux_first}
            for captured in (flux_first, not flux_first):
                self.use_capture(captured)
                if captured:
                    if p.prepared:
                        got["flux_prepared"] = self.measured_run(
                            f"(b') {tag}: Flux attached, engine stopped, prepared statements",
                            script=prepared_script, captured=True, protocol="prepared",
                        )
                        # The drain after the last (b) counts (b)'s transactions only.
                        self.sql("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (SLOT,))
                    got["flux"] = self.measured_run(f"(b) {tag}: Flux attached, engine stopped", script=script, captured=True)
                else:
                    got["no_capture"] = self.measured_run(f"(a) {tag}: no capture (wal_level=replica)")
                    if p.prepared:
                        got["no_capture_prepared"] = self.measured_run(
                            f"(a') {tag}: no capture, prepared statements", protocol="prepared"
                        )
            got["tps_ratio"] = round(got["flux"]["pgbench"]["tps"] / got["no_capture"]["pgbench"]["tps"], 3)
            line = f"  {tag}: TPS (b)/(a) {got['tps_ratio']:.3f}"
            if p.prepared:
                got["prepared_tps_ratio"] = round(
                    got["flux_prepared"]["pgbench"]["tps"] / got["no_capture_prepared"]["pgbench"]["tps"], 3
                )
                line += f", prepared (b')/(a') {got['prepared_tps_ratio']:.3f}"
            print(line, flush=True)
            rounds.append(got)
        return rounds

    def steady(self) -> dict:
        p = self.params
        print(f"steady state: pgbench -i -s {p.scale}", flush=True)
        self.start_cluster("replica")
        subprocess.run([f"{self.bindir}/pgbench", "-i", "-q", "-s", str(p.scale), self.dsn], check=True, capture_output=True)
        builtin = subprocess.run([f"{self.bindir}/pgbench", "--show-script=tpcb-like"], capture_output=True, text=True, check=True)
        script = self.workdir / "tpcb-like-flux-context.sql"
        script.write_text(with_context_message(builtin.stderr or builtin.stdout))
        prepared_script = self.workdir / "tpcb-like-flux-context-prepared.sql"
        prepared_script.write_text(with_context_message(builtin.stderr or builtin.stdout, prepared=True))
        runs = {"audit_trigger": self.audit_run()}
        rounds = self.write_path(script, prepared_script)  # ends attached, right after a (b) window
        engine, walsender, drain = self.drain_after_stopped_window(rounds[-1]["flux"])
        try:
            runs["flux_engine_consuming"] = self.measured_run(
                "(c) Flux attached, engine consuming", script=script, captured=True, engine=engine, walsender=walsender
            )
        finally:
            self.stop_process(engine)
        if engine.returncode not in (0, -signal.SIGTERM):
            raise BenchError(f"engine exited with {engine.returncode}:\n{self.engine_log('engine-steady')}")
        # Diagnostic, not a target: (b) without the message splits its cost into capture (logical WAL,
        # full old rows) and the message (one more statement per transaction, and its WAL record).
        runs["flux_engine_stopped_no_message"] = self.measured_run("(b0) Flux attached, engine stopped, no message", captured=True)
        detach(self.dsn, slot=SLOT)

        base_tps = statistics.mean(r["no_capture"]["pgbench"]["tps"] for r in rounds)
        base_wal = statistics.mean(r["no_capture"]["wal_bytes_per_txn"] for r in rounds)
        ratios = [r["tps_ratio"] for r in rounds]
        prepared = [r["prepared_tps_ratio"] for r in rounds if "prepared_tps_ratio" in r]
        consuming = runs["flux_engine_consuming"]
        source = consuming["source_changes_per_s"]
        flux_wal = statistics.mean(r["flux"]["wal_bytes_per_txn"] for r in rounds)
        return {
            "script": script.read_text(),
            "prepared_script": prepared_script.read_text(),
            "write_path": {
                "rounds": rounds,
                "tps_ratio_median": round(statistics.median(ratios), 3),
                "tps_ratio_range": [min(ratios), max(ratios)],
                **({"prepared_tps_ratio_median": round(statistics.median(prepared), 3),
                    "prepared_tps_ratio_range": [min(prepared), max(prepared)]} if prepared else {}),
                "no_capture_tps_mean": round(base_tps, 1),
                "flux_tps_mean": round(statistics.mean(r["flux"]["pgbench"]["tps"] for r in rounds), 1),
            },
            **runs,
            "drain_after_engine_stopped": drain,
            "ratios": {
                # Peers measured once, against the mean of every (a) window.
                "tps_vs_no_capture": {name: round(runs[name]["pgbench"]["tps"] / base_tps, 3) for name in runs},
                "tps_message_vs_no_message": round(
                    rounds[-1]["flux"]["pgbench"]["tps"] / runs["flux_engine_stopped_no_message"]["pgbench"]["tps"], 3
                ),
                "wal_per_txn_vs_no_capture": {
                    "flux_engine_stopped": round(flux_wal / base_wal, 2),
                    **{name: round(runs[name]["wal_bytes_per_txn"] / base_wal, 2) for name in runs},
                },
                "persisted_vs_source_change_rate": round(consuming["persisted_changes_per_s"] / source, 3) if source else None,
            },
        }

    # phase 2: backlog

    def generate_backlog(self) -> dict:
        p = self.params
        per_session = p.backlog_txns // p.backlog_sessions
        sql = BACKLOG_SQL.format(n=per_session, accounts=100_000 * p.scale, branches=p.scale, tellers=10 * p.scale)
        errors: list[BaseException] = []

        def session() -> None:
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute("SET synchronous_commit = off")  # the generator's speed is not measured
                    conn.execute(sql)
            except BaseException as exc:  # reported by the caller
                errors.append(exc)

        lsn0 = self.sql("SELECT (pg_current_wal_lsn() - '0/0')::bigint")[0][0]
        t0 = time.monotonic()
        threads = [threading.Thread(target=session, daemon=True) for _ in range(p.backlog_sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise BenchError(f"backlog generation failed: {errors[0]}")
        elapsed = time.monotonic() - t0
        # The generator committed asynchronously: its last commits may not be written yet, so the
        # target is the insert position, once flushed (pg_current_wal_lsn() is the write position).
        target_int, target = self.sql("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint, pg_current_wal_insert_lsn()::text")[0]
        deadline = time.monotonic() + 30
        while not self.sql("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (target,))[0][0]:  # the WAL writer's job
            if time.monotonic() > deadline:
                raise BenchError(f"WAL up to {target} was not flushed within 30s")
            time.sleep(0.05)
        txns = per_session * p.backlog_sessions
        return {
            "transactions": txns,
            "changes": CHANGES_PER_TXN * txns,
            "generate_s": round(elapsed, 2),
            "wal_bytes": target_int - lsn0,
            "target_lsn": target,
        }

    def drain_recvlogical(self, target: str, changes: int, slot: str) -> dict:
        out = self.workdir / f"{slot}.out"  # pg_recvlogical appends to an existing file
        cmd = [
            f"{self.bindir}/pg_recvlogical", "-d", self.dsn, "--slot", slot, "--start",
            "-o", "proto_version=1", "-o", f"publication_names={PUBLICATION}", "-o", "messages=true",
            "-f", str(out), "--endpos", target, "--no-loop",
        ]  # fmt: skip
        t0 = time.monotonic()
        proc = self.spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        walsender, cpu_ws = None, None
        while proc.poll() is None and time.monotonic() - t0 < self.params.drain_timeout_s:
            if walsender is None:
                row = self.sql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,))
                walsender = row[0][0] if row and row[0][0] else None
                cpu0 = cpu_seconds(walsender)
            elif cpu0 is not None and (now := cpu_seconds(walsender)) is not None:
                cpu_ws = now - cpu0  # the last reading before the walsender exits
            time.sleep(0.05)
        if proc.poll() is None:
            raise BenchError(f"pg_recvlogical did not reach {target} in {self.params.drain_timeout_s}s")
        elapsed = time.monotonic() - t0
        if proc.returncode != 0:
            raise BenchError(f"pg_recvlogical failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        size = out.stat().st_size
        out.unlink()
        return {
            "seconds": round(elapsed, 2),
            "changes_per_s": round(changes / elapsed),
            "output_bytes": size,
            "walsender_cpu_s": round(cpu_ws, 2) if cpu_ws is not None else None,
        }

    def drain_pypgoutput(self, target: str, changes: int, slot: str) -> dict:
        """pypgoutput's LogicalReplicationReader, in its own virtualenv, from launch to exit."""
        python, why = self.pypgoutput
        if python is None:
            return {"error": f"no virtualenv for pypgoutput's reader: {why}"}
        cmd = [python, str(ROOT / "bench/cdc_pypgoutput.py"), self.dsn, slot, PUBLICATION, target, str(changes)]
        window = CpuWindow({}).start()
        t0 = time.monotonic()
        proc = self.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.groups.append(proc.pid)
        try:
            out, err = proc.communicate(timeout=self.params.pypgoutput_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            return {"error": f"did not reach {target} within {self.params.pypgoutput_timeout_s:.0f}s: {err.strip()[-800:]}"}
        elapsed = time.monotonic() - t0
        cpu = window.stop()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its extractor process, if it outlived the reader
        except OSError:
            pass
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            return {"error": f"exited with {proc.returncode}: {err.strip()[-800:]}"}
        got = json.loads(lines[-1])
        if got["changes_seen"] != changes:
            return {"error": f"the reader ended after {got['changes_seen']:,} of {changes:,} changes: {err.strip()[-800:]}", **got}
        return {
            "seconds": round(elapsed, 2),
            "changes_per_s": round(changes / elapsed),
            **got,
            "machine_busy_pct_of_all_cores": cpu["machine_busy_pct_of_all_cores"],
        }

    def drain_engine(self, target: str, changes: int, slot: str, *, profile: bool) -> dict:
        self.sql("TRUNCATE flux.state_mutations")  # each round records the same changes
        name = f"engine-drain-{slot}"
        t0 = time.monotonic()
        engine = self.start_engine(name, slot)
        marks: dict[str, float] = {}
        pids: dict[str, int | None] = {"engine": engine.pid}
        cpu0: dict[str, float | None] = {"engine": cpu_seconds(engine.pid)}
        cpu: dict[str, float] = {}
        profiler = None
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() - t0 < self.params.drain_timeout_s:
                if engine.poll() is not None:
                    raise BenchError(f"engine exited with {engine.returncode}:\n{self.engine_log(name)}")
                active, confirmed = conn.execute(
                    "SELECT active_pid, confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s", (target, slot)
                ).fetchone()
                got = conn.execute("SELECT mutations FROM flux.cdc_progress WHERE slot_name = %s", (slot,)).fetchone()
                now = time.monotonic() - t0
                if active and "streaming" not in marks:
                    marks["streaming"] = now
                    pids["walsender"], pids["sink_backend"] = active, self.sink_pid()
                    cpu0.update({k: cpu_seconds(pids[k]) for k in ("walsender", "sink_backend")})
                    profiler = self.start_profiler(engine.pid) if profile else None
                if got and got[0] and "first_row" not in marks:
                    marks["first_row"] = now
                if got and got[0] >= changes and "all_rows" not in marks:
                    marks["all_rows"] = now
                for who, pid in pids.items():
                    if (value := cpu_seconds(pid)) is not None and cpu0.get(who) is not None:
                        cpu[who] = value - cpu0[who]
                if confirmed:
                    marks["confirmed"] = now
                    break
                time.sleep(0.05)
        hwm = peak_rss_mib(engine.pid)
        self.stop_process(engine)
        top = self.read_profile(profiler) if profiler else None
        if "confirmed" not in marks:
            raise BenchError(f"the engine did not confirm {target} within {self.params.drain_timeout_s}s")
        recorded = self.sql("SELECT count(*) FROM flux.state_mutations")[0][0]
        batches = batching(self.sql(BATCH_SQL.format(where="")))
        elapsed = marks["confirmed"]
        streaming = marks["all_rows"] - marks["streaming"] if "all_rows" in marks else None
        return {
            "seconds": round(elapsed, 2),
            "changes_per_s": round(changes / elapsed),
            "marks_s": {k: round(v, 2) for k, v in marks.items()},
            "changes_per_s_while_streaming": round(changes / streaming) if streaming else None,
            "recorded_vs_expected": {"recorded": recorded, "expected": changes},
            "batching": batches,
            "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
            "engine_cpu_pct_of_one_core": round(100 * cpu.get("engine", 0) / elapsed, 1),
            "engine_peak_rss_mib": hwm,
            "profiled": profile,
            "profile_top": top,
        }

    def start_profiler(self, pid: int) -> tuple[subprocess.Popen, Path] | None:
        spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        if not Path(spy).exists():
            print("  (py-spy not installed: no profile)", flush=True)
            return None
        out = self.workdir / "engine-profile.txt"
        proc = self.spawn(
            [spy, "record", "--nonblocking", "--format", "raw", "--rate", "200", "-o", str(out), "--pid", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return proc, out

    def read_profile(self, profiler: tuple[subprocess.Popen, Path]) -> dict | None:
        proc, out = profiler
        try:
            proc.wait(30)  # py-spy writes its file when the engine exits
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        return top_functions(out.read_text()) if out.exists() else None

    def decode_peers(self, target: str, changes: int) -> dict:
        t0 = time.monotonic()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.cursor(binary=True)
            cur.execute(
                f"SELECT data FROM pg_logical_slot_peek_binary_changes('{PEEK_SLOT}', '{target}', NULL,"
                f" 'proto_version', '1', 'publication_names', '{PUBLICATION}', 'messages', 'true')"
            )
            payloads = [row[0] for row in cur]
        peek_s = time.monotonic() - t0
        catalog = PostgresCatalog(dsn=self.dsn)
        try:
            decoded = time_decoders(payloads, catalog, repeats=self.params.decode_repeats)
        finally:
            catalog.close()
        if decoded["changes"] != changes:
            raise BenchError(f"the peek slot returned {decoded['changes']} changes, not {changes}")
        return {"peek_s": round(peek_s, 2), **decoded}

    def backlog(self) -> dict:
        print("backlog:", flush=True)
        p = self.params
        self.start_cluster("logical")
        self.sql("TRUNCATE flux.state_mutations")
        attach(self.dsn, tables=TABLES, slot=SLOT, publication=PUBLICATION)
        rounds = range(p.drain_rounds)
        # With --profile, one more engine drain runs under py-spy; it never counts as the best.
        engine_slots = [SLOT] + [f"flux_round{r + 1}" for r in range(1, p.drain_rounds + self.profile)]
        recv_slots = [f"bench_recvlogical_{r}" for r in rounds]
        for slot in engine_slots[1:] + recv_slots + [PYPGOUTPUT_SLOT, PEEK_SLOT]:  # all start where the first is
            self.sql("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        self.sql("CHECKPOINT")
        print(f"  generating {p.backlog_txns:,} transactions with the engine stopped ...", flush=True)
        generated = self.generate_backlog()
        target, changes = generated["target_lsn"], generated["changes"]
        recv, engine = [], []
        for r in rounds:
            print(f"  round {r + 1}/{p.drain_rounds}: pg_recvlogical draining {changes:,} changes ...", flush=True)
            recv.append(self.drain_recvlogical(target, changes, recv_slots[r]))
            print(f"  round {r + 1}/{p.drain_rounds}: engine draining {changes:,} changes ...", flush=True)
            engine.append(self.drain_engine(target, changes, engine_slots[r], profile=False))
        if self.profile:
            print(f"  engine draining {changes:,} changes under py-spy (not counted) ...", flush=True)
            engine.append(self.drain_engine(target, changes, engine_slots[-1], profile=True))
        print(f"  pypgoutput's reader draining {changes:,} changes (one round) ...", flush=True)
        reader = self.drain_pypgoutput(target, changes, PYPGOUTPUT_SLOT)
        if "error" in reader:
            print(f"  pypgoutput's reader: no figure: {reader['error']}", flush=True)
        print("  decode-only peers ...", flush=True)
        decode = self.decode_peers(target, changes)
        # The best unprofiled round of each: noise on a shared machine only ever slows a run down.
        best_recv = max(recv, key=lambda x: x["changes_per_s"])
        best_engine = max((e for e in engine if not e["profiled"]), key=lambda x: x["changes_per_s"])
        return {
            "generated": generated,
            "pg_recvlogical": best_recv,
            "engine": best_engine,
            "pypgoutput_reader": reader,
            "rounds": {"pg_recvlogical": recv, "engine": engine},
            "decode": decode,
            "ratios": {
                "engine_vs_pg_recvlogical": round(best_engine["changes_per_s"] / best_recv["changes_per_s"], 3),
                "engine_vs_pypgoutput_reader": (
                    round(best_engine["changes_per_s"] / reader["changes_per_s"], 2) if "changes_per_s" in reader else None
                ),
                "flux_decoder_vs_pypgoutput": round(decode["flux_decoder"]["changes_per_s"] / decode["pypgoutput_decoder"]["changes_per_s"], 2),
                "engine_vs_flux_decode_and_assemble": round(best_engine["changes_per_s"] / decode["flux_decode_and_assemble"]["changes_per_s"], 3),
            },
        }

    def machine(self) -> dict:
        pgbench = subprocess.run([f"{self.bindir}/pgbench", "--version"], capture_output=True, text=True).stdout.strip()
        return {
            **machine_info(),
            "postgres": self.sql("SELECT version()")[0][0],
            "pgbench": pgbench,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark Flux's CDC engine on a throwaway PostgreSQL cluster.")
    parser.add_argument("--quick", action="store_true", help="Shorter runs (about half the time).")
    parser.add_argument("--out", type=Path, help="JSON result path (default: bench/results/cdc-DATE.json).")
    parser.add_argument("--profile", action="store_true", help="Sample the engine with py-spy during the backlog drain.")
    parser.add_argument("--prepared", action="store_true",
                        help="Also run (a') and (b') with prepared statements in every write-path round (doubles its time).")
    args = parser.parse_args(argv)
    params = replace(QUICK if args.quick else Params(), prepared=args.prepared)
    now = datetime.now(timezone.utc)
    out = args.out or ROOT / "bench/results" / f"cdc-{now:%Y-%m-%d-%H%M}{'-quick' if args.quick else ''}.json"

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    print("pypgoutput's reader: checking its virtualenv (bench/.venv-pypgoutput) ...", flush=True)
    pypgoutput = ensure_venv(PYTHON)
    if pypgoutput[0] is None:
        print(f"  not available, so no figure for it: {pypgoutput[1]}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="flux-bench-cdc-"))
    os.chmod(workdir, 0o755)  # the server account must reach the cluster below it
    bench = Bench(params, workdir, profile=args.profile, pypgoutput=pypgoutput)
    try:
        result: dict = {"benchmark": "cdc", "date": now.isoformat(timespec="seconds"), "quick": args.quick,
                        "params": asdict(params), "server_settings": SERVER_SETTINGS,
                        "flux_source_sha256": source_fingerprint(SNAPSHOT),
                        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
        result["steady"] = bench.steady()
        result["backlog"] = bench.backlog()
        result["machine"] = bench.machine()
        result["targets"] = targets(result)
        if source_fingerprint(ROOT) != result["flux_source_sha256"]:
            result["note"] = "flux/ changed during the run; this run measured the copy taken at its start"
            print(f"note: {result['note']}", file=sys.stderr)
        result["runtime_s"] = round(time.monotonic() - started)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print()
    print(summary(result))
    print(f"\nsaved {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}  ({result['runtime_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
