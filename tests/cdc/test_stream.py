"""`flux.cdc.stream`: what opening the replication stream says when it cannot."""

from __future__ import annotations

import os
import socket

import pytest

from flux.cdc.stream import ReplicationStream
from flux.errors import SlotHeldError
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
