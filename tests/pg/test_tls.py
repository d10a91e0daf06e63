"""`flux.pg.tls`: a refused server certificate told from a server that is down."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from flux.errors import ConfigError
from flux.pg.tls import certificate_refused


def test_the_probe_of_a_refused_certificate_sends_none_of_the_dsns_credentials(tls_cluster, tls_dsn):
    """The probe logged in with the DSN's role and password over a connection whose server it had
    not verified: verify-full's whole point is that credentials never reach an impostor."""
    info, certificates = tls_cluster
    log = Path(info.data_dir) / "server.log"
    with psycopg.connect(tls_dsn, autocommit=True) as conn:
        conn.execute("CREATE ROLE flux_witness LOGIN PASSWORD 'witness-password'")
        conn.execute("ALTER SYSTEM SET log_connections = on")
        conn.execute("SELECT pg_reload_conf()")
        try:
            seen = log.stat().st_size
            refused = (tls_dsn.replace("/ca.crt", "/other-ca.crt")
                       .replace("postgresql://postgres@", "postgresql://flux_witness:witness-password@"))
            with pytest.raises(psycopg.OperationalError) as failed:
                psycopg.connect(refused, connect_timeout=5)
            error = certificate_refused(refused, failed.value)
            with log.open() as text:
                text.seek(seen)
                logged = text.read()
        finally:
            conn.execute("ALTER SYSTEM RESET log_connections")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("DROP ROLE flux_witness")
    assert isinstance(error, ConfigError) and "TLS certificate was not accepted" in error.message
    assert "flux_tls_probe" in logged  # the probe did reach the server
    assert "flux_witness" not in logged
