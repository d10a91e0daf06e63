"""A PostgreSQL cluster that speaks TLS, with a certificate made for the tests by openssl.

`make_certificates` writes a CA, a server certificate it signed for `localhost` and 127.0.0.1,
and a second CA that signed nothing (a client that trusts only it refuses the server).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from flux.pg.cluster import _server_user

INSTALL_HINT = "These tests need the openssl command (apt-get install openssl)."


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> None:
    """ca.crt, server.crt and server.key (CN localhost, also 127.0.0.1), other-ca.crt; the key is the server account's."""
    days = ("-days", "2")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", *days,
             "-subj", "/CN=flux-test-ca", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=directory)
    (directory / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "server.crt", *days, "-extfile", "san.cnf", cwd=directory)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key", "-out", "other-ca.crt", *days,
             "-subj", "/CN=flux-other-ca", cwd=directory)
    os.chmod(directory / "server.key", 0o600)  # PostgreSQL refuses a key others can read
    user = _server_user()
    if user is not None:
        os.chmod(directory, 0o755)
        for name in ("server.key", "server.crt"):
            os.chown(directory / name, user.pw_uid, user.pw_gid)


def tls_settings(directory: Path) -> dict[str, str]:
    return {"ssl": "on", "ssl_cert_file": f"'{directory / 'server.crt'}'", "ssl_key_file": f"'{directory / 'server.key'}'"}
