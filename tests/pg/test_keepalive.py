"""`flux.pg.keepalive`: the engine's connections ask the kernel to find a dead peer, on their real sockets."""

from __future__ import annotations

import os
import socket

import psycopg

from flux.cdc.sink import PostgresCatalog, PostgresSink
from flux.cdc.stream import open_replication


def _probing(conn: psycopg.Connection) -> tuple[int, int, int, int, int]:
    """What the connection's socket asks of the kernel: keepalive on, idle, interval, count, user timeout."""
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0,
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


def test_the_replication_connection_finds_a_dead_peer_within_a_minute(dsn):
    """Without it a silent partition was waited out for as long as TCP takes (hours when idle)."""
    with open_replication(dsn, slot="flux", application_name="test") as conn:
        assert _probing(conn) == (True, 30, 10, 3, 60_000)


def test_the_store_and_catalog_connections_find_a_dead_peer_too(dsn):
    sink, catalog = PostgresSink(dsn=dsn), PostgresCatalog(dsn=dsn)
    try:
        assert _probing(sink._conn) == _probing(catalog._conn) == (True, 30, 10, 3, 60_000)
    finally:
        sink.close()
        catalog.close()


def test_keepalive_settings_in_the_dsn_win(dsn):
    with open_replication(f"{dsn}?keepalives_idle=7&tcp_user_timeout=9000", slot="flux", application_name="test") as conn:
        assert _probing(conn) == (True, 7, 10, 3, 9000)
