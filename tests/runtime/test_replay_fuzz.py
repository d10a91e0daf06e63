"""A randomized check that the tape is enough to replay a request: generated functions
(tests/runtime/fuzzgen.py) run once for real, against PostgreSQL and a stub whose delays are
random per run, then again from their recording alone (tests/runtime/replay.py), read back from
jsonb as the trace store keeps it, with the stub gone, the database changed and no socket able to
connect. Each replay must read the same values at the same points, make the same calls and answer
the same.

The checked-in seeds (0 to 99) run in 10 to 20 s. `FLUX_REPLAY_SEEDS=N FLUX_REPLAY_SEED_FROM=S`
runs seeds S to S+N-1 instead, to search by hand; a failure names its seed and shows the function,
its tape and what the replay did."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from flux.project import load_project
from flux.redaction import Redactor
from flux.runtime.executor import Execution, Executor, Invocation
from flux.runtime.fetch import AiohttpTransport, FetchPolicy
from flux.runtime.isolate import CompiledFunction, IsolatePool, compile_function
from flux.store.schema import ensure_schema
from tests.functions import Stub, write_project
from tests.runtime.fuzzgen import SCHEMA, FunctionGenerator
from tests.runtime.replay import assert_replays, replay, stored_recording

# The checked-in seeds; FLUX_REPLAY_SEEDS=N (from FLUX_REPLAY_SEED_FROM, default 0) runs others, by hand.
SEED_FROM = int(os.environ.get("FLUX_REPLAY_SEED_FROM", "0"))
SEEDS = range(SEED_FROM, SEED_FROM + int(os.environ.get("FLUX_REPLAY_SEEDS", "100")))
STATS = os.environ.get("FLUX_REPLAY_STATS")  # a file to append each seed's outcome and tape to
SECRET = "sk_fuzz_4f1c9e0b7a2d"


def run_all(root: Path, names: list[str], dsn: str) -> list[tuple[CompiledFunction, Execution, dict[str, Any]]]:
    """Each function for real, one request at a time. Every other one runs a request before the
    one replayed, which then runs in a renewed realm of a reused isolate, as most requests do."""
    project = load_project(root)

    async def main() -> list[tuple[CompiledFunction, Execution, dict[str, Any]]]:
        db_pool = AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False)
        await db_pool.open(wait=True)
        transport = AiohttpTransport()
        executor = Executor(limits=project.limits, fetch_policy=FetchPolicy(project.fetch), transport=transport,
                            db_pool=db_pool, redactor=Redactor.of(project))
        ran = []
        try:
            for index, name in enumerate(names):
                compiled = compile_function(project.functions[name])
                assert compiled.script is not None, compiled.error
                request = {"method": "POST", "path": f"/{name}", "query": {}, "headers": {}, "body": None, "ip": None}
                pool = IsolatePool(compiled, size=1, memory_mb=project.limits.memory_mb)
                try:
                    call = Invocation(request_id="req-0", tenant="default", secrets={}, parent_span=None, request=request)
                    if index % 2:
                        await executor.run(pool, call)
                    ran.append((compiled, await executor.run(pool, call), request))
                finally:
                    pool.close()
        finally:
            await transport.aclose()
            await db_pool.close()
        return ran

    return asyncio.run(main())


def check_seeds(seeds: range, tmp_path: Path, dsn: str, conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    conn.execute(SCHEMA)
    ensure_schema(conn)
    stub = Stub()
    try:
        sources = {f"fz{seed}": FunctionGenerator(seed, stub.url).source() for seed in seeds}
        write_project(tmp_path, sources, f'[fetch]\nallow = ["{stub.host}", "127.0.0.1:9"]\n[limits]\ntimeout_ms = 1500\n'
                                         f'[secrets]\nKEY = "{SECRET}"\n')
        ran = run_all(tmp_path, list(sources), dsn)
    finally:
        stub.close()  # a replay that fetched would fail: nothing answers
    conn.execute("UPDATE fz SET v = 'changed'")  # nor would a replay that queried see the same rows
    redactor = Redactor.of(load_project(tmp_path))
    for seed, (compiled, execution, request) in zip(seeds, ran):
        assert execution.status in (200, 500, 504), (seed, execution.error)
        if STATS:  # what the seeds exercised, one JSON line each, to judge the generator by
            with open(STATS, "a") as out:
                out.write(json.dumps({"seed": seed, "status": execution.status, "error": execution.error,
                                      "recording": execution.recording}) + "\n")
        # Redacted as the gateway redacts a record (the functions never see the secret: nothing changes).
        recorded = redactor.redact(execution.recording, {"KEY": SECRET})
        stored = stored_recording(conn, f"req-{seed}", dataclasses.replace(execution, recording=recorded))
        try:
            # A replay stops where its tape does; the time limit is for one that spins without reading it, and
            # a spin cut at the time limit (1.5 s) may take longer to replay on a busy machine.
            with monkeypatch.context() as offline:  # nor could one connect anywhere (the database, the stub, DNS)
                offline.setattr(socket.socket, "connect", _no_connection)
                offline.setattr(socket.socket, "connect_ex", _no_connection)
                assert_replays(compiled, dataclasses.replace(execution, recording=stored), request, timeout_ms=20_000)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed} diverged: {exc}\n--- functions/fz{seed}.js\n{sources[f'fz{seed}']}\n"
                                 f"--- ran: {execution.status} {execution.error or ''}\n{json.dumps(stored['events'])[:20_000]}\n"
                                 f"--- replayed: {_replayed(compiled, stored, request)}") from exc


def _no_connection(sock: socket.socket, address: Any) -> None:
    raise AssertionError(f"the replay connected to {address}")


def _replayed(compiled: CompiledFunction, recording: dict[str, Any], request: dict[str, Any]) -> str:
    try:
        got = replay(compiled, recording, request, timeout_ms=20_000)
    except AssertionError as exc:  # a call the tape does not have
        return str(exc)
    return (f"{got.status} {got.error or ''} incomplete={got.incomplete}\n{json.dumps(got.js_events)[:20_000]}\n"
            f"{json.dumps(got.calls)[:20_000]}")


def test_generated_functions_replay_exactly_from_their_tape(tmp_path, dsn, conn, monkeypatch):
    check_seeds(SEEDS, tmp_path, dsn, conn, monkeypatch)
