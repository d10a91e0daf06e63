"""`flux serve`: a real process serving HTTP against --database, drained on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from flux.cli.serve import run_stack
from flux.errors import InUseError
from flux.pg.cluster import Cluster, free_port
from tests.functions import write_project
from tests.proxy import ProxyProcess
from tests.support import communicate, first_answer, wait_caught_up

HELLO = "export default async function () { return {status: 200, body: 'hi'}; }"


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def start_serve(project, *args: str) -> tuple[subprocess.Popen, int]:
    """`flux serve` in `project`, once it answers HTTP."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux", "serve", *args, "--port", str(port)],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/_flux/health", timeout=5)
            return proc, port
        except httpx.ConnectError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("flux serve did not start listening:\n" + proc.stdout.read())
            time.sleep(0.2)


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
        response = first_answer(lambda: httpx.post(f"http://127.0.0.1:{port}/create_user", json={"email": "a@x"}, timeout=5),
                                proc=proc, seconds=60)
        assert response.status_code == 201 and response.json() == {"id": 1}
        request_id = response.headers["x-flux-request-id"]
        wait_caught_up(dsn)  # the engine in the same process recorded the insert
    finally:
        proc.send_signal(signal.SIGTERM)
        out = communicate(proc)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    with psycopg.connect(dsn) as check:
        assert check.execute("SELECT status FROM flux.trace_requests WHERE id = %s", (request_id,)).fetchone() == (201,)
        assert check.execute("SELECT request_id FROM flux.state_mutations").fetchall() == [(request_id,)]


def test_a_sigterm_while_serve_starts_stops_it_cleanly_before_it_serves(tmp_path, dsn, conn):
    """Before, the default action killed the process (exit -15, nothing said) until the gateway's handlers were in place."""
    write_project(tmp_path, {"hello": HELLO})
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    subprocess.run([sys.executable, "-m", "flux", "attach", "--database", dsn, "--tables", "t"], check=True, capture_output=True)
    proxy = ProxyProcess(dsn, hold_answer_to="flux-serve-check", release_after=2)  # holds its start check a while
    port = free_port()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "flux", "serve", "--database", proxy.dsn, "--port", str(port)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while not conn.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = 'flux-serve-check'").fetchone():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out = communicate(proc)
    finally:
        proxy.close()
    assert proc.returncode == 0, out
    assert "stopped before serving: SIGTERM arrived while starting" in out and "Traceback" not in out, out
    assert "serving" not in out.replace("stopped before serving", "")


def test_serve_started_before_its_database_waits_for_it_then_serves(tmp_path, dsn):
    """Boot order: it exited 4 at once (0.9 s), a restart loop that systemd gives up on after 5 starts in 10 s."""
    write_project(tmp_path, {"hello": HELLO})
    database_port, port = free_port(), free_port()
    down = make_conninfo(dsn, port=database_port)  # nothing listens there yet
    proc = subprocess.Popen([sys.executable, "-m", "flux", "serve", "--database", down, "--no-engine", "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proxy = None
    try:
        line = proc.stdout.readline()
        assert "waiting for the database, 60 s more (--wait-for-database): Cannot reach" in line, line
        proxy = ProxyProcess(dsn, port=database_port)  # the server comes up at that address
        assert first_answer(lambda: httpx.post(f"http://127.0.0.1:{port}/hello", timeout=5), proc=proc).text == "hi"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = communicate(proc)
        if proxy is not None:
            proxy.close()
    assert proc.returncode == 0, out
    assert "reached the database after" in out and "Traceback" not in out


def test_serve_whose_database_stays_unreachable_exits_4_once_its_wait_is_over(tmp_path):
    write_project(tmp_path, {"hello": HELLO})
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", down, "--wait-for-database", "1.5",
                             "--port", str(free_port())], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 4, result.stderr
    assert 1.5 < time.monotonic() - started < 30
    assert "WARNING flux: waiting for the database, " in result.stderr
    assert result.stderr.splitlines()[-2].endswith("Connection refused (waited 1.5 s, --wait-for-database)")


def test_a_stop_that_wrote_every_trace_says_so_last(tmp_path, dsn):
    """The log ended at `stopping: ...`, as a stop that hung or was killed would leave it."""
    write_project(tmp_path, {"hello": HELLO})
    proc, port = start_serve(tmp_path, "--database", dsn, "--no-engine")
    assert httpx.post(f"http://127.0.0.1:{port}/hello", timeout=10).status_code == 200
    proc.send_signal(signal.SIGTERM)
    out = communicate(proc)
    assert proc.returncode == 0, out
    assert out.splitlines()[-1].endswith(
        "INFO flux.gateway: gateway stopped: trace queue drained (1 written this run, 0 dropped by a full queue, 0 refused by "
        "the database)")


def test_serve_refuses_a_database_flux_is_not_attached_to(tmp_path, dsn):
    write_project(tmp_path, {"f": "export default async function () { return {status: 200}; }"})
    result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", dsn], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not attached" in result.stderr and "flux attach" in result.stderr and "Traceback" not in result.stderr


def test_serve_with_its_engine_refuses_a_role_that_may_not_replicate_before_it_serves(tmp_path, dsn, conn):
    write_project(tmp_path, {"hello": HELLO})
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    subprocess.run([sys.executable, "-m", "flux", "attach", "--database", dsn, "--tables", "t"], check=True, capture_output=True)
    conn.execute("CREATE ROLE serve_norepl LOGIN")
    try:
        conn.execute("GRANT USAGE ON SCHEMA flux TO serve_norepl;"
                     " GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA flux TO serve_norepl")
        # Before: it served, and its engine retried the walsender's refusal forever.
        result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", dsn.replace("postgres@", "serve_norepl@"),
                                 "--port", str(free_port())], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    finally:
        conn.execute("DROP OWNED BY serve_norepl")
        conn.execute("DROP ROLE serve_norepl")
    assert result.returncode == 4, result.stderr
    assert result.stderr.splitlines() == [
        "error: Role 'serve_norepl' may not use replication, which the engine needs to read the slot (role=serve_norepl, slot=flux)",
        'hint: As a superuser run: ALTER ROLE "serve_norepl" WITH REPLICATION;']


def test_serve_on_a_port_in_use_says_so_before_attaching(tmp_path, dsn, conn, taken_port):
    write_project(tmp_path, {"hello": HELLO})
    result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", dsn, "--attach", "--port", str(taken_port)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: Port {taken_port} is in use on 127.0.0.1" in result.stderr and "Traceback" not in result.stderr
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()").fetchone() == (0,)


def test_a_port_taken_after_the_check_fails_before_the_stack_says_it_serves(tmp_path, dsn, conn, taken_port):
    write_project(tmp_path, {"hello": HELLO})
    told: list[str | None] = []
    with pytest.raises(InUseError):
        run_stack(dsn=dsn, root=tmp_path, host="127.0.0.1", port=taken_port, workers=1, pool_size=1, record=True,
                  reload=False, engine=False, on_ready=told.append)
    assert told == []
    assert conn.execute("SELECT to_regclass('flux.trace_requests')").fetchone() == (None,)  # nothing started


@pytest.mark.slow
def test_serve_counts_the_batch_it_was_retrying_among_the_traces_it_could_not_write(tmp_path):
    cluster = Cluster(state_dir=tmp_path / "pg")
    try:
        info = cluster.start()
        project = write_project(tmp_path / "app", {"hello": HELLO})
        proc, port = start_serve(project, "--database", info.dsn, "--no-engine")
        try:
            cluster.stop(mode="immediate")
            for _ in range(3):
                assert httpx.post(f"http://127.0.0.1:{port}/hello", timeout=10).status_code == 200
            time.sleep(1)  # the writer has taken the three as a batch and retries it: none is queued
        finally:
            proc.send_signal(signal.SIGTERM)
            out = communicate(proc)
    finally:
        cluster.destroy()
    assert "gave up draining traces after 10s: 3 records not written" in out, out


def _traces_of(dsn: str, function: str, count: int, timeout: float = 15) -> list[tuple]:
    """(status, error, gateway span attributes) of `function`'s trace rows, once there are `count`."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as check:
        while True:
            rows = check.execute("SELECT status, error, spans->0->'attributes' FROM flux.trace_requests WHERE function = %s",
                                 (function,)).fetchall()
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)


def test_a_client_that_hangs_up_does_not_stop_its_function_which_commits_and_is_recorded(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    project = write_project(tmp_path, {"slow_signup": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", [req.body.email]);
          await ctx.db.query("SELECT pg_sleep(1)", []);
          return { status: 201, body: "created" };
        }
    """})
    proc, port = start_serve(project, "--database", dsn, "--no-engine")
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://127.0.0.1:{port}/slow_signup", json={"email": "gone@x"}, timeout=0.3)
        [(status, error, attributes)] = _traces_of(dsn, "slow_signup", 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = communicate(proc)
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert (status, error) == (201, "the client disconnected before the response was sent")
    assert attributes["flux.client_disconnected"] is True
    assert conn.execute("SELECT email FROM users").fetchall() == [("gone@x",)]


def test_a_client_that_hangs_up_before_its_body_arrives_is_recorded_as_499_and_nothing_runs(tmp_path, dsn, conn):
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    project = write_project(tmp_path, {"signup": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO users (email) VALUES ($1)", ["never"]);
          return { status: 201 };
        }
    """})
    proc, port = start_serve(project, "--database", dsn, "--no-engine")
    try:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"POST /signup HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           b"content-length: 100\r\n\r\n{\"email\"")
            time.sleep(0.3)
        [(status, error, attributes)] = _traces_of(dsn, "signup", 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        communicate(proc)
    assert (status, error) == (499, "the client disconnected before its request body arrived")
    assert attributes["flux.client_disconnected"] is True
    assert conn.execute("SELECT count(*) FROM users").fetchone() == (0,)


SLOW_SIGNUP = """
    export default async function (req, ctx) {
      await ctx.db.query("INSERT INTO users (email) VALUES ($1)", [req.body.email]);
      await ctx.db.query("SELECT pg_sleep(0.7)", []);
      return { status: 201, body: "created" };
    }
"""


def _gateway_load(port: int) -> tuple[int, int]:
    health = httpx.get(f"http://127.0.0.1:{port}/_flux/health", timeout=5).json()
    return health["running"], health["queued"]


def _wait_for_load(port: int, running: int, queued: int) -> None:
    deadline = time.monotonic() + 30
    while (load := _gateway_load(port)) != (running, queued):
        assert time.monotonic() < deadline, load
        time.sleep(0.02)


def test_a_client_that_hangs_up_while_waiting_for_a_worker_is_recorded_as_499_and_nothing_runs(tmp_path, dsn, conn):
    import threading

    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    project = write_project(tmp_path, {"signup": SLOW_SIGNUP})
    proc, port = start_serve(project, "--database", dsn, "--no-engine", "--workers", "1")
    try:
        first = threading.Thread(target=httpx.post, args=(f"http://127.0.0.1:{port}/signup",),
                                 kwargs={"json": {"email": "first@x"}, "timeout": 10})
        first.start()
        _wait_for_load(port, running=1, queued=0)  # the first holds the only worker
        body = b'{"email": "gone@x"}'
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"POST /signup HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            _wait_for_load(port, running=1, queued=1)
        first.join()
        rows = sorted(_traces_of(dsn, "signup", 2), key=lambda r: r[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        communicate(proc)
    assert [(status, error) for status, error, _ in rows] == [
        (201, None), (499, "the client disconnected while its request waited for a free worker")]
    assert conn.execute("SELECT email FROM users").fetchall() == [("first@x",)]


def test_at_shutdown_started_functions_finish_and_queued_requests_are_answered_503_all_recorded(tmp_path, dsn, conn):
    import concurrent.futures

    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    project = write_project(tmp_path, {"signup": SLOW_SIGNUP}, "[limits]\ntimeout_ms = 1000\n")
    proc, port = start_serve(project, "--database", dsn, "--no-engine", "--workers", "1")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        sent = [pool.submit(httpx.post, f"http://127.0.0.1:{port}/signup", json={"email": f"{n}@x"}, timeout=30)
                for n in range(6)]
        # Until every request has reached the gateway: running, waiting for the worker, or answered
        # (counted first, so that none counts twice).
        deadline = time.monotonic() + 30
        while sum(request.done() for request in sent) + sum(_gateway_load(port)) < len(sent):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        concurrent.futures.wait(sent)
    out = communicate(proc)
    assert proc.returncode == 0 and "Traceback" not in out, out
    answered = sorted(request.result().status_code for request in sent)  # each client got its answer
    with psycopg.connect(dsn, autocommit=True) as check:
        statuses = sorted(r[0] for r in check.execute("SELECT status FROM flux.trace_requests WHERE function = 'signup'"))
        created = check.execute("SELECT count(*) FROM users").fetchone()[0]
    assert len(statuses) == 6 and set(statuses) <= {201, 503}, statuses  # every request recorded
    assert 503 in statuses and statuses.count(201) == created  # a 503 never ran; a 201 committed
    assert answered == statuses


def test_an_engine_that_stops_in_the_stack_says_so_when_it_stops(dsn, caplog):
    from flux.errors import NotFoundError

    with caplog.at_level("ERROR", logger="flux"), pytest.raises(NotFoundError):  # not attached: no slot
        run_stack(dsn=dsn, root=None, host="127.0.0.1", port=0, workers=1, pool_size=1, record=False, reload=False,
                  engine=True)
    # Before: nothing until the process stopped, while a gateway served on without capture.
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the CDC engine stopped: ")]
    assert len(stopped) == 1 and "Replication slot 'flux' does not exist" in stopped[0] and "(hint: Run `flux attach`" in stopped[0]


def test_serve_refuses_a_database_whose_server_has_another_databases_flux_slot(tmp_path, dsn, pg_info):
    write_project(tmp_path, {"f": "export default async function () { return {status: 200}; }"})
    with psycopg.connect(pg_info.dsn, autocommit=True) as admin:  # the cluster's own database, not the test's
        admin.execute("SELECT pg_create_logical_replication_slot('flux', 'pgoutput')")
        try:
            result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", dsn], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=60)
        finally:
            admin.execute("SELECT pg_drop_replication_slot('flux')")
    assert result.returncode == 2, result.stderr
    assert "slot 'flux' is database postgres's" in result.stderr and "--no-engine" in result.stderr


def test_serve_project_names_the_directory_holding_flux_toml_not_one_inside_it(tmp_path, dsn):
    write_project(tmp_path, {"f": "export default async function () { return {status: 200}; }"})
    result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", dsn, "--project", "functions"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "--project functions has no flux.toml" in result.stderr


@pytest.mark.parametrize("reload", [False, True], ids=["plain", "reload"])
def test_serve_of_a_project_without_functions_says_every_request_is_a_404(tmp_path, dsn, reload):
    """It served and answered every request 404, with nothing in its output to say why."""
    (tmp_path / "flux.toml").write_text('[project]\nname = "t"\n')
    proc, _ = start_serve(tmp_path, "--database", dsn, "--no-engine", *(["--reload"] if reload else []))
    proc.send_signal(signal.SIGTERM)
    out = communicate(proc)
    assert proc.returncode == 0, out
    said = f"no functions in {tmp_path / 'functions'}: every request is answered 404 until one is added (functions/NAME.js; "
    assert said + ("each is served as soon as it is saved)" if reload else "then restart flux serve, or serve with --reload)") in out


def test_serve_reload_follows_a_project_symlink_pointed_at_another_release(tmp_path, dsn):
    """`--project /srv/app/current` was resolved at start: a deploy that swapped `current` to a new
    release was never reloaded, and the old release served until a restart."""
    for release in ("v1", "v2"):
        write_project(tmp_path / release, {"r": f"export default async function () {{ return {{status: 200, body: '{release}'}}; }}"})
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "v1")
    proc, port = start_serve(tmp_path, "--project", str(current), "--database", dsn, "--no-engine", "--reload")
    try:
        (tmp_path / "next").symlink_to(tmp_path / "v2")
        os.replace(tmp_path / "next", current)  # atomic, as deploy tools swap it
        deadline = time.monotonic() + 10
        while (answer := httpx.post(f"http://127.0.0.1:{port}/r", timeout=5).text) != "v2" and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        communicate(proc)
    assert answer == "v2"


def test_serve_outside_a_project_says_so_before_touching_the_database(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", f"postgresql://postgres@127.0.0.1:{free_port()}/x"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: No flux.toml in {tmp_path} or its parents" in result.stderr and "hint: Run `flux init`" in result.stderr


LONG_SIGNUP = """
    export default async function (req, ctx) {
      await ctx.db.query("INSERT INTO users (email) VALUES ($1)", [req.body.email]);
      await ctx.db.query("SELECT pg_sleep(20)", []);
      return { status: 201, body: "created" };
    }
"""


def test_a_second_stop_signal_stops_at_once_and_the_cut_function_rolls_back_answered_503(tmp_path, dsn, conn):
    """A second Ctrl-C was ignored: the server waited for every running function up to its time limit."""
    import concurrent.futures

    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    project = write_project(tmp_path, {"signup": LONG_SIGNUP}, "[limits]\ntimeout_ms = 30000\n")
    proc, port = start_serve(project, "--database", dsn, "--no-engine")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sent = pool.submit(httpx.post, f"http://127.0.0.1:{port}/signup", json={"email": "a@x"}, timeout=60)
        _wait_for_load(port, running=1, queued=0)
        time.sleep(0.3)  # into its pg_sleep
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out = communicate(proc)
        took = time.monotonic() - stopped_at
        answer = sent.result()
    assert took < 8, out
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert "stopping: 1 function(s) running" in out and "stopping now: 1 running function(s) cancelled" in out, out
    assert answer.status_code == 503 and "stopped before the function finished" in answer.json()["error"]
    assert [row[0] for row in _traces_of(dsn, "signup", 1)] == [503]
    assert conn.execute("SELECT count(*) FROM users").fetchone() == (0,)


def test_a_stop_that_leaves_traces_unwritten_exits_1_and_says_how_many(tmp_path, dsn, conn):
    """It exited 0, as after a clean stop, with the loss only in a log line."""
    project = write_project(tmp_path, {"hello": HELLO})
    proc, port = start_serve(project, "--database", dsn, "--no-engine")
    conn.autocommit = False
    conn.execute("LOCK TABLE flux.trace_requests")  # the writer's batch waits on it
    try:
        for _ in range(3):
            assert httpx.post(f"http://127.0.0.1:{port}/hello", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # no need to wait out the drain's 10 s
        out = communicate(proc)
    finally:
        conn.rollback()
    assert proc.returncode == 1, out
    assert "error: Stopped with 3 trace record(s) not written" in out and "Traceback" not in out, out


@pytest.mark.parametrize("option", [["--workers", "0"], ["--pool-size", "-1"]])
def test_serve_refuses_workers_below_one_and_a_negative_pool_size(tmp_path, option):
    """--workers 0 was accepted, and every request then waited for a worker forever."""
    write_project(tmp_path, {"hello": HELLO})
    result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", "postgresql://x@127.0.0.1:1/x", *option],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert option[0] in result.stderr and "Traceback" not in result.stderr


def test_serve_with_an_invalid_flux_toml_says_so_before_attaching_or_starting_the_engine(tmp_path, dsn, conn):
    """It attached and started the engine first, then failed on flux.toml."""
    write_project(tmp_path, {"hello": HELLO}, "[limits\n")
    result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", dsn, "--attach", "--port", str(free_port())],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "flux.toml is not valid TOML" in result.stderr and "streaming slot" not in result.stderr
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()").fetchone() == (0,)


def test_serve_bounds_its_worker_queue_as_its_flags_say_and_health_reports_it(tmp_path, dsn, conn):
    project = write_project(tmp_path, {"hello": HELLO})
    proc, port = start_serve(project, "--database", dsn, "--no-engine", "--workers", "2", "--max-queue", "3",
                             "--queue-timeout", "2.5")
    try:
        health = httpx.get(f"http://127.0.0.1:{port}/_flux/health", timeout=5).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        communicate(proc)
    assert {k: health[k] for k in ("workers", "max_queue", "queue_timeout_seconds", "refused")} == {
        "workers": 2, "max_queue": 3, "queue_timeout_seconds": 2.5, "refused": 0}


def _engine_of(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/_flux/health", timeout=5).json()["engine"]


def _wait_for_engine(port: int, state: str) -> dict:
    deadline = time.monotonic() + 30
    while (engine := _engine_of(port))["state"] != state:
        assert time.monotonic() < deadline, engine
        time.sleep(0.1)
    return engine


def test_a_second_serve_on_one_database_stands_by_and_its_engine_takes_over_when_the_first_stops(tmp_path, dsn, conn):
    """Scaled out behind a load balancer, the second's engine warned every 10 s, forever, that the slot was held."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    project = write_project(tmp_path, {"hello": HELLO})
    first, first_port = start_serve(project, "--database", dsn, "--attach")
    second = None
    try:
        assert _wait_for_engine(first_port, "active")["holder"] is None
        second, second_port = start_serve(project, "--database", dsn)
        standby = _wait_for_engine(second_port, "standby")
        status = subprocess.run([sys.executable, "-m", "flux", "cdc", "status", "--database", dsn, "--json"],
                                capture_output=True, text=True, timeout=60)
        first.send_signal(signal.SIGTERM)
        first_out = communicate(first)
        _wait_for_engine(second_port, "active")
        conn.execute("INSERT INTO t VALUES (1)")
        wait_caught_up(dsn)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        second_out = second.communicate(timeout=60)[0] if second is not None else ""
    assert standby == {"state": "standby", "slot": "flux", "holder": {"pid": first.pid, "host": socket.gethostname()}}
    reported = json.loads(status.stdout)
    assert (reported["consumer_pid"], reported["standbys"]) == (first.pid, [{"pid": second.pid, "host": socket.gethostname()}])
    assert first.returncode == 0 and second.returncode == 0, first_out + second_out
    assert "WARNING" not in second_out and "Traceback" not in second_out, second_out
    assert f"standing by: slot flux is held by the Flux engine of pid {first.pid}" in second_out
    assert conn.execute("SELECT count(*) FROM flux.state_mutations WHERE table_name = 't'").fetchone() == (1,)


MINUTE_SIGNUP = """
    export default async function (req, ctx) {
      await ctx.db.query("INSERT INTO users (email) VALUES ($1)", [req.body.email]);
      await ctx.db.query("SELECT pg_sleep(62)", []);
      return { status: 201, body: "created" };
    }
"""


@pytest.mark.slow
def test_a_stop_waits_for_a_function_whose_time_limit_is_past_a_minute_then_writes_its_trace(tmp_path, dsn, conn):
    """Hypercorn gives the app's shutdown (finishing functions, then the trace drain) 60 s of its own: with
    a longer time limit, a function whose client had gone was cut off there, with a traceback, its trace lost."""
    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    project = write_project(tmp_path, {"signup": MINUTE_SIGNUP}, "[limits]\ntimeout_ms = 70000\n")
    proc, port = start_serve(project, "--database", dsn, "--no-engine")
    body = b'{"email": "a@x"}'
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"POST /signup HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        _wait_for_load(port, running=1, queued=0)
    time.sleep(0.5)  # the gateway has seen its client go: the function runs on, detached
    stopped_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    took = time.monotonic() - stopped_at
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert 60 < took < 70 + 30, took  # its time limit, then the drain: within the documented bound
    [(status, error, attributes)] = _traces_of(dsn, "signup", 1)
    assert (status, error, attributes["flux.client_disconnected"]) == (
        201, "the client disconnected before the response was sent", True)
    assert conn.execute("SELECT count(*) FROM users").fetchone() == (1,)


def test_with_the_worker_queue_full_a_request_is_refused_503_before_its_body_arrives(tmp_path, dsn, conn):
    """A request beyond the queue's bound was kept until its body arrived, only to wait on."""
    import threading

    conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text)")
    project = write_project(tmp_path, {"signup": LONG_SIGNUP})  # 504 after the default 5 s
    proc, port = start_serve(project, "--database", dsn, "--no-engine", "--workers", "1", "--max-queue", "0")
    try:
        first = threading.Thread(target=httpx.post, args=(f"http://127.0.0.1:{port}/signup",),
                                 kwargs={"json": {"email": "first@x"}, "timeout": 30})
        first.start()
        _wait_for_load(port, running=1, queued=0)
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.settimeout(3)  # the body never comes: the answer must not wait for it
            client.sendall(b"POST /signup HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           b"content-length: 100\r\n\r\n")
            head = client.recv(65536).decode("latin-1")
        first.join()
        statuses = sorted(row[0] for row in _traces_of(dsn, "signup", 2))
    finally:
        proc.send_signal(signal.SIGTERM)
        communicate(proc)
    assert head.startswith("HTTP/1.1 503") and "retry-after: 1" in head.lower() and "x-flux-request-id" in head.lower(), head
    assert statuses == [503, 504]


def _idle_connection_open_after(port: int, idle: float) -> bool:
    """Whether a keep-alive connection that served one request still serves a second after `idle` seconds."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/_flux/health")
        assert conn.getresponse().read()
        time.sleep(idle)
        try:
            conn.request("GET", "/_flux/health")  # on the same connection: http.client opens no other
            return conn.getresponse().status == 200
        except (http.client.RemoteDisconnected, ConnectionError):  # the server had closed it
            return False
    finally:
        conn.close()


def test_serve_keeps_an_idle_connection_past_hypercorns_5_s_and_as_long_as_keep_alive_says(tmp_path, dsn):
    """Behind a load balancer whose idle timeout is 60 s, a connection closed after 5 s idle was one
    the balancer could reuse as it closed: its client got a 502."""
    project = write_project(tmp_path, {"hello": HELLO})
    results = []
    for args, idle in [((), 6.0), (("--keep-alive", "1"), 2.0)]:
        proc, port = start_serve(project, "--database", dsn, "--no-engine", *args)
        try:
            results.append(_idle_connection_open_after(port, idle))
        finally:
            proc.send_signal(signal.SIGTERM)
            communicate(proc)
    assert results == [True, False]


def test_serve_through_pgbouncer_refuses_to_start_its_engine_there_before_it_serves(tmp_path, dsn, bouncer_dsn, conn):
    write_project(tmp_path, {"hello": HELLO})
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    subprocess.run([sys.executable, "-m", "flux", "attach", "--database", dsn, "--tables", "t"], check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", bouncer_dsn, "--port", str(free_port())],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "through a connection pooler" in result.stderr and "--engine-database" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_runs_its_engine_on_engine_database_and_the_gateway_through_pgbouncer(tmp_path, dsn, bouncer_dsn, conn):
    write_project(tmp_path, {"add": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO t (id) VALUES ($1)", [req.body.id]);
          return {status: 200, body: "ok"};
        }"""})
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    subprocess.run([sys.executable, "-m", "flux", "attach", "--database", dsn, "--tables", "t"], check=True, capture_output=True)
    proc, port = start_serve(tmp_path, "--database", bouncer_dsn, "--engine-database", dsn)
    try:
        for n in range(4):
            assert httpx.post(f"http://127.0.0.1:{port}/add", json={"id": n}, timeout=10).status_code == 200
        wait_caught_up(dsn)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert conn.execute("SELECT count(*) FROM flux.state_mutations WHERE request_id IS NOT NULL").fetchone()[0] == 4


def test_an_engine_database_that_cannot_be_reached_is_named_as_such(tmp_path, dsn):
    write_project(tmp_path, {"hello": HELLO})
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    result = subprocess.run([sys.executable, "-m", "flux", "serve", "--database", dsn, "--engine-database", closed,
                             "--wait-for-database", "0", "--port", str(free_port())], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 4, result.stderr
    assert result.stderr.startswith("error: Cannot reach the database given by --engine-database:")



def test_functions_database_runs_ctx_db_as_a_role_that_cannot_read_the_recordings(tmp_path, dsn, conn):
    """With one role for both, every function could read every tenant's traces and row images."""
    from tests.cdc.test_roles import engine_role

    write_project(tmp_path, {"peek": """
        export default async function (req, ctx) {
          await ctx.db.query("INSERT INTO t (id) VALUES ($1)", [req.body.id]);
          await ctx.db.query("SAVEPOINT peek");
          try { await ctx.db.query("SELECT count(*) FROM flux.trace_requests"); return {status: 200, body: "read the traces"}; }
          catch (e) { await ctx.db.query("ROLLBACK TO SAVEPOINT peek"); return {status: 200, body: e.sqlstate}; }
        }"""})
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    subprocess.run([sys.executable, "-m", "flux", "attach", "--database", dsn, "--tables", "t"], check=True, capture_output=True)
    with engine_role(conn, dsn, replication=False) as (role, role_dsn):
        conn.execute(f"GRANT SELECT, INSERT ON t TO {role}")
        proc, port = start_serve(tmp_path, "--database", dsn, "--functions-database", role_dsn)
        try:
            answer = httpx.post(f"http://127.0.0.1:{port}/peek", json={"id": 1}, timeout=10)
            wait_caught_up(dsn)
        finally:
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=60)[0]
    assert (answer.status_code, answer.text) == (200, "42501"), out  # insufficient_privilege
    request_id = answer.headers["x-flux-request-id"]
    assert conn.execute("SELECT count(*) FROM flux.trace_requests WHERE id = %s", (request_id,)).fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM flux.state_mutations WHERE request_id = %s", (request_id,)).fetchone()[0] == 1
    assert "may use" not in out  # the role reaches no flux table: nothing to warn of


def test_functions_database_whose_role_reaches_the_recordings_is_warned_of(tmp_path, dsn, conn):
    write_project(tmp_path, {"hello": HELLO})
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    subprocess.run([sys.executable, "-m", "flux", "attach", "--database", dsn, "--tables", "t"], check=True, capture_output=True)
    proc, _ = start_serve(tmp_path, "--database", dsn, "--functions-database", dsn)  # the superuser reaches everything
    proc.send_signal(signal.SIGTERM)
    out = " ".join(proc.communicate(timeout=60)[0].split())
    assert "functions' ctx.db (--functions-database, role" in out and "flux.trace_requests" in out, out


def test_a_stopping_server_refuses_health_probes_while_its_functions_in_flight_finish(tmp_path, dsn):
    """What a load balancer needs of a draining instance: its probe fails from the stop signal on, on a
    new connection and on a kept-alive one, while the request in flight still gets its answer."""
    write_project(tmp_path, {"slow": "export default async function () { await new Promise(r => setTimeout(r, 3000)); "
                                     "return {status: 200, body: 'done'}; }"})
    proc, port = start_serve(tmp_path, "--database", dsn, "--attach", "--no-engine")
    base = f"http://127.0.0.1:{port}"
    answers: list[int] = []
    try:
        with httpx.Client(base_url=base, timeout=10) as kept:
            assert kept.get("/_flux/health").status_code == 200  # its connection stays open
            slow = threading.Thread(target=lambda: answers.append(httpx.post(base + "/slow", timeout=20).status_code))
            slow.start()
            time.sleep(1)  # the function is running
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            probes = []
            with httpx.Client(base_url=base, timeout=2) as new:
                for client in (kept, new):
                    try:
                        probes.append(client.get("/_flux/health").status_code)
                    except httpx.TransportError as exc:
                        probes.append(type(exc).__name__)
            slow.join(20)
    finally:
        if proc.poll() is None and not answers:  # stopped before the test's signal: stop it now
            proc.kill()
        out = communicate(proc)
    assert probes == ["ConnectError", "ConnectError"], out
    assert answers == [200], out
