"""`flux.errors`: Postgres errors classified by SQLSTATE, on real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest

from flux.errors import ConnectionLostError, DatabaseError, from_psycopg


def test_a_statement_timeout_is_a_retryable_database_error_not_a_lost_connection(conn):
    """57014 is in class 57 with the shutdowns and terminations, but the connection outlives it: the
    CLI said of a statement timeout that the server could not be reached, and exited 4."""
    conn.execute("SET statement_timeout = '10ms'")
    with pytest.raises(psycopg.errors.QueryCanceled) as caught:
        conn.execute("SELECT pg_sleep(1)")
    error = from_psycopg(caught.value, "Counting failed")
    assert (type(error), error.retryable, error.context["sqlstate"]) == (DatabaseError, True, "57014")
    assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection is still there


def test_a_terminated_session_is_a_lost_connection(conn, dsn):
    with psycopg.connect(dsn, autocommit=True) as victim:
        conn.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError) as caught:
            victim.execute("SELECT 1")
    assert isinstance(from_psycopg(caught.value, "Reading failed"), ConnectionLostError)
