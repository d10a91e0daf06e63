"""A local PostgreSQL cluster that Flux creates, starts and stops itself.

Used by `flux dev` (kept under `.flux/` and reused between runs) and by the test suite
(throwaway clusters). It owns finding server binaries, `initdb`, choosing a free port,
and running the server as an unprivileged user when the caller is root, since
postgres refuses to run as root.

It does not tune the server for production: it is a development and test cluster.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from flux.errors import ClusterError

# Not "flux": with search_path "$user", public a role named flux would create its tables in the flux schema.
SUPERUSER = "postgres"
DATABASE = "postgres"
UNPRIVILEGED_USERS = ("postgres", "nobody")

# Settings every Flux cluster needs: logical decoding with room for test slots.
BASE_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "40",
    "max_wal_senders": "40",
    "max_connections": "200",
    "listen_addresses": "'127.0.0.1'",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "wal_sender_timeout": "'60s'",
}

INSTALL_HINT = (
    "Install the PostgreSQL server (14 or newer): 'apt-get install postgresql' on Debian/Ubuntu, "
    "'dnf install postgresql-server' on Fedora/RHEL, 'brew install postgresql' on macOS; "
    "or point Flux at a server you run with --database DSN."
)


def find_bindir() -> Path:
    """Locate the newest server binaries: $FLUX_PG_BINDIR alone if set, else `pg_config --bindir`,
    then the usual Debian and RPM paths."""
    if os.environ.get("FLUX_PG_BINDIR"):
        return _check_bindirs([Path(os.environ["FLUX_PG_BINDIR"])])
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    versioned = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin")
    versioned.sort(key=_version_of_path, reverse=True)
    candidates += [Path(p) for p in versioned]
    candidates += [Path("/usr/local/pgsql/bin"), Path("/opt/homebrew/bin"), Path("/usr/local/bin"), Path("/usr/bin")]
    return _check_bindirs(candidates)


def _check_bindirs(candidates: list[Path]) -> Path:
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise ClusterError(
        "No PostgreSQL server binaries (initdb, pg_ctl, postgres) were found",
        hint=INSTALL_HINT,
        searched=", ".join(str(c) for c in candidates),
    )


def _version_of_path(path: str) -> float:
    for part in Path(path).parts:
        digits = part.removeprefix("pgsql-")
        try:
            return float(digits)
        except ValueError:
            continue
    return 0.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the server binds: connections left in TIME_WAIT by a restart do not make it busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _server_user() -> pwd.struct_passwd | None:
    """The account the server runs as: None means the current user (when it is not root)."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ClusterError(
        "Running as root, and no unprivileged account exists to run PostgreSQL",
        hint="Create one ('useradd --system postgres') or run Flux as a normal user.",
    )


def _reachable_by(user: pwd.struct_passwd | None, path: Path) -> bool:
    """Whether `user` can traverse every parent of `path` (root's home is often closed to others)."""
    if user is None:
        return True
    for parent in [path, *path.parents]:
        if not parent.exists():
            continue
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            mode_bit = 0o100
        elif st.st_gid == user.pw_gid:
            mode_bit = 0o010
        else:
            mode_bit = 0o001
        if not st.st_mode & mode_bit:
            return False
    return True


@dataclass(frozen=True)
class ClusterInfo:
    data_dir: str
    port: int
    bindir: str
    started: bool = False  # this start() started the server; False: it was running already

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"


RELOCATED_ROOT = Path("/var/tmp/flux-clusters")  # data directories the server account cannot keep under state_dir


class Cluster:
    """One PostgreSQL cluster in `data_dir`, created on first `start()`.

    `state_dir` keeps `cluster.json` (port, data directory) so a later run reuses the same
    cluster and port. When the server account cannot reach `state_dir` (e.g. under /root),
    the data directory moves to /var/tmp/flux-clusters/<hash> and `cluster.json` records where.
    """

    def __init__(self, *, state_dir: Path, settings: dict[str, str] | None = None, bindir: Path | None = None) -> None:
        self.state_dir = state_dir.resolve()
        self.settings = {**BASE_SETTINGS, **(settings or {})}
        self._bindir = bindir
        self._user = _server_user()

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    @property
    def _meta_path(self) -> Path:
        return self.state_dir / "cluster.json"

    def _load_meta(self) -> dict:
        try:
            return json.loads(self._meta_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save_meta(self, meta: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    def _data_dir(self, meta: dict) -> Path:
        if meta.get("data_dir"):
            return Path(meta["data_dir"])
        local = self.state_dir / "pgdata"
        if _reachable_by(self._user, self.state_dir):
            return local
        digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:16]
        return RELOCATED_ROOT / digest / "pgdata"

    def _run(self, args: list[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        kwargs: dict = {}
        env = dict(os.environ)
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
            env["HOME"] = self._user.pw_dir
        try:
            proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd="/", timeout=timeout, **kwargs)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ClusterError(f"Could not run {Path(args[0]).name}: {exc}", hint=INSTALL_HINT) from exc
        if check and proc.returncode != 0:
            output = (proc.stderr or proc.stdout).strip().splitlines()
            raise ClusterError(
                f"{Path(args[0]).name} failed: {output[-1] if output else 'exit ' + str(proc.returncode)}",
                hint="See the server log under the cluster's data directory.",
                command=" ".join(args[:2]),
            )
        return proc

    def _chown_for_server(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _init(self, data_dir: Path) -> None:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._chown_for_server(data_dir.parent)
        data_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown_for_server(data_dir)
        self._run([
            str(self.bindir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER,
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
        ])

    def _write_settings(self, data_dir: Path, port: int) -> None:
        lines = [f"{k} = {v}" for k, v in {**self.settings, "port": str(port)}.items()]
        lines.append(f"unix_socket_directories = '{data_dir}'")
        conf = data_dir / "postgresql.auto.conf"
        conf.write_text("# Written by Flux on every start.\n" + "\n".join(lines) + "\n")
        self._chown_for_server(conf)

    def is_running(self) -> bool:
        meta = self._load_meta()
        data_dir = self._data_dir(meta)
        if not (data_dir / "PG_VERSION").exists():
            return False
        return self._run([str(self.bindir / "pg_ctl"), "status", "-D", str(data_dir)], check=False).returncode == 0

    def start(self) -> ClusterInfo:
        """Create the cluster if needed and start it; reuse a running one. Idempotent.

        `started` on the result says which: whoever reused a running server did not start it,
        and should leave stopping it to whoever did.
        """
        meta = self._load_meta()
        data_dir = self._data_dir(meta)
        if not (data_dir / "PG_VERSION").exists():
            self._init(data_dir)
        pg_ctl = str(self.bindir / "pg_ctl")
        port = int(meta.get("port") or 0)
        if self._run([pg_ctl, "status", "-D", str(data_dir)], check=False).returncode == 0 and port:
            info = ClusterInfo(data_dir=str(data_dir), port=port, bindir=str(self.bindir))
            self._save_meta({"data_dir": str(data_dir), "port": port})
            return info
        if not port or not _port_is_free(port):
            port = free_port()
        self._write_settings(data_dir, port)
        self._run([pg_ctl, "start", "-w", "-t", "60", "-D", str(data_dir), "-l", str(data_dir / "server.log")])
        self._save_meta({"data_dir": str(data_dir), "port": port})
        return ClusterInfo(data_dir=str(data_dir), port=port, bindir=str(self.bindir), started=True)

    def stop(self, *, mode: str = "fast") -> None:
        meta = self._load_meta()
        data_dir = self._data_dir(meta)
        if (data_dir / "PG_VERSION").exists():
            self._run([str(self.bindir / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(data_dir)], check=False)

    def stop_command(self) -> str:
        """The shell command that stops this cluster, for a person to run (as the server's account when root)."""
        data_dir = self._data_dir(self._load_meta())
        command = f"{shlex.quote(str(self.bindir / 'pg_ctl'))} stop -D {shlex.quote(str(data_dir))}"
        return command if self._user is None else f"runuser -u {shlex.quote(self._user.pw_name)} -- {command}"

    def restart(self, *, mode: str = "fast") -> ClusterInfo:
        """Stop and start on the same port (tests use this to simulate a server restart)."""
        self.stop(mode=mode)
        return self.start()

    def destroy(self) -> None:
        meta = self._load_meta()
        data_dir = self._data_dir(meta)
        self.stop(mode="immediate")
        shutil.rmtree(data_dir, ignore_errors=True)
        if data_dir.parent.parent == RELOCATED_ROOT:
            try:
                data_dir.parent.rmdir()  # the relocated cluster's own directory, now empty
            except OSError:
                pass
        try:
            self._meta_path.unlink()
        except FileNotFoundError:
            pass


def wait_until_accepting(dsn: str, *, timeout: float = 30) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
