"""/_flux/health's view of the database the functions use: can the gateway reach it now.

Why a probe of its own: the trace writer and the functions' pool only find the database gone when
they use it, so an idle gateway reported a database that was down as if nothing were wrong. A
fresh connection (login included: a rotated password shows) answering `SELECT 1` is the check.

Health probes come often and from many load balancers: a result serves every probe for
PROBE_TTL_S, one probe runs at a time, and a health answer waits for it at most PROBE_WAIT_S
(a database that does not answer must not make the health check itself time out).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

PROBE_TTL_S = 2.0
PROBE_WAIT_S = 0.25  # below the 1 s that orchestrators give a probe by default (Kubernetes timeoutSeconds)
PROBE_CONNECT_TIMEOUT_S = 3
# The whole check, login and SELECT 1: a server (or a PgBouncer out of server connections) that
# logs in but does not answer must read as unreachable, not as the last check's answer for minutes.
PROBE_TIMEOUT_S = 5.0
CLOSE_WAIT_S = 15.0  # past psycopg's own bounds on a cancelled statement (5 s to cancel, 5 s for it to end)


class DatabaseProbe:
    def __init__(self, conninfo: str, connect_kwargs: dict[str, Any] | None = None, *,
                 timeout: float = PROBE_TIMEOUT_S) -> None:
        self._conninfo = conninfo
        self._timeout = timeout
        # The pool's options (keepalives, TLS files passed as arguments), not its session settings.
        self._kwargs = {**(connect_kwargs or {}), "autocommit": True, "connect_timeout": PROBE_CONNECT_TIMEOUT_S}
        self._task: asyncio.Task[None] | None = None
        self._reachable: bool | None = None  # None: not checked yet
        self._error: str | None = None
        self._round_trip_ms: float | None = None
        self._checked_at: float | None = None  # time.monotonic() of the last finished check
        self._started_at = 0.0  # time.monotonic() when the check in hand began
        self._checking = False  # a check has begun and not answered yet

    async def status(self) -> dict[str, Any]:
        """The last check's result, checking again first when it is older than PROBE_TTL_S."""
        stale = self._checked_at is None or time.monotonic() - self._checked_at >= PROBE_TTL_S
        if stale and self._task is None:
            self._started_at, self._checking = time.monotonic(), True
            self._task = asyncio.create_task(self._check(), name="flux-health-database")
        if self._task is not None and self._checking:  # not while an answered check's connection closes
            await asyncio.wait({self._task}, timeout=PROBE_WAIT_S)  # never cancels it: the next answer has it
        return {
            "reachable": self._reachable,
            "error": self._error,
            "round_trip_ms": self._round_trip_ms,
            "checked_seconds_ago": None if self._checked_at is None else round(time.monotonic() - self._checked_at, 1),
            "checking_seconds": round(time.monotonic() - self._started_at, 1) if self._checking else None,
        }

    async def _check(self) -> None:
        attempt = asyncio.ensure_future(self._login_and_select_1())
        try:
            await asyncio.wait({attempt}, timeout=self._timeout)
            if attempt.done():
                try:
                    attempt.result()
                    self._answer(True, None, round((time.monotonic() - self._started_at) * 1000, 1))
                except (psycopg.Error, OSError) as exc:
                    self._answer(False, _one_line(exc))
                return
            self._answer(False, f"no answer to the login and SELECT 1 in {self._timeout:g} s")
            # psycopg, cancelled in a statement, sends the server a cancel and waits up to 10 s for the
            # statement to end: the answer above does not wait for that (it did, twice the timeout),
            # and no other check connects until this one's connection is closed (or CLOSE_WAIT_S).
            attempt.cancel()
            await asyncio.wait({attempt}, timeout=CLOSE_WAIT_S)
        finally:
            if not attempt.done():  # the probe is closing, or psycopg's cleanup outlived CLOSE_WAIT_S
                attempt.cancel()  # (again: psycopg then closes the connection at once)
            elif not attempt.cancelled():
                attempt.exception()  # retrieved: an error after the timeout is not worth a log line
            self._task = None

    async def _login_and_select_1(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs) as conn:
            await conn.execute("SELECT 1")

    def _answer(self, reachable: bool, error: str | None, round_trip_ms: float | None = None) -> None:
        self._reachable, self._error, self._round_trip_ms = reachable, error, round_trip_ms
        self._checked_at, self._checking = time.monotonic(), False

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
