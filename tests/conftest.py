"""Shared fixtures: one real PostgreSQL cluster per test session, a fresh database per test.

The cluster comes from `flux.pg.cluster`, the same module `flux dev` uses, so the suite runs
anywhere, as root too. Without server binaries the database tests fail with what to install:
they are never skipped, in CI or elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from pytest_postgresql.janitor import DatabaseJanitor

from flux.cdc.attach import attach
from flux.errors import ClusterError
from flux.pg.cluster import SUPERUSER, Cluster, ClusterInfo
from tests.pgbouncer import INSTALL_HINT as PGBOUNCER_HINT
from tests.pgbouncer import PgBouncer, ServerHop
from tests.support import RunningEngine, start_engine
from tests.tls import INSTALL_HINT as TLS_HINT
from tests.tls import make_certificates, tls_settings

# fsync off: these clusters are throwaway; the engine's own durability is tested by killing
# the engine, not the machine. Prepared transactions: what a two-phase commit left behind holds
# tables and the slot's creation up, and Flux must say so.
TEST_SETTINGS = {"fsync": "off", "full_page_writes": "off", "shared_buffers": "'256MB'", "max_wal_size": "'4GB'",
                 "max_prepared_transactions": "4"}


def _start(cluster: Cluster) -> ClusterInfo:
    """Start `cluster`; a machine without a usable server fails the test, never skips it."""
    try:
        return cluster.start()
    except ClusterError as exc:
        pytest.fail(f"These tests need a PostgreSQL 14+ server: {exc} -- {exc.hint}")


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state_dir = tmp_path_factory.mktemp("cluster")
    os.chmod(state_dir, 0o755)
    for parent in state_dir.parents:  # the server account must traverse pytest's temp tree
        if parent == Path(tmp_path_factory.getbasetemp()).parent:
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o011)
    cluster = Cluster(state_dir=state_dir, settings=TEST_SETTINGS)
    _start(cluster)
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def pg_info(pg_cluster: Cluster) -> ClusterInfo:
    return pg_cluster.start()


def _drop_slots(admin_dsn: str, dbname: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for slot, pid in conn.execute(
            "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (dbname,)
        ).fetchall():
            if pid:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            for _ in range(50):
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    break
                except psycopg.errors.ObjectInUse:
                    import time

                    time.sleep(0.1)


@pytest.fixture
def dsn(pg_info: ClusterInfo) -> Iterator[str]:
    """DSN of a fresh, empty database on the session cluster; dropped (with its slots) afterwards."""
    dbname = f"t_{uuid.uuid4().hex[:12]}"
    janitor = DatabaseJanitor(
        user=SUPERUSER, host="127.0.0.1", port=pg_info.port, dbname=dbname, password=None
    )
    janitor.init()
    yield f"postgresql://{SUPERUSER}@127.0.0.1:{pg_info.port}/{dbname}"
    _drop_slots(pg_info.dsn, dbname)
    janitor.drop()


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the per-test database, for setting up tables and writing rows."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def capture(dsn: str) -> Iterator[Callable[..., RunningEngine]]:
    """capture(tables=[...]) or capture(all_tables=True): attach, then run the engine until the test ends."""
    running: list[RunningEngine] = []

    def _capture(*, tables: list[str] | None = None, all_tables: bool = False, **config) -> RunningEngine:
        attach(dsn, tables=tables, all_tables=all_tables)
        engine = start_engine(dsn, **config)
        running.append(engine)
        return engine

    yield _capture
    for engine in running:
        engine.engine.stop()
        engine.thread.join(timeout=30)


@pytest.fixture
def seeded(conn: psycopg.Connection) -> psycopg.Connection:
    """A fresh database holding the trace and mutation-log rows of `tests.traces_seed`."""
    from tests.traces_seed import seed

    seed(conn)
    return conn


@pytest.fixture(scope="session")
def pgbouncer(pg_info: ClusterInfo) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the session cluster (`tests.pgbouncer`); never skipped."""
    bouncer = PgBouncer(server_port=pg_info.port)
    try:
        bouncer.start()
    except RuntimeError as exc:
        pytest.fail(f"{exc} -- {PGBOUNCER_HINT}")
    yield bouncer
    bouncer.stop()


@pytest.fixture
def bouncer_dsn(dsn: str, pgbouncer: PgBouncer) -> str:
    """The per-test database through PgBouncer in transaction mode."""
    return pgbouncer.dsn_for(dsn)


@pytest.fixture
def server_hop(bouncer_dsn: str) -> Iterator[ServerHop]:
    """Called between transactions through `bouncer_dsn`, moves the next to another server connection."""
    hop = ServerHop(bouncer_dsn)
    yield hop
    hop.close()


@pytest.fixture(scope="session")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClusterInfo, Path]]:
    """A second cluster with ssl = on (`tests.tls`): its info and the directory of its certificates."""
    certificates = Path(tempfile.mkdtemp(prefix="flux-tls-"))  # the server account cannot traverse pytest's
    try:
        make_certificates(certificates)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"Could not make test certificates: {exc} -- {TLS_HINT}")
    cluster = Cluster(state_dir=tmp_path_factory.mktemp("tls-cluster"), settings={**TEST_SETTINGS, **tls_settings(certificates)})
    yield _start(cluster), certificates
    cluster.destroy()
    shutil.rmtree(certificates, ignore_errors=True)


@pytest.fixture
def tls_dsn(tls_cluster: tuple[ClusterInfo, Path]) -> str:
    """The TLS cluster's own database, verifying its certificate (verify-full) against the test CA."""
    info, certificates = tls_cluster
    return f"postgresql://{SUPERUSER}@localhost:{info.port}/postgres?sslmode=verify-full&sslrootcert={certificates / 'ca.crt'}"

