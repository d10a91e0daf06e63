"""A real PgBouncer in front of the session's test cluster, for the tests of what works behind one.

It runs as the cluster's server account (PgBouncer refuses root), in transaction pooling mode.
Every database of the cluster is reachable through it (`* =`). While idle PgBouncer gives a lone
client the server connection it released last, so a client's transactions would all run on one;
`ServerHop` moves each to another, as load does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from flux.pg.cluster import _server_user, free_port

INSTALL_HINT = "These tests need PgBouncer 1.18+ (apt-get install pgbouncer; .ci/run installs it)."


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


class PgBouncer:
    def __init__(self, *, server_port: int, mode: str = "transaction") -> None:
        # Its own directory in /tmp: the server account cannot traverse pytest's (under /root).
        self.directory = Path(tempfile.mkdtemp(prefix="flux-pgbouncer-"))
        self.server_port = server_port
        self.mode = mode
        self.port = free_port()
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = find_pgbouncer()
        if binary is None:
            raise RuntimeError(f"pgbouncer not found. {INSTALL_HINT}")
        user = _server_user()
        (self.directory / "users.txt").write_text('"postgres" ""\n')
        config = self.directory / "pgbouncer.ini"
        config.write_text("\n".join([
            "[databases]", f"* = host=127.0.0.1 port={self.server_port}",
            "[pgbouncer]", "listen_addr = 127.0.0.1", f"listen_port = {self.port}", "unix_socket_dir =",
            "auth_type = trust", f"auth_file = {self.directory / 'users.txt'}", f"pool_mode = {self.mode}",
            "default_pool_size = 4", "max_client_conn = 100",
            "ignore_startup_parameters = extra_float_digits,options", "",
        ]))
        kwargs: dict = {}
        if user is not None:
            for path in (self.directory, config, self.directory / "users.txt"):
                os.chown(path, user.pw_uid, user.pw_gid)
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        self._log = open(self.directory / "pgbouncer.log", "w")
        self._proc = subprocess.Popen([binary, str(config)], stdout=self._log, stderr=subprocess.STDOUT, cwd="/", **kwargs)
        deadline = time.monotonic() + 15
        while True:
            try:
                with psycopg.connect(self.dsn_for(f"postgresql://postgres@127.0.0.1:{self.server_port}/postgres"),
                                     connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start: {(self.directory / 'pgbouncer.log').read_text()}")
                time.sleep(0.1)

    def dsn_for(self, dsn: str) -> str:
        """`dsn`'s database and user, through PgBouncer."""
        params = conninfo_to_dict(dsn)
        params.update(host="127.0.0.1", port=str(self.port))
        return make_conninfo(**params)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class ServerHop:
    """Call it between a client's transactions through PgBouncer: the next one runs on another
    server connection than the last. Of two transactions it keeps open, one takes the server
    connection released last (PgBouncer reuses the most recent), then the other frees its own."""

    def __init__(self, dsn: str) -> None:
        self._conns = [psycopg.connect(dsn), psycopg.connect(dsn)]
        self._conns[0].execute("SELECT 1")  # holds a server connection until its commit
        self._holding = 0

    def __call__(self) -> None:
        other = 1 - self._holding
        self._conns[other].execute("SELECT 1")
        self._conns[self._holding].commit()
        self._holding = other

    def close(self) -> None:
        for conn in self._conns:
            conn.rollback()
            conn.close()
