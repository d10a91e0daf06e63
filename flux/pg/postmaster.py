"""What a data directory's files say about its server: `postmaster.pid`, the server log, the config.

A server killed hard (kill -9, a crash, power loss) leaves its `postmaster.pid` behind, and after a
reboot its pid may belong to another process: `pg_ctl status` then says the server runs, and the
server itself refuses to start. These helpers tell such a file from a live server's. They read
files and the process table and start nothing; `flux.pg.cluster` acts on what they say. They do not
prove that a live postgres process serves this data directory: PostgreSQL's own interlock (the
shared memory block tied to the directory) still refuses a second server.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

PID_FILE = "postmaster.pid"
SERVER_NAMES = ("postgres", "postmaster")
# sun_path holds 108 bytes on Linux and 104 on macOS, the terminating NUL included.
MAX_SOCKET_PATH = 103


def pid_file_fields(data_dir: Path) -> list[str] | None:
    """The lines of `postmaster.pid` (pid, data directory, start time, port, ...), or None without one."""
    try:
        return (data_dir / PID_FILE).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None


def pid_file_pid(data_dir: Path) -> int | None:
    """The server's pid, as its `postmaster.pid` gives it."""
    fields = pid_file_fields(data_dir) or []
    return int(fields[0]) if fields and fields[0].strip().isdigit() else None


def pid_file_port(data_dir: Path) -> int | None:
    """The port the server that wrote `postmaster.pid` listens on."""
    fields = pid_file_fields(data_dir) or []
    return int(fields[3]) if len(fields) > 3 and fields[3].strip().isdigit() else None


def stale_pid_file(data_dir: Path) -> str | None:
    """Why `postmaster.pid` cannot be a live server's (a sentence), or None when it may be (or is absent).

    Stale: empty or garbled (a crash while it was written), or naming a process that is gone, is not
    a PostgreSQL server, or is one that does not listen on the file's port (its pid reused since the
    server died, by another program or another cluster's server).
    """
    fields = pid_file_fields(data_dir)
    if fields is None:
        return None
    pid = fields[0].strip() if fields else ""
    if not pid.lstrip("-").isdigit() or int(pid) == 0:
        return "it holds no process id (the server was stopped while writing it)"
    pid_number = abs(int(pid))  # negative: a single-user server's
    if not alive(pid_number):
        return f"process {pid_number} is gone (the server was killed or the machine restarted)"
    name = process_name(pid_number)
    if name is not None and name not in SERVER_NAMES:
        return f"process {pid_number} is now another program ({name}), not a PostgreSQL server"
    port = pid_file_port(data_dir)
    if int(pid) > 0 and port is not None and not _listening(fields, port):
        # A server listens from its first moments, before recovery: this is another cluster's, its pid reused.
        return f"process {pid_number} is a PostgreSQL server that does not listen on this cluster's port {port}"
    return None


def _listening(fields: list[str], port: int) -> bool:
    address = fields[5].split()[0] if len(fields) > 5 and fields[5].split() else "127.0.0.1"
    if address in ("*", "0.0.0.0", "::"):
        address = "127.0.0.1"
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:  # unreachable, timed out: cannot tell, so not stale
        return True


def process_name(pid: int) -> str | None:
    """The program name of `pid` (Linux's /proc, else `ps`), or None when it cannot be told."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["ps", "-o", "comm=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    name = out.stdout.strip()
    return os.path.basename(name) if out.returncode == 0 and name else None


def alive(pid: int) -> bool:
    """Whether a process `pid` exists (another account's included) and has not ended (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process
        pass
    try:  # Linux: the state follows the parenthesised name, which may itself hold ") "
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def conf_string(value: str) -> str:
    """`value` as a quoted string of postgresql.conf, which reads '' as ' and backslash escapes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def socket_directory(data_dir: Path, port: int) -> str:
    """Where the server puts its Unix socket: its data directory, or nowhere ('') when the socket's
    path would exceed the OS limit or the directory's name holds what the setting's list syntax
    reads otherwise (a comma, a double quote). Flux connects over TCP; the socket is for psql."""
    path = os.fsencode(data_dir / f".s.PGSQL.{port}")
    if len(path) > MAX_SOCKET_PATH or any(c in str(data_dir) for c in ',"'):
        return ""
    return str(data_dir)


def server_log_error(log: Path, offset: int) -> str | None:
    """The reason a server that did not start gave: the last FATAL or PANIC line written to `log`
    after `offset`, with its DETAIL, without the line's timestamp prefix."""
    try:
        with log.open("rb") as handle:
            handle.seek(offset)
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    found: str | None = None
    for number, line in enumerate(lines):
        for level in ("FATAL:", "PANIC:"):
            if level in line:
                found = line.split(level, 1)[1].strip()
                following = lines[number + 1] if number + 1 < len(lines) else ""
                if "DETAIL:" in following:
                    found += " " + following.split("DETAIL:", 1)[1].strip()
    return found


def tool_error(output: str) -> str | None:
    """The line of initdb's or pg_ctl's output that says what failed (not its clean-up afterwards)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        for marker in ("FATAL:", "PANIC:", "error:"):
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return lines[-1] if lines else None
