"""`flux.cli.output` as a terminal, a pipe or a script meets it: any stream encoding, a reader that
leaves, a write that fails, NO_COLOR.

Run as the real command (`python -m flux`): each of these failed in what the interpreter or rich does
with the real stdout, which CliRunner replaces.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from flux.errors import NotFoundError
from tests.traces_seed import FAIL

READER_GONE = 141  # 128 + SIGPIPE, as a shell reports for git or cat


def flux(*args: str, encoding: str | None = None, stdout: Any = subprocess.PIPE, **kwargs: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"PYTHONIOENCODING": encoding} if encoding else {})}
    return subprocess.run([sys.executable, "-m", "flux", *args], env=env, stdout=stdout, stderr=subprocess.PIPE, timeout=60,
                          **kwargs)


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_trace_in_a_stream_without_its_drawing_characters_draws_them_in_ascii(seeded, dsn, encoding):
    result = flux("trace", FAIL[:8], "--database", dsn, encoding=encoding)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    out = result.stdout.decode(encoding)
    assert "  `- create_user " in out and "     |- db.insert(users) " in out


def test_why_in_an_ascii_stream_draws_its_arrow_in_ascii(seeded, dsn):
    result = flux("why", FAIL[:8], "--database", dsn, encoding="ascii")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert "  POST /signup  >  function: create_user" in result.stdout.decode("ascii")


def test_recorded_text_an_ascii_stream_lacks_is_written_as_escapes(conn, dsn):
    from flux.store.schema import ensure_schema
    from flux.store.traces import insert_traces
    from tests.traces_seed import trace

    ensure_schema(conn)
    insert_traces(conn, [trace(FAIL, path="/café/✓", status=500, error="échec")])
    result = flux("why", FAIL[:8], "--database", dsn, encoding="ascii")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    out = result.stdout.decode("ascii")
    assert "POST /caf\\xe9/\\u2713" in out and "500 - \\xe9chec" in out


def closed_pipe() -> int:
    """The write end of a pipe whose reader has already left (`| head` done, a pager quit): every write fails."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize("args", [["requests"], ["requests", "--json"], ["trace", FAIL[:8]], ["why", FAIL[:8], "--json"]],
                         ids=" ".join)
def test_a_reader_that_left_ends_the_command_quietly_with_141(seeded, dsn, args):
    out = closed_pipe()
    try:
        result = flux(*args, "--database", dsn, stdout=out)
    finally:
        os.close(out)
    assert (result.returncode, result.stderr) == (READER_GONE, b"")


def test_an_error_whose_json_reader_left_says_it_on_stderr_with_its_exit_code(seeded, dsn):
    out = closed_pipe()
    try:
        result = flux("trace", "deadbeef", "--database", dsn, "--json", stdout=out)
    finally:
        os.close(out)
    assert result.returncode == NotFoundError.exit_code
    assert result.stderr.decode().startswith("error: No trace with id starting 'deadbeef'"), result.stderr


@pytest.mark.parametrize("args", [["trace", FAIL[:8]], ["requests", "--json"]], ids=" ".join)
def test_output_to_a_full_disk_is_one_error_line_and_exit_1(seeded, dsn, args):
    with open("/dev/full", "w") as full:  # every write fails ENOSPC, as a full disk's does
        result = flux(*args, "--database", dsn, stdout=full)
    assert result.returncode == 1
    assert result.stderr.decode().startswith("error: Could not write the output: No space left on device\nhint: ")


@pytest.mark.parametrize("args", [["trace", FAIL[:8]], ["requests", "--json"]], ids=" ".join)
def test_output_with_stdout_closed_is_one_error_line_and_exit_1(seeded, dsn, args):
    result = flux(*args, "--database", dsn, stdout=None, preexec_fn=lambda: os.close(1))
    assert result.returncode == 1
    assert result.stderr.decode().startswith("error: Could not write the output: stdout is closed\nhint: ")


def on_a_terminal(*args: str, **env: str) -> bytes:
    """What `flux ARGS` writes to a terminal (a pseudo-terminal), with `env` added to the environment."""
    import pty

    leader, follower = pty.openpty()
    try:
        try:  # its output is a few lines, well within what the terminal holds unread
            subprocess.run([sys.executable, "-m", "flux", *args], env={**os.environ, "TERM": "xterm-256color", **env},
                           stdout=follower, stderr=follower, timeout=60)
        finally:
            os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal is closed and read through
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(leader)


def test_no_color_on_a_terminal_writes_no_escape_codes_at_all(seeded, dsn):
    assert b"\x1b[" in on_a_terminal("why", FAIL[:8], "--database", dsn)  # bold, red: a terminal gets them
    out = on_a_terminal("why", FAIL[:8], "--database", dsn, NO_COLOR="1")
    assert b"Root cause" in out and b"\x1b" not in out
