"""`flux.cli.main`, the entry point: usage errors are click's message and exit 2, never a traceback.

Run as the real command (`python -m flux`), since the traceback came from what main() let through.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def flux(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flux", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [
    ["requests", "--limit", "0"],
    ["requests", "-n", "abc"],
    ["requests", "--bogus"],
    ["trace"],
    ["nosuchcmd"],
    ["dev", "--port", "abc"],
], ids=" ".join)
def test_a_usage_error_prints_the_usage_and_exits_2_without_a_traceback(tmp_path, args):
    result = flux(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert "Usage:" in result.stderr and "Error:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [[], ["state"]], ids=lambda args: " ".join(["flux", *args]))
def test_a_group_without_a_command_shows_its_help_without_a_traceback(tmp_path, args):
    result = flux(tmp_path, *args)
    assert result.returncode in (0, 2)  # click >= 8.2 exits 2 for a group run without its command
    assert "Commands" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_help_exits_0(tmp_path):
    result = flux(tmp_path, "--help")
    assert result.returncode == 0 and "requests" in result.stdout


def test_a_usage_error_with_json_also_prints_a_json_error_on_stdout(tmp_path):
    import json

    result = flux(tmp_path, "requests", "--limit", "0", "--json")
    assert result.returncode == 2 and "Usage:" in result.stderr
    error = json.loads(result.stdout)
    assert error["error"] == "UsageError" and "--limit" in error["message"] and error["hint"]


def test_an_argument_that_is_not_utf8_is_a_usage_error_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flux", "trace", b"abcd\xff".decode("utf-8", "surrogateescape")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "Argument 2 is not valid UTF-8: abcd\\udcff" in result.stderr and "hint:" in result.stderr


def _commands():
    """Every leaf command of `flux`, as (["cdc", "run"], click command)."""
    import typer.main

    from flux.cli import app

    def walk(command, path):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, command

    return list(walk(typer.main.get_command(app), []))


def _readme_rows(path: list[str]) -> str:
    """The README's CLI-table row of a command; for `flux serve`, its own option table."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    if path == ["serve"]:
        return readme[readme.index("`flux serve --database DSN` runs"):readme.index("`compose.yaml` runs")]
    cli = readme[readme.index("\n## CLI\n"):readme.index("\n## Development\n")]
    name = " ".join(["flux", *path])
    return "\n".join(line for line in cli.splitlines() if line.startswith((f"| `{name} ", f"| `{name}`")))


def test_every_command_and_each_of_its_options_is_in_the_readme_cli_reference():
    import re

    missing = []
    for path, command in _commands():
        row = _readme_rows(path)
        if not row:
            missing.append(" ".join(path))
            continue
        for param in command.params:
            names = [*param.opts, *param.secondary_opts]
            if not names[0].startswith("-") or "--help" in names or "--database" in names:  # --database: said once for all
                continue
            if not any(re.search(re.escape(n) + r"(?![\w-])", row) for n in names):
                missing.append(f"{' '.join(path)} {names[0]}")
    assert not missing


def test_every_command_but_the_servers_has_json():
    """Issue 3: every command has --json; the README: where it prints data. The servers (dev, serve,
    cdc run) print log lines, whose JSON form is --log-format json."""
    servers = [["dev"], ["serve"], ["cdc", "run"]]
    without = [" ".join(path) for path, command in _commands()
               if path not in servers and not any("--json" in param.opts for param in command.params)]
    assert not without


def test_every_command_names_its_arguments_in_help_as_the_readme_does():
    """`flux trace ID` in the README; the help said `{id_or_prefix}`, the parameter's name."""
    import re

    differ = []
    for path, command in _commands():
        row = _readme_rows(path)
        for param in command.params:
            if param.param_type_name == "argument" and not (param.metavar and re.search(rf"\b{param.metavar}\b", row)):
                differ.append(f"{' '.join(path)} {param.metavar or param.name}")
    assert not differ


def test_every_command_has_help_that_exits_0():
    from typer.testing import CliRunner

    from flux.cli import app

    for path, _ in _commands():
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, path


def test_help_shows_no_type_beside_a_flag():
    import re

    from typer.testing import CliRunner

    from flux.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ --")}
    # Typer spells a type "<int>", or "INTEGER" in older releases that the pins allow.
    assert re.search(r"<int>|INTEGER", lines["--port"])  # an option that takes a value still shows its type
    assert not re.search(r"<bool>|BOOLEAN", lines["--record"] + lines["--verbose"])
