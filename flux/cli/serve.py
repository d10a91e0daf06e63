"""`flux serve`: the gateway and the CDC engine against a database you run (`--database`).

`run_stack()` is shared with `flux dev`: it runs the engine in a thread and the gateway on
the main thread's asyncio loop, and stops both on Ctrl-C or SIGTERM: the gateway stops
accepting, finishes requests in flight and drains its trace queue; then the engine flushes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from flux.cli.common import (CONNECT_TIMEOUT, WAIT_FOR_DATABASE, Database, DatabaseOption, LogFormat, LogFormatOption,
                              WaitOption, checked_dsn, reaching, resolve_database, wait_for_database)
from flux.cli.output import console, escape

log = logging.getLogger("flux")

ENGINE_STOP_SECONDS = 30  # after the gateway has stopped, what the engine gets to commit what it has read

HostOption = Annotated[str, typer.Option("--host", help="Interface to listen on (0.0.0.0 for all).")]
PortOption = Annotated[int, typer.Option("--port", "-p", help="TCP port to listen on.")]
WorkersOption = Annotated[
    int,
    typer.Option("--workers", min=1, help="How many function executions may run at once (each in its own V8 isolate and "
                 "thread); further requests wait for a free slot (see --max-queue). One process serves them all. At most 32 of them hold "
                 "a database connection at once."),
]
MaxQueueOption = Annotated[
    int | None,
    typer.Option("--max-queue", min=0, show_default=False, help="How many requests may wait for a worker (each holding its "
                 "body); beyond them a request is answered 503 with Retry-After at once. Default: 4 per worker."),
]
QueueTimeoutOption = Annotated[
    float | None,
    typer.Option("--queue-timeout", min=0.001, show_default=False, help="Seconds a request may wait for a worker before "
                 "it is answered 503 with Retry-After. Default: as long as its client waits."),
]
KeepAliveOption = Annotated[
    float,
    typer.Option("--keep-alive", min=0.1, help="Seconds an idle HTTP/1.1 connection stays open: keep it above the idle "
                 "timeout of a load balancer in front (60 s for AWS ALB and nginx), or it may reuse one just closed (a 502)."),
]
PoolOption = Annotated[int, typer.Option("--pool-size", min=0, help="Warm isolates kept ready per function.")]
ProjectOption = Annotated[Path | None, typer.Option("--project", help="The project directory (holding flux.toml); by default, "
                                             "the one enclosing the current directory.", show_default=False)]
RecordOption = Annotated[bool, typer.Option("--record/--no-record", help="Write a trace row (spans and replay tape) per request.")]


def run_stack(
    *, dsn: str, root: Path | None, host: str, port: int, workers: int, pool_size: int, record: bool,
    reload: bool, engine: bool, on_ready=None, max_queue: int | None = None, queue_timeout: float | None = None,
    keep_alive: float | None = None, engine_dsn: str | None = None, functions_dsn: str | None = None,
) -> None:
    from flux.cdc.engine import Engine, EngineConfig
    from flux.signals import hold_while_stopping, received

    if received() is not None:  # during the start before this (flux.signals): nothing is started
        log.info("stopped before serving: %s arrived while starting", signal.Signals(received()).name)
        return
    cdc = Engine(EngineConfig(dsn=engine_dsn or dsn, slot="flux")) if engine else None
    errors: list[BaseException] = []
    thread = None
    if cdc is not None:
        def target() -> None:
            try:
                cdc.run(install_signal_handlers=False)
            except BaseException as exc:  # raised again after the gateway stops; said now, since it serves on
                hint = getattr(exc, "hint", None)
                log.error("the CDC engine stopped: %s%s. Requests are still served; their row changes wait in the "
                          "slot until an engine runs again.", exc, f" (hint: {hint})" if hint else "")
                errors.append(exc)

        thread = threading.Thread(target=target, name="flux-engine", daemon=True)
        thread.start()
    try:
        if root is not None:
            from flux.gateway.server import ServeConfig, serve

            config = ServeConfig(root=root, dsn=dsn, host=host, port=port, workers=workers, pool_size=pool_size,
                                 record=record, reload=reload, max_queue=max_queue, queue_timeout=queue_timeout,
                                 functions_dsn=functions_dsn, **({} if keep_alive is None else {"keep_alive": keep_alive}))
            try:
                asyncio.run(serve(config, on_ready=on_ready, engine_status=cdc.status if cdc is not None else None))
            finally:  # the loop's handlers are gone (the defaults kill): a signal now stops the rest at once
                hold_while_stopping()
        elif cdc is not None:
            from flux import STOP_SIGNALS

            stop = threading.Event()
            for sig in STOP_SIGNALS:
                signal.signal(sig, lambda *_: stop.set())
            if on_ready is not None:  # after the handlers: whoever is told we are ready may stop us
                on_ready(None)
            while not stop.wait(0.5) and thread is not None and thread.is_alive():
                pass
            hold_while_stopping()
    finally:
        if cdc is not None and thread is not None:
            cdc.stop()
            thread.join(timeout=ENGINE_STOP_SECONDS)
            log.info("engine stopped")
    if errors:
        raise errors[0]


def _log_slot_waits(sessions: list[str]) -> None:
    log.warning("creating the replication slot waits for these transactions to end: %s", "; ".join(sessions))


def serve(
    database: DatabaseOption = None,
    project: ProjectOption = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    workers: WorkersOption = 64,
    max_queue: MaxQueueOption = None,
    queue_timeout: QueueTimeoutOption = None,
    keep_alive: KeepAliveOption = 75.0,
    pool_size: PoolOption = 4,
    record: RecordOption = True,
    attach_all: Annotated[bool, typer.Option("--attach", help="First attach Flux to every table of the database (idempotent; "
                                             "see `flux attach --all-tables`).")] = False,
    engine: Annotated[bool, typer.Option("--engine/--no-engine", help="Also run the CDC engine in this process.")] = True,
    engine_database: Annotated[str | None, typer.Option(
        "--engine-database", show_default=False, help="The engine's DSN, when it differs from --database: a direct one "
        "when --database goes through PgBouncer, which cannot carry the engine's replication connection.")] = None,
    functions_database: Annotated[str | None, typer.Option(
        "--functions-database", show_default=False, help="The DSN functions' ctx.db connects with, when it differs from "
        "--database: a role with the application's privileges and none on the flux schema, so that no function reads "
        "or writes what Flux recorded.")] = None,
    reload: Annotated[bool, typer.Option("--reload", help="Reload functions and flux.toml when their files change.")] = False,
    wait_for: WaitOption = WAIT_FOR_DATABASE,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Serve the project's functions over HTTP against --database, recording every request, with the CDC engine."""
    from flux.cdc.attach import attach
    from flux.logs import json_logs, setup_logging
    from flux.gateway.server import check_port, ensure_store, warn_if_functions_reach_the_store
    from flux.project import find_project_root, load_project
    from flux.signals import received

    setup_logging(verbose, log_format.value)
    db = resolve_database(database)
    dsn = db.dsn
    engine_db = Database(checked_dsn(engine_database, "--engine-database"), "--engine-database") if engine_database else db
    engine_dsn = engine_db.dsn
    functions_db = (Database(checked_dsn(functions_database, "--functions-database"), "--functions-database")
                    if functions_database else None)
    root = find_project_root() if project is None else _given_project(project)
    project_config = load_project(root)  # flux.toml's errors before attach changes anything or the engine starts
    check_port(host, port)  # before attach changes anything
    for each in dict.fromkeys(d for d in (engine_db if attach_all or engine else None, db, functions_db) if d is not None):
        if not wait_for_database(each, wait_for, stopped=lambda: received() is not None):
            log.info("stopped before serving: %s arrived while starting", signal.Signals(received()).name)
            return
    with reaching(engine_db):
        if attach_all:
            for warning in attach(engine_dsn, all_tables=True, on_wait=_log_slot_waits).warnings:
                if "no consumer" not in warning:  # the engine starts right below
                    log.warning("%s", warning)
        if engine:
            _require_attached(engine_dsn)
    with reaching(db):
        ensure_store(dsn, record=record, retention=project_config.retention)
    if functions_db is not None:
        with reaching(functions_db):
            warn_if_functions_reach_the_store(functions_db.dsn)

    def ready(url: str | None) -> None:
        if not project_config.functions:  # every request would be a 404, with nothing here to say why
            later = "each is served as soon as it is saved" if reload else "then restart flux serve, or serve with --reload"
            log.warning("no functions in %s: every request is answered 404 until one is added (functions/NAME.js; %s)",
                        root / "functions", later)
        if json_logs():  # a log pipeline reads stderr's JSON lines: the line that says it serves is one of them
            log.info("serving %s on %s", root, url, extra={"url": url, "project": str(root)})
        else:
            console.print(f"[bold green]Flux[/] serving [cyan]{escape(str(root))}[/] on [cyan]{url}[/]")

    run_stack(dsn=dsn, root=root, host=host, port=port, workers=workers, pool_size=pool_size, record=record,
              reload=reload, engine=engine, on_ready=ready, max_queue=max_queue, queue_timeout=queue_timeout,
              keep_alive=keep_alive, engine_dsn=engine_dsn, functions_dsn=functions_db.dsn if functions_db else None)


def _given_project(directory: Path) -> Path:
    """--project names the project itself: a directory inside one is not it (its parents are not searched)."""
    from flux.errors import ConfigError
    from flux.project import CONFIG_FILE

    if not (directory / CONFIG_FILE).is_file():
        raise ConfigError(f"--project {directory} has no {CONFIG_FILE}",
                          hint="Name the directory that holds flux.toml, or leave out --project inside it.")
    return Path(os.path.abspath(directory))  # not resolved: with --reload, a symlink pointed at another release is followed


def _require_attached(dsn: str) -> None:
    import psycopg

    from flux.cdc.roles import require_engine_role
    from flux.cdc.stream import open_replication
    from flux.errors import ConfigError, from_psycopg

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            slot = conn.execute("SELECT database, current_database() FROM pg_replication_slots"
                                " WHERE slot_name = 'flux'").fetchone()
            if slot is None:
                raise ConfigError(
                    "Flux is not attached to this database (no replication slot 'flux')",
                    hint="Run `flux attach --all-tables` (or --tables a,b) first, pass --attach, or use --no-engine.",
                )
            # Slot names are per cluster: the engine would fight another database's engine for it, forever.
            owner, here = slot
            if owner != here:
                raise ConfigError(
                    f"Flux is not attached to database {here}: the server's replication slot 'flux' is database {owner}'s",
                    hint=f"flux serve always uses slot flux: serve database {owner}, or run `flux cdc run --slot NAME` for this"
                         " one (after `flux attach --slot NAME`) and serve it with --no-engine.",
                )
            # The engine runs in this process with this role: refused now, not after the gateway serves.
            require_engine_role(conn, slot="flux")
        # Not through a pooler, either: its refusal is said now, not by an engine thread once serving.
        open_replication(dsn, slot="flux", application_name="flux-serve-check", connect_timeout=CONNECT_TIMEOUT).close()
    except psycopg.Error as exc:
        raise from_psycopg(exc, "Could not read the replication slots") from exc
