"""Fault tests: the engine as a real process (`python -m flux cdc run`), killed, stopped and cut
off from its server while clients write.

Each test keeps its own ground truth of what was committed and compares it row for row with
flux.state_mutations: nothing lost, nothing duplicated, every image exact.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import orjson
import psycopg
import pytest

from flux.cdc import autocapture
from flux.cdc import pgoutput as pg
from flux.cdc.assembler import MutationRow
from flux.cdc.attach import attach
from flux.cdc.sink import _COPY_COLUMNS, _copy_text
from flux.cdc.wire import format_lsn, parse_lsn
from flux.pg.cluster import Cluster, ClusterInfo
from flux.store.schema import ensure_schema
from tests.support import mutations, start_engine, wait_caught_up

REPO = Path(__file__).resolve().parents[2]

SCHEMA = """
CREATE TABLE accounts (id text PRIMARY KEY, owner text, balance numeric(12,2), note text);
CREATE TABLE events (id bigint PRIMARY KEY, kind text NOT NULL, payload jsonb, "odd ""name"", {x}\\ y\tz" text);
CREATE TABLE scratch (id bigserial PRIMARY KEY, v text);
CREATE TABLE commit_marks (request_id text PRIMARY KEY);
"""
PUBLISHED = ["accounts", "events"]  # scratch and commit_marks are written too, but never published

ODD = 'odd "name", {x}\\ y\tz'  # a column name that needs quoting in a text[] and escaping in COPY
OWNERS = ["alice", "O'Brien", "tab\there", "new\nline", "back\\slash", "ünïcødé ✓", "", None, '"quoted"', "\\N"]


# -- the engine process --------------------------------------------------------------------


class EngineProcess:
    """`python -m flux cdc run` against one database; all its runs log to one file."""

    def __init__(self, dsn: str, log_path: Path, *args: str) -> None:
        self.dsn = dsn
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.started_at = 0.0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1}\n".encode())
            log.flush()
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flux", "cdc", "run", "--database", self.dsn, *self.args],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def assert_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"engine exited on its own\n{self.log_tail()}"

    def kill(self) -> None:
        self.assert_alive()
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds until exit)."""
        self.assert_alive()
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"engine did not exit within {timeout}s of SIGTERM\n{self.log_tail()}")
        return code, time.monotonic() - began

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        return kb / 1024

    def wait_streaming(self, timeout: float = 30.0) -> None:
        """Until this run's walsender (not a previous run's, still exiting) holds the slot."""
        deadline = time.monotonic() + timeout
        query = (
            "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid"
            " WHERE s.slot_name = 'flux' AND a.backend_start >= to_timestamp(%s)"
        )
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not conn.execute(query, (self.started_at,)).fetchone()[0]:
                self.assert_alive()
                assert time.monotonic() < deadline, f"engine did not start streaming\n{self.log_tail()}"
                time.sleep(0.05)

    def caught_up(self, timeout: float = 60.0) -> None:
        self.assert_alive()
        try:
            wait_caught_up(self.dsn, timeout=timeout)
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no engine log)"

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def engine(dsn: str, tmp_path: Path):
    """engine(*cli_args): an EngineProcess for this test's database, killed at teardown if still running."""
    made: list[EngineProcess] = []

    def _engine(*args: str) -> EngineProcess:
        made.append(EngineProcess(dsn, tmp_path / f"engine{len(made)}.log", *args))
        return made[-1]

    yield _engine
    for process in made:
        process.stop_quietly()


# -- the workload and its ground truth ------------------------------------------------------


@dataclass
class Committed:
    writer: int
    number: int
    xid: int
    changes: list[tuple]  # (table, op, row_key, old, new, old_complete), in statement order


@dataclass
class Workload:
    """Writers on their own connections, each running multi-statement transactions that start
    with (or, one in five, follow their first change with) a `flux` context message.

    `committed` is the ground truth: request_id -> what that transaction changed. Transactions
    rolled back on purpose, or that failed, are in `aborted`. With `survive_disconnects`, a
    writer whose connection drops reconnects and settles an in-doubt COMMIT by looking for its commit mark.
    """

    dsn: str
    writers: int = 4
    seed: int = 0
    survive_disconnects: bool = False
    pause: float = 0.005  # seconds between a writer's transactions: keeps the backlog at the end short
    committed: dict[str, Committed] = field(default_factory=dict)
    aborted: set[str] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)
    disconnects: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.writers)]

    def start(self) -> Workload:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        if self.errors:
            raise self.errors[0]

    def _run(self, index: int) -> None:
        try:
            _Writer(self, index).run()
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)

    def record(self, request_id: str, outcome: Committed | None) -> None:
        with self._lock:
            if outcome is None:
                self.aborted.add(request_id)
            else:
                self.committed[request_id] = outcome


class _Writer:
    def __init__(self, workload: Workload, index: int) -> None:
        self.w = workload
        self.index = index
        self.rng = random.Random(f"{workload.seed}-{index}")
        self.rows: dict[str, dict] = {}  # this writer's committed accounts: id -> image
        self.next_key = 0
        self.next_event = (index + 1) * 10**9
        self.conn: psycopg.Connection | None = None

    def run(self) -> None:
        number = 0
        while not self.w._stop.is_set():
            number += 1
            request_id = f"w{self.index}-{number}"
            if self.conn is None:
                self.conn = self._connect()
            staged = dict(self.rows)
            xid = None
            try:
                xid, changes, commit = self._transaction(request_id, staged)
                if commit:
                    self.conn.commit()
                else:
                    self.conn.rollback()
                    self.w.record(request_id, None)
                    continue
            except psycopg.errors.UniqueViolation:  # the deliberate failure: a key that exists
                try:
                    self.conn.rollback()
                except psycopg.OperationalError as exc:  # the server went away right after the failure
                    self._reconnect(exc)
                self.w.record(request_id, None)
                continue
            except psycopg.OperationalError as exc:
                self._reconnect(exc)
                if xid is None or not self._committed(request_id):
                    self.w.record(request_id, None)
                    continue
            self.rows = staged
            self.w.record(request_id, Committed(self.index, number, xid, changes))
            if self.w.pause:
                time.sleep(self.w.pause)

    def _reconnect(self, cause: psycopg.OperationalError) -> None:
        """A new connection after a lost one; `cause` raised where the workload expects none."""
        if not self.w.survive_disconnects:
            raise cause
        self.w.disconnects += 1
        self.conn.close()
        self.conn = self._connect()

    def _connect(self) -> psycopg.Connection:
        deadline = time.monotonic() + 60
        while True:
            try:
                return psycopg.connect(self.w.dsn, connect_timeout=5)
            except psycopg.OperationalError:
                if not self.w.survive_disconnects or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _committed(self, request_id: str) -> bool:
        """Whether a transaction whose COMMIT was cut off did commit: its mark is there.

        Not pg_xact_status: after crash recovery the xid of a transaction whose WAL was lost can
        be handed out again, and then it reports the fate of another transaction."""
        found = self.conn.execute("SELECT EXISTS (SELECT 1 FROM commit_marks WHERE request_id = %s)", (request_id,)).fetchone()[0]
        self.conn.rollback()
        return found

    def _transaction(self, request_id: str, staged: dict[str, dict]) -> tuple[int, list[tuple], bool]:
        rng, conn = self.rng, self.conn
        xid = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
        conn.execute("INSERT INTO commit_marks VALUES (%s)", (request_id,))
        changes: list[tuple] = []
        late_context = rng.random() < 0.2  # the message follows the first change: a backfill
        if not late_context:
            self._context(request_id)
        for step in range(rng.randint(1, 4)):
            op = rng.choices(["insert", "update", "delete", "bulk", "scratch"], [4, 3, 1, 0.4, 0.5])[0]
            if op in ("update", "delete") and not staged:
                op = "insert"
            if op == "insert":
                key = f"a{self.index}-{self.next_key}"
                self.next_key += 1
                new = self._account(key)
                conn.execute("INSERT INTO accounts (id, owner, balance, note) VALUES (%s, %s, %s, %s)", tuple(new.values()))
                changes.append(("accounts", "insert", {"id": key}, None, new, None))
                staged[key] = new
            elif op == "update":
                key = rng.choice(list(staged))
                old = staged[key]
                if rng.random() < 0.5:  # note untouched: an unchanged TOASTed value when it is large
                    new = {**old, "owner": rng.choice(OWNERS), "balance": self._balance()}
                    conn.execute("UPDATE accounts SET owner = %s, balance = %s WHERE id = %s", (new["owner"], new["balance"], key))
                else:
                    new = self._account(key)
                    conn.execute(
                        "UPDATE accounts SET owner = %s, balance = %s, note = %s WHERE id = %s",
                        (new["owner"], new["balance"], new["note"], key),
                    )
                changes.append(("accounts", "update", {"id": key}, old, new, True))
                staged[key] = new
            elif op == "delete":
                key = rng.choice(list(staged))
                conn.execute("DELETE FROM accounts WHERE id = %s", (key,))
                changes.append(("accounts", "delete", {"id": key}, staged.pop(key), None, True))
            elif op == "bulk":  # many rows from one statement: spans COPY batches
                first, count = self.next_event, rng.randint(20, 150)
                self.next_event += count
                conn.execute(
                    "INSERT INTO events SELECT g, 'bulk', jsonb_build_object('n', g, 'w', %s::int), E'x\\ty\\\\z'"
                    " FROM generate_series(%s::bigint, %s::bigint) g",
                    (self.index, first, first + count - 1),
                )
                for g in range(first, first + count):
                    image = {"id": g, "kind": "bulk", "payload": {"n": g, "w": self.index}, ODD: "x\ty\\z"}
                    changes.append(("events", "insert", {"id": g}, None, image, None))
            else:  # unpublished: must leave no trace
                conn.execute("INSERT INTO scratch (v) VALUES (%s)", (request_id,))
            if late_context and step == 0:
                self._context(request_id)
        fate = rng.random()
        if fate < 0.08:
            return xid, changes, False
        if fate < 0.11 and self.rows:
            key = next(iter(self.rows))
            conn.execute("INSERT INTO accounts (id) VALUES (%s)", (key,))  # raises UniqueViolation
            if key not in staged:  # deleted in this very transaction: the insert succeeded, so fail it here
                return xid, changes, False
        return xid, changes, True

    def _context(self, request_id: str) -> None:
        content = json.dumps({"request_id": request_id, "writer": self.index})
        self.conn.execute("SELECT pg_logical_emit_message(true, 'flux', %s)", (content,))

    def _balance(self) -> Decimal:
        return Decimal(self.rng.randint(-10**8, 10**8)) / 100

    def _account(self, key: str) -> dict:
        rng = self.rng
        roll = rng.random()
        if roll < 0.3:
            note = None
        elif roll < 0.85:
            note = rng.choice(OWNERS) or "x"
        else:  # random letters compress poorly: stored out of line (TOAST)
            note = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=6000))
        return {"id": key, "owner": rng.choice(OWNERS), "balance": self._balance(), "note": note}


def assert_matches_truth(dsn: str, workload: Workload) -> dict[str, int]:
    """Compare flux.state_mutations with the workload's ground truth; returns counts for the report."""
    recorded = mutations(dsn)
    positions = Counter((m["commit_lsn"], m["seq"]) for m in recorded)
    by_request: dict[str | None, list[dict]] = defaultdict(list)
    for m in recorded:  # already in (commit_lsn, seq) order
        by_request[m["request_id"]].append(m)

    lost = [rid for rid, truth in workload.committed.items() if truth.changes and rid not in by_request]
    phantom = [rid for rid in by_request if rid not in workload.committed]
    rolled_back_recorded = [rid for rid in phantom if rid in workload.aborted]
    # Counted by (request_id, table, op, key): what is missing, what came twice.
    want = Counter((rid, c[0], c[1], json.dumps(c[2])) for rid, t in workload.committed.items() for c in t.changes)
    have = Counter((m["request_id"], m["table"], m["op"], json.dumps(m["row_key"])) for m in recorded)
    lost_changes, duplicated = list(want - have), list(have - want)
    wrong: list[str] = []  # images, order, seq or transaction differ
    for rid, truth in workload.committed.items():
        got = by_request.get(rid)
        if got is None:
            continue
        images = [_recorded(m) for m in got]
        same_txn = {m["commit_lsn"] for m in got} == {got[0]["commit_lsn"]} and {m["xid"] for m in got} == {truth.xid % 2**32}
        if images != [_expected(c) for c in truth.changes] or not same_txn or [m["seq"] for m in got] != list(range(len(got))):
            wrong.append(rid)
    # Each writer's transactions commit in the order it ran them.
    out_of_order = []
    last: dict[int, str] = {}
    for rid, truth in sorted(workload.committed.items(), key=lambda kv: (kv[1].writer, kv[1].number)):
        if rid in by_request and truth.writer in last and parse_lsn(by_request[rid][0]["commit_lsn"]) <= parse_lsn(last[truth.writer]):
            out_of_order.append(rid)
        if rid in by_request:
            last[truth.writer] = by_request[rid][0]["commit_lsn"]

    def sample(items: list) -> str:
        return f"{len(items)} {sorted(items, key=str)[:5]}"

    problems = {
        "lost transactions": lost,
        "recorded but never committed": phantom,
        "rolled back yet recorded": rolled_back_recorded,
        "lost changes": lost_changes,
        "duplicated changes": duplicated,
        "wrong images or positions": wrong,
        "duplicated (commit_lsn, seq)": [k for k, n in positions.items() if n > 1],
        "out of commit order": out_of_order,
    }
    failed = {name: sample(items) for name, items in problems.items() if items}
    if failed:
        detail = ""
        if wrong:
            rid = wrong[0]
            expected = [_expected(c) for c in workload.committed[rid].changes]
            got = [_recorded(m) for m in by_request[rid]]
            detail = f"\nfirst wrong {rid}:\n  expected {expected!r:.3000}\n  recorded {got!r:.3000}"
        pytest.fail(f"mutations differ from the ground truth: {failed}{detail}")
    expected_rows = sum(len(t.changes) for t in workload.committed.values())
    assert len(recorded) == expected_rows
    return {"transactions": len(workload.committed), "mutations": expected_rows, "aborted": len(workload.aborted)}


def _expected(change: tuple) -> tuple:
    """A ground-truth change with the columns the log derives: changed_columns, missing_columns."""
    table, op, key, old, new, old_complete = change
    if op == "update":
        changed = [c for c in new if old[c] != new[c]]
    else:
        changed = list(new if op == "insert" else old)
    return (table, op, key, old, new, old_complete, changed, None)


def _recorded(m: dict) -> tuple:
    return (m["table"], m["op"], m["row_key"], m["old"], m["new"], m["old_complete"], m["changed_columns"], m["missing_columns"])


def _attached(conn: psycopg.Connection, dsn: str) -> None:
    conn.execute(SCHEMA)
    attach(dsn, tables=PUBLISHED)


def _server_pid(dsn: str, query: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(query).fetchone()
            if row and row[0]:
                return row[0]
            assert time.monotonic() < deadline, f"no backend for: {query}"
            time.sleep(0.05)


WALSENDER = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'flux' AND database = current_database()"
SINK = "SELECT pid FROM pg_stat_activity WHERE application_name = 'flux-sink' AND datname = current_database()"


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.slow
def test_repeated_kill_9_under_concurrent_writes_loses_and_duplicates_nothing(dsn, conn, engine):
    """Ten SIGKILLs at random instants (three during start-up), each followed by a restart, while
    four writers commit, roll back and fail transactions; then every committed change is recorded
    exactly once with its exact images, and nothing rolled back is."""
    _attached(conn, dsn)
    # Small batches: a kill often lands between COPYs of one open sink transaction.
    proc = engine("--batch-rows", "64")
    rng = random.Random(7)
    workload = Workload(dsn, writers=4, seed=1).start()
    try:
        proc.start()
        # Early kills land in start-up (imports, connecting, START_REPLICATION); later ones mid-stream.
        delays = [0.05, 0.4, 0.8] + [rng.uniform(0.3, 3.0) for _ in range(7)]
        for delay in delays:
            time.sleep(delay)
            proc.kill()
            proc.start()
        time.sleep(2.0)
    finally:
        workload.stop()
    proc.caught_up(timeout=120)
    code, _ = proc.terminate()
    assert code == 0, proc.log_tail()
    counts = assert_matches_truth(dsn, workload)
    print(counts)
    assert counts["transactions"] > 500 and counts["aborted"] > 20, counts
    assert proc.starts == len(delays) + 1


@pytest.fixture
def same_port_cluster(pg_cluster: Cluster, pg_info: ClusterInfo):
    """The session cluster, for tests that restart it: it is running on its port again afterwards."""
    yield pg_cluster
    info = pg_cluster.start()
    assert info.port == pg_info.port, "the session cluster came back on another port"


@pytest.mark.slow
def test_server_restart_under_load_reconnects_and_loses_nothing(dsn, conn, engine, same_port_cluster, pg_info):
    """A fast and then an immediate (crash-recovery) restart of the server under load: the same
    engine process backs off, reconnects and records every committed change once. Writers settle
    a COMMIT cut off by the restart by looking for its commit mark."""
    _attached(conn, dsn)
    conn.close()
    proc = engine()
    workload = Workload(dsn, writers=3, seed=2, survive_disconnects=True).start()
    try:
        proc.start()
        proc.wait_streaming()
        for mode in ("fast", "immediate"):  # immediate: crash recovery, the slot may resend what was confirmed
            time.sleep(2.5)
            info = same_port_cluster.restart(mode=mode)
            assert info.port == pg_info.port
        time.sleep(3.0)
    finally:
        workload.stop()
    proc.caught_up(timeout=90)
    code, _ = proc.terminate()
    assert code == 0, proc.log_tail()
    assert workload.disconnects > 0
    assert proc.starts == 1 and "reconnecting" in proc.log_tail(400)  # the same process, backing off
    assert_matches_truth(dsn, workload)


@pytest.mark.slow
def test_terminated_walsender_and_sink_backends_reconnect_and_lose_nothing(dsn, conn, engine):
    """pg_terminate_backend of the walsender and of the sink connection, alternately and then both
    at once, under load: the same process reconnects each time and loses or repeats nothing."""
    _attached(conn, dsn)
    proc = engine("--batch-rows", "64")
    rng = random.Random(3)
    workload = Workload(dsn, writers=4, seed=3).start()
    terminated = 0
    try:
        proc.start()
        for target in [WALSENDER, SINK] * 4:
            time.sleep(rng.uniform(0.3, 1.5))
            pid = _server_pid(dsn, target)
            terminated += conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        time.sleep(1.0)
        both = [_server_pid(dsn, WALSENDER), _server_pid(dsn, SINK)]
        conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (both,))
        time.sleep(1.0)
    finally:
        workload.stop()
    proc.caught_up(timeout=60)
    assert terminated == 8
    assert proc.starts == 1  # the process survived every cut
    code, _ = proc.terminate()
    assert code == 0, proc.log_tail()
    assert_matches_truth(dsn, workload)


def test_unpublished_writes_advance_confirmed_flush_lsn_of_an_idle_engine(dsn, conn, engine):
    """Writes only to an unpublished table: the idle engine still confirms past them (from the
    server's keepalives), so it does not pin WAL. Observed: well under a second; allowed: 5 s."""
    _attached(conn, dsn)
    proc = engine()
    proc.start()
    conn.execute("INSERT INTO accounts (id) VALUES ('only')")
    proc.caught_up()
    for i in range(50):
        conn.execute("INSERT INTO scratch (v) VALUES (%s)", (f"unpublished {i}",))
    written = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    slot = "SELECT confirmed_flush_lsn, confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = 'flux'"
    began = time.monotonic()
    while not (confirmed := conn.execute(slot, (written,)).fetchone())[1]:
        assert time.monotonic() - began < 5, f"confirmed_flush_lsn stuck at {confirmed[0]}, the writes end at {written}"
        time.sleep(0.05)
    assert [m["row_key"] for m in mutations(dsn)] == [{"id": "only"}]
    proc.assert_alive()


@pytest.mark.slow
def test_one_million_row_transaction_streams_in_bounded_memory(dsn, conn, engine):
    """One source transaction of 1,000,000 rows, after one of 100,000, through one engine process.

    Measured on a shared 2-core machine (PostgreSQL 15 with fsync off, batch_rows 10000, the sink
    on its worker thread): the 1M rows were recorded about 9 s after their INSERT returned (about
    115k rows/s); peak RSS (VmHWM) 52 MB after the 100k transaction and still 52 MB after the 1M
    one. Bounds: 150 MB, and the 1M transaction may add at most 20 MB over the 100k one (memory
    must not follow the row count).
    """
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, name text, amount numeric(12,2), at timestamptz)")
    attach(dsn, tables=["big"])
    proc = engine()
    proc.start()
    conn.execute("INSERT INTO big VALUES (0, 'warm-up', 0, now())")
    proc.caught_up()
    report = []
    for rows in (100_000, 1_000_000):
        first = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM big").fetchone()[0]
        began = time.monotonic()
        conn.execute(
            "INSERT INTO big SELECT g, 'name ' || g, g / 100.0, timestamptz '2024-01-01' + g * interval '1 second'"
            " FROM generate_series(%s::int, %s::int) g",
            (first, first + rows - 1),
        )
        inserted = time.monotonic()
        proc.caught_up(timeout=300)
        took = time.monotonic() - began
        report.append((rows, took, rows / (time.monotonic() - inserted), proc.peak_rss_mb()))
    print("rows, seconds incl. insert, rows/s after insert, peak RSS MB:", report)
    per_txn = conn.execute(
        "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM flux.state_mutations"
        " WHERE table_name = 'big' GROUP BY commit_lsn ORDER BY commit_lsn"
    ).fetchall()
    assert per_txn == [(1, 1, 0, 0), (100_000, 100_000, 0, 99_999), (1_000_000, 1_000_000, 0, 999_999)]
    last = conn.execute(
        "SELECT row_key::text, new::text FROM flux.state_mutations WHERE table_name = 'big' ORDER BY commit_lsn DESC, seq DESC LIMIT 1"
    ).fetchone()
    assert json.loads(last[0]) == {"id": 1_100_000}
    assert json.loads(last[1]) == {"id": 1_100_000, "name": "name 1100000", "amount": 11000.0, "at": "2024-01-13T17:33:20+00:00"}
    (_, _, _, rss_100k), (_, _, _, rss_1m) = report
    assert rss_1m < 150, report
    assert rss_1m - rss_100k < 20, report
    code, _ = proc.terminate()
    assert code == 0


@pytest.mark.slow
def test_sigterm_mid_stream_exits_zero_promptly_and_restart_loses_nothing(dsn, conn, engine):
    """SIGTERM under load, and once while the sink holds part of a 100,000-row transaction: exit 0
    within 10 s (observed 0.1-0.7 s), and the restarted engine records everything exactly once."""
    _attached(conn, dsn)
    proc = engine("--batch-rows", "500")
    rng = random.Random(5)
    workload = Workload(dsn, writers=4, seed=5).start()
    stops = []
    try:
        proc.start()
        for _ in range(3):
            proc.wait_streaming()
            time.sleep(rng.uniform(0.5, 2.0))
            stops.append(proc.terminate())
            proc.start()
    finally:
        workload.stop()
    # SIGTERM while the sink holds part of a 100,000-row transaction: rolled back, then resent.
    proc.caught_up(timeout=120)
    conn.execute("INSERT INTO events (id, kind) SELECT g, 'huge' FROM generate_series(1, 100000) g")
    deadline = time.monotonic() + 30
    writing = SINK.replace("SELECT pid", "SELECT count(*)") + " AND backend_xid IS NOT NULL"  # rows written, not committed
    while not conn.execute(writing).fetchone()[0]:
        assert time.monotonic() < deadline, "the engine never started writing the huge transaction"
        time.sleep(0.01)
    mark = proc.log_path.stat().st_size
    stops.append(proc.terminate())
    cut_huge = b"stopping mid-transaction" in proc.log_path.read_bytes()[mark:]
    proc.start()
    proc.caught_up(timeout=120)
    stops.append(proc.terminate())
    print("SIGTERM: (exit code, seconds to exit):", stops)
    assert all(code == 0 and took < 10 for code, took in stops), stops
    assert cut_huge, proc.log_tail()
    huge = conn.execute("SELECT count(*), count(DISTINCT seq) FROM flux.state_mutations WHERE new->>'kind' = 'huge'").fetchone()
    assert huge == (100_000, 100_000)
    conn.execute("DELETE FROM flux.state_mutations WHERE new->>'kind' = 'huge'")  # not part of the workload's truth
    assert_matches_truth(dsn, workload)


def test_a_second_sigterm_stops_an_engine_whose_store_is_locked_at_once_and_nothing_is_lost(dsn, conn, engine):
    """The first SIGTERM waits for the store to commit what is complete (up to a minute), which a
    lock someone holds on flux.state_mutations holds up; a second one stops at once (exit 130),
    and the next start records the change exactly once."""
    _attached(conn, dsn)
    proc = engine()
    proc.start()
    proc.wait_streaming()
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE flux.state_mutations IN ACCESS EXCLUSIVE MODE")
        conn.execute("INSERT INTO events (id, kind) VALUES (1, 'locked out')")
        waiting = SINK.replace("SELECT pid", "SELECT count(*)") + " AND wait_event_type = 'Lock'"
        deadline = time.monotonic() + 30
        while not conn.execute(waiting).fetchone()[0]:
            assert time.monotonic() < deadline, f"the sink never waited on the lock\n{proc.log_tail()}"
            time.sleep(0.02)
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        proc.assert_alive()  # the first signal waits for the store
        began = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        code = proc.proc.wait(timeout=10)
        took = time.monotonic() - began
        locker.rollback()
    assert code == 130 and took < 3, (code, took, proc.log_tail())
    assert "a second signal stops at once" in proc.log_path.read_text()
    proc.start()
    proc.caught_up()
    assert conn.execute("SELECT count(*) FROM flux.state_mutations WHERE new->>'kind' = 'locked out'").fetchone() == (1,)
    assert proc.terminate()[0] == 0


def test_walsender_gone_before_start_replication_is_retried(dsn, conn, monkeypatch):
    """A walsender terminated between connecting and START_REPLICATION (a server shutting down,
    an operator's pg_terminate_backend) is a lost connection: retried, not the end of the engine."""
    _attached(conn, dsn)
    real_connect = psycopg.connect
    cut = []

    def connect_then_terminate(*args, **kwargs):
        connection = real_connect(*args, **kwargs)
        if kwargs.get("replication") and not cut:
            cut.append(conn.execute("SELECT pg_terminate_backend(%s, 5000)", (connection.info.backend_pid,)).fetchone()[0])
        return connection

    monkeypatch.setattr(psycopg, "connect", connect_then_terminate)
    running = start_engine(dsn, backoff_initial=0.1)
    try:
        conn.execute("INSERT INTO accounts (id) VALUES ('after')")
        running.caught_up()
    finally:
        running.stop()
    assert cut == [True]
    assert running.engine.stats.reconnects >= 1
    assert [m["row_key"] for m in mutations(dsn)] == [{"id": "after"}]


def test_connection_lost_during_new_table_check_is_retried(dsn, conn, monkeypatch):
    """The periodic --all-tables check runs its own queries; a connection dropped under them is retried."""
    conn.execute(SCHEMA)
    attach(dsn, all_tables=True)
    real_reconcile = autocapture.reconcile
    failures = []

    def drop_once(connection, **kwargs):
        if not failures:
            failures.append(1)
            raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
        return real_reconcile(connection, **kwargs)

    monkeypatch.setattr(autocapture, "reconcile", drop_once)
    running = start_engine(dsn, reconcile_interval=0.2, backoff_initial=0.1)
    try:
        deadline = time.monotonic() + 10
        while not failures:
            assert not running.errors and time.monotonic() < deadline, f"the new-table check never ran: {running.errors}"
            time.sleep(0.05)
        conn.execute("INSERT INTO accounts (id) VALUES ('after')")
        running.caught_up()
    finally:
        running.stop()
    assert running.engine.stats.reconnects >= 1
    assert [m["row_key"] for m in mutations(dsn)] == [{"id": "after"}]


def test_resume_waits_for_a_dead_consumers_commit_still_in_flight(dsn, conn):
    """A killed engine's sink backend may still be committing its last batch (slow disk, a
    synchronous standby) when the next engine starts. The next engine must resume from the
    progress that commit writes: reading the older one would resend the batch and fail on
    (commit_lsn, seq)."""
    _attached(conn, dsn)
    first = start_engine(dsn)
    conn.execute("INSERT INTO accounts (id) VALUES ('before')")
    first.caught_up()
    first.stop()
    conn.execute("INSERT INTO accounts (id) VALUES ('in flight')")
    while conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()[0]:
        time.sleep(0.02)  # the first engine's walsender is still exiting
    peeked = conn.execute(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
        "'flux', NULL, NULL, 'proto_version', '1', 'publication_names', 'flux')"
    ).fetchall()
    decoded = [pg.decode(data, lsn=parse_lsn(lsn)) for lsn, data in peeked]
    begin = next(m for m in decoded if isinstance(m, pg.Begin))
    commit = next(m for m in decoded if isinstance(m, pg.Commit))
    with psycopg.connect(dsn) as late:  # what the dead engine's backend had done when it got COMMIT
        late.execute(
            "INSERT INTO flux.state_mutations (schema_name, table_name, op, row_key, new, xid, commit_lsn, commit_time, seq)"
            " VALUES ('public', 'accounts', 'insert', '{\"id\": \"in flight\"}', '{}', %s, %s::pg_lsn, now(), 0)",
            (begin.xid, format_lsn(begin.final_lsn)),
        )
        late.execute(
            "UPDATE flux.cdc_progress SET commit_lsn = %s::pg_lsn, end_lsn = %s::pg_lsn WHERE slot_name = 'flux'",
            (format_lsn(commit.commit_lsn), format_lsn(commit.end_lsn)),
        )
        second = start_engine(dsn)
        time.sleep(1.0)  # the next engine starts while that COMMIT is still in flight
        late.commit()
    try:
        second.caught_up()
    finally:
        second.stop()
    assert [m["row_key"] for m in mutations(dsn)] == [{"id": "before"}, {"id": "in flight"}]


def test_copy_text_fast_path_stores_exactly_what_write_row_stores(dsn, conn):
    """The sink builds COPY text itself (the 1M-row throughput depends on it); on hostile values
    (escapes, NULL look-alikes, quotes and braces in array elements) it must store exactly what
    psycopg's own `copy.write_row` stores."""
    ensure_schema(conn)
    rng = random.Random(11)
    pieces = ["a", "\\", "\t", "\n", "\r", '"', "{", "}", ",", " ", "\\N", "NULL", "é", "✓", "'", ".", "\x01", "\x7f"]

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))

    def maybe(make):
        return None if rng.random() < 0.2 else make()

    rows = [
        MutationRow(
            maybe(text), maybe(lambda: orjson.dumps({text(): text()}).decode()), text() or "s", text() or "t",
            rng.choice(["insert", "update", "delete", "truncate"]), maybe(lambda: orjson.dumps({"k": text()}).decode()),
            maybe(lambda: orjson.dumps([text()]).decode()), maybe(lambda: orjson.dumps(text()).decode()),
            rng.choice([None, True, False]), maybe(lambda: [text() for _ in range(rng.randint(0, 3))]),
            maybe(lambda: [text() for _ in range(rng.randint(0, 3))]), rng.randint(0, 2**32 - 1), f"0/{i:X}",
            datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=rng.randint(0, 10**12)), i,
            maybe(lambda: orjson.dumps({"k": text()}).decode()), maybe(lambda: rng.randint(1, 2**32 - 1)),
        )
        for i in range(2000)
    ]
    columns = ", ".join(_COPY_COLUMNS)
    conn.execute("CREATE TABLE fast (LIKE flux.state_mutations INCLUDING ALL)")
    conn.execute("CREATE TABLE reference (LIKE flux.state_mutations INCLUDING ALL)")
    with conn.cursor().copy(f"COPY fast ({columns}) FROM STDIN") as copy:
        for chunk in _copy_text(rows):
            copy.write(chunk)
    with conn.cursor().copy(f"COPY reference ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row.as_tuple())
    query = f"SELECT {columns} FROM {{}} ORDER BY seq"
    fast, reference = (conn.execute(query.format(table)).fetchall() for table in ("fast", "reference"))
    assert len(fast) == 2000 and fast == reference


def test_synchronous_standby_names_star_makes_commits_wait_for_the_engine_but_never_deadlocks_it(tmp_path_factory):
    """With '*', PostgreSQL counts the engine's walsender as a synchronous standby: a commit waits
    until the engine acknowledges it, which it does only after its own sink commit. That commit
    must not wait for a standby in turn (it waited for itself, and every commit hung)."""
    from flux.cdc.status import cdc_status
    from tests.conftest import TEST_SETTINGS

    state = tmp_path_factory.mktemp("sync_standby")
    state.chmod(0o755)
    cluster = Cluster(state_dir=state, settings=TEST_SETTINGS)
    info = cluster.start()
    try:
        with psycopg.connect(info.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
            attach(info.dsn, tables=["users"])
            running = start_engine(info.dsn)
            try:
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                conn.execute("SELECT pg_reload_conf()")
                deadline = time.monotonic() + 20
                while conn.execute("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'").fetchone()[0] == 0:
                    assert time.monotonic() < deadline, "the engine never became a synchronous standby"
                    time.sleep(0.1)
                conn.execute("SET statement_timeout = '15s'")  # a hung commit gives up waiting after it, with a warning
                started = time.monotonic()
                conn.execute("INSERT INTO users VALUES (1)")
                assert time.monotonic() - started < 10
                running.caught_up()
                assert [m["new"] for m in mutations(info.dsn, "users")] == [{"id": 1}]
                assert [w for w in cdc_status(info.dsn).warnings if "as a synchronous standby" in w]
            finally:
                conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
                conn.execute("SELECT pg_reload_conf()")
                running.stop()
    finally:
        cluster.destroy()
