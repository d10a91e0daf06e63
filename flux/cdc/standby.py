"""Standing by for a replication slot that another Flux engine holds.

PostgreSQL lets one walsender stream a slot at a time, so of two engines on one slot (two `flux
serve` behind a load balancer, each running its engine) one streams and the other stands by:
`wait_while_held` keeps one ordinary connection, named by `standby_name` so that `flux cdc status`
lists it, and looks every `interval` seconds whether the slot is still held. It returns once the
slot is free or a stop is asked. It does not take the slot: the engine's next session does (and
comes back here if another standby got it first). What is recorded, and exactly once, is the
session's business: it reloads the stored progress when it opens, as after any restart.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading

import psycopg

from flux.errors import from_psycopg
from flux.pg.keepalive import dead_peer_options

log = logging.getLogger("flux.cdc")

_STANDBY_NAME = re.compile(r"flux-cdc-standby (\S+) (\d+)@(.*)")


def standby_name(slot: str) -> str:
    """A standing-by engine's application_name (PostgreSQL keeps 63 bytes of it)."""
    return f"flux-cdc-standby {slot} {os.getpid()}@{socket.gethostname()}"[:63]


def standby_of(application_name: str | None) -> tuple[str, int, str] | None:
    """The slot, pid and host a `standby_name` names; None for any other application_name."""
    named = _STANDBY_NAME.fullmatch(application_name or "")
    return (named[1], int(named[2]), named[3]) if named else None


def standbys(conn: psycopg.Connection, slot: str) -> list[tuple[int, str]]:
    """The pid and host of each engine standing by for `slot` in this database."""
    rows = conn.execute("SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name LIKE 'flux-cdc-standby %' ORDER BY backend_start").fetchall()
    return [(pid, host) for named in map(standby_of, (r[0] for r in rows)) if named
            for held, pid, host in [named] if held == slot]


def wait_while_held(dsn: str, slot: str, stop: threading.Event, *, interval: float) -> None:
    """Return when `slot` is free (or gone: the next session says so), or `stop` is set. A lost
    connection is a retryable FluxError, for the engine's backoff."""
    try:
        with psycopg.connect(dsn, autocommit=True, application_name=standby_name(slot), connect_timeout=10,
                             **dead_peer_options(dsn)) as conn:
            while not stop.wait(interval):
                row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
                if row is None or not row[0]:
                    return
                log.debug("slot %s is still held by another engine; standing by", slot)
    except psycopg.Error as exc:
        raise from_psycopg(exc, "Could not watch the replication slot while standing by", slot=slot) from exc
