"""V8 isolates for functions: compiling a function's source, and a pre-warmed pool of isolates.

Every request gets a fresh isolate (a mini-racer context of its own: no state is shared with
any other request or tenant), already holding the prelude and the function's code. Used isolates
are closed, never returned. The pool refills in the background on worker threads, off the
response path and off the event loop.

Only `eval_cancelable` is used once an isolate serves a request, so a deadline can always
interrupt it; `close()` is what stops JS spinning inside a microtask.

What this module does not do: it does not run the request protocol (that is
`flux.runtime.executor`) and it does not limit concurrency (the gateway does).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from py_mini_racer import JSEvalException, LibAlreadyInitializedError, MiniRacer, init_mini_racer

# Compile eagerly: each isolate runs its code once, so V8's lazy compilation would put the
# compile of every prelude function on the request path (measured: the first eval of a request
# 0.83 -> 0.51 ms). The cost moves to warming, off the response path.
# No Temporal: Temporal.Now would read the clock past the recording (see prelude.js).
V8_FLAGS = ("--single-threaded", "--no-lazy", "--no-enable-lazy-source-positions", "--no-harmony-temporal")
try:
    init_mini_racer(flags=V8_FLAGS)
except LibAlreadyInitializedError:  # an embedding application initialised V8 first: keep its flags
    pass

try:  # mini-racer's own internal seams (pinned: mini-racer 0.14); see Isolate
    from py_mini_racer._context import _UNCANCELABLE_TASK_CALLBACK_ID
    from py_mini_racer._mini_racer import _make_context
except ImportError:  # another mini-racer: isolates are then made on the loop thread
    _make_context = None

from flux.project import Function

log = logging.getLogger("flux.runtime")

PRELUDE = resources.files("flux.runtime").joinpath("prelude.js").read_text()
_EXPORT_DEFAULT = re.compile(r"^(\s*)export\s+default\s+", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class CompiledFunction:
    """A function ready to load into isolates, or the load error that makes its route answer 500."""

    function: Function
    script: str | None
    error: str | None = None  # "functions/x.js:3: SyntaxError: Unexpected token"

    @property
    def name(self) -> str:
        return self.function.name


def to_script(function: Function) -> str:
    """The function's file as a classic script: `export default` becomes a global assignment.

    The rewrite keeps every line where it was, so V8's line numbers are the file's.
    """
    source, count = _EXPORT_DEFAULT.subn(r"\1globalThis.__flux_handler = ", function.source, count=1)
    if count == 0:
        raise ValueError(f"{function.display_path} has no `export default async function (req, ctx)`")
    return f"{source}\n//# sourceURL={function.display_path}\n"


def compile_function(function: Function, *, memory_mb: int = 128) -> CompiledFunction:
    """Load the function once in a scratch isolate, so syntax errors surface at load time."""
    try:
        script = to_script(function)
    except ValueError as exc:
        return CompiledFunction(function, None, str(exc))
    mr = MiniRacer()
    try:
        mr.set_hard_memory_limit(memory_mb * 1024 * 1024)
        mr.eval(PRELUDE)  # a prelude error is Flux's bug: let it raise
        mr.eval(script)
    except JSEvalException as exc:
        return CompiledFunction(function, None, _load_error(function, exc))
    finally:
        mr.close()
    return CompiledFunction(function, script)


def _load_error(function: Function, exc: JSEvalException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # V8 says "<anonymous>:LINE: SyntaxError: ..." for scripts; name the file instead.
    first = re.sub(r"^(<anonymous>|" + re.escape(function.display_path) + r"):", f"{function.display_path}:", first)
    if not first.startswith(function.display_path):
        first = f"{function.display_path}: {first}"
    return first


class Isolate:
    """One V8 isolate holding the prelude and one function, used for one request and closed.

    For requests, creating, loading and freeing an isolate (about 2 ms of CPU) happen on worker
    threads: `new_isolate_async` makes the context there and runs the prelude and the function's
    code with synchronous evals that no loop sees (the context is nobody else's yet). Only the
    start-up fill (`IsolatePool.warm_now`), closing the isolate of a failed request (timeout,
    memory, JS error: `Executor.run`) and closing a pool run on the loop. The context is bound
    to the running loop when it is made, so that a request's `eval_cancelable` calls resolve on
    that loop. Both rest on mini-racer's internal seams, `_make_context(event_loop=...)` and its
    uncancelable-task queue (pinned: mini-racer 0.14).
    """

    __slots__ = ("_maker", "context")

    def __init__(self, context: Any, maker: Any) -> None:
        self.context = context  # py_mini_racer's Context, or a MiniRacer where its internals are missing
        self._maker = maker

    async def eval_cancelable(self, code: str) -> object:
        return await self.context.eval_cancelable(code)

    def close(self) -> None:
        """Free the isolate now; this also stops JS that is still running in it."""
        maker, self._maker = self._maker, None
        if maker is not None:
            maker.__exit__(None, None, None)
        elif isinstance(self.context, MiniRacer):
            self.context.close()

    def close_soon(self) -> None:
        """Free the isolate on a worker thread, off the response path."""
        try:
            asyncio.get_running_loop().run_in_executor(None, self.close)
        except RuntimeError:
            self.close()


def _eval_unshared(context: Any, code: str) -> object:
    """A synchronous eval from any thread, for a context no one else uses yet (its results queue is single file)."""
    handle = context._python_to_value_handle(code)
    context._dll.mr_eval(context._ctx, handle.raw, _UNCANCELABLE_TASK_CALLBACK_ID)
    return context._value_handle_to_python(context._non_cancelable_mr_task_results_queue.get())


def _make_loaded(compiled: CompiledFunction, memory_mb: int, loop: asyncio.AbstractEventLoop) -> Isolate:
    """A context bound to `loop`, with the prelude and the function loaded; runs on any thread."""
    assert compiled.script is not None
    maker = _make_context(event_loop=loop)
    context = maker.__enter__()
    try:
        context.set_hard_memory_limit(memory_mb * 1024 * 1024)
        _eval_unshared(context, PRELUDE)
        _eval_unshared(context, compiled.script)
    except BaseException:
        maker.__exit__(None, None, None)
        raise
    return Isolate(context, maker)


def new_isolate(compiled: CompiledFunction, *, memory_mb: int) -> Isolate:
    """An isolate made entirely on the calling thread, for the loop running there (if any)."""
    assert compiled.script is not None
    if _make_context is not None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            return _make_loaded(compiled, memory_mb, loop)
    mr = MiniRacer()
    mr.set_hard_memory_limit(memory_mb * 1024 * 1024)
    mr.eval(PRELUDE)
    mr.eval(compiled.script)
    return Isolate(mr, None)


async def new_isolate_async(compiled: CompiledFunction, *, memory_mb: int) -> Isolate:
    """An isolate made and loaded on a worker thread, bound to the running loop."""
    if _make_context is None:
        return new_isolate(compiled, memory_mb=memory_mb)
    return await asyncio.to_thread(_make_loaded, compiled, memory_mb, asyncio.get_running_loop())


class IsolatePool:
    """Warm isolates for one compiled function; `acquire()` hands out a fresh one.

    An isolate takes about 2 ms of CPU to make, load and free; refills do all of it on worker
    threads (`new_isolate_async`, `Isolate.close`). That work is batched: used isolates are parked by
    `release()`, and only when the pool falls to half its size does one maintenance pass free the
    parked ones and refill to full. At a light rate most requests therefore run while no isolate is
    being made or freed; under sustained load the refill runs nearly all the time, on the same cores
    as the requests (`bench/gateway.py`'s `flux-deep-pool` measures what that costs them).
    """

    def __init__(self, compiled: CompiledFunction, *, size: int, memory_mb: int) -> None:
        self.compiled = compiled
        self.size = size
        self.low_water = size // 2
        self.memory_mb = memory_mb
        self._warm: list[Isolate] = []
        self._used: list[Isolate] = []
        self._maintenance: asyncio.Task | None = None
        self._closed = False
        self.acquire_times: list[float] = []  # seconds, for the bench and the function span

    def warm_now(self) -> None:
        while len(self._warm) < self.size:
            self._warm.append(new_isolate(self.compiled, memory_mb=self.memory_mb))

    async def acquire(self) -> Isolate:
        started = time.perf_counter()
        if self._warm:
            isolate = self._warm.pop()
        else:
            isolate = await new_isolate_async(self.compiled, memory_mb=self.memory_mb)
        self.acquire_times.append(time.perf_counter() - started)
        if len(self.acquire_times) > 10_000:
            del self.acquire_times[:5_000]
        if len(self._warm) <= self.low_water:
            self._schedule_maintenance()
        return isolate

    def release(self, isolate: Isolate) -> None:
        """A used isolate: never handed out again, freed by the next maintenance pass."""
        if self._closed:
            isolate.close_soon()
            return
        self._used.append(isolate)
        if len(self._used) > max(self.size, 1):
            self._schedule_maintenance()

    def _schedule_maintenance(self) -> None:
        if self._closed or (self._maintenance is not None and not self._maintenance.done()):
            return
        try:
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain())
        except RuntimeError:  # no loop: the next acquire creates on demand
            self._maintenance = None

    async def _maintain(self) -> None:
        """Free what requests have used, then refill. Freeing comes first at every step: while
        requests outpace a refill, the isolates they park would otherwise pile up until the
        process runs out of memory mappings (V8 then aborts the whole process)."""
        while not self._closed:
            if self._used:
                used, self._used = self._used, []
                await asyncio.to_thread(lambda: [isolate.close() for isolate in used])
                continue
            if len(self._warm) >= self.size:
                return
            try:
                isolate = await new_isolate_async(self.compiled, memory_mb=self.memory_mb)
            except Exception:  # noqa: BLE001 -- a failed warm-up must not kill the pool; acquire retries inline
                log.exception("could not warm an isolate for %s", self.compiled.name)
                return
            if self._closed:
                isolate.close_soon()
                return
            self._warm.append(isolate)

    def close(self) -> None:
        self._closed = True
        if self._maintenance is not None:
            self._maintenance.cancel()
        for isolate in self._warm + self._used:
            isolate.close()
        self._warm.clear()
        self._used.clear()
