"""`flux.signals`: a server command stops cleanly on a signal that comes before its own handlers are in place."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (Linux: SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_a_sigterm_in_the_first_instant_of_cdc_run_stops_it_cleanly(tmp_path, dsn, conn):
    """Before, Python's imports and the start (about 0.3 s) had no handler: the process died of it (exit -15)."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    subprocess.run([sys.executable, "-m", "flux", "attach", "--database", dsn, "--tables", "t"], check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "flux", "cdc", "run", "--database", dsn], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 10
    while not catches(proc.pid, signal.SIGTERM) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # the first instant it is caught: Python is still importing the CLI
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "SIGTERM arrived while starting" in out and "Traceback" not in out, out
