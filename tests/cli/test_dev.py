"""`flux dev`: the embedded PostgreSQL under .flux/, attached, with the engine in the foreground."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from flux.pg.cluster import Cluster, free_port
from tests.functions import write_project
from tests.support import communicate, first_answer, wait_caught_up


def start_dev(project: Path, *args: str, env: dict[str, str] | None = None, lines: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`flux dev` in `project`, once it printed its DSN; `lines` receives what it printed until then."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux", "dev", *args], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    deadline = time.monotonic() + 60
    lines = [] if lines is None else lines
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.strip().startswith("psql "):
            return proc, line.strip().removeprefix("psql ")
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("flux dev did not print its DSN:\n" + "".join(lines))


def run_dev(project: Path, *args: str) -> subprocess.CompletedProcess:
    """A `flux dev` expected to stop by itself, at start-up."""
    return subprocess.run([sys.executable, "-m", "flux", "dev", *args], cwd=project, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "200"})


def stop_dev(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    out = communicate(proc)
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


def test_dev_says_where_it_kept_the_data_when_it_stops(project):
    """As root the server account cannot reach a project under /tmp/pytest-of-root: the data moves
    to /var/lib/flux/clusters, and 'data kept in .flux/' sent the user to the wrong place."""
    proc, _ = start_dev(project)
    out = stop_dev(proc)
    data_dir = Path(json.loads((project / ".flux" / "cluster.json").read_text())["data_dir"])
    shown = data_dir.relative_to(project) if data_dir.is_relative_to(project) else data_dir  # flux dev runs in the project
    assert f"data kept in {shown})" in " ".join(out.split()), out


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


def test_a_second_dev_in_the_same_project_refuses_at_once_and_leaves_the_first_running(project):
    first, dsn = start_dev(project)
    try:
        started = time.monotonic()
        second = run_dev(project)
        assert time.monotonic() - started < 15  # refused before starting anything
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"flux dev is already running for this project (pid {first.pid})" in second.stderr
        assert "hint:" in second.stderr and "Traceback" not in second.stderr
        with psycopg.connect(dsn, autocommit=True) as conn:  # the first one's database is still up
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        stop_dev(first)
    assert first.returncode == 0


@pytest.mark.parametrize("deleted", ["dev.lock", ".flux"])
def test_a_second_dev_refuses_even_when_the_first_ones_lock_file_or_flux_dir_was_deleted(project, deleted):
    """The lock was a flock on .flux/dev.lock: deleting it (or .flux/, `git clean -fdx`) while dev ran removed the
    locked file, and a second flux dev started beside the first, on the same cluster."""
    first, dsn = start_dev(project)
    try:
        shutil.rmtree(project / ".flux") if deleted == ".flux" else (project / ".flux" / "dev.lock").unlink()
        second = subprocess.Popen([sys.executable, "-m", "flux", "dev"], cwd=project, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
        try:
            out, err = second.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # it started: stopped as a user would, so that it leaves no server behind
            out = stop_dev(second)
            pytest.fail("a second flux dev started beside the first:\n" + out)
        assert second.returncode == 2, out + err
        assert f"flux dev is already running for this project (pid {first.pid})" in err
        assert "Starting embedded PostgreSQL" not in out
    finally:
        stop_dev(first)
    assert first.returncode == 0


def test_dev_leaves_running_an_embedded_server_it_did_not_start_and_prints_a_command_that_stops_it(project):
    cluster = Cluster(state_dir=project / ".flux")
    cluster.start()  # started by someone else, who may still be using it
    printed: list[str] = []
    proc, _ = start_dev(project, lines=printed)
    out = stop_dev(proc)
    assert proc.returncode == 0, out
    assert "Using the embedded PostgreSQL already running" in "".join(printed)
    assert "Embedded PostgreSQL left running" in out and "Embedded PostgreSQL stopped" not in out
    assert cluster.is_running()
    command = out.split("Embedded PostgreSQL left running", 1)[1].split("(", 1)[1].rsplit(" stops it)", 1)[0]
    stopped = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr  # as printed, even as root
    assert not cluster.is_running()


@pytest.mark.parametrize("stop_signal", [signal.SIGHUP, signal.SIGTERM])
def test_dev_with_functions_stops_cleanly_on_a_closed_terminal_or_sigterm(project, stop_signal):
    write_project(project, {"hello": "export default async function () { return {status: 200}; }"})
    port = free_port()
    proc, _ = start_dev(project, "--port", str(port))
    # serving, so the signal finds the gateway running
    assert first_answer(lambda: httpx.post(f"http://127.0.0.1:{port}/hello", timeout=5)).status_code == 200
    proc.send_signal(stop_signal)
    out = communicate(proc)
    assert proc.returncode == 0, out
    assert "Embedded PostgreSQL stopped" in out, out
    assert not Cluster(state_dir=project / ".flux").is_running()


def test_a_sigterm_while_dev_starts_its_database_stops_it_cleanly_without_serving(project):
    """Before, the default action killed the process (exit -15) and left the embedded server running."""
    write_project(project, {"hello": "export default async function () { return {status: 200}; }"})
    proc = subprocess.Popen([sys.executable, "-m", "flux", "dev", "--port", str(free_port())], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    first = proc.stdout.readline()
    assert first.startswith("Starting embedded PostgreSQL"), first
    proc.send_signal(signal.SIGTERM)  # while the server starts: its handlers are not in place yet
    out = communicate(proc)
    assert proc.returncode == 0, out
    assert "stopped before serving: SIGTERM arrived while starting" in out and "Embedded PostgreSQL stopped" in out, out
    assert "gateway http" not in out and "Traceback" not in out
    assert not Cluster(state_dir=project / ".flux").is_running()


def test_dev_bounds_its_worker_queue_as_its_flags_say(project):
    write_project(project, {"hello": "export default async function () { return {status: 200}; }"})
    port = free_port()
    proc, _ = start_dev(project, "--port", str(port), "--workers", "2", "--max-queue", "3", "--queue-timeout", "2.5")
    try:
        health = first_answer(lambda: httpx.get(f"http://127.0.0.1:{port}/_flux/health", timeout=5)).json()
    finally:
        stop_dev(proc)
    assert {k: health[k] for k in ("workers", "max_queue", "queue_timeout_seconds")} == {
        "workers": 2, "max_queue": 3, "queue_timeout_seconds": 2.5}


def test_dev_without_functions_stops_cleanly_on_sighup(project):
    proc, _ = start_dev(project)
    proc.send_signal(signal.SIGHUP)
    out = communicate(proc)
    assert proc.returncode == 0 and "Embedded PostgreSQL stopped" in out, out
    assert not Cluster(state_dir=project / ".flux").is_running()


def test_dev_stops_cleanly_after_its_terminal_hung_up(project):
    """Every write to a terminal that hung up fails (EIO): its last word about the embedded server is skipped,
    and it still stops the server and exits 0."""
    import pty
    import select

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "flux", "dev"], cwd=project, stdout=follower, stderr=follower,
                            env={**os.environ, "COLUMNS": "200"})
    os.close(follower)
    out, deadline = b"", time.monotonic() + 60
    while b"psql " not in out and time.monotonic() < deadline:
        if select.select([leader], [], [], 1)[0]:
            out += os.read(leader, 65536)
    os.close(leader)  # the terminal is gone
    assert b"psql " in out, out
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=60) == 0
    assert not Cluster(state_dir=project / ".flux").is_running()


def test_dev_on_a_port_in_use_says_so_before_starting_the_database(project):
    write_project(project, {"hello": "export default async function () { return {status: 200}; }"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_dev(project, "--port", str(port))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: Port {port} is in use on 127.0.0.1" in result.stderr and "--port N" in result.stderr
    assert "gateway http" not in result.stdout and "Starting embedded PostgreSQL" not in result.stdout
    assert "Traceback" not in result.stderr
    assert not Cluster(state_dir=project / ".flux").is_running()


def test_dev_on_its_embedded_servers_recorded_port_moves_the_server_and_serves_there(project):
    """The gateway's port was checked free (the server was stopped), then the server started on it, and the
    gateway said "Port N is in use ... stop the process that listens there": its own PostgreSQL."""
    write_project(project, {"hello": "export default async function () { return {status: 200, body: 'hi'}; }"})
    cluster = Cluster(state_dir=project / ".flux")
    port = cluster.start().port
    cluster.stop()
    printed: list[str] = []
    proc, dsn = start_dev(project, "--port", str(port), lines=printed)
    try:
        assert f"(port {port} is the gateway's --port: PostgreSQL listens on" in "".join(printed)
        assert f":{port}/" not in dsn
        assert first_answer(lambda: httpx.post(f"http://127.0.0.1:{port}/hello", timeout=5)).text == "hi"
    finally:
        out = stop_dev(proc)
    assert proc.returncode == 0, "".join(printed) + out


def test_dev_on_the_port_of_its_embedded_server_already_running_says_so(project):
    write_project(project, {"hello": "export default async function () { return {status: 200}; }"})
    cluster = Cluster(state_dir=project / ".flux")
    port = cluster.start().port
    try:
        result = run_dev(project, "--port", str(port))
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"error: Port {port} is this project's embedded PostgreSQL's, which is running" in result.stderr
        assert "hint: Pass another --port for the gateway." in result.stderr
        assert cluster.is_running()  # not its to stop
    finally:
        cluster.stop()


def test_dev_warns_that_other_commands_read_flux_database_url(project):
    elsewhere = f"postgresql://postgres@127.0.0.1:{free_port()}/production"
    printed: list[str] = []
    proc, dsn = start_dev(project, env={"FLUX_DATABASE_URL": elsewhere}, lines=printed)
    stop_dev(proc)
    assert dsn != elsewhere  # it used its embedded database
    warning = next(line for line in printed if line.startswith("warning: FLUX_DATABASE_URL is set"))
    assert "flux dev uses its embedded database" in warning and "unset it, or pass them --database" in warning


def test_dev_with_a_bad_schema_sql_is_a_config_error(project):
    write_project(project, {"hello": "export default async function () { return {status: 200}; }"},
                  '[project]\nname = "t"\n[dev]\nsetup_sql = "schema.sql"\n')
    (project / "schema.sql").write_text("CREATE TABLEX oops;\n")
    result = run_dev(project, "--port", str(free_port()))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: Running schema.sql (line 1) failed: syntax error" in result.stderr and "hint: Fix the SQL" in result.stderr
    assert "Embedded PostgreSQL stopped" in result.stdout


def test_dev_against_an_unreachable_database_says_so_rather_than_blaming_the_sql(project):
    write_project(project, {"hello": "export default async function () { return {status: 200}; }"},
                  '[project]\nname = "t"\n[dev]\nsetup_sql = "schema.sql"\n')
    (project / "schema.sql").write_text("CREATE TABLE IF NOT EXISTS t (id int);\n")
    result = run_dev(project, "--port", str(free_port()), "--database", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "Cannot reach the database given by --database" in result.stderr
    assert "Check that the server is running" in result.stderr and "Fix the SQL" not in result.stderr


def test_an_error_in_schema_sql_names_its_line(dsn, tmp_path):
    from flux.cli.dev import _run_setup_sql
    from flux.errors import ConfigError

    schema = tmp_path / "schema.sql"
    schema.write_text("CREATE TABLE IF NOT EXISTS a (id int);\n\nCREATE TABLE b (id int,\n  name txt);\n")
    with pytest.raises(ConfigError) as caught:
        _run_setup_sql(dsn, schema)
    assert caught.value.message.startswith("Running schema.sql (line 4) failed: type \"txt\" does not exist")


def test_dev_in_a_project_without_functions_says_where_to_add_one(project):
    (project / "flux.toml").write_text('[project]\nname = "t"\n')
    printed: list[str] = []
    proc, _ = start_dev(project, "--port", str(free_port()), lines=printed)
    out = stop_dev(proc)
    assert "functions: none yet: add functions/NAME.js" in "".join(printed) + out


def test_dev_outside_a_project_says_why_it_serves_no_functions(project):
    """It ran the database and the engine only, silently: a project whose flux.toml was missing served nothing."""
    (project / "functions").mkdir()
    (project / "functions" / "hello.js").write_text("export default async function () { return {status: 200}; }")
    printed: list[str] = []
    proc, _ = start_dev(project, lines=printed)
    out = "".join(printed) + stop_dev(proc)
    assert f"no gateway: no flux.toml in {project} or its parents, so no functions are served" in out, out
    assert "flux init makes a project" in out


def test_a_schema_sql_that_is_not_utf8_is_a_config_error(dsn, tmp_path):
    from flux.cli.dev import _run_setup_sql
    from flux.errors import ConfigError

    schema = tmp_path / "schema.sql"
    schema.write_bytes(b"INSERT INTO t VALUES ('caf\xe9');\n")
    with pytest.raises(ConfigError, match="schema.sql is not UTF-8"):
        _run_setup_sql(dsn, schema)


def test_dev_where_a_file_stands_in_the_way_of_flux_says_so_in_one_line(project):
    """Any OSError making .flux/ or its lock (a read-only project, one made by another account) was a traceback."""
    (project / ".flux").write_text("not a directory\n")
    result = run_dev(project)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"error: Cannot write {project / '.flux'}: a file is in the way" in result.stderr
    assert "hint: flux dev keeps its database in the project's .flux/ directory" in result.stderr
    assert "Traceback" not in result.stderr
    (project / ".flux").unlink()  # for the fixture's clean-up


def test_a_ctrl_c_during_initdb_stops_dev_without_an_error(project):
    """The terminal's SIGINT reaches initdb too (one process group): its failure was reported as flux dev's own,
    'initdb failed: initdb: removing contents of data directory', exit 1."""
    data_dir = Cluster(state_dir=project / ".flux")._data_dir({})
    proc = subprocess.Popen([sys.executable, "-m", "flux", "dev"], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 30
    while not list(data_dir.parent.glob(f"{data_dir.name}*/global/pg_control")):  # initdb is bootstrapping
        assert time.monotonic() < deadline and proc.poll() is None, "initdb did not start"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does
    out = communicate(proc)
    assert proc.returncode == 0, out
    assert "stopped before serving: SIGINT arrived while starting" in out and "error" not in out, out
    assert not Cluster(state_dir=project / ".flux").is_running()


def test_dev_adopts_the_server_a_killed_dev_left_and_stops_it(project):
    """After kill -9 the next flux dev took the server for someone else's and left it running when it stopped."""
    first, _ = start_dev(project)
    first.kill()
    first.wait()
    printed: list[str] = []
    second, dsn = start_dev(project, lines=printed)
    out = stop_dev(second)
    assert f"(left running by a flux dev that ended abruptly, pid {first.pid}: this one stops it)" in "".join(printed)
    assert second.returncode == 0 and "Embedded PostgreSQL stopped" in out, out
    assert not Cluster(state_dir=project / ".flux").is_running()
