"""Which PostgreSQL server binaries a cluster runs with.

A new cluster takes the first server of 14 or newer found (`$FLUX_PG_BINDIR` alone if set, else
`pg_config --bindir`, then the usual Debian and RPM paths, newest first); an existing one takes a server of the
major version that made it (its `PG_VERSION`), since no other can open its files. It does not
upgrade a cluster from one major version to another (that is `pg_upgrade`'s job).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

from flux.errors import ClusterError

MIN_MAJOR = 14  # logical decoding of streamed and two-phase transactions, and what attach checks

INSTALL_HINT = (
    "Install the PostgreSQL server (14 or newer): 'apt-get install postgresql' on Debian/Ubuntu, "
    "'dnf install postgresql-server' on Fedora/RHEL, 'brew install postgresql' on macOS; "
    "or point Flux at a server you run with --database DSN."
)


def find_bindir(*, major: int | None = None, data_dir: Path | None = None) -> Path:
    """The server binaries to run: of version `major` when given (an existing cluster's), else the first
    of 14 or newer (pg_config's, then the newest of the usual paths). $FLUX_PG_BINDIR, when set, is the
    only candidate."""
    override = os.environ.get("FLUX_PG_BINDIR")
    candidates = [Path(override)] if override else _candidates()
    found: list[tuple[Path, int]] = []
    seen: set[Path] = set()
    for bindir in candidates:
        version = server_major(bindir)
        server = (bindir / "postgres").resolve()
        if version is not None and server not in seen:  # /usr/local/bin's links to /usr/lib/postgresql/15/bin
            seen.add(server)
            found.append((bindir, version))
    searched = ", ".join(str(c) for c in candidates)
    if not found:
        raise ClusterError("No PostgreSQL server binaries (initdb, pg_ctl, postgres) were found",
                           hint=INSTALL_HINT, searched=searched)
    versions = ", ".join(f"{version} in {bindir}" for bindir, version in found)
    if major is not None:
        for bindir, version in found:
            if version == major:
                return bindir
        where = "FLUX_PG_BINDIR" if override else "this machine"
        raise ClusterError(
            f"The embedded cluster{f' in {data_dir}' if data_dir else ''} was made by PostgreSQL {major},"
            f" and {where} has no PostgreSQL {major} server"
            f" (found {versions})",
            hint=f"Install PostgreSQL {major}'s server (or set FLUX_PG_BINDIR to its bin directory); or move the"
                 " cluster's data directory aside to start a new, empty one (pg_upgrade carries data across versions).",
        )
    usable = [(bindir, version) for bindir, version in found if version >= MIN_MAJOR]
    if not usable:
        raise ClusterError(f"PostgreSQL {MIN_MAJOR} or newer is required, and only {versions} was found",
                           hint=INSTALL_HINT)
    return usable[0][0]  # pg_config's, the one on PATH, before the newest of the usual paths


def server_major(bindir: Path) -> int | None:
    """The major version of the server in `bindir`, or None when it holds no complete server."""
    if not all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
        return None
    try:  # `postgres --version` runs as root too: the root check comes after it
        out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\) (\d+)", out.stdout)
    return int(match.group(1)) if match else None


def _candidates() -> list[Path]:
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
    unique: list[Path] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def _version_of_path(path: str) -> float:
    for part in Path(path).parts:
        digits = part.removeprefix("pgsql-")
        try:
            return float(digits)
        except ValueError:
            continue
    return 0.0
