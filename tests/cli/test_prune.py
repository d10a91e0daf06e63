"""`flux prune`: the command over flux.store.retention."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flux.cli import app
from flux.errors import ConfigError
from flux.store.schema import ensure_schema
from flux.store.traces import insert_traces
from tests.traces_seed import trace

runner = CliRunner()


def seed(conn) -> None:
    ensure_schema(conn)
    insert_traces(conn, [trace(f"{days:08x}-0000-4000-8000-000000000000", ago=timedelta(days=days)) for days in (40, 1)])


def test_prune_json_says_what_it_deleted(dsn, conn):
    seed(conn)
    result = runner.invoke(app, ["prune", "--older-than", "30d", "--database", dsn, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["traces"], data["mutations"], data["dry_run"]) == (1, 0, False)
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone() == (1,)


def test_every_key_of_prune_json_is_in_the_readme(dsn, conn):
    seed(conn)
    data = json.loads(runner.invoke(app, ["prune", "--older-than", "30d", "--dry-run", "--database", dsn, "--json"]).stdout)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Retention: `flux prune`"):]
    section = section[:section.index("\n## ")]
    assert [key for key in data if f"`{key}`" not in section] == []


def test_prune_dry_run_text_says_what_it_would_delete(dsn, conn):
    seed(conn)
    result = runner.invoke(app, ["prune", "--older-than", "2d", "--dry-run", "--no-mutations", "--database", dsn])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Would delete 1 trace recorded before ")
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone() == (2,)


def test_prune_needs_a_duration_it_can_read(dsn, conn):
    seed(conn)
    result = runner.invoke(app, ["prune", "--older-than", "a month", "--database", dsn])
    assert isinstance(result.exception, ConfigError) and "--older-than 'a month' is not a duration" in str(result.exception)
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone() == (2,)


def test_prune_refuses_minutes_which_a_user_may_mean_as_months(dsn, conn):
    seed(conn)
    result = runner.invoke(app, ["prune", "--older-than", "6m", "--database", dsn])
    assert isinstance(result.exception, ConfigError) and "'6m' is 6 minutes" in str(result.exception)
    assert "180d for 6 months" in result.exception.hint and "0.1h" in result.exception.hint
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone() == (2,)


def test_prune_text_gives_the_cutoff_in_utc_whatever_the_servers_time_zone(dsn, conn):
    seed(conn)
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET TimeZone = 'Pacific/Chatham'")  # UTC+12:45 or +13:45
    result = runner.invoke(app, ["prune", "--older-than", "30d", "--dry-run", "--database", dsn])
    assert result.exit_code == 0, result.output
    printed = datetime.strptime(result.stdout.split(" recorded before ")[1][:19], "%Y-%m-%d %H:%M:%S")
    expected = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=30)
    assert abs(printed - expected) < timedelta(minutes=5), result.stdout


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_after_the_batch_in_hand_and_says_what_it_deleted(dsn, conn, stop_signal):
    """SIGTERM (`timeout`, a stopping systemd unit) killed the prune outright, and a cron job's log
    had no word of what it had done."""
    ensure_schema(conn)
    total = 200_000  # one row per transaction; 2,000 batches of 100: far longer than the wait below
    conn.execute(
        "INSERT INTO flux.state_mutations (schema_name, table_name, op, row_key, xid, commit_lsn, commit_time, seq)"
        " SELECT 'public', 'users', 'insert', jsonb_build_object('id', s), s, '0/0'::pg_lsn + s::numeric,"
        " now() - interval '40 days', 0 FROM generate_series(1, %s) s", (total,))
    proc = subprocess.Popen([sys.executable, "-m", "flux", "prune", "--older-than", "30d", "--batch-rows", "100",
                             "--json", "--database", dsn], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while conn.execute("SELECT count(*) FROM flux.state_mutations").fetchone()[0] == total:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(stop_signal)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    data = json.loads(out)
    left = conn.execute("SELECT count(*) FROM flux.state_mutations").fetchone()[0]
    assert data["stopped"] is True and 0 < data["mutations"] == total - left < total


def test_a_period_of_nothing_or_nothing_to_prune_is_refused_before_connecting():
    """Both were refused only once connected: a server that did not answer made them exit 4, as if
    the command had been right, and `0d` was not said to be --older-than's."""
    unreachable = "postgresql://postgres@127.0.0.1:1/none?connect_timeout=1"
    for args, said in ((["--older-than", "0d"], "--older-than '0d' is not a positive duration"),
                       (["--older-than", "30d", "--no-traces", "--no-mutations"], "Nothing to prune")):
        proc = subprocess.run([sys.executable, "-m", "flux", "prune", *args, "--database", unreachable],
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, said in proc.stderr) == (2, True), proc.stderr
