"""Rendering, the one shared last step of every command: rich text for people, JSON for scripts."""

from __future__ import annotations

import codecs
import dataclasses
import logging
import os
import sys
from datetime import date, datetime
from decimal import Decimal
from typing import Any, NoReturn

import orjson
from rich.cells import cell_len
from rich.console import Console

from flux.errors import FluxError, OutputError
from flux.store.names import visible

EXIT_READER_GONE = 141  # 128 + SIGPIPE: what a shell reports for git or cat whose reader left first (`| head`)


def reader_gone() -> NoReturn:
    """stdout's reader has left (`| head`, a pager quit early): what it read is all it wanted, so no
    traceback, and not exit 1, which says the command failed."""
    _stdout_to_devnull()
    sys.exit(EXIT_READER_GONE)


def _stdout_to_devnull() -> None:
    """So that the flush at exit, of what is still buffered, does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no descriptor to point (a test's captured stdout, or none)
        pass


def _unwritable(exc: OSError | None) -> OutputError:
    """The error for output that could not be written; stdout goes to /dev/null, so exit's flush does not fail too."""
    _stdout_to_devnull()
    why = "stdout is closed" if exc is None else exc.strerror or str(exc)
    return OutputError(f"Could not write the output: {why}",
                       hint="The output is missing or incomplete: check where stdout goes (a full disk, a closed descriptor), "
                            "then run the command again.")


class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich's own exits 1
        self.quiet = True
        reader_gone()

    def _check_buffer(self) -> None:
        """rich's write of what was printed: a full disk raised OSError, a traceback; a closed stdout (`>&-`)
        dropped it all, and the command exited 0. (rich's own name: were it renamed, this is not called, and
        such failures are what they were, no worse.)"""
        if sys.stdout is None and not self.stderr and self._buffer and not self.quiet:
            del self._buffer[:]
            raise _unwritable(None)
        try:
            super()._check_buffer()
        except OSError as exc:  # a reader gone is on_broken_pipe's, inside
            if self.stderr:
                raise
            raise _unwritable(exc) from exc


# NO_COLOR: no escape codes at all. rich's own reading of it drops the colours and keeps bold and dim,
# escape codes still, which a screen reader or a log capture of a terminal session then has to strip.
_COLORS = None if os.environ.get("NO_COLOR", "") != "" else "auto"
console = _Console(highlight=False, soft_wrap=True, emoji=False, color_system=_COLORS)
err_console = _Console(stderr=True, highlight=False, soft_wrap=True, emoji=False, color_system=_COLORS)

# The text output's own characters in ASCII, for a stream whose encoding lacks them (PYTHONIOENCODING=ascii,
# a latin-1 locale, a Windows code page), each one character for one, since columns and trees were
# aligned with the originals; any other character the encoding lacks is written as its escape (`\xe9`).
_ASCII = str.maketrans({"└": "`", "├": "|", "│": "|", "─": "-", "·": "-", "—": "-", "→": ">", "≤": "<", "…": "~"})


def _ascii_fallback(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    text = exc.object[exc.start:exc.end].translate(_ASCII)
    return text.encode("ascii", "backslashreplace").decode("ascii"), exc.end


def fit_streams() -> None:
    """Let stdout and stderr write any text in whatever encoding they have: a character the encoding
    lacks raised UnicodeEncodeError, a traceback in place of the trace. UTF-8 streams are left as they are."""
    codecs.register_error("flux.ascii", _ascii_fallback)
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None)
        try:
            utf8 = codecs.lookup(encoding).name == "utf-8" if encoding else True
        except LookupError:
            utf8 = False
        if not utf8 and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="flux.ascii")


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
    try:
        _write_stdout(to_json(data) + b"\n")
    except BrokenPipeError:
        reader_gone()


def _write_stdout(data: bytes) -> None:
    """`data` to stdout, whole; BrokenPipeError when its reader left, OutputError when it cannot be written."""
    if sys.stdout is None:  # started with it closed (`>&-`)
        raise _unwritable(None)
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise _unwritable(exc) from exc


def fail(exc: FluxError) -> NoReturn:
    """The CLI's single exit path for errors: one line, a hint, a non-zero code, no traceback."""
    from flux.logs import json_logs

    if json_logs():  # a server logging JSON lines: its last line, the reason it stopped, is one too
        logging.getLogger("flux").error(str(exc), extra={"error": type(exc).__name__, "hint": exc.hint,
                                                         "retryable": exc.retryable, "exit_code": exc.exit_code})
        sys.exit(exc.exit_code)
    if "--json" in sys.argv[1:]:
        try:
            _write_stdout(orjson.dumps(exc.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        except (BrokenPipeError, OutputError):  # the error still goes to stderr, with its own exit code
            _stdout_to_devnull()
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
