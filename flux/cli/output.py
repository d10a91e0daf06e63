"""Rendering, the one shared last step of every command: rich text for people, JSON for scripts."""

from __future__ import annotations

import dataclasses
import logging
import sys
from datetime import date, datetime
from decimal import Decimal
from typing import Any, NoReturn

import orjson
from rich.cells import cell_len
from rich.console import Console

from flux.errors import FluxError
from flux.store.names import visible

console = Console(highlight=False, soft_wrap=True, emoji=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def to_json(data: Any) -> bytes:
    return orjson.dumps(data, default=_default, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


def print_json(data: Any) -> None:
    sys.stdout.buffer.write(to_json(data) + b"\n")
    sys.stdout.flush()


def fail(exc: FluxError) -> NoReturn:
    """The CLI's single exit path for errors: one line, a hint, a non-zero code, no traceback."""
    from flux.logs import json_logs

    if json_logs():  # a server logging JSON lines: its last line, the reason it stopped, is one too
        logging.getLogger("flux").error(str(exc), extra={"error": type(exc).__name__, "hint": exc.hint,
                                                         "retryable": exc.retryable, "exit_code": exc.exit_code})
        sys.exit(exc.exit_code)
    if "--json" in sys.argv[1:]:
        sys.stdout.buffer.write(orjson.dumps(exc.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}")  # it may quote recorded text (ids, names)
    if exc.hint:
        err_console.print(f"[dim]hint:[/] {escape(exc.hint)}")
    sys.exit(exc.exit_code)


def rich_escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def width(text: str) -> int:
    """How many terminal cells `text` takes as `escape` shows it (a CJK character or an emoji: two)."""
    return cell_len(visible(text))


def pad(text: str, cells: int) -> str:
    """`text` as `escape` shows it, padded with spaces to `cells` terminal cells."""
    shown = visible(text)
    return shown + " " * (cells - cell_len(shown))


def escape(text: str) -> str:
    """Text for rich markup, with what a terminal would not show as itself made visible (`\\n`,
    `\\u001b`): a path, an error, a span or function name is the client's, the function's or a
    writer's, and its escape sequences must not reach the reader's terminal and act there."""
    return rich_escape(visible(text))
