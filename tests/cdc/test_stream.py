"""`flux.cdc.stream`: what opening the replication stream says when it cannot."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from flux.cdc.stream import ReplicationStream, open_replication
from flux.errors import ConfigError, ConnectionLostError, SlotHeldError
from flux.cdc.attach import attach
from tests.proxy import ProxyProcess
from tests.support import wait_slot_held


def test_a_slot_another_engine_holds_is_a_retryable_slot_held_error_naming_that_engine(dsn, conn, capture):
    """The server's message names its own walsender's pid, which is not the process to stop."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    capture(tables=["t"])
    wait_slot_held(conn)
    second = ReplicationStream(dsn=dsn, slot="flux", publication="flux", start_lsn=0)
    with pytest.raises(SlotHeldError) as caught:  # the engine stands by on it
        second.open()
    assert caught.value.retryable
    assert f"held by the Flux engine of pid {os.getpid()} on {socket.gethostname()}" in caught.value.message
    assert (caught.value.context["holder_pid"], caught.value.context["holder_host"]) == (os.getpid(), socket.gethostname())


def test_other_threads_run_while_the_server_takes_its_time_to_answer_start_replication(dsn, conn):
    """libpq's blocking wait for the answer held the GIL: every thread of the process (the gateway's
    loop, in `flux serve`) stopped until the server answered."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    proxy = ProxyProcess(dsn, hold_answer_to="START_REPLICATION", release_after=2.0)
    stream = ReplicationStream(dsn=proxy.dsn, slot="flux", publication="flux")
    opening = threading.Thread(target=stream.open, daemon=True)
    gaps = []
    try:
        started = last = time.monotonic()
        opening.start()
        while opening.is_alive() and last - started < 10:
            time.sleep(0.05)
            gaps.append(time.monotonic() - last)
            last += gaps[-1]
        took = last - started
    finally:
        stream.close()
        proxy.close()
    assert took >= 1.5  # the answer was held back
    assert max(gaps) < 1.0


def test_a_dsn_through_pgbouncer_is_refused_at_once_with_a_hint_to_give_a_direct_one(bouncer_dsn, conn):
    """PgBouncer refuses the replication startup parameter without a SQLSTATE: the engine took it
    for a server that is down and retried it forever."""
    stream = ReplicationStream(dsn=bouncer_dsn, slot="flux", publication="flux")
    with pytest.raises(ConfigError) as caught:
        stream.open()
    assert not caught.value.retryable
    assert "through a connection pooler" in caught.value.message
    assert "directly" in caught.value.hint and "--engine-database" in caught.value.hint


def test_a_host_that_never_answers_is_tried_once_per_attempt_not_probed_for_a_pooler_too():
    """A pooler refuses at once; probing a silent host for one doubled every retry's wait."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept_and_stay_silent():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept_and_stay_silent, daemon=True).start()
    port = listener.getsockname()[1]
    try:
        with pytest.raises(ConnectionLostError):
            open_replication(f"host=127.0.0.1 port={port} user=flux dbname=flux", slot="flux",
                             application_name="test", connect_timeout=2)
        time.sleep(0.2)  # a probe's connection would have been accepted by now
    finally:
        listener.close()
        for connection in accepted:
            connection.close()
    assert len(accepted) == 1
