"""`flux attach`, `flux detach` and `flux cdc status` through the real CLI against real servers."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from typer.testing import CliRunner

from flux.cdc.attach import require_server_version
from flux.cli import app
from flux.errors import PreflightError
from flux.pg.cluster import Cluster
from tests.support import record_pending, table_owner_role

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def run_flux(*args: str):
    """Through the real entry point, so FluxError handling (one line, hint, exit code) is covered."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "flux", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def replica_cluster(tmp_path_factory) -> Cluster:
    state = tmp_path_factory.mktemp("replica_cluster")
    state.chmod(0o755)
    cluster = Cluster(state_dir=state, settings={"wal_level": "replica", "fsync": "off"})
    cluster.start()
    yield cluster
    cluster.destroy()


def test_attach_creates_schema_publication_slot_and_full_identity(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
    result = invoke("attach", "--database", dsn, "--tables", "users", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tables"] == ["public.users"]
    assert data["replica_identity_changed"] == [{"table": "public.users", "previous": "DEFAULT", "restored_by_detach": True}]
    assert conn.execute("SELECT relreplident FROM pg_class WHERE relname = 'users'").fetchone()[0] == "f"
    assert conn.execute("SELECT plugin FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()[0] == "pgoutput"
    assert conn.execute("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'flux'").fetchone()[0] == 1


def test_attach_twice_changes_nothing(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    invoke("attach", "--database", dsn, "--tables", "users")
    second = json.loads(invoke("attach", "--database", dsn, "--tables", "users", "--json").stdout)
    assert second["created"] == [] and second["replica_identity_changed"] == []
    text = invoke("attach", "--database", dsn, "--tables", "users").stdout
    assert "Nothing changed" in text


def test_attach_text_output_lists_identity_changes_and_what_detach_restores(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    out = invoke("attach", "--database", dsn, "--tables", "users").stdout
    assert "public.users: REPLICA IDENTITY DEFAULT → FULL" in out
    assert "restores DEFAULT" in out


def test_attach_and_detach_text_of_many_tables_shows_twenty_a_list_and_how_many_more(dsn, conn):
    """A line per table, twice (captured, set FULL): 6,000 lines for 3,000 tables, and 3,000 again at
    every later attach that changed nothing."""
    for i in range(25):
        conn.execute(f"CREATE TABLE t{i:02} (id int PRIMARY KEY)")
    out = invoke("attach", "--database", dsn, "--all-tables").stdout
    assert out.count("  captures ") == 20 and out.count("REPLICA IDENTITY DEFAULT → FULL") == 20
    assert out.count("… and 5 more like these (`--json` lists every one)") == 2
    assert len(json.loads(invoke("attach", "--database", dsn, "--all-tables", "--json").stdout)["tables"]) == 25
    detached = invoke("detach", "--database", dsn).stdout
    assert detached.count(": REPLICA IDENTITY DEFAULT") == 20 and "… and 5 more like these" in detached


HOSTILE_NAME = "p[/]\x1b[2J"  # rich's closing tag with nothing to close, and a terminal's clear-screen


def test_attach_shows_a_publication_name_with_markup_and_an_escape_sequence_as_text(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    result = invoke("attach", "--database", dsn, "--tables", "a", "--publication", HOSTILE_NAME)
    assert result.exit_code == 0
    assert "publication p[/]\\u001b[2J" in result.stdout and "\x1b" not in result.stdout


def test_attach_shows_a_table_name_with_an_escape_sequence_escaped(dsn, conn):
    conn.execute('CREATE TABLE "t\x1b[2J" (id int PRIMARY KEY)')
    out = invoke("attach", "--database", dsn, "--all-tables").stdout
    assert "captures public.t\\u001b[2J" in out and "\x1b" not in out


def test_cdc_status_shows_a_publication_name_with_markup_and_an_escape_sequence_as_text(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    invoke("attach", "--database", dsn, "--tables", "a", "--publication", HOSTILE_NAME, "--json")
    result = invoke("cdc", "status", "--database", dsn)
    assert result.exit_code == 0
    assert "publication    p[/]\\u001b[2J (1 table)" in result.stdout and "\x1b" not in result.stdout


def test_attach_all_tables_never_publishes_the_flux_schema(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    invoke("attach", "--database", dsn, "--all-tables")
    schemas = {r[0] for r in conn.execute("SELECT schemaname FROM pg_publication_tables WHERE pubname = 'flux'")}
    assert schemas == {"public"}


def test_attach_reads_dsn_from_environment(dsn, conn, monkeypatch):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    monkeypatch.setenv("FLUX_DATABASE_URL", dsn)
    assert invoke("attach", "--tables", "a").exit_code == 0


def test_attach_unknown_table_fails_with_hint(dsn):
    proc = run_flux("attach", "--database", dsn, "--tables", "nope")
    assert proc.returncode == 3
    assert "No table 'nope'" in proc.stderr and "hint:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_attach_without_table_choice_is_a_usage_error(dsn):
    proc = run_flux("attach", "--database", dsn)
    assert proc.returncode == 2 and "--all-tables" in proc.stderr


def test_attach_with_both_tables_and_all_tables_says_they_exclude_each_other(dsn):
    proc = run_flux("attach", "--database", dsn, "--tables", "users", "--all-tables")
    assert proc.returncode == 2 and "--tables and --all-tables exclude each other" in proc.stderr, proc.stderr


def test_attach_refuses_wal_level_replica_and_shows_the_fix(replica_cluster):
    proc = run_flux("attach", "--database", replica_cluster.start().dsn, "--all-tables")
    assert proc.returncode == 4
    assert "wal_level is 'replica'" in proc.stderr
    assert "ALTER SYSTEM SET wal_level = logical" in proc.stderr and "restart" in proc.stderr


def test_cdc_run_refuses_wal_level_replica_with_the_fix_and_exit_4(replica_cluster):
    proc = run_flux("cdc", "run", "--database", replica_cluster.start().dsn)
    assert proc.returncode == 4, proc.stderr
    assert "wal_level is 'replica'" in proc.stderr and "ALTER SYSTEM SET wal_level = logical" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cdc_run_started_before_its_server_waits_for_it_rather_than_exiting():
    """Boot order under systemd or compose: the engine may start first (and waits --wait-for-database, 60 s)."""
    import signal
    import subprocess
    import sys

    from flux.pg.cluster import free_port

    down = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    proc = subprocess.Popen([sys.executable, "-m", "flux", "cdc", "run", "--database", down],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        # Until it says it retries (a fixed sleep sent the signal before the handlers were in place
        # on a loaded machine), then a while longer: it retries rather than exiting.
        deadline = time.monotonic() + 60
        while not any("waiting for the database" in line for line in seen) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
        time.sleep(1)
        assert proc.poll() is None, "".join(seen) + proc.communicate()[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    out = "".join(seen) + out
    assert proc.returncode == 0, out
    assert "waiting for the database, 60 s more (--wait-for-database)" in out and "Traceback" not in out


def test_cdc_run_without_attach_names_the_missing_slot_and_exits_3(dsn):
    proc = run_flux("cdc", "run", "--database", dsn, "--slot", "never_made")
    assert proc.returncode == 3, proc.stderr
    assert "Replication slot 'never_made' does not exist" in proc.stderr and "flux attach" in proc.stderr


@pytest.fixture(scope="module")
def small_wal_keep_cluster(tmp_path_factory) -> str:
    """A cluster that invalidates a slot more than 1 MB of WAL behind (max_slot_wal_keep_size); its DSN."""
    state = tmp_path_factory.mktemp("small_wal_keep_cluster")
    state.chmod(0o755)
    cluster = Cluster(state_dir=state, settings={"fsync": "off", "max_slot_wal_keep_size": "'1MB'"})
    try:
        yield cluster.start().dsn
    finally:
        cluster.destroy()


def attach_and_lose_the_slot(dsn: str, slot: str = "flux") -> None:
    """Attach, then write past max_slot_wal_keep_size with no engine running: PostgreSQL invalidates the slot."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
        assert invoke("attach", "--database", dsn, "--tables", "users", "--slot", slot).exit_code == 0
        for n in range(4):  # WAL segments the slot still needs, then a checkpoint removes them
            conn.execute("INSERT INTO users SELECT g FROM generate_series(%s::int, %s::int) g", (n * 1000, n * 1000 + 999))
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
        assert conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()[0] == "lost"


@pytest.fixture(scope="module")
def lost_slot_dsn(small_wal_keep_cluster) -> str:
    """A database whose slot PostgreSQL invalidated: it fell further behind than max_slot_wal_keep_size."""
    attach_and_lose_the_slot(small_wal_keep_cluster)
    return small_wal_keep_cluster


def test_cdc_run_on_an_invalidated_slot_says_the_gap_is_lost_and_how_to_start_over(lost_slot_dsn):
    proc = run_flux("cdc", "run", "--database", lost_slot_dsn)
    assert proc.returncode == 1, proc.stderr
    assert "invalidated" in proc.stderr
    assert "max_slot_wal_keep_size" in proc.stderr and "`flux detach` then `flux attach`" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cdc_status_warns_that_an_invalidated_slot_lost_changes(lost_slot_dsn):
    data = json.loads(invoke("cdc", "status", "--database", lost_slot_dsn, "--json").stdout)
    assert data["wal_status"] == "lost"
    assert [w for w in data["warnings"] if "was invalidated" in w and "not recorded" in w]


def test_cdc_status_of_an_invalidated_slot_gives_no_time_behind(small_wal_keep_cluster):
    """With a change recorded before the slot was lost, it said "at most N s" behind, as if the
    engine could still catch up."""
    with psycopg.connect(small_wal_keep_cluster, autocommit=True) as admin:
        admin.execute("CREATE DATABASE recorded_then_lost")
    dsn = make_conninfo(small_wal_keep_cluster, dbname="recorded_then_lost")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE early (id int PRIMARY KEY)")
        assert invoke("attach", "--database", dsn, "--tables", "early", "--slot", "recorded").exit_code == 0
        conn.execute("INSERT INTO early VALUES (1)")
        record_pending(dsn, slot="recorded")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for n in range(4):  # past max_slot_wal_keep_size, with no engine running
                conn.execute("INSERT INTO early SELECT g FROM generate_series(%s::int, %s::int) g", (n * 1000 + 2, n * 1000 + 1001))
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
        data = json.loads(invoke("cdc", "status", "--database", dsn, "--slot", "recorded", "--json").stdout)
    finally:
        with psycopg.connect(small_wal_keep_cluster, autocommit=True) as admin:
            admin.execute("SELECT pg_drop_replication_slot('recorded')")
    assert data["wal_status"] == "lost" and data["mutations_recorded"] >= 1
    assert (data["lag_seconds"], data["lag_is_upper_bound"]) == (None, False)


def test_cdc_status_of_an_invalidated_slot_exits_3_as_nothing_is_captured(lost_slot_dsn):
    """Before: exit 0 and "slot exists", so a health check passed while nothing was captured."""
    result = invoke("cdc", "status", "--database", lost_slot_dsn)
    assert result.exit_code == 3
    assert "lost (invalidated: nothing is captured)" in result.stdout


def test_cdc_run_on_an_invalidated_slot_says_which_changes_were_not_recorded(small_wal_keep_cluster):
    with psycopg.connect(small_wal_keep_cluster, autocommit=True) as admin:
        admin.execute("CREATE DATABASE lost_after_progress")
    dsn = small_wal_keep_cluster.rsplit("/", 1)[0] + "/lost_after_progress"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
        invoke("attach", "--database", dsn, "--tables", "users", "--slot", "progressed")
        conn.execute("INSERT INTO flux.cdc_progress (slot_name, commit_lsn, end_lsn) VALUES ('progressed', '0/10', '0/20')")
        conn.execute("DROP TABLE users")
    attach_and_lose_the_slot(dsn, "progressed")  # attach keeps the progress: the slot exists
    proc = run_flux("cdc", "run", "--database", dsn, "--slot", "progressed")
    assert proc.returncode == 1, proc.stderr
    error, hint = proc.stderr.strip().splitlines()
    assert error.startswith("error: Replication slot 'progressed' was invalidated by PostgreSQL (")
    assert "changes committed after 0/20, the last recorded, until now were never recorded" in hint


def test_attach_again_replaces_an_invalidated_slot_and_says_what_was_not_recorded(small_wal_keep_cluster):
    """Before: "Nothing changed: already attached this way", leaving the dead slot and capturing nothing."""
    with psycopg.connect(small_wal_keep_cluster, autocommit=True) as admin:
        admin.execute("CREATE DATABASE lost_then_attached")
    dsn = small_wal_keep_cluster.rsplit("/", 1)[0] + "/lost_then_attached"
    attach_and_lose_the_slot(dsn, "relost")
    data = json.loads(invoke("attach", "--database", dsn, "--tables", "users", "--slot", "relost", "--json").stdout)
    [created] = data["created"]
    assert created == "replication slot relost (replaces the old one: PostgreSQL had invalidated it (max_slot_wal_keep_size))"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'relost'").fetchone() == ("reserved",)
        assert conn.execute("SELECT count(*) FROM flux.cdc_progress WHERE slot_name = 'relost'").fetchone() == (0,)
    [warning] = [w for w in data["warnings"] if "invalidated" in w]  # what `flux dev` shows of an attach
    assert warning.startswith("Slot 'relost' was replaced, as PostgreSQL had invalidated it (max_slot_wal_keep_size): "
                              "changes committed after ") and "Capture starts over from now" in warning
    assert invoke("cdc", "status", "--database", dsn, "--slot", "relost").exit_code == 0


def test_attach_refuses_role_without_replication(dsn, conn):
    conn.execute("CREATE ROLE app_noreplication LOGIN")
    conn.execute("GRANT CREATE ON DATABASE " + conn.info.dbname + " TO app_noreplication")
    try:
        proc = run_flux("attach", "--database", dsn.replace("postgres@", "app_noreplication@"), "--all-tables")
        assert proc.returncode == 4
        assert "may not use replication" in proc.stderr and "WITH REPLICATION" in proc.stderr
    finally:
        conn.execute("REVOKE CREATE ON DATABASE " + conn.info.dbname + " FROM app_noreplication")
        conn.execute("DROP ROLE app_noreplication")


def test_attach_refuses_tables_the_role_does_not_own(dsn, conn):
    conn.execute("CREATE TABLE owned_by_postgres (id int PRIMARY KEY)")
    conn.execute("CREATE ROLE app_repl LOGIN REPLICATION")
    conn.execute("GRANT CREATE ON DATABASE " + conn.info.dbname + " TO app_repl")
    try:
        proc = run_flux("attach", "--database", dsn.replace("postgres@", "app_repl@"), "--tables", "owned_by_postgres")
        assert proc.returncode == 4
        assert "does not own: public.owned_by_postgres (owner postgres)" in proc.stderr
    finally:
        conn.execute("REVOKE CREATE ON DATABASE " + conn.info.dbname + " FROM app_repl")
        conn.execute("DROP ROLE app_repl")


def test_status_warns_of_a_table_all_tables_cannot_capture_and_of_key_only_identities(dsn, conn):
    with table_owner_role(conn, dsn, "app_owner2") as app:
        try:
            with psycopg.connect(app, autocommit=True) as app_conn:
                app_conn.execute("CREATE TABLE public.mine (id int PRIMARY KEY)")
                assert invoke("attach", "--database", app, "--all-tables").exit_code == 0
                app_conn.execute("ALTER TABLE public.mine REPLICA IDENTITY DEFAULT")  # undone by hand
            conn.execute("CREATE TABLE public.dba_table (id int PRIMARY KEY)")  # owned by postgres, not by app_owner2
            # read as the superuser: what counts is what the attaching role owns
            data = json.loads(invoke("cdc", "status", "--database", dsn, "--json").stdout)
            [gap] = [w for w in data["warnings"] if "not captured" in w]
            assert "1 table(s) are not captured" in gap and "public.dba_table (owner postgres)" in gap and "does not own them" in gap
            [key_only] = [w for w in data["warnings"] if "REPLICA IDENTITY FULL" in w]
            assert "by key only: public.mine." in key_only
        finally:
            invoke("detach", "--database", dsn, "--drop-data")


def test_attach_refuses_when_no_replication_slot_is_free(tmp_path):
    tmp_path.chmod(0o755)
    cluster = Cluster(state_dir=tmp_path, settings={"max_replication_slots": "1", "max_wal_senders": "2", "fsync": "off"})
    info = cluster.start()
    try:
        with psycopg.connect(info.dsn, autocommit=True) as c:
            c.execute("SELECT pg_create_logical_replication_slot('someone_else', 'pgoutput')")
        proc = run_flux("attach", "--database", info.dsn, "--all-tables")
        assert proc.returncode == 4
        assert "No free replication slot: 1 of max_replication_slots=1" in proc.stderr
        assert "pg_drop_replication_slot('someone_else')" in proc.stderr
    finally:
        cluster.destroy()


def test_server_version_below_14_is_refused_with_upgrade_hint():
    with pytest.raises(PreflightError) as info:
        require_server_version(130011, "13.11")
    assert "14 or newer" in info.value.message and "Upgrade" in info.value.hint


def test_detach_drops_slot_and_publication_restores_identity_and_keeps_data(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    conn.execute("CREATE UNIQUE INDEX users_id_idx ON users (id)")
    conn.execute("ALTER TABLE users REPLICA IDENTITY USING INDEX users_id_idx")
    invoke("attach", "--database", dsn, "--tables", "users")
    result = json.loads(invoke("detach", "--database", dsn, "--json").stdout)
    assert result["restored"] == [{"table": "public.users", "restored": "USING INDEX users_id_idx"}]
    assert conn.execute("SELECT relreplident FROM pg_class WHERE relname = 'users'").fetchone()[0] == "i"
    assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM pg_publication").fetchone()[0] == 0
    assert conn.execute("SELECT to_regclass('flux.state_mutations')").fetchone()[0] is not None


def test_detach_with_drop_data_removes_the_flux_schema(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    invoke("attach", "--database", dsn, "--tables", "users")
    assert invoke("detach", "--database", dsn, "--drop-data").exit_code == 0
    assert conn.execute("SELECT to_regnamespace('flux')").fetchone()[0] is None


def test_detach_with_drop_data_after_a_detach_that_kept_the_data_drops_it(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    invoke("attach", "--database", dsn, "--tables", "users")
    assert invoke("detach", "--database", dsn).exit_code == 0
    # Before: "No Flux attachment uses slot flux", and the data could only go by hand.
    result = invoke("detach", "--database", dsn, "--drop-data")
    assert result.exit_code == 0 and "- schema flux (all recorded data)" in result.stdout
    assert conn.execute("SELECT to_regnamespace('flux')").fetchone()[0] is None
    assert run_flux("detach", "--database", dsn, "--drop-data").returncode == 3  # nothing left


def test_status_reports_inactive_slot_with_warning(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    invoke("attach", "--database", dsn, "--tables", "users")
    data = json.loads(invoke("cdc", "status", "--database", dsn, "--json").stdout)
    assert data["slot_exists"] is True and data["consumer_running"] is False
    assert data["publication"] == "flux" and data["published_tables"] == 1
    assert any("no consumer" in w for w in data["warnings"])
    text = invoke("cdc", "status", "--database", dsn).stdout
    assert "not running" in text and "warning:" in text


def test_status_shows_the_last_commit_in_utc_whatever_the_sessions_time_zone(dsn, conn):
    """It printed the session's local time (a server or database set to another zone) labelled UTC."""
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    invoke("attach", "--database", dsn, "--tables", "users")
    conn.execute("INSERT INTO flux.cdc_progress (slot_name, commit_lsn, end_lsn, commit_time, mutations)"
                 " VALUES ('flux', '0/10', '0/20', '2026-01-02 03:04:05+00', 1)")
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET timezone = 'Asia/Kolkata'")
    assert "  last commit    2026-01-02 03:04:05 UTC at 0/10" in invoke("cdc", "status", "--database", dsn).stdout


def test_status_of_running_engine_reports_consumer_mutations_and_no_lag(dsn, conn, capture):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    running = capture(tables=["users"])
    conn.execute("INSERT INTO users SELECT generate_series(1, 10)")
    running.caught_up()
    data = json.loads(invoke("cdc", "status", "--database", dsn, "--json").stdout)
    # The engine runs in this process: its pid and host, not the server's walsender.
    assert data["consumer_running"] is True
    assert (data["consumer_pid"], data["consumer_host"]) == (os.getpid(), socket.gethostname())
    assert data["walsender_pid"] == conn.execute(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()[0] != os.getpid()
    assert f"running (pid {os.getpid()} on {socket.gethostname()})" in invoke("cdc", "status", "--database", dsn).stdout
    assert data["mutations_recorded"] == 10 and 0 <= data["last_commit_age_seconds"] < 60
    assert data["last_commit_lsn"] and data["lag_bytes"] is not None
    assert not any("no consumer" in w for w in data["warnings"])


def test_status_of_a_slot_that_does_not_exist_exits_3_after_reporting_it(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    invoke("attach", "--database", dsn, "--tables", "users")
    result = invoke("cdc", "status", "--database", dsn, "--slot", "nope", "--json")
    assert result.exit_code == 3
    data = json.loads(result.stdout)
    assert data["slot_exists"] is False and any("Slot 'nope' does not exist" in w for w in data["warnings"])


def test_status_as_a_role_that_may_not_read_the_flux_schema_is_one_line_with_a_hint(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    invoke("attach", "--database", dsn, "--tables", "users")
    conn.execute("CREATE ROLE status_reader LOGIN")
    try:
        proc = run_flux("cdc", "status", "--database", dsn.replace("postgres@", "status_reader@"), "--json")
    finally:
        conn.execute("DROP ROLE status_reader")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    error = json.loads(proc.stdout)
    assert error["message"].startswith("Could not read the CDC status: permission denied")
    assert "GRANT SELECT ON ALL TABLES IN SCHEMA flux" in error["hint"]


def test_status_of_a_stopped_engine_behind_bounds_its_lag_by_the_newest_recorded_commit(dsn, conn, capture):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    running = capture(tables=["users"])
    conn.execute("INSERT INTO users VALUES (1)")
    running.caught_up()
    running.stop()
    deadline = time.monotonic() + 10  # the walsender ends just after the engine
    while conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()[0]:
        assert time.monotonic() < deadline, "the slot stayed active after the engine stopped"
        time.sleep(0.05)
    conn.execute("INSERT INTO users VALUES (2)")
    data = json.loads(invoke("cdc", "status", "--database", dsn, "--json").stdout)
    assert data["consumer_running"] is False and data["lag_bytes"] > 0
    assert data["lag_is_upper_bound"] is True and data["lag_seconds"] >= 0
    assert "· at most " in invoke("cdc", "status", "--database", dsn).stdout


def test_status_warns_when_retained_wal_is_large(dsn, conn):
    from flux.cdc.attach import slot_warnings

    conn.execute("CREATE TABLE users (id int PRIMARY KEY, pad text)")
    invoke("attach", "--database", dsn, "--tables", "users")
    conn.execute("INSERT INTO users SELECT g, repeat('x', 1000) FROM generate_series(1, 2000) g")
    warnings = slot_warnings(conn, "flux", retained_limit=1 << 20)
    assert any("retains" in w and "MB of WAL" in w for w in warnings)


def test_status_on_unattached_database_is_not_found(dsn):
    proc = run_flux("cdc", "status", "--database", dsn)
    assert proc.returncode == 3 and "not attached" in proc.stderr


def test_every_command_has_help():
    for args in (["attach"], ["detach"], ["dev"], ["cdc", "run"], ["cdc", "status"], ["state", "history"], ["state", "blame"]):
        result = invoke(*args, "--help")
        assert result.exit_code == 0 and "Usage" in result.output, args


def test_every_command_is_documented_in_readme():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for command in ("flux dev", "flux attach", "flux detach", "flux cdc run", "flux cdc status", "flux state history", "flux state blame"):
        assert command in readme, command


def test_tables_are_split_on_commas_outside_quoted_names(dsn, conn):
    conn.execute('CREATE SCHEMA "sp ace"')
    conn.execute('CREATE TABLE "sp ace"."Tä.b,le" (id int PRIMARY KEY)')
    conn.execute("CREATE TABLE plain (id int PRIMARY KEY)")
    result = invoke("attach", "--database", dsn, "--tables", '"sp ace"."Tä.b,le", plain', "--json")
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.stdout)["tables"]) == ["public.plain", "sp ace.Tä.b,le"]


def test_status_text_says_how_old_the_newest_commit_is_when_the_servers_seconds_read_low():
    from flux.cdc.status import CdcStatus
    from flux.cli.cdc import _lag

    catching_up = CdcStatus(slot="flux", database="app", slot_exists=True, lag_bytes=400_000_000, lag_seconds=2.2,
                            last_commit_age_seconds=56.0)
    assert _lag(catching_up).endswith(" · 2.2s (server's measure; the newest recorded commit is 56s old)")
    idle = CdcStatus(slot="flux", database="app", slot_exists=True, lag_bytes=0, lag_seconds=0.0, last_commit_age_seconds=3600.0)
    assert _lag(idle).endswith(" · 0.0s")
