"""Measuring instruments for bench/cdc.py: process CPU and memory, pgbench output, lag and
batching queries, a sampling monitor, py-spy profile digests, and the decode-only peers.

Nothing here starts or stops a server or a process: bench/cdc.py does.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psycopg

from flux.cdc import pgoutput
from flux.cdc.assembler import Assembler, Catalog

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


def source_fingerprint(root: Path) -> str:
    """Hash of root/flux/**/*.py: which engine was measured (the tree may change between runs)."""
    digest = hashlib.sha256()
    for path in sorted((root / "flux").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cpu_seconds(pid: int | None) -> float | None:
    """user + system CPU seconds of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    if not pid:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)  # minus idle and iowait


class CpuWindow:
    """CPU use of some processes (and of the whole machine) between `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids

    def start(self) -> CpuWindow:
        self.t0, self.busy0 = time.monotonic(), machine_busy()
        self.cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        busy1 = machine_busy()
        out: dict = {"wall_s": round(wall, 2)}
        jiffies = busy1[1] - self.busy0[1]
        out["machine_busy_pct_of_all_cores"] = round(100 * (busy1[0] - self.busy0[0]) / jiffies, 1) if jiffies else None
        for name, pid in self.pids.items():
            before, after = self.cpu0.get(name), cpu_seconds(pid)
            if before is not None and after is not None:
                out[f"{name}_cpu_s"] = round(after - before, 2)
                out[f"{name}_cpu_pct_of_one_core"] = round(100 * (after - before) / wall, 1)
        return out


def parse_pgbench(out: str) -> dict:
    def find(pattern: str) -> float | None:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else None

    result = {
        "transactions": int(find(r"number of transactions actually processed: (\d+)") or 0),
        "failed": int(find(r"number of failed transactions: (\d+)") or 0),
        "tps": find(r"tps = ([\d.]+) \(without initial connection time\)"),
        "latency_avg_ms": find(r"latency average = ([\d.]+) ms"),
    }
    if result["tps"] is None:
        raise BenchError(f"could not read pgbench output:\n{out[-2000:]}")
    return result


def latency_summary(rows: list[tuple]) -> dict:
    count, p50, p99, worst = rows[0]
    ms = lambda s: round(s * 1000, 1) if s is not None else None  # noqa: E731
    return {"rows": count, "p50_ms": ms(p50), "p99_ms": ms(p99), "max_ms": ms(worst)}


LAG_SQL = """
SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY lag), percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), max(lag)
FROM (SELECT extract(epoch FROM recorded_at - commit_time)::float8 AS lag FROM flux.state_mutations
      WHERE {column} BETWEEN %s AND %s) s
"""

# recorded_at is now() of the sink transaction, so its distinct values count sink commits.
BATCH_SQL = """
SELECT count(*), count(DISTINCT recorded_at), count(DISTINCT commit_lsn) FROM flux.state_mutations {where}
"""


# Did each source transaction's changes get its own request id from the `flux` message?
CONTEXT_SQL = """
SELECT count(*), count(*) FILTER (WHERE request_id IS NULL), count(DISTINCT request_id), count(DISTINCT commit_lsn)
FROM flux.state_mutations WHERE commit_time BETWEEN %s AND %s
"""


def context_summary(rows: list[tuple]) -> dict:
    changes, without, request_ids, source_txns = rows[0]
    return {"changes": changes, "without_request_id": without, "distinct_request_ids": request_ids, "source_txns": source_txns}


def batching(rows: list[tuple]) -> dict:
    changes, sink_commits, source_txns = rows[0]
    return {
        "sink_commits": sink_commits,
        "changes_per_sink_commit": round(changes / sink_commits, 1) if sink_commits else None,
        "source_txns_per_sink_commit": round(source_txns / sink_commits, 2) if sink_commits else None,
    }


class Monitor(threading.Thread):
    """Samples WAL position, persisted mutations and slot lag twice a second during a run."""

    def __init__(self, dsn: str, *, flux: bool, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.dsn, self.flux, self.interval = dsn, flux, interval
        self.samples: list[list] = []
        self._halt = threading.Event()

    def run(self) -> None:
        query = "SELECT (pg_current_wal_lsn() - '0/0')::bigint"
        if self.flux:
            query += (
                ", (SELECT mutations FROM flux.cdc_progress WHERE slot_name = 'flux'),"
                " (SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'flux')"
            )
        t0 = time.monotonic()
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self._halt.wait(self.interval):
                    self.samples.append([round(time.monotonic() - t0, 2), *conn.execute(query).fetchone()])
        except psycopg.OperationalError:
            pass  # the server went away (an interrupted run): the samples so far stand

    def stop(self) -> list[list]:
        self._halt.set()
        self.join(timeout=10)
        return self.samples


# -- profiles ------------------------------------------------------------------------------


def top_functions(collapsed: str, *, limit: int = 20) -> dict:
    """Top functions by own and by inclusive samples, from py-spy's raw (collapsed) stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_short_frame(f) for f in stack.split(";")]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    pct = lambda c: [[name, round(100 * n / total, 1)] for name, n in c.most_common(limit)]  # noqa: E731
    # Frames in nearly every sample are the entry chain (runpy, the CLI, Engine.run, consume).
    entry = [name for name, n in inclusive.items() if n >= 0.9 * total]
    for name in entry:
        del inclusive[name]
    return {"samples": total, "own_pct": pct(own), "inclusive_pct": pct(inclusive), "entry_chain": sorted(entry)}


def _short_frame(frame: str) -> str:
    """'decode (/x/site-packages/flux/cdc/pgoutput.py:370)' -> 'decode (flux/cdc/pgoutput.py)'."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame or "(no Python frame)"
    path = m.group(2)
    for marker in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group(1)} ({path})"


# -- decode-only peers ---------------------------------------------------------------------


def decoder_peers(payloads: list[bytes], catalog: Catalog) -> dict[str, Callable[[], None]]:
    """Each peer decodes every payload once. Results are dropped: only the work is timed.

    pypgoutput has no dispatcher of its own outside its reader process; it picks the class by
    the first byte, as here. It turns timestamps into datetimes and tuples into objects per
    column; Flux keeps timestamps raw and tuples as tuples of str.
    """
    from pypgoutput import decoders as pypg

    def flux_decoder() -> None:
        decode = pgoutput.decode
        for payload in payloads:
            decode(payload)

    classes = {ord("B"): pypg.Begin, ord("C"): pypg.Commit, ord("R"): pypg.Relation, ord("I"): pypg.Insert,
               ord("U"): pypg.Update, ord("D"): pypg.Delete, ord("T"): pypg.Truncate}  # fmt: skip
    decodable = [p for p in payloads if p[0] in classes]  # it has no decoder for logical messages ('M')

    def pypgoutput_decoder() -> None:
        for payload in decodable:
            classes[payload[0]](payload)

    def flux_decode_and_assemble() -> None:
        """What the engine does to each message, short of reading the socket and writing the sink."""
        decode, asm = pgoutput.decode, Assembler(catalog=catalog)
        handlers = {
            pgoutput.Insert: asm.insert, pgoutput.Update: asm.update, pgoutput.Delete: asm.delete,
            pgoutput.Begin: asm.begin, pgoutput.Commit: asm.commit, pgoutput.Relation: asm.relation,
            pgoutput.LogicalMessage: asm.message,
        }  # fmt: skip
        for payload in payloads:
            msg = decode(payload)
            handler = handlers.get(msg.__class__)
            if handler is not None:
                handler(msg)

    return {
        "flux_decoder": flux_decoder,
        "pypgoutput_decoder": pypgoutput_decoder,
        "flux_decode_and_assemble": flux_decode_and_assemble,
    }


def time_decoders(payloads: list[bytes], catalog: Catalog, *, repeats: int) -> dict:
    """Best-of-`repeats` time of each peer; peers alternate so that noise hits them alike."""
    kinds = Counter(chr(p[0]) for p in payloads)
    changes = kinds["I"] + kinds["U"] + kinds["D"]
    peers = decoder_peers(payloads, catalog)
    times: dict[str, list[float]] = {name: [] for name in peers}
    for _ in range(repeats):
        for name, run in peers.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    result: dict = {
        "messages": len(payloads),
        "message_kinds": dict(sorted(kinds.items())),
        "changes": changes,
        "payload_bytes": sum(len(p) for p in payloads),
    }
    for name, ts in times.items():
        result[name] = {
            "best_s": round(min(ts), 3),
            "times_s": [round(t, 3) for t in ts],
            "changes_per_s": round(changes / min(ts)),
            "messages_per_s": round(len(payloads) / min(ts)),
        }
    return result


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__})",
    }
