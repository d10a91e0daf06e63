"""The `flux` command line: one Typer app with a sub-app per command group.

Each command module parses flags, calls a library function that returns data, and hands
that data to `flux.cli.output` to render as rich text or `--json`. Errors become a one-line
message with a hint and a non-zero exit here, at the edge, and nowhere else.
"""

from __future__ import annotations

import sys

import typer

from flux.cli import attach, cdc, dev, init, prune, serve, state, trace
from flux.cli.output import fail, fit_streams, print_json


def _hide_flag_types() -> None:
    """Typer's rich help prints a flag's type ("--json <bool>"), which reads as if the flag took
    a value; click's plain help leaves it out, and so does this."""
    option = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None:  # another Typer: its own rendering
        return

    def display_type_rich(self: typer.core.TyperOption, ctx: object) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    option.display_type_rich = display_type_rich


_hide_flag_types()
app = typer.Typer(
    name="flux",
    help="Flux: a function runtime with built-in debugging. Every change is keyed by request_id.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("dev")(dev.dev)
app.command("serve")(serve.serve)
app.command("attach")(attach.attach)
app.command("detach")(attach.detach)
app.command("init")(init.init)
app.add_typer(cdc.app, name="cdc")
app.add_typer(state.app, name="state")
app.command("trace")(trace.trace)
app.command("why")(trace.why)
app.command("requests")(trace.requests)
app.command("prune")(prune.prune)


def main() -> None:
    import psycopg

    from flux.errors import ConfigError, FluxError, from_psycopg
    from flux.signals import hold_for_command

    hold_for_command(sys.argv[1:])  # again for a script that calls this directly: idempotent
    fit_streams()
    try:
        _check_encoding(sys.argv[1:])
        code = app(standalone_mode=False)
    except FluxError as exc:
        fail(exc)
    except psycopg.Error as exc:  # one no command wrapped with its own words: still one line and a hint
        fail(from_psycopg(exc, "The database refused the operation"))
    except typer.Abort:
        sys.stderr.write("Aborted.\n")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if not _is_click_exception(exc):
            raise
        if _logs_json(sys.argv[1:]) and hasattr(exc, "format_message"):  # before setup_logging: said as it would have
            from flux.logs import json_line

            sys.stderr.write(json_line("ERROR", "flux", exc.format_message(), error="UsageError",
                                       hint="See the command's --help.", exit_code=exc.exit_code) + "\n")
            sys.exit(exc.exit_code)
        if "--json" in sys.argv[1:] and exc.exit_code == ConfigError.exit_code and hasattr(exc, "format_message"):
            print_json({"error": "UsageError", "message": exc.format_message(), "hint": "See the command's --help.",
                        "retryable": False, "context": {}})
        exc.show()  # click's usage message; for a bare group, its help
        sys.exit(exc.exit_code)
    # Without standalone mode, click returns the code of `typer.Exit` / `ctx.exit(code)` (e.g. 0 for --help).
    if isinstance(code, int):
        sys.exit(code)


def _check_encoding(args: list[str]) -> None:
    """Arguments the locale could not decode reach Python as lone surrogates, which no database
    query or output can carry: refuse them up front rather than fail deep inside."""
    from flux.errors import ConfigError

    for position, arg in enumerate(args, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"Argument {position} is not valid UTF-8: {arg.encode('utf-8', 'backslashreplace').decode()}",
                              hint="Flux reads arguments as UTF-8 text; check the terminal's locale (LANG) and the "
                                   "value's encoding.") from None


# The commands that take --log-format. Not `flux dev`, which logs text: a FLUX_LOG_FORMAT=json exported
# for a server made its usage errors JSON lines, the rest of its output text.
LOG_FORMAT_COMMANDS = (("serve",), ("cdc", "run"))


def _logs_json(args: list[str]) -> bool:
    """A server command asked for JSON log lines (`--log-format json`, FLUX_LOG_FORMAT=json), read
    from the arguments themselves: a usage error comes before they are parsed."""
    import os

    if not any(tuple(args[:len(command)]) == command for command in LOG_FORMAT_COMMANDS):
        return False
    given = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--log-format"]
    given += [arg.split("=", 1)[1] for arg in args if arg.startswith("--log-format=")]
    return (given[-1] if given else os.environ.get("FLUX_LOG_FORMAT", "")).lower() == "json"


def _is_click_exception(exc: Exception) -> bool:
    """A usage error from click, recognised by what it does rather than by its class.

    Typer 0.29 raises exceptions of the click it vendors (`typer._click`), earlier releases those
    of the standalone click; both show themselves and carry their exit code (2 for usage errors).
    """
    return callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int)
