"""Helpers shared by engine tests: run a real engine in a thread, wait for it, read what it recorded."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import psycopg

from flux.cdc.engine import Engine, EngineConfig


def wait_caught_up(dsn: str, *, slot: str = "flux", timeout: float = 30.0, alive: Callable[[], None] | None = None) -> None:
    """Block until the slot has confirmed everything written so far (so it has been recorded).

    `alive` is called while waiting and may raise, e.g. the error of an engine that died.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        deadline = time.monotonic() + timeout
        while True:
            if alive is not None:
                alive()
            done = conn.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s", (target, slot)
            ).fetchone()
            if done and done[0]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"slot {slot} did not reach {target} within {timeout}s")
            time.sleep(0.05)


def wait_slot_held(conn: psycopg.Connection, *, slot: str = "flux", timeout: float = 15.0) -> None:
    """Block until a replication connection holds the slot (an engine started streaming it)."""
    deadline = time.monotonic() + timeout
    while not conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()[0]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing held slot {slot} within {timeout}s")
        time.sleep(0.05)


@dataclass
class RunningEngine:
    dsn: str
    engine: Engine
    thread: threading.Thread
    errors: list[BaseException]

    def caught_up(self, timeout: float = 30.0) -> None:
        """Wait until everything written so far is recorded; an engine that died raises its own error."""
        wait_caught_up(self.dsn, slot=self.engine.config.slot, timeout=timeout, alive=self._raise_error)

    def _raise_error(self) -> None:
        if self.errors:
            raise self.errors[0]

    def stop(self) -> None:
        self.engine.stop()
        self.thread.join(timeout=30)
        if self.errors:
            raise self.errors[0]


def start_engine(dsn: str, **config) -> RunningEngine:
    # A short status interval: the idle read waits at most that long, so the engine notices
    # stop() and acknowledges progress (what caught_up waits for) sooner.
    config.setdefault("status_interval", 0.1)
    engine = Engine(EngineConfig(dsn=dsn, **config))
    errors: list[BaseException] = []

    def target() -> None:
        try:
            engine.run(install_signal_handlers=False)
        except BaseException as exc:  # surfaced to the test by caught_up()/stop()
            errors.append(exc)

    thread = threading.Thread(target=target, name="flux-engine", daemon=True)
    thread.start()
    return RunningEngine(dsn, engine, thread, errors)


def record_pending(dsn: str, **config) -> None:
    """Run an engine until it has recorded everything written so far, then stop it."""
    running = start_engine(dsn, **config)
    try:
        running.caught_up()
    finally:
        running.stop()


def mutations(dsn: str, table: str | None = None) -> list[dict]:
    """Recorded mutations in log order, images parsed with exact numerics."""
    import json
    from decimal import Decimal

    query = (
        "SELECT request_id, context::text, schema_name, table_name, op, row_key::text, old::text, new::text,"
        " old_complete, missing_columns, changed_columns, xid, commit_lsn::text, seq, old_row_key::text"
        " FROM flux.state_mutations {} ORDER BY commit_lsn, seq"
    )
    where, params = ("WHERE table_name = %s", (table,)) if table else ("", ())
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(query.format(where), params).fetchall()
    load = lambda text: None if text is None else json.loads(text, parse_float=Decimal)  # noqa: E731
    keys = ("request_id", "context", "schema", "table", "op", "row_key", "old", "new", "old_complete",
            "missing_columns", "changed_columns", "xid", "commit_lsn", "seq", "old_row_key")
    out = []
    for row in rows:
        item = dict(zip(keys, row))
        for k in ("context", "row_key", "old", "new", "old_row_key"):
            item[k] = load(item[k])
        out.append(item)
    return out


@contextmanager
def table_owner_role(conn: psycopg.Connection, dsn: str, name: str) -> Iterator[str]:
    """A non-superuser role that may replicate and create tables in `dsn`'s database (so it owns
    what it creates), as an application's owner role is; yields its DSN. Dropped afterwards, with
    everything it owns."""
    db = conn.info.dbname
    conn.execute(f"CREATE ROLE {name} LOGIN REPLICATION")
    conn.execute(f'GRANT CREATE ON DATABASE "{db}" TO {name}')
    conn.execute(f"GRANT CREATE ON SCHEMA public TO {name}")
    try:
        yield dsn.replace("postgres@", f"{name}@")
    finally:
        conn.execute(f"DROP OWNED BY {name}")
        conn.execute(f"REVOKE CREATE ON SCHEMA public FROM {name}")
        conn.execute(f'REVOKE CREATE ON DATABASE "{db}" FROM {name}')
        conn.execute(f"DROP ROLE {name}")


def communicate(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The rest of what `proc` prints (stdout, text), once it has exited. `proc.communicate(timeout=...)`
    reads the pipe's descriptor itself, so text that an earlier `proc.stdout.readline()` had read
    ahead into the file's buffer was lost: a test that read up to one line and then stopped the
    process missed the lines printed in the same write."""
    out: list[str] = []
    if proc.stdout is None:
        proc.wait(timeout=timeout)
        return ""
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    reader.join(timeout)
    return "".join(out)


T = TypeVar("T")


def first_answer(send: Callable[[], T], *, proc: subprocess.Popen | None = None, seconds: float = 30.0) -> T:
    """`send()`, an HTTP call to a server starting up, once it listens: retried while the
    connection is refused, for `seconds` at most and while `proc` (the server, if given) runs."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            return send()
        except httpx.ConnectError:
            if proc is not None:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else f"the server exited {proc.returncode}"
            assert time.monotonic() < deadline, f"the server did not listen within {seconds:g} s"
            time.sleep(0.1)
