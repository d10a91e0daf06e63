"""Flag sets shared by every command, defined once, and config resolution at the edge."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import psycopg
import typer

from flux.errors import ConfigError, from_psycopg

DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database",
        "-d",
        help="PostgreSQL DSN. Falls back to $FLUX_DATABASE_URL, then to the embedded database of `flux dev` in this directory.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]

ENV_DSN = "FLUX_DATABASE_URL"
STATE_DIR = ".flux"


def project_cluster_meta(start: Path | None = None) -> dict | None:
    """`.flux/cluster.json` of the nearest enclosing directory that ran `flux dev`."""
    here = (start or Path.cwd()).resolve()
    for directory in [here, *here.parents]:
        meta = directory / STATE_DIR / "cluster.json"
        if meta.is_file():
            try:
                return json.loads(meta.read_text())
            except ValueError:
                return None
    return None


def resolve_dsn(flag: str | None) -> str:
    """--database, then $FLUX_DATABASE_URL, then the embedded cluster of this project."""
    if flag:
        return flag
    if os.environ.get(ENV_DSN):
        return os.environ[ENV_DSN]
    meta = project_cluster_meta()
    if meta and meta.get("port"):
        from flux.pg.cluster import DATABASE, SUPERUSER

        return f"postgresql://{SUPERUSER}@127.0.0.1:{meta['port']}/{DATABASE}"
    raise ConfigError(
        "No database given",
        hint=f"Pass --database DSN, set {ENV_DSN}, or run `flux dev` in this directory first.",
    )


@contextmanager
def connect(database: str | None, *, failing: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the resolved DSN; psycopg errors become FluxErrors saying `failing`."""
    dsn = resolve_dsn(database)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            yield conn
    except psycopg.Error as exc:
        raise from_psycopg(exc, failing) from exc
