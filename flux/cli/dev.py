"""`flux dev`: the embedded PostgreSQL under .flux/, the CDC engine, and (in a project) the gateway.

In a directory with flux.toml it serves the project's functions on http://127.0.0.1:PORT,
reloading them when their files change. Elsewhere it runs the database and the engine only.
One `flux dev` runs per project on its embedded database (a lock on the project's directory), and it stops
the embedded server only if it started it, or adopted it from a process that died (Cluster.start).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated

import typer

from flux.cli.common import CONNECT_TIMEOUT, ENV_DSN, FROM_EMBEDDED, FROM_FLAG, STATE_DIR, Database, checked_dsn, reaching
from flux.cli.output import console, escape
from flux.cli.serve import (HostOption, MaxQueueOption, PoolOption, PortOption, QueueTimeoutOption, WorkersOption,
                             run_stack)
from flux.errors import OutputError

if TYPE_CHECKING:
    from flux.pg.cluster import ClusterInfo

LOCK_FILE = "dev.lock"


def dev(
    database: Annotated[
        str | None,
        typer.Option("--database", "-d", help="Use this PostgreSQL instead of the embedded one (no $FLUX_DATABASE_URL fallback here: dev defaults to embedded)."),
    ] = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    workers: WorkersOption = 16,
    max_queue: MaxQueueOption = None,
    queue_timeout: QueueTimeoutOption = None,
    pool_size: PoolOption = 2,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Start (or reuse) the embedded PostgreSQL in .flux/, record every row change, and serve this project's functions."""
    from flux.cdc.attach import attach
    from flux.logs import setup_logging
    from flux.errors import ClusterError, ConfigError, InUseError
    from flux.gateway.server import check_port, ensure_store
    from flux.pg.cluster import Cluster
    from flux.project import find_project_root, load_project
    from flux.signals import received

    setup_logging(verbose)
    try:
        root: Path | None = find_project_root()
    except ConfigError:
        root = None
    project_dir = root or Path.cwd()
    state_dir = project_dir / STATE_DIR
    given = checked_dsn(database, FROM_FLAG) if database is not None else None
    lock = hold_project_lock(state_dir) if given is None else None
    cluster = info = None
    try:
        if root is not None:
            try:
                check_port(host, port)  # before the database starts: nothing to undo
            except InUseError:
                # Its own server, left running there: "stop the process that listens there" would be a riddle.
                embedded = Cluster(state_dir=state_dir) if given is None else None
                if embedded is not None and embedded.recorded_port() == port and embedded.is_running():
                    raise InUseError(f"Port {port} is this project's embedded PostgreSQL's, which is running",
                                     hint="Pass another --port for the gateway.") from None
                raise
        _warn_about_env_dsn(given)
        if received() is not None:  # during Python's start (flux.signals): nothing to start, nothing to stop
            logging.getLogger("flux").info("stopped before starting: %s arrived", signal.Signals(received()).name)
            return
        if given is None:
            cluster = Cluster(state_dir=state_dir)
            running = cluster.is_running()
            verb = "Using the embedded PostgreSQL already running" if running else "Starting embedded PostgreSQL"
            console.print(f"{verb} in {escape(str(state_dir))} …")
            try:
                info = cluster.start(avoid=port if root is not None else None)
            except KeyboardInterrupt:  # a second signal while it started: it is ours to stop all the same
                if not running:
                    cluster.stop()
                    _say("Embedded PostgreSQL stopped.")
                raise
            except ClusterError:
                if received() is None:
                    raise
                # Ctrl-C reaches initdb and pg_ctl too (one process group): their failure is the user's stop.
                # initdb leaves nothing half-made (Cluster._init); a server pg_ctl had launched is ours to stop.
                logging.getLogger("flux").info("stopped before serving: %s arrived while starting",
                                               signal.Signals(received()).name)
                if not running and cluster.stop():
                    _say("Embedded PostgreSQL stopped.")
                return
            _say_how_it_started(info, port if root is not None else None)
            db = Database(info.dsn, FROM_EMBEDDED, project_dir)
        else:
            db = Database(given, FROM_FLAG)
        dsn = db.dsn
        with reaching(db):
            if root is not None:
                project = load_project(root)  # config errors surface before anything listens
                if project.setup_sql is not None:
                    _run_setup_sql(dsn, project.setup_sql)
            result = attach(dsn, all_tables=True)
            ensure_store(dsn)
        for warning in result.warnings:
            if "no consumer" not in warning:  # the engine starts right below
                console.print(f"[yellow]warning:[/] {escape(warning)}")
        console.print(f"[bold green]Flux dev[/]  database [cyan]{escape(dsn)}[/]")

        # Printed once Ctrl-C is handled: a script that reads these lines may stop us at once. They go
        # out in one write, so that a reader that acts on the `psql` line has the others already.
        def ready(url: str | None) -> None:
            lines = [f"  psql {escape(dsn)}"]
            if url is None:
                # Said, or a project whose flux.toml is missing (misnamed, not created yet) just serves nothing.
                lines.append(f"  no gateway: no flux.toml in {escape(str(project_dir))} or its parents, so no functions"
                             " are served (flux init makes a project)")
                lines.append("  Change rows in any table, then: flux state history TABLE --id ID")
            else:
                lines.append(f"  gateway {url}")
                names = ", ".join(sorted(load_project(root).functions)) if root else ""
                if names:
                    lines.append(f"  functions: {escape(names)}  (reloaded when their files change)")
                else:  # every route would answer 404, with nothing here to say why
                    lines.append("  functions: none yet: add functions/NAME.js (served at POST /NAME as soon as it is saved)")
                lines.append("  Then: flux requests · flux trace ID · flux why ID")
            stops_server = info is not None and info.started
            lines.append("  Ctrl-C stops everything" + (" and the embedded PostgreSQL." if stops_server else "."))
            console.print("\n".join(lines))

        run_stack(dsn=dsn, root=root, host=host, port=port, workers=workers, pool_size=pool_size, record=True,
                  reload=True, engine=True, on_ready=ready, max_queue=max_queue, queue_timeout=queue_timeout)
        logging.getLogger("flux").info("stopped")
    finally:
        if info is not None and info.started:
            kept = (Path(info.data_dir) / "PG_VERSION").exists()
            cluster.stop()
            _say(f"Embedded PostgreSQL stopped (data kept in {escape(_shown(Path(info.data_dir)))})." if kept else
                 f"Embedded PostgreSQL stopped (its data directory {escape(_shown(Path(info.data_dir)))} was deleted"
                 " while it ran: the next flux dev makes a new, empty one).")
        elif info is not None:  # someone else started it, and may still use it
            _say("Embedded PostgreSQL left running: it was running before this flux dev started"
                 f" ({escape(cluster.stop_command())} stops it).")
        if lock is not None:
            lock.close()


def _say_how_it_started(info: ClusterInfo, gateway_port: int | None) -> None:
    """What start() did that the user would otherwise wonder about: a server adopted, a port moved, a crash's leftovers."""
    if info.remade:
        console.print(f"  (.flux/cluster.json named a cluster in {escape(_shown(Path(info.data_dir)))} that is gone:"
                      " this is a new, empty one)")
    if info.adopted_from is not None:
        console.print(f"  (left running by a flux dev that ended abruptly, pid {info.adopted_from}: this one stops it)")
    if info.stale_pid_file is not None:
        console.print(f"  (removed the postmaster.pid left by a server that did not stop cleanly: {escape(info.stale_pid_file)})")
    if info.moved_from is not None and info.moved_from == gateway_port:
        console.print(f"  (port {info.moved_from} is the gateway's --port: PostgreSQL listens on {info.port} now)")
    elif info.moved_from is not None:
        console.print(f"  (port {info.moved_from} is taken by another program now: PostgreSQL listens on {info.port})")


def _shown(path: Path) -> str:
    """`path` as the user would type it from here: relative below the working directory (.flux/pgdata),
    else whole (run as root, the data may live under /var/lib/flux/clusters)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _say(text: str) -> None:
    """A last word that a closed terminal (the SIGHUP that stopped us) cannot turn into a traceback."""
    try:
        console.print(text)
    except (OSError, OutputError):  # OutputError: how the console reports the write that failed
        pass


class ProjectLock:
    """What `hold_project_lock` holds: the lock on the project's directory, and the pid file beside it."""

    def __init__(self, directory: int, pid_file: IO[str]) -> None:
        self._directory = directory
        self._pid_file = pid_file

    def close(self) -> None:
        self._pid_file.close()
        os.close(self._directory)  # releases the flock


def hold_project_lock(state_dir: Path) -> ProjectLock:
    """An exclusive lock on the project's directory (`state_dir`'s parent), held for the life of the
    process: one `flux dev` per project. `.flux/dev.lock` keeps the holder's pid for the message.

    A second one would reuse the running cluster, fight the first engine for the replication slot,
    and stop the first one's database when it exits. The OS releases a flock when its process ends,
    however it ends, so a crash leaves no stale lock. The lock is on the directory, not on a file in
    `.flux/`: deleting `.flux/` (or its dev.lock) while flux dev runs removed a locked file, and a
    second flux dev then locked a new one and started beside the first, on the same cluster.
    """
    from flux.errors import InUseError
    from flux.pg.cluster import unwritable_error

    project_dir = state_dir.parent
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        directory = os.open(project_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:  # read-only, or made by another account (sudo flux dev, then flux dev)
        raise unwritable_error(Path(exc.filename or state_dir), exc, owned=state_dir) from None
    try:
        fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(state_dir / LOCK_FILE, directory)
        os.close(directory)
        raise InUseError(
            f"flux dev is already running for this project (pid {holder})",
            hint=f"Use that one (every command run in {project_dir} reads its database), or stop it first.",
        ) from None
    try:
        handle = open(state_dir / LOCK_FILE, "w")  # noqa: SIM115 -- held until the process ends
    except OSError as exc:
        os.close(directory)
        raise unwritable_error(Path(exc.filename or state_dir), exc, owned=state_dir) from None
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return ProjectLock(directory, handle)


def _lock_holder(pid_file: Path, directory: int) -> str:
    """The pid of the flux dev holding the lock: its pid file's, or, with that deleted, the kernel's
    list of locks (/proc/locks, Linux) for the directory; "unknown" when neither says."""
    try:
        written = pid_file.read_text().strip()
    except OSError:
        written = ""
    if written.isdigit():
        return written
    try:
        st = os.fstat(directory)
        where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == where and fields[4].isdigit():
                    return fields[4]
    except OSError:
        pass
    return "unknown"


def _warn_about_env_dsn(given: str | None) -> None:
    """flux dev never reads $FLUX_DATABASE_URL (an exported production URL must not receive schema.sql),
    but the other commands do: say so, or they read another database than the one dev writes to."""
    env = os.environ.get(ENV_DSN)
    if not env or env == given:
        return
    uses = "the database given by --database" if given else "its embedded database"
    console.print(
        f"[yellow]warning:[/] {ENV_DSN} is set, but flux dev uses {uses}, never {ENV_DSN}. Other commands in this"
        f" shell (flux requests, trace, why, state) read {ENV_DSN}: unset it, or pass them --database."
    )


def _run_setup_sql(dsn: str, path: Path) -> None:
    """[dev] setup_sql: the project's schema, applied at each start (write it idempotently).

    SQL the server refuses is the project's to fix (ConfigError); a server that cannot be reached
    stays a ConnectionLostError for the caller to report as such.
    """
    import psycopg

    from flux.errors import ConfigError, from_psycopg

    if not path.is_file():
        raise ConfigError(f"[dev] setup_sql names {path}, which does not exist", hint="Fix the path in flux.toml.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path.name} is not UTF-8 text: {exc.reason} at byte {exc.start}",
                          hint="Save it as UTF-8.") from None
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            try:
                conn.execute(text)
            except psycopg.Error as exc:
                # PostgreSQL says where in the text a statement it could not parse or plan went wrong.
                position = exc.diag.statement_position
                where = f" (line {text[:int(position) - 1].count(chr(10)) + 1})" if position and position.isdigit() else ""
                error = from_psycopg(exc, f"Running {path.name}{where} failed")
                if error.retryable:  # the connection dropped, or a transient conflict: not the SQL's fault
                    raise error from exc
                raise ConfigError(error.message, hint="Fix the SQL; it runs at every `flux dev` start.",
                                  sqlstate=exc.sqlstate) from exc
    except psycopg.Error as exc:
        raise from_psycopg(exc, "Could not connect to the database") from exc
