"""`flux.cli.common`: where a command's database comes from, and what it says when it cannot reach it.

Run as the real command, since the exit code is set at the edge.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flux.cli.common import connect
from flux.pg.cluster import Cluster, free_port


def flux(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "FLUX_DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "flux", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**environ, **(env or {})})


@pytest.fixture(scope="module")
def stopped_dev_project(tmp_path_factory: pytest.TempPathFactory):
    """A project whose `flux dev` has stopped: its cluster exists, recorded in .flux/, and is not running."""
    project = tmp_path_factory.mktemp("stopped")
    cluster = Cluster(state_dir=project / ".flux")
    cluster.start()
    cluster.stop()
    yield project
    cluster.destroy()


@pytest.mark.parametrize("args", [
    ["requests"], ["trace", "deadbeef"], ["why", "deadbeef"], ["state", "history", "users", "--id", "1"], ["cdc", "status"],
], ids=" ".join)
def test_commands_in_a_project_whose_dev_stopped_say_to_start_it_and_exit_4(stopped_dev_project, args):
    result = flux(stopped_dev_project, *args)
    assert result.returncode == 4, result.stderr
    assert f"Cannot reach the embedded database of {stopped_dev_project}" in result.stderr
    assert "hint: Start `flux dev` in that project, or pass --database DSN." in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_database_flag_asks_to_check_the_server_and_exits_4(tmp_path):
    result = flux(tmp_path, "requests", "--database", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    assert result.returncode == 4, result.stderr
    assert "Cannot reach the database given by --database" in result.stderr
    assert "hint: Check that the server is running, and the DSN's host, port, user, password" in result.stderr


def test_a_role_the_server_does_not_know_is_reported_with_a_hint_that_names_the_user(tmp_path, pg_info):
    """libpq gives no SQLSTATE for a refused connection, so this cannot be told from a server that is down."""
    result = flux(tmp_path, "requests", "--database", f"postgresql://nosuchrole@127.0.0.1:{pg_info.port}/postgres")
    assert result.returncode == 4, result.stderr
    assert 'role "nosuchrole" does not exist' in result.stderr and "user, password and database" in result.stderr


def test_an_unreachable_environment_dsn_is_named_as_the_source(tmp_path):
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    result = flux(tmp_path, "why", "deadbeef", env={"FLUX_DATABASE_URL": dsn})
    assert result.returncode == 4, result.stderr
    assert "Cannot reach the database in $FLUX_DATABASE_URL" in result.stderr
    assert "hint: Check that the server is running" in result.stderr


@pytest.mark.parametrize("args", [["requests"], ["cdc", "status"], ["attach", "--all-tables"]], ids=" ".join)
def test_a_malformed_dsn_is_a_usage_error_with_a_hint(tmp_path, args):
    result = flux(tmp_path, *args, "--database", "not a dsn")
    assert result.returncode == 2, result.stderr
    assert "--database is not a valid PostgreSQL DSN" in result.stderr
    assert "hint: Write a URL, postgresql://USER@HOST:PORT/DBNAME" in result.stderr


@pytest.mark.parametrize(("dsn", "said"), [
    ("postgresql://app:s3cr%zzet@127.0.0.1/app", 'invalid percent-encoded token: "[redacted]"'),
    ("host=127.0.0.1 user=app password=hunter2 s3cret dbname=app", 'missing "=" after "[redacted]"'),
    ("postgresql://app:s3cret@127.0.0.1/app?sslmod=require", 'invalid URI query parameter: "sslmod"'),
], ids=["uri", "key-value", "a-key-is-kept"])
def test_a_malformed_dsn_error_never_shows_the_password(tmp_path, dsn, said):
    """libpq quotes the part of the DSN it could not parse, which may be the password."""
    result = flux(tmp_path, "requests", "--database", dsn)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and "s3cr" not in result.stderr


def test_a_dsn_with_an_unknown_sslmode_is_a_usage_error_not_an_unreachable_server(tmp_path):
    result = flux(tmp_path, "requests", "--database", "postgresql://postgres@127.0.0.1/postgres?sslmode=verify")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --database is not a valid PostgreSQL DSN: sslmode 'verify' is not one of")


@pytest.mark.parametrize("dsn", ["postgresql://postgres@127.0.0.1:abc/postgres", "host=127.0.0.1 port=99999",
                                 "host=a,b port=5432,0"])
def test_a_dsn_with_an_impossible_port_is_a_usage_error_not_an_unreachable_server(tmp_path, dsn):
    result = flux(tmp_path, "requests", "--database", dsn)
    assert result.returncode == 2, result.stderr
    assert "--database is not a valid PostgreSQL DSN: port" in result.stderr and "hint: Fix the port" in result.stderr


@pytest.fixture
def password_role(pg_info):
    """A role the session cluster logs in only with its password (scram), beside its trust rules."""
    import psycopg

    hba = Path(pg_info.data_dir) / "pg_hba.conf"
    before = hba.read_text()
    hba.write_text("host all flux_pw_test 127.0.0.1/32 scram-sha-256\n" + before)
    with psycopg.connect(pg_info.dsn, autocommit=True) as conn:
        conn.execute("CREATE ROLE flux_pw_test LOGIN PASSWORD 'right'")
        conn.execute("SELECT pg_reload_conf()")
    yield f"127.0.0.1:{pg_info.port}/postgres"
    hba.write_text(before)
    with psycopg.connect(pg_info.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("DROP ROLE flux_pw_test")


@pytest.mark.parametrize("login", ["flux_pw_test:wrong", "flux_pw_test"], ids=["wrong password", "no password"])
def test_a_server_that_refuses_the_login_is_a_config_error_not_an_unreachable_server(tmp_path, password_role, login):
    """It said `Cannot reach the database` with exit 4 (server not ready), sending an operator to a server that is up."""
    result = flux(tmp_path, "requests", "--database", f"postgresql://{login}@{password_role}", env={"PGPASSWORD": ""})
    assert result.returncode == 2, result.stderr
    assert "error: The database given by --database refused the connection" in result.stderr
    assert "hint: The server is up: check the user, the password" in result.stderr and "Traceback" not in result.stderr


def test_cdc_run_with_a_wrong_password_exits_2_at_once_rather_than_retrying(tmp_path, password_role):
    """It logged the refusal and retried forever (every 30 s), as if the server were down; flux serve exited 2."""
    result = subprocess.run([sys.executable, "-m", "flux", "cdc", "run", "--database", f"postgresql://flux_pw_test:wrong@{password_role}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30, env={**os.environ, "PGPASSWORD": ""})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: The database given by --database refused the connection")
    assert "waiting for the database" not in result.stderr and "Traceback" not in result.stderr


def test_commands_read_with_jit_off(dsn):
    """At 5 million logged rows, compiling a history query for JIT took 1 to 2.4 s of its 1.1 to 2.7 s."""
    with connect(dsn, failing="reading") as conn:
        assert conn.execute("SHOW jit").fetchone()[0] == "off"


def _untrusted_ca(tls_dsn: str) -> str:
    return tls_dsn.replace("/ca.crt", "/other-ca.crt")


def _host_not_in_certificate(tls_dsn: str) -> str:
    return tls_dsn.replace("@localhost:", "@db.invalid:") + "&hostaddr=127.0.0.1"  # the same server, by another name


def test_commands_reach_a_tls_server_with_verify_full(tmp_path, tls_dsn):
    result = flux(tmp_path, "requests", "--database", tls_dsn, "--json")
    assert result.returncode in (0, 3), result.stderr  # 3: no flux schema there; what matters is the connection
    assert "certificate" not in result.stderr and "Cannot reach" not in result.stderr


@pytest.mark.parametrize("refused", [_untrusted_ca, _host_not_in_certificate])
def test_a_server_certificate_the_dsn_does_not_accept_is_a_config_error_with_a_tls_hint(tmp_path, tls_dsn, refused):
    """libpq's refusal has no SQLSTATE: it read as a server that is down ('check that the server is running', exit 4)."""
    result = flux(tmp_path, "requests", "--database", refused(tls_dsn))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: The database server's TLS certificate was not accepted (sslmode=verify-full):")
    assert lines[1].startswith("hint: Give sslrootcert the certificate of the CA")


def test_a_command_connected_through_pgbouncer_prepares_nothing(bouncer_dsn, server_hop):
    """psycopg prepares a statement at its fifth run (blame following a row's key changes runs one
    per change); the next transaction, on another server connection, would not find it."""
    with connect(bouncer_dsn, failing="test") as conn:
        for _ in range(8):
            assert conn.execute("SELECT 1").fetchone() == (1,)
            server_hop()
