"""Serving a project: the database pool, the trace writer, hypercorn, reload, and clean shutdown.

`serve()` is the one loop of the gateway process. It owns the order of start and stop:

    bind the port -> schema -> db pool -> trace writer -> app (isolate pools warm) -> hypercorn ... signal
    -> stop accepting -> finish requests in flight -> drain traces -> close pools

One signal's stop is bounded by `stop_bound()`: the function time limit + 6 s from the signal for
functions in flight, 5 s for one cancelled then to roll back, the drain (10 s), 5 s to close
pools; with the default drain, timeout_ms + 26 s. Hypercorn's own timeouts are set to fit it.
A second signal cuts the waits short: running functions are cancelled (503) and the drain gets
HURRIED_DRAIN_SECONDS. Traces left unwritten at the end are a DatabaseError (exit code 1).

One process, one asyncio loop. `workers` bounds how many function executions run at the
same time (each in its own isolate, on its own V8 thread); requests beyond that wait for a
slot, up to `max_queue` of them (then 503). `pool_size` is the number of warm isolates kept per function.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from flux import STOP_SIGNALS
from flux.errors import ConfigError, DatabaseError, FluxError, InUseError, ServerNotReadyError, from_psycopg
from flux.gateway.app import LATE_CANCEL_SECONDS, SETTLE_GRACE_SECONDS, Gateway, create_app
from flux.gateway.traces import CONNECT_TIMEOUT, TraceWriter
from flux.pg.keepalive import dead_peer_options
from flux.project import Project, Retention, fingerprint, load_project
from flux.runtime.fetch import AiohttpTransport
from flux.runtime.host import DbPool
from flux.signals import received as held_signal
from flux.store import retention
from flux.store.queries import no_jit

log = logging.getLogger("flux.gateway")

# Idle HTTP/1.1 connections stay open longer than the load balancers in front keep theirs (AWS ALB
# and nginx: 60 s): with Hypercorn's 5 s, a balancer reused a connection the gateway had just closed,
# and answered its client 502.
KEEP_ALIVE_SECONDS = 75.0
HURRIED_DRAIN_SECONDS = 1.0  # after a second stop signal, what the trace drain still gets
CLOSE_SECONDS = 5.0  # closing the database pool (psycopg_pool's own default)
SETTLE_SECONDS = 0.1  # with reload, how long the files must stay unchanged before they are read (a save, a checkout)
SETTLE_LIMIT_SECONDS = 5.0  # files that keep changing are read anyway after this long


def stop_bound(timeout_ms: int, drain_timeout: float) -> float:
    """The longest one stop signal keeps the gateway: functions in flight get their time limit and
    the grace (counted from the signal), one cancelled then its rollback, traces the drain, then the
    pools close."""
    return timeout_ms / 1000 + SETTLE_GRACE_SECONDS + LATE_CANCEL_SECONDS + drain_timeout + CLOSE_SECONDS


def set_stop_timeouts(hc: HypercornConfig, timeout_ms: int, drain_timeout: float) -> None:
    """Hypercorn's own limits on a stop, from the function time limit (again on each reload: it reads
    them when it stops). `graceful_timeout`: requests in flight end within their time limit and the
    grace. `shutdown_timeout` bounds the app's shutdown (`Gateway.settle`, then the trace drain):
    left at its default of 60 s, it cut both short, with a traceback and traces lost, whenever a
    function with a longer time limit ran on with its client gone."""
    hc.graceful_timeout = timeout_ms / 1000 + SETTLE_GRACE_SECONDS
    hc.shutdown_timeout = stop_bound(timeout_ms, drain_timeout) + 10  # never reached: settle and drain end first


@dataclass(frozen=True, slots=True)
class ServeConfig:
    root: Path
    dsn: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 64
    pool_size: int = 4
    record: bool = True
    reload: bool = False
    drain_timeout: float = 10.0
    max_queue: int | None = None  # requests that may wait for a worker; None: 4 per worker (see Gateway)
    queue_timeout: float | None = None  # seconds one may wait; None: as long as its client does
    keep_alive: float = KEEP_ALIVE_SECONDS  # seconds an idle HTTP/1.1 connection stays open
    functions_dsn: str | None = None  # what ctx.db connects with; None: dsn


def warn_if_functions_reach_the_store(dsn: str) -> list[str]:
    """The flux tables the role of `dsn` (functions' ctx.db, given apart) may use, each said in a
    warning: what it can read there is every tenant's traces and row images."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
        role, reachable = conn.execute("""
            SELECT current_user, coalesce(array_agg(c.relname::text ORDER BY c.relname), '{}')
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'flux' AND c.relkind IN ('r', 'p')
              AND has_schema_privilege('flux', 'USAGE')
              AND has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')""").fetchone()
    if reachable:
        quoted = '"' + role.replace('"', '""') + '"'
        log.warning("functions' ctx.db (--functions-database, role %s) may use %s: a function can read or change every "
                    "tenant's recordings there. REVOKE ALL ON ALL TABLES IN SCHEMA flux FROM %s; REVOKE USAGE ON SCHEMA "
                    "flux FROM %s (a superuser reaches them anyway)", role, ", ".join(f"flux.{t}" for t in reachable),
                    quoted, quoted)
    return reachable


def ensure_store(dsn: str, *, record: bool = True, retention: Retention | None = None) -> None:
    """The flux schema, created or upgraded, and the role's privileges on it checked (`flux.cdc.roles`)."""
    from flux.cdc.roles import require_gateway_role
    from flux.store.schema import ensure_schema

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            require_gateway_role(conn, record=record, retention=retention)
            ensure_schema(conn)
    except psycopg.Error as exc:
        hint = ("`flux attach` creates and upgrades the flux schema: run it (again, after upgrading Flux) as the role that "
                "attached, then start this." if exc.sqlstate == "42501" else "Check --database / FLUX_DATABASE_URL.")
        raise from_psycopg(exc, "Could not prepare the flux schema", hint=hint) from exc


def trace_reader(dsn: str) -> Callable[[str, str | None, dict[str, str]], Awaitable[Any]]:
    """Tenant-scoped reads for GET /_flux/requests, run in a thread on a short-lived connection."""
    from datetime import timedelta

    from flux.store import traces

    def read(tenant: str, request_id: str | None, args: dict[str, str]) -> Any:
        # Bounded: a server that accepts and says nothing would hold a thread of the loop's default
        # executor, which also makes and frees isolates, for good.
        with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            no_jit(conn)
            if request_id is not None:
                return traces.get_trace(conn, request_id, tenant=tenant)
            since = args.get("since_seconds")
            return traces.list_traces(
                conn, tenant=tenant, function=args.get("function"), status=args.get("status"),
                since=timedelta(seconds=float(since)) if since else None, limit=min(int(args.get("limit", 50)), 500),
            )

    async def reader(tenant: str, request_id: str | None, args: dict[str, str]) -> Any:
        return await asyncio.to_thread(read, tenant, request_id, args)

    return reader


def _expected_discard(record: logging.LogRecord) -> bool:
    """False for psycopg_pool's warning about a closed connection handed back: the runtime closes a
    connection on purpose when a request's time limit or client cut its exchange short (see
    `DbSession`), and the pool replaces it. Its span already says why; the warning, per request
    and without a request id, would only be noise."""
    return not record.getMessage().startswith("discarding closed connection")


logging.getLogger("psycopg.pool").addFilter(_expected_discard)


async def build(config: ServeConfig, project: Project, *, hurry: asyncio.Event | None = None,
                engine_status: Callable[[], dict[str, Any]] | None = None) -> tuple[Gateway, Callable[[], Awaitable[None]]]:
    """A started Gateway and the coroutine function that stops it (drains traces, closes pools).
    The drain waits up to `config.drain_timeout`, or until `hurry` is set (a second Ctrl-C)."""
    hurry = hurry or asyncio.Event()
    functions_dsn = config.functions_dsn or config.dsn
    # DbSession runs BEGIN itself. Pooled connections live for days: they find a dead peer within a
    # minute (flux.pg.keepalive), rather than a function's statement waiting on one to its time limit.
    db_pool = DbPool(functions_dsn, min_size=1, max_size=max(2, min(config.workers, 32)), open=False,
                     kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT, **dead_peer_options(functions_dsn)})
    try:
        await db_pool.open(wait=True, timeout=15)
    except Exception as exc:  # noqa: BLE001 -- psycopg_pool raises PoolTimeout with the cause logged
        # Reached a moment before (ensure_store): gone since, not misconfigured (exit 4, not 2).
        given = "--functions-database" if config.functions_dsn else "--database / FLUX_DATABASE_URL"
        raise ServerNotReadyError(f"Could not connect to the database: {exc}",
                                  hint=f"Check that the server is running, and {given}.") from exc
    writer = TraceWriter(config.dsn) if config.record else None
    if writer is not None:
        await writer.start()
    transport = AiohttpTransport()
    gateway = Gateway(project, transport=transport, db_pool=db_pool, sink=writer, workers=config.workers,
                      pool_size=config.pool_size, record=config.record, trace_reader=trace_reader(config.dsn),
                      max_queue=config.max_queue, queue_timeout=config.queue_timeout, engine_status=engine_status)

    async def stop() -> None:
        if writer is not None:
            closing = asyncio.ensure_future(writer.close())
            hurried = asyncio.ensure_future(hurry.wait())
            started = asyncio.get_running_loop().time()
            await asyncio.wait({closing, hurried}, timeout=config.drain_timeout, return_when=asyncio.FIRST_COMPLETED)
            hurried.cancel()
            if not closing.done() and hurry.is_set():  # a healthy database still takes the queue in this time
                left = config.drain_timeout - (asyncio.get_running_loop().time() - started)
                await asyncio.wait({closing}, timeout=max(0.0, min(HURRIED_DRAIN_SECONDS, left)))
            if not closing.done():
                closing.cancel()
                # `pending` counts the batch being retried too, which the queue's size leaves out.
                log.error("gave up draining traces after %.0fs%s: %d records not written%s",
                          asyncio.get_running_loop().time() - started, " (stopped at once)" if hurry.is_set() else "",
                          writer.pending, f" ({writer.sending} of them sent, which the server may still commit)"
                          if writer.sending else "")
                if writer.dropped:  # close() reports these when it finishes; it did not
                    log.error("%d trace records were dropped because the queue was full", writer.dropped)
        await transport.aclose()
        await db_pool.close()

    return gateway, stop


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to host:port as hypercorn binds them (its own code, SO_REUSEADDR included).

    A port in use is an InUseError, any other refusal a ConfigError: both before anything listens.
    """
    hc = HypercornConfig()
    hc.bind = [f"{host}:{port}"]
    try:
        return hc.create_sockets().insecure_sockets
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InUseError(f"Port {port} is in use on {host}", hint="Pass --port N, or stop the process that listens there.") from exc
        raise ConfigError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}", hint="Check --host and --port.") from exc
    except OverflowError as exc:  # a port past 65535
        raise ConfigError(f"Cannot listen on {host}:{port}: {exc}", hint="Pass --port N with N from 1 to 65535.") from exc


def check_port(host: str, port: int) -> None:
    """Fail now if the gateway could not listen on host:port (before a database or an engine starts)."""
    for sock in bind_sockets(host, port):
        sock.close()


async def serve(config: ServeConfig, *, on_ready: Callable[[str], None] | None = None,
                engine_status: Callable[[], dict[str, Any]] | None = None) -> None:
    """Serve until a stop signal. `engine_status`: the CDC engine run beside it, for /_flux/health."""
    # Bound first, and held: a port taken meanwhile fails here, before anything starts or says it serves.
    sockets = bind_sockets(config.host, config.port)
    try:
        await _serve(config, sockets, on_ready, engine_status)
    finally:
        for sock in sockets:
            sock.close()  # a no-op for those handed to hypercorn


async def _serve(config: ServeConfig, sockets: list[socket.socket], on_ready: Callable[[str], None] | None,
                 engine_status: Callable[[], dict[str, Any]] | None) -> None:
    project = load_project(config.root)
    ensure_store(config.dsn, record=config.record, retention=project.retention)
    hurry = asyncio.Event()
    gateway, stop = await build(config, project, hurry=hurry, engine_status=engine_status)

    async def started() -> None:
        freeze_heap()

    app = create_app(gateway, on_startup=started, on_shutdown=stop)
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()

    def begin_shutdown() -> None:
        if shutdown.is_set():  # a second signal: stop waiting
            if not hurry.is_set():
                hurry.set()
                log.warning("stopping now: %d running function(s) cancelled (rolled back, answered and recorded 503); "
                            "traces not yet written are given up and counted", gateway.cut_short())
            return
        load = gateway.load()
        log.info("stopping: %d function(s) running, %d request(s) queued (answered 503), %d trace(s) to write; "
                 "again to stop at once", load["running"], load["queued"], gateway.sink.status()["pending"] if gateway.sink else 0)
        gateway.stop_starting()  # queued requests get their 503 while their clients still listen
        shutdown.set()

    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, begin_shutdown)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    if held_signal() is not None:  # it came while this started (flux.signals): stop without serving
        log.info("%s arrived while starting", signal.Signals(held_signal()).name)
        begin_shutdown()
    port = sockets[0].getsockname()[1]  # the real one, should --port be 0
    hc = HypercornConfig()
    hc.bind = [f"fd://{sock.detach()}" for sock in sockets]  # hypercorn serves the sockets bound above
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.keep_alive_timeout = config.keep_alive
    set_stop_timeouts(hc, project.limits.timeout_ms, config.drain_timeout)
    gateway.reload_hooks.append(lambda project: set_stop_timeouts(hc, project.limits.timeout_ms, config.drain_timeout))
    watcher = asyncio.create_task(_watch(gateway, shutdown, dsn=config.dsn, root=config.root)) if config.reload else None
    pruner = asyncio.create_task(retention.keep(config.dsn, lambda: gateway.project.retention))
    if on_ready is not None and not shutdown.is_set():
        loop.call_soon(on_ready, f"http://{config.host}:{port}")
    try:
        await hypercorn_serve(app, hc, shutdown_trigger=shutdown.wait)
    finally:
        pruner.cancel()  # a pass on its worker thread has its statement cancelled; the next never starts
        if watcher is not None:
            watcher.cancel()
    lost = gateway.sink.status()["pending"] if gateway.sink is not None else 0
    if lost:  # logged as it happened; the exit code says it too, to whatever supervises the process
        raise DatabaseError(f"Stopped with {lost} trace record(s) not written: the database did not take them in time",
                            hint="Their row changes are in flux.state_mutations (the engine reads them from the WAL); "
                                 "`flux why` says which requests have no trace.")
    # The stop's last word: without it the log ended at `stopping: ...`, the same as a stop that hung.
    status = gateway.sink.status() if gateway.sink is not None else None
    log.info("gateway stopped: %s", "no traces recorded (--no-record)" if status is None else
             f"trace queue drained ({status['written']} written this run, {status['dropped']} dropped by a full "
             f"queue, {status['failed']} refused by the database)")


def freeze_heap() -> None:
    """Leave what is alive now out of Python's future garbage collections.

    Once the app has started (modules, app, isolate pools), the process holds about 75,000
    objects that live as long as it does, and each full collection walked them all: 35 to 60 ms
    with the loop stopped, every few thousand requests (measured 2026-12-06). Frozen, they are
    never walked again, and a full collection takes 2 to 4 ms. Called again after a reload, which
    unfreezes first: the replaced functions' objects must stay collectable.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def _watch(gateway: Gateway, shutdown: asyncio.Event, interval: float = 0.5, *, dsn: str | None = None,
                 quiet: float = SETTLE_SECONDS, root: Path | None = None) -> None:
    """Reload functions and flux.toml when their files change (flux dev). With `dsn`, a changed
    `[retention]` has the grants it needs checked as at start.

    A checkout, a deploy copying a tree or an editor's save writes several files, or one file
    several times: a reload part-way served a mix of old and new files until the next one. So
    the files are read once they have not changed for `quiet` seconds, and read again should they
    change while they are read.

    `root` is the project's directory as given (`--project`): a symlink pointed at another release
    is followed (the project's own root is where it pointed when it loaded)."""
    root = root or gateway.project.root
    seen = fingerprint(root)
    while not shutdown.is_set():
        await asyncio.sleep(interval)
        try:
            change = await _read_change(root, seen, quiet)
            if change is None:
                continue
            seen, project = change
            if isinstance(project, Exception):
                raise project
            previous = gateway.project.retention
            errors = await _reload(gateway, project, root, seen, interval, quiet)
        except ConfigError as exc:
            gateway.reload_error = f"not reloaded: {exc}; still serving the version of {_clock(gateway.loaded_at)}"
            log.error("%s%s", gateway.reload_error, f" (hint: {exc.hint})" if exc.hint else "")
            continue
        except Exception:  # noqa: BLE001 -- a watcher that died would ignore every later edit, silently
            gateway.reload_error = (f"not reloaded: Flux failed while loading the project; still serving the version of "
                                    f"{_clock(gateway.loaded_at)}")
            log.exception(gateway.reload_error)
            continue
        gateway.reload_error = None
        freeze_heap()
        log.info("reloaded %d function(s)%s", len(project.functions), f"; {len(errors)} failed to load" if errors else "")
        for error in errors:
            log.error("function failed to load: %s", error)
        if dsn is not None and project.retention != previous:
            await _check_prune_grants(dsn, record=gateway.record, retention=project.retention)


async def _reload(gateway: Gateway, project: Project, root: Path, seen: tuple, interval: float, quiet: float) -> list[str]:
    """`gateway.reload(project)`, the files still polled meanwhile (seconds, with slow top-level code):
    a flux.toml saved meanwhile has its API keys apply at once (`Gateway.expect`), so a key it revokes
    is refused then, not once this reload is done. The watcher's next poll reloads that version."""
    reloading = asyncio.ensure_future(gateway.reload(project))
    try:
        while not (await asyncio.wait({reloading}, timeout=interval))[0]:
            change = await _read_change(root, seen, quiet)
            # One that does not load revokes nothing; the watcher says why when it reads it for its reload.
            if change is not None and not isinstance(change[1], Exception):
                seen, newer = change
                gateway.expect(newer)
    except asyncio.CancelledError:
        reloading.cancel()
        raise
    return reloading.result()


async def _read_change(root: Path, seen: tuple, quiet: float) -> tuple[tuple, Project | Exception] | None:
    """The files of `root` read, once settled, if they changed since `seen`: (their fingerprint, the
    project or the error loading it). None when nothing changed, or when they changed while read (a
    mix, perhaps: the next poll reads them again)."""
    current = fingerprint(root)
    if current == seen:
        return None
    current = await _settled(root, current, quiet)
    try:
        read: Project | Exception = await asyncio.to_thread(load_project, root)  # git and the files: off the loop
    except Exception as exc:  # noqa: BLE001 -- the caller's to report, unless it read a change part-way
        read = exc
    if fingerprint(root) != current:
        return None
    return current, read


async def _settled(root: Path, current: tuple, quiet: float) -> tuple:
    """The files' fingerprint once it has held for `quiet` seconds (or, for files that never stop
    changing, after SETTLE_LIMIT_SECONDS: they are read as they are then)."""
    give_up = time.monotonic() + SETTLE_LIMIT_SECONDS
    while time.monotonic() < give_up:
        await asyncio.sleep(quiet)
        again = fingerprint(root)
        if again == current:
            break
        current = again
    return current


def _clock(at: float) -> str:
    """A wall-clock time of this process's, as its log lines write it (local time)."""
    return time.strftime("%H:%M:%S", time.localtime(at))


async def _check_prune_grants(dsn: str, *, record: bool, retention: Retention) -> None:
    """The start check of the gateway's role, for a `[retention]` a reload changed: said in the log
    now (serving goes on), rather than by the hourly prune failing later."""
    from flux.cdc.roles import require_gateway_role

    def check() -> None:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            require_gateway_role(conn, record=record, retention=retention)

    try:
        await asyncio.to_thread(check)
    except FluxError as exc:
        log.error("the changed [retention] cannot be applied: %s%s", exc, f" (hint: {exc.hint})" if exc.hint else "")
    except psycopg.Error as exc:
        log.warning("the changed [retention]: %s", from_psycopg(exc, "its grants could not be checked"))
