"""Telling a server certificate the client refused from a server that cannot be reached.

libpq reports both as a failed connection with no SQLSTATE ("SSL error: certificate verify
failed", "root certificate file ... does not exist", a host name the certificate does not hold),
so a bad certificate read like a server that is down: retried forever by the engine, with a hint
to check that the server runs. When a DSN that verifies the certificate (`sslmode=verify-ca` or
`verify-full`, from the DSN or PGSSLMODE) fails to connect, `certificate_refused` connects again
with `sslmode=require`, encrypted but unverified: if the server answers there, the certificate was
the failure. It costs a connection attempt, only on such a failure. The server it reaches is not
verified (it may be an impostor: that is what verify-full guards against), so the attempt carries
none of the DSN's credentials: a made-up role, no password, no password file. A server that
refuses that role, or asks for a password, has answered through TLS all the same.
"""

from __future__ import annotations

import psycopg

from flux.errors import ConfigError

_VERIFYING = (b"verify-ca", b"verify-full")
_NO_ROOT_CERTIFICATE = "/nonexistent/flux-probe-root.crt"
_NO_PASSWORD_FILE = "/nonexistent/flux-probe-pgpass"
_PROBE_ROLE = "flux_tls_probe"  # made up: the probe's server is not verified, so none of the DSN's credentials go to it
PROBE_TIMEOUT = 5  # seconds: the server just answered, or this is not the certificate


def certificate_refused(dsn: str, exc: BaseException | None) -> ConfigError | None:
    """A ConfigError when `exc`, a failed connection to `dsn`, was this client refusing the server's certificate."""
    pgconn = getattr(exc, "pgconn", None)
    if not isinstance(exc, psycopg.OperationalError) or pgconn is None:
        return None
    try:
        sslmode = next((opt.val for opt in pgconn.info if opt.keyword == b"sslmode"), None)
    except psycopg.Error:
        return None
    if sslmode not in _VERIFYING:
        return None
    if not _answers_through_tls(dsn):
        return None  # down, or another failure: the original error says which
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(
        f"The database server's TLS certificate was not accepted (sslmode={sslmode.decode()}): {detail}",
        hint="Give sslrootcert the certificate of the CA that signed the server's (the default is ~/.postgresql/root.crt);"
             " with verify-full the DSN's host must also be a name the certificate holds. sslmode=require encrypts"
             " without verifying the server.")


def _answers_through_tls(dsn: str) -> bool:
    try:
        # libpq verifies under `require` too when a root certificate file exists: one that does not.
        with psycopg.connect(dsn, sslmode="require", sslrootcert=_NO_ROOT_CERTIFICATE, connect_timeout=PROBE_TIMEOUT,
                             user=_PROBE_ROLE, dbname=_PROBE_ROLE, password="", passfile=_NO_PASSWORD_FILE):
            return True
    except psycopg.Error as exc:
        # Refused (no such role, a password asked for and not given): the handshake was done all the same.
        return bool(getattr(getattr(exc, "pgconn", None), "ssl_in_use", False))
