"""`flux.cdc.standby`: a second engine on a held slot stands by, says so once, and takes over."""

from __future__ import annotations

import logging
import os
import socket
import time

from flux.cdc.attach import attach
from flux.cdc.status import cdc_status
from tests.proxy import ProxyProcess
from tests.support import mutations, start_engine, wait_slot_held


def _until(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_engine_stands_by_quietly_and_takes_over_when_the_first_stops(dsn, conn, capture, caplog):
    """It retried the held slot forever, a warning every 10 s."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    first = capture(tables=["t"])
    wait_slot_held(conn)
    conn.execute("INSERT INTO t VALUES (1)")
    first.caught_up()
    with caplog.at_level(logging.DEBUG, logger="flux.cdc"):
        second = start_engine(dsn, standby_interval=0.1)
        try:
            _until(lambda: second.engine.status()["state"] == "standby")
            time.sleep(1.0)  # ten looks at the slot
            while_standing_by = [(r.levelno, r.getMessage()) for r in caplog.records]
            assert second.engine.status() == {"state": "standby", "slot": "flux",
                                              "holder": {"pid": os.getpid(), "host": socket.gethostname()}}
            first.stop()
            _until(lambda: second.engine.status()["state"] == "active")
            conn.execute("INSERT INTO t VALUES (2)")
            second.caught_up()
        finally:
            second.stop()
    infos = [m for level, m in while_standing_by if level >= logging.INFO]
    assert infos == [f"standing by: slot flux is held by the Flux engine of pid {os.getpid()} on {socket.gethostname()};"
                     " this engine takes over when it frees"]
    assert sum(1 for level, m in while_standing_by if level == logging.DEBUG and "standing by" in m) >= 5
    assert f"took over slot flux from the Flux engine of pid {os.getpid()} on {socket.gethostname()}" in caplog.messages
    assert [m["row_key"] for m in mutations(dsn, "t")] == [{"id": 1}, {"id": 2}]  # each once


def test_cdc_status_names_the_active_engine_and_those_standing_by(dsn, conn, capture):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    capture(tables=["t"])
    wait_slot_held(conn)
    second = start_engine(dsn, standby_interval=0.1)
    try:
        _until(lambda: second.engine.status()["state"] == "standby")
        _until(lambda: cdc_status(dsn).standbys)  # its watching connection is open
        status = cdc_status(dsn)
    finally:
        second.stop()
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    assert (status.consumer_pid, status.consumer_host) == (me["pid"], me["host"])
    assert status.standbys == [me]
    assert cdc_status(dsn).standbys == []  # stopped, it no longer waits


def test_a_slot_still_held_by_the_engines_own_lost_connection_is_freed_not_stood_by_for(dsn, conn, caplog):
    """After a blip the engine found its slot held by its own previous connection, stood by for "the
    Flux engine of pid <its own pid>", and streamed again only when wal_sender_timeout ended it."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    proxy = ProxyProcess(dsn)
    running = start_engine(proxy.dsn, backoff_initial=0.1)
    try:
        wait_slot_held(conn)
        ghost = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()[0]
        with caplog.at_level(logging.INFO, logger="flux.cdc"):
            proxy.cut_replication()
            conn.execute("INSERT INTO t VALUES (1)")
            running.caught_up(timeout=15)  # well within the 60 s of wal_sender_timeout
        states = running.engine.status()["state"]
    finally:
        running.stop()
        proxy.close()
    assert states == "active"
    assert conn.execute("SELECT count(*) FROM pg_stat_replication WHERE pid = %s", (ghost,)).fetchone()[0] == 0
    assert not [m for m in caplog.messages if "standing by" in m]
    assert any(f"still held by this engine's previous connection (walsender pid {ghost})" in m and "ended it" in m
               for m in caplog.messages)
    assert not [m for m in caplog.messages if "reconnecting" in m and "held" in m]  # streamed at once
    assert [m["row_key"] for m in mutations(dsn, "t")] == [{"id": 1}]
