"""Stop signals while a server command has no handlers of its own: before they are in place, and after.

`flux serve`, `flux dev` and `flux cdc run` install their graceful handlers once there is something
to stop gracefully (the engine's loop, the gateway's). Before that come Python's imports, the
embedded server's start, attach and the isolates' warm-up (a second or more), and after the
gateway's loop has ended its handlers are gone (asyncio restores the defaults) while the engine
and the embedded server still stop. A SIGTERM or SIGHUP then killed the process outright (exit
-15, no word said), and `flux dev` left its embedded PostgreSQL running.

`hold()` covers those times: the first signal is remembered, and the command stops as soon as it
looks (`received()`), without serving; a second one stops at once (KeyboardInterrupt: exit 130,
with `finally` blocks run, so the embedded server is still stopped). This module installs
handlers only when called; importing it changes nothing.
"""

from __future__ import annotations

import os
import signal
import sys

from flux import STOP_SIGNALS

SERVER_COMMANDS = (("serve",), ("dev",), ("cdc", "run"))

_received: list[int] = []  # the signal that asked to stop, once one has
_held = False  # this process is a server command that called hold()
_stopping = False  # already stopping: the next signal stops at once


def hold() -> None:
    """Take the stop signals until the command installs its own handlers."""
    global _held
    _held = True
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def hold_while_stopping() -> None:
    """Once the command's own handlers are gone and it still stops (the engine, the embedded server):
    any signal stops at once. Only in a process that held them (not a test calling a command's parts)."""
    global _stopping
    if _held:
        _stopping = True
        hold()


def hold_for_command(args: list[str]) -> None:
    """`hold()` when `args` run a server command; other commands keep the defaults (Ctrl-C interrupts)."""
    if any(tuple(args[:len(command)]) == command for command in SERVER_COMMANDS):
        hold()


def received() -> int | None:
    """The stop signal that arrived while held, if one did."""
    return _received[0] if _received else None


def _on_signal(signum: int, frame: object) -> None:
    if _received or _stopping:
        raise KeyboardInterrupt
    _received.append(signum)
    try:  # at once, or a first Ctrl-C during a long step (attach waiting on a transaction) seemed to do nothing;
        # to the descriptor, since a write to sys.stderr could re-enter one this signal interrupted
        said = f"{signal.Signals(signum).name} received while starting: stopping once the current step ends (again to stop at once)"
        # flux.logs is not imported here, where it would add its imports (orjson) to the start-up these
        # handlers cover; until it is imported, logging is not set up, so not as JSON either.
        logs = sys.modules.get("flux.logs")
        line = logs.json_line("INFO", "flux", said) if logs is not None and logs.json_logs() else said
        os.write(2, line.encode() + b"\n")
    except OSError:  # a closed terminal (the SIGHUP itself)
        pass
