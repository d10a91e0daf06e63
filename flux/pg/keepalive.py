"""Connection options that make the kernel find a dead peer, for connections that live for days.

Why: the engine's connections (the replication stream, the store, the catalog, a standby's watch)
wait on the server for as long as it takes. Behind a silent network partition (a host gone, a
firewall that drops an idle flow) nothing ever answers, and with the kernel's defaults the wait
lasts until TCP gives up: over two hours for an idle connection, about 15 minutes for one with data
unacknowledged. TCP keepalives are answered by the server's kernel, not by PostgreSQL, so a server
busy decoding a huge transaction still answers them: no false alarm. libpq ignores these options
on a Unix socket, and TCP_USER_TIMEOUT where the system lacks it.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

# A dead peer is found within about a minute: 30 s idle, then 3 probes 10 s apart; data left
# unacknowledged for 60 s ends the connection too.
DEAD_PEER_OPTIONS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


def dead_peer_options(dsn: str) -> dict[str, Any]:
    """DEAD_PEER_OPTIONS less those the DSN sets itself, whose values win."""
    try:
        given = conninfo_to_dict(dsn)
    except psycopg.Error:  # a malformed DSN: the connect that follows reports it
        given = {}
    return {key: value for key, value in DEAD_PEER_OPTIONS.items() if key not in given}
