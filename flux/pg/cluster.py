"""A local PostgreSQL cluster that Flux creates, starts and stops itself.

Used by `flux dev` (kept under `.flux/` and reused between runs) and by the test suite
(throwaway clusters). It owns `initdb`, choosing a free port, running the server as an
unprivileged user when the caller is root (postgres refuses to run as root), and starting
again after a crash: a stale `postmaster.pid` removed, a server whose starter died adopted.
Which binaries run is `flux.pg.binaries`'s; what the data directory's files say, `flux.pg.postmaster`'s.

It does not tune the server for production: it is a development and test cluster.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from flux.errors import ClusterError
from flux.pg.binaries import INSTALL_HINT, find_bindir
from flux.pg.postmaster import (PID_FILE, SERVER_NAMES, alive, conf_string, pid_file_pid, pid_file_port, process_name,
                                server_log_error, socket_directory, stale_pid_file, tool_error)

__all__ = ["INSTALL_HINT", "SUPERUSER", "DATABASE", "Cluster", "ClusterInfo", "find_bindir", "free_port", "unwritable_error"]

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
    started: bool = False  # this start() started the server (or adopted it); False: it was running already
    adopted_from: int | None = None  # the pid of the dead process that had started the server this one adopted
    moved_from: int | None = None  # the port recorded last time, taken by another program since (or `avoid`ed)
    stale_pid_file: str | None = None  # why a postmaster.pid left by a server that died was removed
    remade: bool = False  # cluster.json named a cluster that is gone (deleted, or cleaned from /var/tmp): this one is new

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"


# Data directories the server account cannot keep under state_dir. Not /var/tmp, where they were
# before: systemd-tmpfiles deletes files there untouched for 30 days, a project's cluster among them,
# file by file, and leaves it corrupt. Clusters made there earlier stay where cluster.json says.
RELOCATED_ROOT = Path("/var/lib/flux/clusters")
_EARLIER_RELOCATED_ROOTS = (Path("/var/tmp/flux-clusters"),)


class Cluster:
    """One PostgreSQL cluster in `data_dir`, created on first `start()`.

    `state_dir` keeps `cluster.json` (port, data directory, the pid that started the server) so a
    later run reuses the same cluster and port. When the server account cannot reach `state_dir`
    (e.g. under /root), the data directory moves to /var/lib/flux/clusters/<hash> and
    `cluster.json` records where.
    """

    def __init__(self, *, state_dir: Path, settings: dict[str, str] | None = None, bindir: Path | None = None) -> None:
        self.state_dir = state_dir.resolve()
        self.settings = {**BASE_SETTINGS, **(settings or {})}
        self._bindir = bindir
        self._user = _server_user()
        self._postmaster: int | None = None  # the server's pid, as last seen by start()

    @property
    def bindir(self) -> Path:
        """The server binaries: of the version that made the cluster, once it exists (binaries.py)."""
        if self._bindir is None:
            data_dir = self._data_dir(self._load_meta())
            made_by = self._made_by(data_dir) if self._exists(data_dir) else None
            self._bindir = find_bindir(major=made_by, data_dir=data_dir if made_by else None)
        return self._bindir

    @property
    def _meta_path(self) -> Path:
        return self.state_dir / "cluster.json"

    def recorded_port(self) -> int | None:
        """The server's port as cluster.json last recorded it (the one it listens on while it runs)."""
        port = self._load_meta().get("port")
        return port if isinstance(port, int) and port > 0 else None

    def _load_meta(self) -> dict:
        try:
            return json.loads(self._meta_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save_meta(self, meta: dict) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        except OSError as exc:
            raise unwritable_error(self._meta_path, exc, owned=self.state_dir) from None

    def _data_dir(self, meta: dict) -> Path:
        if meta.get("data_dir"):
            return Path(meta["data_dir"])
        local = self.state_dir / "pgdata"
        if _reachable_by(self._user, self.state_dir):
            return local
        digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:16]
        return RELOCATED_ROOT / digest / "pgdata"

    def _exists(self, data_dir: Path) -> bool:
        """Whether `data_dir` holds a cluster, checking first that the server's account owns it:
        another account's (made by root, run as a user, or the reverse) is refused in words."""
        try:
            owner = data_dir.stat().st_uid
        except FileNotFoundError:
            return False
        runner = self._user.pw_uid if self._user is not None else os.geteuid()
        if owner != runner:
            owner_name, runner_name = _user_name(owner), _user_name(runner)
            # A server account's cluster, opened by a user: root's flux dev made it (it runs the server as one).
            maker = "root (sudo flux dev)" if owner_name in UNPRIVILEGED_USERS and self._user is None else owner_name
            target = self.state_dir if data_dir.is_relative_to(self.state_dir) else data_dir
            raise ClusterError(
                f"The embedded cluster in {data_dir} belongs to {owner_name}, and PostgreSQL would run as {runner_name}",
                hint=f"It was made by flux dev run as {maker}: run flux dev that way again, or hand it over:"
                     f" sudo chown -R {runner_name} {shlex.quote(str(target))}",
            )
        return (data_dir / "PG_VERSION").exists()

    def _made_by(self, data_dir: Path) -> int | None:
        try:
            return int((data_dir / "PG_VERSION").read_text().split(".")[0])
        except (OSError, ValueError):
            return None

    def _run(self, args: list[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        kwargs: dict = {}
        env = dict(os.environ)
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
            env["HOME"] = self._user.pw_dir
        try:
            # errors="replace": the tools echo paths, which need not be UTF-8 (a latin-1 directory name)
            proc = subprocess.run(args, capture_output=True, text=True, errors="replace", env=env, cwd="/",
                                  timeout=timeout, **kwargs)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ClusterError(f"Could not run {Path(args[0]).name}: {exc}", hint=INSTALL_HINT) from exc
        if check and proc.returncode != 0:
            reason = tool_error(proc.stderr or proc.stdout) or f"exit {proc.returncode}"
            raise ClusterError(f"{Path(args[0]).name} failed: {reason}", hint=_failure_hint(reason),
                               command=" ".join(args[:2]))
        return proc

    def _chown_for_server(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _init(self, data_dir: Path) -> None:
        """initdb into a sibling directory, renamed into place once complete: an initdb cut short
        (Ctrl-C, a full disk, kill -9) leaves no half-made cluster that a later start would take as made."""
        building = data_dir.with_name(data_dir.name + ".initdb")
        try:
            data_dir.parent.mkdir(parents=True, exist_ok=True)
            self._chown_for_server(data_dir.parent)
            shutil.rmtree(building, ignore_errors=True)  # a previous attempt's
            if data_dir.exists() and any(data_dir.iterdir()):
                raise ClusterError(f"{data_dir} exists and holds no PostgreSQL cluster (no PG_VERSION)",
                                   hint="Move it aside (or delete it if nothing in it is needed): flux dev then makes"
                                        " a new cluster there.", data_dir=str(data_dir))
            if data_dir.exists():
                data_dir.rmdir()  # empty: older Flux made it before running initdb in it
            building.mkdir(mode=0o700)
            self._chown_for_server(building)
        except OSError as exc:
            raise unwritable_error(Path(exc.filename or data_dir), exc) from None
        try:
            self._run([
                str(self.bindir / "initdb"), "-D", str(building), "-U", SUPERUSER,
                "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
            ])
            building.rename(data_dir)
        finally:
            shutil.rmtree(building, ignore_errors=True)

    def _write_settings(self, data_dir: Path, port: int) -> None:
        lines = [f"{k} = {v}" for k, v in {**self.settings, "port": str(port)}.items()]
        lines.append(f"unix_socket_directories = {conf_string(socket_directory(data_dir, port))}")
        conf = data_dir / "postgresql.auto.conf"
        text = "# Written by Flux on every start.\n" + "\n".join(lines) + "\n"
        conf.write_bytes(text.encode("utf-8", "surrogateescape"))  # a path's bytes as they are, UTF-8 or not
        self._chown_for_server(conf)

    def _status_running(self, data_dir: Path) -> bool:
        return self._run([str(self.bindir / "pg_ctl"), "status", "-D", str(data_dir)], check=False).returncode == 0

    def is_running(self) -> bool:
        data_dir = self._data_dir(self._load_meta())
        if not self._exists(data_dir):
            return False
        return stale_pid_file(data_dir) is None and self._status_running(data_dir)

    def start(self, *, avoid: int | None = None) -> ClusterInfo:
        """Create the cluster if needed and start it; reuse a running one. Idempotent.

        `avoid`: a port the server must not take (flux dev's gateway's, free until the gateway binds it):
        a recorded port equal to it moves, as one another program took does.

        `started` on the result says which: whoever reused a running server did not start it,
        and should leave stopping it to whoever did, unless that one is gone (`adopted_from`).
        """
        meta = self._load_meta()
        data_dir = self._data_dir(meta)
        remade = False
        if not self._exists(data_dir):
            remade = bool(meta.get("data_dir"))
            self._init(data_dir)
        stale = stale_pid_file(data_dir)
        if stale is not None:  # the server would refuse to start while it exists
            (data_dir / PID_FILE).unlink(missing_ok=True)
        port = int(meta.get("port") or 0)
        if stale is None and self._status_running(data_dir):
            port = pid_file_port(data_dir) or port
            self._postmaster = pid_file_pid(data_dir)
            starter = meta.get("started_by")
            adopted = isinstance(starter, int) and starter != os.getpid() and not alive(starter)
            self._save_meta({"data_dir": str(data_dir), "port": port,
                             "started_by": os.getpid() if adopted else starter})
            return ClusterInfo(data_dir=str(data_dir), port=port, bindir=str(self.bindir), started=adopted,
                               adopted_from=starter if adopted else None)
        moved_from = port if port and (port == avoid or not _port_is_free(port)) else None
        if not port or moved_from:
            port = free_port()
            while port == avoid:
                port = free_port()
        self._write_settings(data_dir, port)
        # Recorded first: a start cut short may still leave a server running, which the next run then adopts.
        self._save_meta({"data_dir": str(data_dir), "port": port, "started_by": os.getpid()})
        log = data_dir / "server.log"
        offset = log.stat().st_size if log.exists() else 0
        pg_ctl = str(self.bindir / "pg_ctl")
        try:
            self._run([pg_ctl, "start", "-w", "-t", "60", "-D", str(data_dir), "-l", str(log)])
        except ClusterError as exc:
            reason = server_log_error(log, offset)
            if reason is None:
                raise
            raise ClusterError(f"PostgreSQL did not start: {reason}", hint=_failure_hint(reason, log),
                               data_dir=str(data_dir)) from exc
        self._postmaster = pid_file_pid(data_dir)
        return ClusterInfo(data_dir=str(data_dir), port=port, bindir=str(self.bindir), started=True,
                           moved_from=moved_from, stale_pid_file=stale, remade=remade)

    def stop(self, *, mode: str = "fast") -> bool:
        """Stop the server; False when there was none to stop.

        A server whose data directory was deleted while it ran (no pg_ctl can name it now) is
        stopped through the pid this object saw at start, as `pg_ctl stop -m fast` would.
        """
        data_dir = self._data_dir(self._load_meta())
        if (data_dir / "PG_VERSION").exists():
            self._run([str(self.bindir / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(data_dir)], check=False)
            return True
        pid = self._postmaster
        if pid is None or not alive(pid) or process_name(pid) not in SERVER_NAMES:
            return False
        os.kill(pid, signal.SIGINT)  # the postmaster's fast shutdown
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        return True

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
        if data_dir.parent.parent in (RELOCATED_ROOT, *_EARLIER_RELOCATED_ROOTS):
            try:
                data_dir.parent.rmdir()  # the relocated cluster's own directory, now empty
            except OSError:
                pass
        try:
            self._meta_path.unlink()
        except FileNotFoundError:
            pass


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def unwritable_error(path: Path, exc: OSError, *, owned: Path | None = None) -> ClusterError:
    """A file or directory the embedded cluster needs that cannot be written, said in words;
    `owned` is the directory to hand over when another account made it (default: `path`)."""
    if exc.errno == errno.EROFS:
        return ClusterError(f"Cannot write {path}: the file system is read-only",
                            hint="flux dev keeps its database in the project's .flux/: run it from a writable copy,"
                                 " or pass --database DSN to use a server you run (nothing is written then).")
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return ClusterError(f"Cannot write {path}: a file is in the way of the directory flux dev keeps",
                            hint="flux dev keeps its database in the project's .flux/ directory: move that file aside.")
    if exc.errno == errno.ENOSPC:
        return ClusterError(f"Cannot write {path}: no space left on the device", hint="Free some disk space and retry.")
    return ClusterError(f"Cannot write {path}: {exc.strerror}",
                        hint="Another account made it (flux dev run with sudo, or as root, then as yourself?):"
                             f" hand it over with sudo chown -R {_user_name(os.geteuid())} {shlex.quote(str(owned or path))},"
                             " or pass --database DSN.")


def _failure_hint(reason: str, log: Path | None = None) -> str:
    if "No space left on device" in reason:
        return "Free some disk space and retry."
    if log is not None:
        return f"The server's log says more: {log}"
    return "Fix what it says and retry, or pass --database DSN to use a server you run."


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
