"""pypgoutput's `LogicalReplicationReader` as a backlog-drain peer for bench/cdc.py.

pypgoutput 0.0.3's reader builds pydantic 1 models; Flux's venv has pydantic 2 (typer needs
it). So the reader runs in a virtualenv of its own, and this file has two roles:

- imported by bench/cdc.py (stdlib only): `ensure_venv()` makes that virtualenv once, under
  bench/.venv-pypgoutput, and says why when it cannot;
- run in that virtualenv: `python cdc_pypgoutput.py DSN SLOT PUBLICATION TARGET_LSN CHANGES`
  drains SLOT with the reader, counts its change events until all CHANGES are in (or one
  reaches TARGET_LSN), and prints one JSON line.

It does not time the process from the outside (bench/cdc.py does: launch to exit, as for
pg_recvlogical), stop the reader's slot from advancing, or check the rows it built: the reader's
own per-message work (a pipe round trip to its extractor process, a pydantic model per row, a
feedback message per change) is what is measured.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

START = time.monotonic()  # before the reader's imports, which are part of its start-up

VENV = Path(__file__).resolve().parent / ".venv-pypgoutput"
# pypgoutput declares psycopg2, which builds from source (pg_config and a compiler);
# psycopg2-binary provides the same module, so pypgoutput itself goes in with --no-deps.
REQUIREMENTS = ["pydantic<2", "psycopg2-binary"]
NO_DEPS = ["pypgoutput==0.0.3"]
MARKER = ".bench-requirements"


def ensure_venv(base_python: str, *, timeout: float = 600) -> tuple[str | None, str | None]:
    """(the virtualenv's python, None), or (None, why it could not be made)."""
    python = VENV / "bin/python"
    wanted = " ".join(REQUIREMENTS + NO_DEPS)
    marker = VENV / MARKER
    if marker.exists() and marker.read_text() == wanted and _imports_ok(python):
        return str(python), None
    shutil.rmtree(VENV, ignore_errors=True)
    steps = [
        [base_python, "-m", "venv", str(VENV)],
        [str(python), "-m", "pip", "install", "-q", *REQUIREMENTS],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", *NO_DEPS],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(step[:4])} ...: {exc}"
        if done.returncode != 0:
            return None, f"{' '.join(step[:4])} ... exited {done.returncode}: {(done.stderr or done.stdout).strip()[-800:]}"
    if not _imports_ok(python):
        return None, "the virtualenv was made, but `import pypgoutput.reader` fails in it"
    marker.write_text(wanted)
    return str(python), None


def _imports_ok(python: Path) -> bool:
    check = "import pydantic, pypgoutput.reader; assert pydantic.VERSION.startswith('1.')"
    try:
        return python.exists() and subprocess.run([str(python), "-c", check], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def lsn_int(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def drain(dsn: str, slot: str, publication: str, target_lsn: str, changes: int) -> dict:
    """Read change events from the reader until `changes` are in or one reaches `target_lsn`."""
    import contextlib
    from collections import Counter

    import pydantic
    from pypgoutput.reader import LogicalReplicationReader

    target = lsn_int(target_lsn)
    kinds: Counter[str] = Counter()
    marks: dict[str, float] = {"imported": time.monotonic() - START}
    count, last_lsn = 0, 0
    # The reader prints each relation's key model to stdout: keep stdout for the result.
    with contextlib.redirect_stdout(sys.stderr):
        reader = LogicalReplicationReader(publication_name=publication, slot_name=slot, dsn=dsn)
        marks["reader_started"] = time.monotonic() - START
        for event in reader:  # the reader ends iteration (and logs why) on any error
            if count == 0:
                marks["first_change"] = time.monotonic() - START
            count += 1
            kinds[event.op] += 1
            last_lsn = event.lsn
            if count >= changes or last_lsn >= target:
                break
        marks["done"] = time.monotonic() - START
        try:
            reader.stop()
        except Exception:  # noqa: BLE001 - its extractor may not have exited yet; the caller kills the group
            pass
    return {
        "changes_seen": count,
        "change_kinds": dict(sorted(kinds.items())),
        "last_change_lsn": f"{last_lsn >> 32:X}/{last_lsn & 0xFFFFFFFF:X}",
        "marks_s": {k: round(v, 2) for k, v in marks.items()},
        "pydantic": pydantic.VERSION,
    }


if __name__ == "__main__":
    import os

    dsn_arg, slot_arg, publication_arg, target_arg, changes_arg = sys.argv[1:6]
    print(json.dumps(drain(dsn_arg, slot_arg, publication_arg, target_arg, int(changes_arg))), flush=True)
    os._exit(0)  # the reader's extractor process may linger; the caller ends the process group
