from __future__ import annotations

import psycopg

from flux.pg.cluster import RELOCATED_ROOT, Cluster, find_bindir


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
    """Not the data directory, nor, where it had to move under /var/tmp/flux-clusters, its own one."""
    cluster = Cluster(state_dir=tmp_path / "state")
    cluster.start()
    data_dir = cluster._data_dir(cluster._load_meta())
    cluster.destroy()
    assert not data_dir.exists()
    assert not (data_dir.parent.parent == RELOCATED_ROOT and data_dir.parent.exists())


def test_start_says_whether_it_started_the_server_or_found_it_running(tmp_path):
    cluster = Cluster(state_dir=tmp_path / "state")
    try:
        assert cluster.start().started is True
        assert cluster.start().started is False
    finally:
        cluster.destroy()
