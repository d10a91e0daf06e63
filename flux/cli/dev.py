"""`flux dev`: the embedded PostgreSQL under .flux/, attached to every table, with the engine in the foreground."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from flux.cli.common import STATE_DIR
from flux.cli.output import console, rich_escape


def dev(
    database: Annotated[
        str | None,
        typer.Option("--database", "-d", help="Use this PostgreSQL instead of the embedded one (no $FLUX_DATABASE_URL fallback here: dev defaults to embedded)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Start (or reuse) the embedded PostgreSQL in .flux/, attach to all its tables and record changes until Ctrl-C."""
    from flux.cdc.attach import attach
    from flux.cdc.engine import Engine, EngineConfig
    from flux.cli.cdc import setup_logging
    from flux.pg.cluster import Cluster

    setup_logging(verbose)
    cluster = None
    if database is None:
        cluster = Cluster(state_dir=Path.cwd() / STATE_DIR)
        console.print("Starting embedded PostgreSQL in .flux/ …")
        info = cluster.start()
        dsn = info.dsn
    else:
        dsn = database
    try:
        result = attach(dsn, all_tables=True)
        for warning in result.warnings:
            if "no consumer" not in warning:  # the engine starts right below
                console.print(f"[yellow]warning:[/] {rich_escape(warning)}")
        console.print(f"[bold green]Flux dev[/]  database [cyan]{rich_escape(dsn)}[/]")
        console.print(f"  psql {rich_escape(dsn)}")
        console.print("  Change rows in any table, then: flux state history TABLE --id ID")
        console.print("  Ctrl-C stops the engine" + (" and the embedded PostgreSQL." if cluster else "."))
        engine = Engine(EngineConfig(dsn=dsn, slot="flux", publication="flux"))
        stats = engine.run()
        logging.getLogger("flux.cdc").info("stopped: %d mutations recorded this run", stats.mutations)
    finally:
        if cluster is not None:
            cluster.stop()
            console.print("Embedded PostgreSQL stopped (data kept in .flux/).")
