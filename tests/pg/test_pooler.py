"""`flux.pg.pooler`: telling a connection through PgBouncer from a direct one, against both."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import pq

from flux.pg.pooler import behind_pooler


@pytest.mark.parametrize("through", [False, True], ids=["direct", "pgbouncer"])
def test_a_connection_through_pgbouncer_is_told_from_a_direct_one(dsn, bouncer_dsn, through):
    with psycopg.connect(bouncer_dsn if through else dsn, autocommit=True) as conn:
        assert behind_pooler(conn) is through


def test_an_idle_connection_without_autocommit_is_left_idle(bouncer_dsn):
    """psycopg_pool discards a connection its configure function leaves in a transaction."""
    with psycopg.connect(bouncer_dsn) as conn:
        assert behind_pooler(conn) is True
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE
