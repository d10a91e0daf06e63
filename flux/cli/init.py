"""`flux init`: a new Flux project from the templates in `flux/scaffold/`.

`scaffold()` copies the template files into a directory and returns what it wrote; the command
renders that and the next steps. Templates are copied verbatim with two exceptions: the project
name is filled into `flux.toml`, and `gitignore` is written as `.gitignore` (setuptools' package
data globs skip dotfiles). An existing `.gitignore` gains the lines it lacks rather than being
replaced. Nothing else in the directory is read or touched, and nothing is deleted, even with
--force.
"""

from __future__ import annotations

import json as jsonlib
import os
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated

import typer

from flux.cli.common import JsonOption
from flux.cli.output import console, escape, print_json
from flux.errors import ConfigError
from flux.store.names import shell_word

TEMPLATES = ("flux", "scaffold")  # package, directory inside it
RENAMES = {"gitignore": ".gitignore"}
MERGED = frozenset({".gitignore"})  # extended line by line, never a conflict
NAME_FIELD = 'name = "{{name}}"'
DEV_URL = "http://127.0.0.1:8000"
STUB_PORT = 4010


@dataclass(frozen=True, slots=True)
class ScaffoldResult:
    root: Path
    name: str
    created: tuple[str, ...]
    overwritten: tuple[str, ...]
    updated: tuple[str, ...]  # merged files that gained lines


def template_files() -> dict[str, bytes]:
    """Destination path (posix, relative) -> bytes of every template file."""
    package, directory = TEMPLATES
    out: dict[str, bytes] = {}
    _walk(files(package) / directory, "", out)
    return dict(sorted(out.items()))


def _walk(node: Traversable, prefix: str, out: dict[str, bytes]) -> None:
    for child in node.iterdir():
        if child.name == "__pycache__" or child.name.endswith(".pyc"):
            continue
        rel = f"{prefix}{RENAMES.get(child.name, child.name)}"
        if child.is_dir():
            _walk(child, f"{rel}/", out)
        else:
            out[rel] = child.read_bytes()


def project_name(root: Path) -> str:
    return root.resolve().name or "flux-app"


def scaffold(directory: Path, *, force: bool = False) -> ScaffoldResult:
    """Write the template project into `directory` (created if missing).

    Raises ConfigError before writing anything when a template file already exists there
    (unless `force`), or when a path the project needs is taken by a directory.
    """
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a directory", hint="Pick a new or existing directory for the project.")
    name = project_name(root)
    templates = template_files()
    taken = sorted(rel for rel in templates if (root / rel).is_dir())
    if taken:
        raise ConfigError(
            f"{root} has a directory where Flux would write a file: {', '.join(taken)}",
            hint="Move it away, or run `flux init` in another directory.",
        )
    existing = [rel for rel in templates if rel not in MERGED and (root / rel).exists()]
    if existing and not force:
        raise ConfigError(
            f"{root} already has {', '.join(existing)}",
            hint="Pass --force to overwrite those files (nothing else is touched), or pick another directory.",
        )
    created: list[str] = []
    updated: list[str] = []
    try:
        for rel, data in templates.items():
            path = root / rel
            if rel == "flux.toml":
                data = data.replace(NAME_FIELD.encode(), f"name = {_toml_string(name)}".encode(), 1)
            if rel in MERGED and path.exists():
                if _merge_lines(path, data):
                    updated.append(rel)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if rel not in existing:
                created.append(rel)
    except OSError as exc:
        raise ConfigError(
            f"Could not write the project into {root}: {exc.strerror or exc}", hint="Check the directory's permissions.",
            file=exc.filename,
        ) from None
    return ScaffoldResult(root=root, name=name, created=tuple(created), overwritten=tuple(existing), updated=tuple(updated))


def _toml_string(text: str) -> str:
    # A JSON string is a valid TOML basic string: the same quotes and escapes.
    return jsonlib.dumps(text, ensure_ascii=False)


def _merge_lines(path: Path, template: bytes) -> bool:
    """Append the template's non-comment lines that `path` lacks; True when it changed."""
    current = path.read_text()
    have = {line.strip() for line in current.splitlines()}
    wanted = [line for line in template.decode().splitlines() if line.strip() and not line.startswith("#")]
    if all(line.strip() in have for line in wanted):
        return False
    head = "" if not current or current.endswith("\n") else "\n"
    with path.open("a") as f:
        f.write(head + ("\n" if current.strip() else "") + template.decode())
    return True


def init(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Where to create the project; created if missing.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite template files that already exist.")] = False,
    json: JsonOption = False,
) -> None:
    """Create a Flux project: flux.toml, two functions, a payment API stub and schema.sql."""
    result = scaffold(directory, force=force)
    if json:
        print_json(result)
    else:
        render(result)


# -- rendering -------------------------------------------------------------------------------


def _shown(root: Path) -> str:
    path = root.resolve()
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return str(path)
    return str(path) if rel.startswith("..") else rel


def render(result: ScaffoldResult) -> None:
    where = _shown(result.root)
    console.print(f'[bold green]Created Flux project[/] "{escape(result.name)}" in {escape(where)}')
    for rel in result.created:
        console.print(f"  [green]+[/] {escape(rel)}")
    for rel in result.overwritten:
        console.print(f"  [yellow]![/] {escape(rel)} [dim](overwritten)[/]")
    for rel in result.updated:
        console.print(f"  [cyan]~[/] {escape(rel)} [dim](lines added)[/]")
    json_header = "-H 'content-type: application/json'"
    steps = [] if where == "." else [f"cd {escape(shell_word(where))}"]
    steps += [
        "flux dev                       [dim]# embedded PostgreSQL, runs schema.sql, serves functions/[/]",
        "",
        "[dim]# in another terminal:[/]",
        f"python3 stubs/payments.py      [dim]# payment API stub on :{STUB_PORT}; --slow makes it time out[/]",
        f"curl -s {DEV_URL}/hello {json_header} -d '{{\"name\": \"Ada\"}}'",
        f"curl -s {DEV_URL}/signup {json_header} -d '{{\"email\": \"ada@example.com\"}}'",
        "flux state history users --id 1  [dim]# the id /signup returned[/]",
    ]
    console.print()
    console.print("[bold]Next steps[/]")
    for step in steps:
        console.print(f"  {step}" if step else "")
