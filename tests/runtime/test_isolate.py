"""The isolate pool: fresh realms in reused isolates, bounded however fast requests come."""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from py_mini_racer import JSEvalException
from py_mini_racer._context import context_count

from flux.project import FetchConfig, Function, Limits
from flux.runtime import isolate as isolate_module
from flux.runtime.executor import Execution, Executor, Invocation
from flux.runtime.fetch import AiohttpTransport, FetchPolicy
from flux.runtime.isolate import Isolate, IsolatePool, compile_function
from flux.runtime.realm import on_isolate_thread

SOURCE = "export default async function (req, ctx) { return { status: 200, body: {} }; }\n"

# Top-level code and the handler both leave state behind, in globals and in a built-in.
STATEFUL = """
globalThis.loads = (globalThis.loads || 0) + 1;
Array.prototype.marker = (Array.prototype.marker || 0) + 1;
export default async function (req, ctx) {
  globalThis.hits = (globalThis.hits || 0) + 1;
  if (req.body.fail) throw new Error("planned failure");
  return { status: 200, body: { loads: globalThis.loads, hits: globalThis.hits, marker: [].marker } };
}
"""


def _pool(tmp_path: Path, size: int, source: str = SOURCE) -> IsolatePool:
    path = tmp_path / "functions" / "ok.js"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    function = Function(name="ok", path=path, source=source, code_version="0" * 16)
    return IsolatePool(compile_function(function), size=size, memory_mb=32)


async def _serve(pool: IsolatePool, bodies: list[dict]) -> list[Execution]:
    """Requests one after another, each after the pool's maintenance pass (renewing, retiring,
    refilling) is over, so that a request never finds the pool empty on a slow machine."""
    transport = AiohttpTransport()
    executor = Executor(limits=Limits(), fetch_policy=FetchPolicy(FetchConfig()), transport=transport, db_pool=None)
    results = []
    try:
        for n, body in enumerate(bodies):
            call = Invocation(request_id=f"r{n}", tenant="default", secrets={}, parent_span=None,
                              request={"method": "POST", "path": "/ok", "query": {}, "headers": {}, "body": body})
            results.append(await executor.run(pool, call))
            if pool._maintenance is not None:
                await pool._maintenance
    finally:
        await transport.aclose()
    return results


def _serve_on_one_isolate(tmp_path: Path, bodies: list[dict]) -> tuple[list[Execution], list[Isolate]]:
    """`bodies` served by a pool of one isolate running STATEFUL: the results, and the pool's warm
    isolates at the end (closed by then; their counters remain)."""

    async def main() -> tuple[list[Execution], list[Isolate]]:
        pool = _pool(tmp_path, size=1, source=STATEFUL)
        try:
            return await _serve(pool, bodies), list(pool._warm)
        finally:
            pool.close()

    return asyncio.run(main())


def test_isolates_used_while_the_pool_refills_are_freed_as_it_goes(tmp_path):
    """Requests that outpace the refill park used isolates all the while; they must not pile up."""

    async def main() -> int:
        pool = _pool(tmp_path, size=2)
        most_parked = 0
        try:
            for _ in range(150):
                pool.release(await pool.acquire())
                most_parked = max(most_parked, len(pool._used))
                await asyncio.sleep(0)
        finally:
            pool.close()
        return most_parked

    assert asyncio.run(main()) <= 8


def test_an_isolate_serves_many_requests_each_in_a_fresh_realm(tmp_path):
    bodies = [{"fail": n % 5 == 4} for n in range(40)]  # a thrown error does not end the isolate's reuse
    results, warm = _serve_on_one_isolate(tmp_path, bodies)
    assert [r.status for r in results] == [500 if b["fail"] else 200 for b in bodies]
    assert all(r.body == {"loads": 1, "hits": 1, "marker": 1} for r in results if r.status == 200)
    assert max(isolate.served for isolate in warm) >= 30  # one isolate, reused; not one per request


def test_a_reused_isolate_collects_the_realms_it_used(tmp_path):
    async def main() -> tuple[int, int]:
        pool = _pool(tmp_path, size=1)
        try:
            await _serve(pool, [{}] * 100)
            isolate = max(pool._warm, key=lambda i: i.served)
            heap = orjson.loads(await asyncio.to_thread(isolate.context.heap_stats))
            return isolate.served, heap["used_heap_size"]
        finally:
            pool.close()

    served, used_heap = asyncio.run(main())
    assert served >= 80
    # Uncollected, 80 used realms hold over 10 MB.
    assert used_heap < 6 * 1024 * 1024


def test_an_isolate_is_retired_after_its_last_request(tmp_path, monkeypatch):
    monkeypatch.setattr(isolate_module, "RETIRE_AFTER", 3)
    results, warm = _serve_on_one_isolate(tmp_path, [{}] * 12)
    assert [r.status for r in results] == [200] * 12
    assert warm and max(isolate.served for isolate in warm) < 3


def test_an_isolate_holding_too_much_of_its_memory_limit_is_retired(tmp_path, monkeypatch):
    """Judged against the pool's memory limit (32 MB here), not V8's own heap limit (about 1.5 GB)."""
    monkeypatch.setattr(isolate_module, "COLLECT_EVERY", 1)
    monkeypatch.setattr(isolate_module, "RETIRE_AT_HEAP_FRACTION", 0.001)  # 33 KB: less than any isolate holds
    results, warm = _serve_on_one_isolate(tmp_path, [{}] * 5)
    assert [r.status for r in results] == [200] * 5
    assert warm and max(isolate.served for isolate in warm) == 0


def test_without_realms_each_isolate_serves_one_request(tmp_path, monkeypatch):
    """A mini-racer whose V8 lacks the hook's symbols still runs every request in a fresh context."""
    monkeypatch.setattr(isolate_module, "HOOK", None)
    results, warm = _serve_on_one_isolate(tmp_path, [{}] * 5)
    assert [r.body for r in results] == [{"loads": 1, "hits": 1, "marker": 1}] * 5
    assert warm and not any(isolate.renewable for isolate in warm)


def test_a_v8_started_by_the_application_without_shadow_realm_still_serves(tmp_path):
    """An embedding application that initialised V8 with its own flags gets an isolate per request."""
    path = tmp_path / "ok.js"
    path.write_text(SOURCE)
    script = f"""
import asyncio
from pathlib import Path
from py_mini_racer import init_mini_racer
init_mini_racer(flags=("--single-threaded",))
from flux.project import Function
from flux.runtime import isolate

async def main():
    function = Function(name="ok", path=Path({str(path)!r}), source=Path({str(path)!r}).read_text(), code_version="0" * 16)
    loaded = await isolate.new_isolate_async(isolate.compile_function(function), memory_mb=32)
    print(loaded.renewable, await loaded.eval_cancelable(f"typeof {{loaded.bridge}}"))
    loaded.close()

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "function"]
    assert "V8 has no ShadowRealm" in out.stderr


def test_a_function_in_the_isolates_own_context_cannot_name_the_bridge(tmp_path):
    """Without realms the function's code shares the context the host's evals run in."""
    path = tmp_path / "ok.js"
    path.write_text(SOURCE)
    script = f"""
import asyncio
from pathlib import Path
from flux.project import Function
from flux.runtime import isolate

async def main():
    function = Function(name="ok", path=Path({str(path)!r}), source=Path({str(path)!r}).read_text(), code_version="0" * 16)
    loaded = await isolate.new_isolate_async(isolate.compile_function(function), memory_mb=32)
    names = await loaded.eval_cancelable("Object.getOwnPropertyNames(globalThis).filter((n) => n.includes('flux')).join(',') || 'none'")
    print(loaded.renewable, names, await loaded.eval_cancelable(f"typeof {{loaded.bridge}}"))
    loaded.close()

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env={**os.environ, "FLUX_REALMS": "off"})
    # The handler's global is the file's own export; the start step removes it.
    assert out.stdout.split() == ["False", "__flux_handler", "function"]


@pytest.mark.parametrize("every_task", [False, True], ids=["pool-closing", "loop-shutting-down"])
def test_closing_a_pool_while_it_renews_frees_every_isolate(tmp_path, every_task):
    """Renewals cut short free their isolates: when the pool closes after they posted their evals,
    and when every task is cancelled at once (as `asyncio.run` does on the way out) before the
    renewals have even started."""

    async def main() -> tuple[bool, int]:
        before = context_count()
        pool = _pool(tmp_path, size=4)
        pool.warm_now()
        for isolate in [await pool.acquire() for _ in range(4)]:
            pool.release(isolate)
        await asyncio.sleep(0)  # the maintenance pass has created its renewals, not yet run
        if every_task:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        else:
            await asyncio.sleep(0)  # the renewals have posted their evals
        during = pool._renewing == 4
        pool.close()
        for _ in range(200):
            if context_count() == before:
                break
            await asyncio.sleep(0.01)
        return during, context_count() - before

    renewing, left = asyncio.run(main())
    assert renewing
    assert left == 0


def _concurrent(pool: IsolatePool, streams: int, each: int) -> list[Execution]:
    async def main() -> list[Execution]:
        transport = AiohttpTransport()
        executor = Executor(limits=Limits(), fetch_policy=FetchPolicy(FetchConfig()), transport=transport, db_pool=None)

        async def stream(s: int) -> list[Execution]:
            return [await executor.run(pool, Invocation(
                request_id=f"r{s}-{n}", tenant="default", secrets={}, parent_span=None,
                request={"method": "POST", "path": "/ok", "query": {}, "headers": {}, "body": {}})) for n in range(each)]

        try:
            return [r for results in await asyncio.gather(*(stream(s) for s in range(streams))) for r in results]
        finally:
            await transport.aclose()

    return asyncio.run(main())


def test_under_more_concurrency_than_its_size_the_pool_grows_to_it_and_no_further(tmp_path):
    """Requests that find the pool empty wait for a renewal rather than each making an isolate."""
    pool = _pool(tmp_path, size=2)
    try:
        results = _concurrent(pool, streams=8, each=40)
    finally:
        pool.close()
    assert [r.status for r in results] == [200] * 320
    assert pool.made <= 12  # about one per concurrent request; making one per request would be 320


def test_isolates_left_from_a_burst_are_closed_once_idle(tmp_path, monkeypatch):
    monkeypatch.setattr(isolate_module, "IDLE_TRIM_S", 0.05)

    async def main() -> tuple[int, int, int]:
        pool = _pool(tmp_path, size=2)
        pool.warm_now()
        isolates = [await pool.acquire() for _ in range(6)]
        for isolate in isolates:
            pool.release(isolate)
        await pool._maintenance
        after_burst = len(pool._warm)
        try:
            # Poll rather than sleep a fixed time: a loaded machine runs the trim timer late.
            deadline = asyncio.get_running_loop().time() + 10
            while len(pool._warm) > 2 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            return after_burst, len(pool._warm), pool.made
        finally:
            pool.close()

    after_burst, after_idling, made = asyncio.run(main())
    assert (after_burst, after_idling, made) == (6, 2, 6)


def test_a_released_isolate_is_renewed_after_a_delay_while_another_is_warm_and_at_once_otherwise(tmp_path):
    """The delay keeps the renewal off the CPU while the request commits and answers."""

    async def main() -> tuple[bool, bool, bool]:
        pool = _pool(tmp_path, size=4)  # above its low-water mark after one acquire: no refill pass runs
        pool.warm_now()
        first = await pool.acquire()
        pool.release(first)
        for _ in range(3):  # loop turns enough for a pass started at once to take it
            await asyncio.sleep(0)
        waited = first in pool._used
        for _ in range(500):
            if first in pool._warm:
                break
            await asyncio.sleep(0.01)
        renewed = first in pool._warm
        a, *_ = [await pool.acquire() for _ in range(4)]  # no isolate is warm now
        pool.release(a)
        for _ in range(3):
            await asyncio.sleep(0)
        at_once = a not in pool._used
        pool.close()
        return waited, renewed, at_once

    assert asyncio.run(main()) == (True, True, True)


def test_a_discarded_isolate_is_freed(tmp_path):
    async def main() -> int:
        before = context_count()
        pool = _pool(tmp_path, size=0)
        pool.discard(await pool.acquire())
        for _ in range(200):
            if context_count() == before:
                break
            await asyncio.sleep(0.01)
        pool.close()
        return context_count() - before

    assert asyncio.run(main()) == 0


def test_a_renewal_that_does_not_finish_in_time_closes_its_isolate(tmp_path, caplog):
    """Top-level code runs again in every fresh realm; if it spins there, the isolate is closed and replaced."""

    async def main() -> tuple[int, int, int]:
        before = context_count()
        pool = _pool(tmp_path, size=1)
        pool.timeout_ms = 200
        pool.warm_now()
        isolate = await pool.acquire()
        await isolate.eval_cancelable("__flux_fresh = function () { for (;;) {} }")  # the bridge's realm maker now spins
        pool.release(isolate)
        await pool._maintenance  # the renewal times out; a new isolate replaces it
        warm = len(pool._warm)
        pool.close()
        for _ in range(200):
            if context_count() == before:
                break
            await asyncio.sleep(0.01)
        return warm, pool.made, context_count() - before

    warm, made, left = asyncio.run(main())
    assert (warm, made, left) == (1, 2, 0)
    assert "did not finish within 200 ms in a fresh realm" in caplog.text


def _thread_states() -> int:
    """The interpreter's Python thread states, one per thread that runs or keeps one."""
    python = ctypes.pythonapi
    python.PyInterpreterState_Get.restype = ctypes.c_void_p
    python.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
    python.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
    python.PyThreadState_Next.argtypes = [ctypes.c_void_p]
    python.PyThreadState_Next.restype = ctypes.c_void_p
    count, state = 0, python.PyInterpreterState_ThreadHead(python.PyInterpreterState_Get())
    while state:
        count, state = count + 1, python.PyThreadState_Next(state)
    return count


def test_a_reused_isolate_answers_in_one_kept_thread_state_freed_when_it_closes(tmp_path):
    """Not a fresh thread state (and an mmap and a munmap) per callback from the isolate's thread."""

    async def main() -> tuple[int, int, bool, int]:
        before = _thread_states()
        pool = _pool(tmp_path, size=2)
        pool.warm_now()
        await _serve(pool, [{}] * 6)
        isolate = pool._warm[-1]
        kept = isolate.thread_state
        answered_in = on_isolate_thread(isolate.context, ctypes.pythonapi.PyThreadState_Get)
        during = _thread_states()
        pool.close()
        return before, during, answered_in == kept, _thread_states()

    before, during, same, after = asyncio.run(main())
    assert during == before + 2
    assert same
    assert after == before


def test_eval_then_answers_with_the_second_eval_or_the_first_evals_error(tmp_path):
    async def main() -> tuple[object, str]:
        pool = _pool(tmp_path, size=1)
        pool.warm_now()
        isolate = await pool.acquire()
        try:
            answer = await isolate.eval_then("globalThis.n = 41", "n + 1")
            with pytest.raises(JSEvalException) as failed:
                await isolate.eval_then("throw new Error('the first failed')", "'the second ran'")
            return answer, str(failed.value)
        finally:
            pool.discard(isolate)
            pool.close()

    answer, error = asyncio.run(main())
    assert answer == 42
    assert "the first failed" in error
