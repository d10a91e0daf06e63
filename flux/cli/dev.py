"""`flux dev`: the embedded PostgreSQL under .flux/, the CDC engine, and (in a project) the gateway.

In a directory with flux.toml it serves the project's functions on http://127.0.0.1:PORT,
reloading them when their files change. Elsewhere it runs the database and the engine only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from flux.cli.common import STATE_DIR
from flux.cli.output import console, rich_escape
from flux.cli.serve import HostOption, PoolOption, PortOption, WorkersOption, run_stack


def dev(
    database: Annotated[
        str | None,
        typer.Option("--database", "-d", help="Use this PostgreSQL instead of the embedded one (no $FLUX_DATABASE_URL fallback here: dev defaults to embedded)."),
    ] = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    workers: WorkersOption = 16,
    pool_size: PoolOption = 2,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Start (or reuse) the embedded PostgreSQL in .flux/, record every row change, and serve this project's functions."""
    from flux.cdc.attach import attach
    from flux.cli.cdc import setup_logging
    from flux.errors import ConfigError
    from flux.gateway.server import ensure_store
    from flux.pg.cluster import Cluster
    from flux.project import find_project_root, load_project

    setup_logging(verbose)
    try:
        root: Path | None = find_project_root()
    except ConfigError:
        root = None
    state_dir = (root or Path.cwd()) / STATE_DIR
    cluster = None
    if database is None:
        cluster = Cluster(state_dir=state_dir)
        console.print(f"Starting embedded PostgreSQL in {rich_escape(str(state_dir))} …")
        dsn = cluster.start().dsn
    else:
        dsn = database
    try:
        if root is not None:
            project = load_project(root)  # config errors surface before anything listens
            if project.setup_sql is not None:
                _run_setup_sql(dsn, project.setup_sql)
        result = attach(dsn, all_tables=True)
        ensure_store(dsn)
        for warning in result.warnings:
            if "no consumer" not in warning:  # the engine starts right below
                console.print(f"[yellow]warning:[/] {rich_escape(warning)}")
        console.print(f"[bold green]Flux dev[/]  database [cyan]{rich_escape(dsn)}[/]")

        # Printed once Ctrl-C is handled: a script that reads these lines may stop us at once.
        def ready(url: str | None) -> None:
            console.print(f"  psql {rich_escape(dsn)}")
            if url is None:
                console.print("  Change rows in any table, then: flux state history TABLE --id ID")
            else:
                console.print(f"  gateway {url}")
                names = ", ".join(sorted(load_project(root).functions)) if root else ""
                console.print(f"  functions: {rich_escape(names)}  (reloaded when their files change)")
                console.print("  Then: flux requests · flux trace ID · flux why ID")
            console.print("  Ctrl-C stops everything" + (" and the embedded PostgreSQL." if cluster else "."))

        run_stack(dsn=dsn, root=root, host=host, port=port, workers=workers, pool_size=pool_size, record=True,
                  reload=True, engine=True, on_ready=ready)
        logging.getLogger("flux").info("stopped")
    finally:
        if cluster is not None:
            cluster.stop()
            console.print("Embedded PostgreSQL stopped (data kept in .flux/).")


def _run_setup_sql(dsn: str, path: Path) -> None:
    """[dev] setup_sql: the project's schema, applied at each start (write it idempotently)."""
    import psycopg

    from flux.errors import ConfigError, from_psycopg

    if not path.is_file():
        raise ConfigError(f"[dev] setup_sql names {path}, which does not exist", hint="Fix the path in flux.toml.")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(path.read_text())
    except psycopg.Error as exc:
        raise from_psycopg(exc, f"Running {path.name} failed", hint="Fix the SQL; it runs at every `flux dev` start.") from exc
