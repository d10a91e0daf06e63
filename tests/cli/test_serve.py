"""`flux serve`: a real process serving HTTP against --database, drained on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psycopg

from flux.pg.cluster import free_port
from tests.functions import write_project
from tests.support import wait_caught_up


def test_serve_answers_http_and_drains_its_traces_on_sigterm(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    write_project(tmp_path, {"create_user": """
        export default async function (req, ctx) {
          const { rows } = await ctx.db.query("INSERT INTO users (email) VALUES ($1) RETURNING id", [req.body.email]);
          return { status: 201, body: rows[0] };
        }
    """})
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux", "serve", "--database", dsn, "--attach", "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/create_user", json={"email": "a@x"}, timeout=5)
                break
            except httpx.ConnectError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "flux serve did not start listening"
                time.sleep(0.2)
        assert response.status_code == 201 and response.json() == {"id": 1}
        request_id = response.headers["x-flux-request-id"]
        wait_caught_up(dsn)  # the engine in the same process recorded the insert
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    with psycopg.connect(dsn) as check:
        assert check.execute("SELECT status FROM flux.trace_requests WHERE id = %s", (request_id,)).fetchone() == (201,)
        assert check.execute("SELECT request_id FROM flux.state_mutations").fetchall() == [(request_id,)]


def test_serve_refuses_a_database_flux_is_not_attached_to(tmp_path, dsn):
    write_project(tmp_path, {"f": "export default async function () { return {status: 200}; }"})
    result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", dsn], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not attached" in result.stderr and "flux attach" in result.stderr and "Traceback" not in result.stderr
