"""Logging of the long-running commands (`flux serve`, `flux cdc run`, `flux dev`): text for a
terminal, or one JSON object per line for a log pipeline (`--log-format json`, `FLUX_LOG_FORMAT`).

A JSON line has `time` (UTC, RFC 3339, milliseconds), `level`, `logger` and `message`, then
`exception` (the traceback) when there is one, and any fields a caller passed in `extra`. Text that
a client or a function sent (a path, an error) stays inside the JSON string: no line of the log can
be forged by it.
"""

from __future__ import annotations

import logging
import sys
import threading
from datetime import datetime, timezone
from typing import Any

import orjson

LOG_FORMATS = ("text", "json")

# What every LogRecord has: anything else on a record came from `extra=` and goes in the JSON line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

_json = False
_handler: list[logging.Handler | None] = [None]  # the handler setup_logging installed


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        return orjson.dumps(line, default=str).decode()


def setup_logging(verbose: bool, log_format: str = "text") -> None:
    global _json
    _json = log_format == "json"
    handler = logging.StreamHandler(sys.stderr)
    if _json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    if _handler[0] is not None:  # set up again in this process (a test): the earlier one goes
        root.removeHandler(_handler[0])
    _handler[0] = handler
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if _json:  # an unexpected error's traceback is one JSON line too, not many lines of text
        sys.excepthook = _log_uncaught
        # Python writes these to stderr as text of its own, not through logging: a library's
        # warning, an error in a thread (an isolate's, the engine's), one raised in a __del__.
        logging.captureWarnings(True)
        threading.excepthook = _log_thread_error
        sys.unraisablehook = _log_unraisable
    # One line per outbound call or served request is noise; traces record every one of them.
    for chatty in ("aiohttp.client", "hypercorn.access"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _log_uncaught(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    logging.getLogger("flux").critical("unexpected error: %s", value, exc_info=(kind, value, traceback))


def _log_thread_error(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("flux").critical("unexpected error in thread %s: %s", name, args.exc_value,
                                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_unraisable(unraisable: Any) -> None:
    what = unraisable.err_msg or "Exception ignored in"
    logging.getLogger("flux").error("%s: %r", what, unraisable.object,
                                    exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


def json_line(level: str, logger: str, message: str, **fields: Any) -> str:
    """One JSON log line made without the logging machinery: for a signal handler, which must not
    take the handler's lock that the code it interrupted may hold."""
    record = logging.makeLogRecord({"levelname": level, "levelno": logging.getLevelName(level), "name": logger, "msg": message,
                                  **fields})
    return JsonFormatter().format(record)


def json_logs() -> bool:
    """Whether this process logs JSON lines: then what it would print for the operator is logged too."""
    return _json
