"""`flux dev`: the embedded PostgreSQL under .flux/, attached, with the engine in the foreground."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from flux.pg.cluster import Cluster
from tests.support import wait_caught_up


def start_dev(project: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux", "dev"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.strip().startswith("psql "):
            return proc, line.strip().removeprefix("psql ")
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("flux dev did not print its DSN:\n" + "".join(lines))


def stop_dev(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return out


@pytest.fixture
def project(tmp_path: Path):
    yield tmp_path
    Cluster(state_dir=tmp_path / ".flux").destroy()


def test_dev_records_changes_made_through_the_printed_dsn_and_stops_cleanly(project):
    proc, dsn = start_dev(project)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
            conn.execute("INSERT INTO users VALUES (42, 'alice@example.com')")
        wait_caught_up(dsn)
        history = subprocess.run(
            [sys.executable, "-m", "flux", "state", "history", "users", "--id", "42", "--json"],
            cwd=project, capture_output=True, text=True, timeout=60,
        )
        assert history.returncode == 0, history.stderr
        [change] = json.loads(history.stdout)["mutations"]
        assert change["op"] == "insert" and change["new"]["email"] == "alice@example.com"
    finally:
        out = stop_dev(proc)
    assert proc.returncode == 0, out
    assert "Embedded PostgreSQL stopped" in out and "Traceback" not in out
    assert not Cluster(state_dir=project / ".flux").is_running()


def test_dev_reuses_the_cluster_and_its_data_on_the_next_run(project):
    proc, dsn = start_dev(project)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    finally:
        stop_dev(proc)
    meta = json.loads((project / ".flux" / "cluster.json").read_text())
    proc, dsn_again = start_dev(project)
    try:
        with psycopg.connect(dsn_again, autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('public.kept')").fetchone()[0] is not None
            assert conn.execute("SHOW wal_level").fetchone()[0] == "logical"
    finally:
        stop_dev(proc)
    assert json.loads((project / ".flux" / "cluster.json").read_text())["data_dir"] == meta["data_dir"]


def test_dev_without_server_binaries_says_what_to_install(project, tmp_path_factory):
    empty_bin = tmp_path_factory.mktemp("nobin")
    env = {**os.environ, "FLUX_PG_BINDIR": str(empty_bin)}
    proc = subprocess.run([sys.executable, "-m", "flux", "dev"], cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "No PostgreSQL server binaries" in proc.stderr
    assert "apt-get install postgresql" in proc.stderr and "--database" in proc.stderr
    assert "Traceback" not in proc.stderr
