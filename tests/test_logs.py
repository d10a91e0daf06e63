"""Logs for a pipeline: `--log-format json` / FLUX_LOG_FORMAT, one JSON object per line."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

from flux.logs import JsonFormatter
from tests.cli.test_serve import HELLO, start_serve
from tests.functions import write_project
from tests.support import communicate


def _lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def test_a_json_line_has_time_level_logger_message_extras_and_the_traceback_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("flux.cdc", logging.ERROR, __file__, 1, "request %s failed:\n\x1b[31m%s", ("r1", "x"),
                                   sys.exc_info())
    record.request_id = "r1"
    text = JsonFormatter().format(record)
    line = json.loads(text)
    assert "\n" not in text and "\x1b" not in text  # a message's newline or escape cannot start or forge a line
    assert line["message"] == "request r1 failed:\n\x1b[31mx" and line["level"] == "ERROR" and line["logger"] == "flux.cdc"
    assert line["time"].endswith("Z") and len(line["time"]) == len("2026-12-07T11:30:00.123Z")
    assert line["request_id"] == "r1" and line["exception"].endswith("ValueError: boom")


def test_a_command_that_fails_at_start_logs_its_error_as_a_json_line_with_its_hint(dsn):
    """A slot not attached: `flux cdc run` exits 3; the reason must reach the log pipeline as JSON too."""
    proc = subprocess.run([sys.executable, "-m", "flux", "cdc", "run", "--database", dsn, "--log-format", "json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    last = _lines(proc.stderr)[-1]
    assert last["level"] == "ERROR" and last["error"] == "NotFoundError" and last["exit_code"] == 3
    assert "flux attach" in last["hint"]


def test_flux_log_format_in_the_environment_chooses_json(dsn):
    proc = subprocess.run([sys.executable, "-m", "flux", "cdc", "run", "--database", dsn], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "FLUX_LOG_FORMAT": "json"})
    assert proc.returncode == 3 and _lines(proc.stderr)[-1]["error"] == "NotFoundError", proc.stderr


def test_serve_logging_json_says_where_it_serves_in_a_json_line_and_every_line_is_json(tmp_path, dsn):
    write_project(tmp_path, {"hello": HELLO})
    proc, port = start_serve(tmp_path, "--database", dsn, "--no-engine", "--log-format", "json")
    proc.send_signal(signal.SIGTERM)
    out = communicate(proc)  # stderr is merged into stdout by start_serve
    assert proc.returncode == 0, out
    lines = _lines(out)
    serving = [line for line in lines if line["message"].startswith("serving ")]
    assert serving and serving[0]["url"] == f"http://127.0.0.1:{port}"


def test_warnings_thread_errors_and_errors_in_del_are_json_lines_too():
    """Python printed these to stderr as lines of text of its own, past the JSON handler."""
    script = """
import threading, warnings
from flux.logs import setup_logging
setup_logging(False, "json")
warnings.warn("a library's warning", DeprecationWarning)
thread = threading.Thread(target=lambda: 1 / 0, name="isolate-1")
thread.start(); thread.join()
class Leaky:
    def __del__(self):
        raise RuntimeError("in del")
Leaky()
"""
    proc = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, timeout=60)
    lines = _lines(proc.stderr)  # every line parses
    assert [line["level"] for line in lines] == ["WARNING", "CRITICAL", "ERROR"], proc.stderr
    assert "a library's warning" in lines[0]["message"] and lines[0]["logger"] == "py.warnings"
    assert "isolate-1" in lines[1]["message"] and lines[1]["exception"].endswith("ZeroDivisionError: division by zero")
    assert lines[2]["exception"].endswith("RuntimeError: in del")


def test_a_stop_signal_while_starting_is_said_in_a_json_line():
    """Said by the signal handler straight to the descriptor: it was plain text in a JSON log."""
    script = """
import os, signal
from flux.logs import setup_logging
from flux.signals import hold, received
setup_logging(False, "json")
hold()
os.kill(os.getpid(), signal.SIGTERM)
assert received() == signal.SIGTERM
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = _lines(proc.stderr)
    assert len(lines) == 1 and lines[0]["message"].startswith("SIGTERM received while starting"), proc.stderr
    assert lines[0]["level"] == "INFO" and lines[0]["logger"] == "flux"


def test_a_usage_error_of_a_server_logging_json_is_a_json_line():
    """A wrong flag in a deployment's command line: click's usage text reached the JSON log."""
    proc = subprocess.run([sys.executable, "-m", "flux", "serve", "--port", "abc"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "FLUX_LOG_FORMAT": "json"})
    lines = _lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0]["level"] == "ERROR" and "--port" in lines[0]["message"]
    assert lines[0]["error"] == "UsageError" and lines[0]["exit_code"] == 2


def test_a_usage_error_of_flux_dev_is_text_whatever_flux_log_format_says(tmp_path):
    """flux dev has no --log-format and logs text: a FLUX_LOG_FORMAT=json exported for a server made
    its usage error, alone of its output, a JSON line."""
    proc = subprocess.run([sys.executable, "-m", "flux", "dev", "--port", "abc"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env={**os.environ, "FLUX_LOG_FORMAT": "json"})
    assert proc.returncode == 2 and "Usage:" in proc.stderr and "--port" in proc.stderr, proc.stderr
    assert not proc.stderr.lstrip().startswith("{"), proc.stderr


def test_cdc_run_says_a_malformed_dsn_in_a_json_line():
    """The DSN was resolved before logging was set up, so its error was plain text in a JSON log (serve's was not)."""
    proc = subprocess.run([sys.executable, "-m", "flux", "cdc", "run", "--log-format", "json", "--database", "host=h port=abc"],
                          capture_output=True, text=True, timeout=60)
    lines = _lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0]["error"] == "ConfigError" and "port 'abc'" in lines[0]["message"] and lines[0]["exit_code"] == 2
