"""The README quickstart, end to end: flux init, flux dev, a signup whose payment call times out,
then flux requests / trace / why / state history from the project directory with no flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flux.pg.cluster import Cluster, free_port
from tests.support import communicate, wait_caught_up


def flux(project: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "flux", *args], cwd=project, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    return result


def start_stub(project: Path, port: int, *, slow: bool) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "stubs/payments.py", "--port", str(port), *(["--slow"] if slow else [])],
                            cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("the payments stub did not start")


@pytest.fixture
def demo(tmp_path: Path):
    project = tmp_path / "demo"
    flux(tmp_path, "init", "demo")
    yield project
    Cluster(state_dir=project / ".flux").destroy()


def test_the_quickstart_story(demo: Path):
    stub_port, port = free_port(), free_port()
    # The example calls the stub at 127.0.0.1:4010; this run uses a free port instead.
    for name in ("flux.toml", "functions/create_user.js"):
        path = demo / name
        path.write_text(path.read_text().replace("127.0.0.1:4010", f"127.0.0.1:{stub_port}"))
    dev = subprocess.Popen([sys.executable, "-m", "flux", "dev", "--port", str(port)], cwd=demo,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    stub = start_stub(demo, stub_port, slow=True)
    try:
        dsn = None
        for line in dev.stdout:
            if line.strip().startswith("psql "):
                dsn = line.strip().removeprefix("psql ")
            if f"gateway http://127.0.0.1:{port}" in line:
                break
        assert dsn, "flux dev did not print its DSN"
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(url + "/_flux/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)

        # 1. The signup writes a user, then the payment API times out.
        failed = httpx.post(url + "/signup", json={"email": "ada@example.com"}, timeout=30)
        assert failed.status_code == 500 and failed.json()["error"] == "Stripe API timeout"
        failed_id = failed.headers["x-flux-request-id"]
        user_id = failed.json()["user_id"]

        # 2. flux requests finds it.
        listed = json.loads(flux(demo, "requests", "--status", "5xx", "--json").stdout)
        assert [r["id"] for r in listed] == [failed_id]

        # 3. flux trace and flux why show it, joined to the row it changed.
        wait_caught_up(dsn)
        trace = json.loads(flux(demo, "trace", failed_id[:8], "--json").stdout)
        spans = {s["name"]: s for s in trace["spans"]}
        assert spans["stripe.create"]["attributes"]["timeout"] is True and trace["db_writes"] == 1
        why = flux(demo, "why", failed_id[:8]).stdout
        assert "Stripe API timeout" in why and "stripe.create" in why and "timeout" in why
        assert f"flux state history users --id {user_id}" in why

        # 4. The payment API is fixed; the retry completes the row.
        stub.kill()
        stub.wait()
        stub = start_stub(demo, stub_port, slow=False)
        retried = httpx.post(url + "/signup", json={"email": "ada@example.com"}, timeout=30)
        assert retried.status_code == 201
        wait_caught_up(dsn)
        history = json.loads(flux(demo, "state", "history", "users", "--id", str(user_id), "--json").stdout)
        assert [m["request_id"] for m in history["mutations"]] == [failed_id, retried.headers["x-flux-request-id"]]
        assert history["mutations"][1]["new"]["stripe_customer"] == retried.json()["stripe_customer"]
    finally:
        stub.kill()
        dev.send_signal(signal.SIGINT)
        out = communicate(dev)
    assert dev.returncode == 0, out
    assert "Traceback" not in out
