"""The `flux` command line: one Typer app with a sub-app per command group.

Each command module parses flags, calls a library function that returns data, and hands
that data to `flux.cli.output` to render as rich text or `--json`. Errors become a one-line
message with a hint and a non-zero exit here, at the edge, and nowhere else.
"""

from __future__ import annotations

import sys

import typer

from flux.cli import attach, cdc, dev, init, serve, state, trace
from flux.cli.output import fail

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


def main() -> None:
    from flux.errors import FluxError

    try:
        code = app(standalone_mode=False)
    except FluxError as exc:
        fail(exc)
    except typer.Abort:
        sys.stderr.write("Aborted.\n")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if not _is_click_exception(exc):
            raise
        exc.show()  # click's usage message; for a bare group, its help
        sys.exit(exc.exit_code)
    # Without standalone mode, click returns the code of `typer.Exit` / `ctx.exit(code)` (e.g. 0 for --help).
    if isinstance(code, int):
        sys.exit(code)


def _is_click_exception(exc: Exception) -> bool:
    """A usage error from click, recognised by what it does rather than by its class.

    Typer 0.29 raises exceptions of the click it vendors (`typer._click`), earlier releases those
    of the standalone click; both show themselves and carry their exit code (2 for usage errors).
    """
    return callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int)
