from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from flux.errors import ClusterError
from flux.pg.cluster import RELOCATED_ROOT, Cluster, find_bindir
from flux.pg.postmaster import alive


def test_find_bindir_returns_directory_with_server_binaries():
    bindir = find_bindir()
    assert (bindir / "initdb").is_file() and (bindir / "postgres").is_file()


def test_session_cluster_has_logical_wal_level(conn: psycopg.Connection):
    assert conn.execute("SHOW wal_level").fetchone()[0] == "logical"


def test_start_is_idempotent_and_keeps_port(pg_cluster):
    first = pg_cluster.start()
    second = pg_cluster.start()
    assert first.port == second.port


def test_destroy_leaves_no_directory_behind(tmp_path):
    """Not the data directory, nor, where it had to move under /var/lib/flux/clusters, its own one."""
    cluster = Cluster(state_dir=tmp_path / "state")
    cluster.start()
    data_dir = cluster._data_dir(cluster._load_meta())
    cluster.destroy()
    assert not data_dir.exists()
    assert not (data_dir.parent.parent == RELOCATED_ROOT and data_dir.parent.exists())


def test_a_cluster_the_server_account_cannot_keep_in_the_project_lives_where_no_tmp_cleaner_deletes_it(tmp_path):
    """It lived in /var/tmp, whose files systemd-tmpfiles deletes after 30 days unused: a project left
    for a month found its cluster's files partly gone, and the cluster corrupt. (As root, pytest's
    temp tree is closed to the server account, so the cluster moves; as a user it stays.)"""
    state = tmp_path / "state"
    cluster = Cluster(state_dir=state)
    try:
        data_dir = Path(cluster.start().data_dir)
        assert data_dir.is_relative_to(state) or data_dir.parent.parent == RELOCATED_ROOT
        assert not data_dir.is_relative_to(Path("/var/tmp")) and RELOCATED_ROOT.is_relative_to(Path("/var/lib"))
    finally:
        cluster.destroy()


def test_start_says_whether_it_started_the_server_or_found_it_running(tmp_path):
    cluster = Cluster(state_dir=tmp_path / "state")
    try:
        assert cluster.start().started is True
        assert cluster.start().started is False
    finally:
        cluster.destroy()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the server account can reach (as root, pytest's temp tree is closed to it, and the
    data would move to /var/lib/flux/clusters, away from the path under test)."""
    directory = Path(tempfile.mkdtemp(prefix="flux-cluster-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _answers(dsn: str) -> bool:
    """Whether the server at `dsn` takes a connection and answers a query."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def _server_uid(cluster: Cluster) -> int:
    return cluster._user.pw_uid if cluster._user is not None else os.geteuid()


def test_a_project_path_with_a_quote_starts(open_dir):
    """postgresql.auto.conf held the path unescaped: a ' ended the string and the server refused its config."""
    cluster = Cluster(state_dir=open_dir / "bob's project" / ".flux")
    try:
        info = cluster.start()
        assert info.data_dir.startswith(str(open_dir / "bob's project"))
        assert _answers(info.dsn)
    finally:
        cluster.destroy()


def test_a_project_path_too_long_for_a_unix_socket_starts_on_tcp(open_dir):
    """The socket's path (data directory + /.s.PGSQL.PORT) over 107 bytes: the server found no socket to create and stopped."""
    state_dir = open_dir / ("deeply-nested-project-" * 4) / ".flux"
    cluster = Cluster(state_dir=state_dir)
    try:
        info = cluster.start()
        assert len(os.fsencode(Path(info.data_dir) / f".s.PGSQL.{info.port}")) > 107
        assert _answers(info.dsn)
    finally:
        cluster.destroy()


def test_a_project_path_that_is_not_utf8_starts(open_dir):
    """A latin-1 directory name: initdb's output, which echoes the path, failed to decode (a traceback)."""
    cluster = Cluster(state_dir=open_dir / os.fsdecode(b"caf\xe9") / ".flux")
    try:
        assert _answers(cluster.start().dsn)
    finally:
        cluster.destroy()


def test_an_initdb_cut_short_leaves_nothing_the_next_start_takes_for_a_cluster(open_dir):
    """initdb writes PG_VERSION first: killed later (Ctrl-C, kill -9, a full disk), it left a directory every
    later start took for a made cluster ('database "postgres" does not exist', for ever)."""
    real = find_bindir()
    killed = open_dir / "bin"
    killed.mkdir()
    for name in ("pg_ctl", "postgres"):
        (killed / name).symlink_to(real / name)
    (killed / "initdb").write_text(  # the real initdb, killed once it has written PG_VERSION
        f'#!/bin/sh\n"{real}/initdb" "$@" & pid=$!\n'
        'while [ ! -f "$2/PG_VERSION" ]; do sleep 0.01; done\nkill -9 $pid\nexit 137\n')
    (killed / "initdb").chmod(0o755)
    state_dir = open_dir / "project" / ".flux"
    with pytest.raises(ClusterError):
        Cluster(state_dir=state_dir, bindir=killed).start()
    cluster = Cluster(state_dir=state_dir)
    try:
        assert _answers(cluster.start().dsn)
    finally:
        cluster.destroy()


def _stop_leaving_a_pid_file_naming(cluster: Cluster, data_dir: str, pid: int) -> None:
    """Stop `cluster`'s running server, then put back its postmaster.pid naming `pid`, as a crash leaves it."""
    pid_file = Path(data_dir) / "postmaster.pid"
    fields = pid_file.read_text().splitlines()
    cluster.stop()
    pid_file.write_text("\n".join([str(pid), *fields[1:]]) + "\n")
    os.chown(pid_file, _server_uid(cluster), -1)


def test_a_postmaster_pid_left_by_a_crash_naming_another_process_does_not_pass_for_a_server(open_dir):
    """After a crash (or a reboot) the file's pid may belong to another program of the same account: pg_ctl
    said the server ran, flux dev 'used' it and could not connect, and its stop command signalled that program."""
    cluster = Cluster(state_dir=open_dir / ".flux")
    try:
        info = cluster.start()
        other = subprocess.Popen(["sleep", "60"], user=_server_uid(cluster))
        try:
            _stop_leaving_a_pid_file_naming(cluster, info.data_dir, other.pid)
            assert not cluster.is_running()
            again = cluster.start()
            assert again.started and "sleep" in again.stale_pid_file
            assert _answers(again.dsn)
            assert other.poll() is None  # untouched
        finally:
            other.kill()
            other.wait()
    finally:
        cluster.destroy()


def test_a_postmaster_pid_left_by_a_crash_naming_another_clusters_server_does_not_pass_for_this_one(open_dir, pg_cluster):
    """The pid reused by the server of another cluster (another project's): pg_ctl said this one ran, and
    adopting it would have stopped the other project's server."""
    other_pid = int((Path(pg_cluster.start().data_dir) / "postmaster.pid").read_text().split()[0])
    cluster = Cluster(state_dir=open_dir / ".flux")
    try:
        info = cluster.start()
        _stop_leaving_a_pid_file_naming(cluster, info.data_dir, other_pid)
        assert not cluster.is_running()
        again = cluster.start()
        assert again.started and "does not listen on this cluster's port" in again.stale_pid_file
        assert alive(other_pid) and pg_cluster.is_running()
    finally:
        cluster.destroy()


def test_a_server_whose_starter_died_is_adopted_by_the_next_start(open_dir):
    """flux dev killed with kill -9 leaves its server running: the next flux dev took it for someone else's and
    left it running for ever."""
    state_dir = open_dir / ".flux"
    starter = subprocess.Popen(
        [sys.executable, "-c", f"from pathlib import Path; from flux.pg.cluster import Cluster; Cluster(state_dir=Path({str(state_dir)!r})).start()"],
        stderr=subprocess.PIPE, text=True)
    assert starter.wait(timeout=60) == 0, starter.stderr.read()
    cluster = Cluster(state_dir=state_dir)
    try:
        assert cluster.is_running()
        info = cluster.start()
        assert info.started and info.adopted_from == starter.pid
    finally:
        cluster.destroy()


def test_a_server_whose_starter_lives_is_not_adopted(pg_cluster):
    assert pg_cluster.start().started is False and pg_cluster.start().adopted_from is None


def test_a_port_taken_since_the_last_run_moves_and_says_from_where(open_dir):
    cluster = Cluster(state_dir=open_dir / ".flux")
    try:
        first = cluster.start()
        cluster.stop()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", first.port))
            taken.listen()
            again = cluster.start()
        assert again.moved_from == first.port and again.port != first.port
    finally:
        cluster.destroy()


def test_a_server_whose_data_directory_was_deleted_while_it_ran_is_stopped(open_dir):
    """pg_ctl cannot name a data directory that is gone: stop() did nothing, and the server ran on."""
    cluster = Cluster(state_dir=open_dir / ".flux")
    info = cluster.start()
    pid = int((Path(info.data_dir) / "postmaster.pid").read_text().split()[0])
    shutil.rmtree(open_dir / ".flux")
    assert cluster.stop() is True
    assert not alive(pid)


def test_a_cluster_gone_since_the_last_run_is_made_anew_and_said(open_dir):
    """Its directory deleted, or cleaned from /var/tmp: a new, empty cluster was made without a word."""
    cluster = Cluster(state_dir=open_dir / ".flux")
    try:
        assert cluster.start().remade is False
        cluster.stop()
        shutil.rmtree(cluster._data_dir(cluster._load_meta()))
        assert cluster.start().remade is True
    finally:
        cluster.destroy()


def test_a_cluster_made_by_another_major_version_is_refused_with_what_to_install(tmp_path):
    """Opened with whatever binaries were found first (pg_config's, the newest), it failed as 'pg_ctl failed:
    Examine the log output.'"""
    cluster = Cluster(state_dir=tmp_path / ".flux")
    data_dir = tmp_path / "pgdata"
    data_dir.mkdir()
    (data_dir / "PG_VERSION").write_text("99\n")
    os.chown(data_dir, _server_uid(cluster), -1)
    (tmp_path / ".flux").mkdir()
    (tmp_path / ".flux" / "cluster.json").write_text(json.dumps({"data_dir": str(data_dir)}))
    with pytest.raises(ClusterError) as caught:
        cluster.start()
    assert caught.value.message.startswith(f"The embedded cluster in {data_dir} was made by PostgreSQL 99, and this machine has no PostgreSQL 99 server")
    assert "Install PostgreSQL 99's server" in caught.value.hint and "FLUX_PG_BINDIR" in caught.value.hint


def test_server_binaries_older_than_14_are_refused(tmp_path, monkeypatch):
    """PostgreSQL 13 cannot be installed beside the suite's server, so this directory stands in for its
    bin: programs that answer --version as 13's do. Before, Flux made a 13 cluster that attach then refused."""
    for name in ("initdb", "pg_ctl", "postgres"):
        (tmp_path / name).write_text(f'#!/bin/sh\necho "{name} (PostgreSQL) 13.14"\n')
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("FLUX_PG_BINDIR", str(tmp_path))
    with pytest.raises(ClusterError, match=rf"PostgreSQL 14 or newer is required, and only 13 in {tmp_path} was found"):
        find_bindir()


def test_a_data_directory_of_another_account_is_refused_in_words(tmp_path):
    """Made by `sudo flux dev`, run as a user (or the reverse): pg_ctl failed with 'could not open PID file'."""
    cluster = Cluster(state_dir=tmp_path / ".flux")
    (tmp_path / ".flux").mkdir()
    foreign = tmp_path / "pgdata" if os.geteuid() == 0 else Path("/")  # root's own, for a server run as postgres
    foreign.mkdir(exist_ok=True)
    (tmp_path / ".flux" / "cluster.json").write_text(json.dumps({"data_dir": str(foreign)}))
    with pytest.raises(ClusterError, match=r"belongs to root, and PostgreSQL would run as") as caught:
        cluster.start()
    assert "sudo chown -R" in caught.value.hint


def test_an_initdb_failure_names_its_cause_not_its_clean_up(open_dir):
    """initdb's last line is its clean-up ('removing contents of data directory'), which was all the error said;
    the cause comes before. This initdb prints what initdb 15 printed on a full 1 MB tmpfs, and fails as it did."""
    (open_dir / "initdb").write_text(
        "#!/bin/sh\necho 'running bootstrap script ... 2026-12-07 11:46:43.593 UTC [4491] FATAL:  could not write to"
        " file \"pg_wal/xlogtemp.4491\": No space left on device' >&2\n"
        "echo 'child process exited with exit code 1' >&2\n"
        "echo 'initdb: removing contents of data directory \"'$2'\"' >&2\nexit 1\n")
    (open_dir / "initdb").chmod(0o755)
    with pytest.raises(ClusterError) as caught:
        Cluster(state_dir=open_dir / ".flux", bindir=open_dir).start()
    assert caught.value.message == 'initdb failed: could not write to file "pg_wal/xlogtemp.4491": No space left on device'
    assert caught.value.hint == "Free some disk space and retry."
