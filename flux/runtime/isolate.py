"""V8 isolates for functions: compiling a function's source, and a pre-warmed pool of isolates.

Every request runs in a fresh JS context: its own global object and its own built-ins, already
holding the prelude and the function's code, with nothing left by any other request or tenant.
Where V8's ShadowRealm hook can be set (`flux.runtime.realm`), that context is a new realm inside
a reused isolate: after a request the isolate drops the used realm and makes the next one, off
the response path. Elsewhere an isolate serves one request and is closed.

A deadline can always interrupt a request: the eval it waits on is cancelable, and `close()`
stops any JS still running (in an eval posted before it, or in a microtask). An isolate whose request
ended at the isolate level (time limit, memory limit, a failed eval, a function stuck on a promise
nothing settles) is discarded, never reused; a function that throws is an ordinary request.

What this module does not do: it does not run the request protocol (that is
`flux.runtime.executor`) and it does not limit concurrency (the gateway does).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import re
import secrets
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
from py_mini_racer import JSEvalException, LibAlreadyInitializedError, MiniRacer, init_mini_racer, mini_racer

# Compile eagerly: each isolate runs its code once, so V8's lazy compilation would put the
# compile of every prelude function on the request path (measured: the first eval of a request
# 0.83 -> 0.51 ms). The cost moves to warming, off the response path.
# No Temporal: Temporal.Now would read the clock past the recording (see prelude.js).
# ShadowRealm: each request's fresh context (flux.runtime.realm). V8 lets code make functions
# from strings (`new Function`, indirect eval) only in the context the host entered, which is the
# isolate's own, not the realm: without the flag, in a realm they throw "no access" and return
# undefined. Nothing of the isolate's own context is reachable from a realm, so nothing is lost.
V8_FLAGS = ("--single-threaded", "--no-lazy", "--no-enable-lazy-source-positions", "--no-harmony-temporal",
            "--harmony-shadow-realm", "--allow-unsafe-function-constructor")
try:
    init_mini_racer(flags=V8_FLAGS)
except LibAlreadyInitializedError:  # an embedding application initialised V8 first: keep its flags
    pass

try:  # mini-racer's own internal seams (pinned: mini-racer 0.14); see Isolate
    from py_mini_racer._context import _UNCANCELABLE_TASK_CALLBACK_ID
    from py_mini_racer._mini_racer import _make_context

    from flux.runtime.external import WATCH
    from flux.runtime.realm import HOOK, on_isolate_thread
except ImportError:  # another mini-racer: isolates are then made on the loop thread, one per request
    _make_context = None
    HOOK = None
    WATCH = None

from flux.project import Function

log = logging.getLogger("flux.runtime")

_SOURCES = resources.files("flux.runtime")
# The Web APIs (each file's value an object of globals), by the globals each defines: compiled
# in a realm on first use (lazy.js).
_ON_FIRST_USE = {
    "webapi.js": ("DOMException", "atob", "btoa", "TextEncoder", "TextDecoder", "queueMicrotask", "structuredClone"),
    "url.js": ("URL", "URLSearchParams"),
}
_LAZY_GLOBALS = "{}({}, {});".format(
    _SOURCES.joinpath("lazy.js").read_text().rstrip(),
    orjson.dumps([_SOURCES.joinpath(name).read_text() for name in _ON_FIRST_USE]).decode(),
    orjson.dumps([[glob, at] for at, globs in enumerate(_ON_FIRST_USE.values()) for glob in globs]).decode(),
)
# What every realm runs first; its value (the prelude's, the last statement's) is the host bridge.
PRELUDE = f"{_LAZY_GLOBALS}\n{_SOURCES.joinpath('prelude.js').read_text()}"
_EXPORT_DEFAULT = re.compile(r"^(\s*)export\s+default\s+", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class CompiledFunction:
    """A function ready to load into isolates, or the load error that makes its route answer 500."""

    function: Function
    script: str | None
    error: str | None = None  # "functions/x.js:3: SyntaxError: Unexpected token"
    # What the function's JS sees of the machine without reading it through a recorded call: the
    # default time zone and locale (from TZ, LANG and LC_ALL when V8 started) and the V8 version,
    # whose ICU data formats dates and numbers. On the tape as `env`: a replay needs the same.
    environment: dict[str, str] | None = field(default=None, hash=False)

    @property
    def name(self) -> str:
        return self.function.name


def to_script(function: Function) -> str:
    """The function's file as a classic script: `export default` becomes a global assignment.

    The rewrite keeps every line where it was, so V8's line numbers are the file's.
    """
    source, count = _EXPORT_DEFAULT.subn(r"\1globalThis.__flux_handler = ", function.source, count=1)
    if count == 0:
        if re.search(r"\bexport\s+default\b", function.source):
            raise ValueError(f"{function.display_path}: put `export default` at the start of a line (Flux finds the "
                             f"handler there)")
        raise ValueError(f"{function.display_path} has no `export default async function (req, ctx)`")
    return f"{source}\n//# sourceURL={function.display_path}\n"


def compile_function(function: Function, *, memory_mb: int = 128, timeout_ms: int = 5000) -> CompiledFunction:
    """Load the function once in a scratch isolate, so syntax errors, and top-level code that
    throws or never finishes, surface at load time."""
    try:
        script = to_script(function)
    except ValueError as exc:
        return CompiledFunction(function, None, str(exc))
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_compile(function, script, memory_mb, timeout_ms))
    # Blocking the caller's loop is the point (a reload swaps every function at once), but
    # the scratch isolate needs a loop of its own to answer on: one on a worker thread.
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, _compile(function, script, memory_mb, timeout_ms)).result()


async def _compile(function: Function, script: str, memory_mb: int, timeout_ms: int) -> CompiledFunction:
    # The context is freed (which stops top-level code still spinning) while this loop still
    # runs: the stopped eval's answer then lands on a live loop, not a closed one.
    with mini_racer(asyncio.get_running_loop()) as mr:
        mr.set_hard_memory_limit(memory_mb * 1024 * 1024)
        # ArrayBuffers the top-level code makes count too (flux.runtime.external).
        v8_isolate = WATCH.install(mr._ctx, memory_mb * 1024 * 1024) if WATCH is not None else None
        try:
            environment = {**orjson.loads(await mr.eval_cancelable(_ENVIRONMENT)), "v8": mr.v8_version}
            await mr.eval_cancelable(PRELUDE)  # a prelude error is Flux's bug: let it raise
            try:
                async with asyncio.timeout(timeout_ms / 1000):
                    await mr.eval_cancelable(script)
            except TimeoutError:
                return CompiledFunction(function, None, f"{function.display_path}: its top-level code did not finish within {timeout_ms} ms")
            except JSEvalException as exc:
                if (WATCH is not None and WATCH.exhausted(v8_isolate)) or mr.was_hard_memory_limit_reached():
                    return CompiledFunction(function, None, f"{function.display_path}: its top-level code exceeded the memory "
                                                            f"limit ({memory_mb} MB)")
                return CompiledFunction(function, None, _load_error(function, exc))
            exported = await mr.eval_cancelable("typeof globalThis.__flux_handler")
            if exported != "function":  # `export default 42`: every call would fail the same way
                return CompiledFunction(function, None, f"{function.display_path}: its default export is {_a(exported)}, not "
                                                        f"`async function (req, ctx)`")
        finally:
            if WATCH is not None:
                WATCH.forget(v8_isolate)
    return CompiledFunction(function, script, environment=environment)


def _a(js_type: str) -> str:
    """`typeof`'s answer as a noun: "a number", "an object", "undefined"."""
    return js_type if js_type == "undefined" else ("an " if js_type[0] in "aeiou" else "a ") + js_type


_ENVIRONMENT = ("(() => { const o = new Intl.DateTimeFormat().resolvedOptions(); "
                "return JSON.stringify({time_zone: o.timeZone, locale: o.locale}); })()")


def _load_error(function: Function, exc: JSEvalException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # V8 says "<anonymous>:LINE: SyntaxError: ..." for scripts; name the file instead.
    first = re.sub(r"^(<anonymous>|" + re.escape(function.display_path) + r"):", f"{function.display_path}:", first)
    if not first.startswith(function.display_path):
        first = f"{function.display_path}: {first}"
    # An error at the end of input is reported on the lines to_script appends: name the file's last line.
    last_line = max(1, len(function.source.splitlines()))
    return re.sub(r"^(" + re.escape(function.display_path) + r"):(\d+):",
                  lambda m: f"{m.group(1)}:{min(int(m.group(2)), last_line)}:", first, count=1)


# How often a reused isolate collects its garbage, and when it is retired. Used realms are
# garbage that V8 leaves in place until a full collection (about 140 KB each): collected every 32
# requests it takes about 1.5 ms, on a worker thread while the isolate is parked. An isolate that
# keeps much live data after a collection, or has served many requests, is closed instead.
COLLECT_EVERY = 32
RETIRE_AFTER = 10_000
RETIRE_AT_HEAP_FRACTION = 0.25
# How long an eval of nothing may take to answer, in a salvage, before the JS ahead of it is taken
# to be a loop in a microtask and stopped (a free isolate answers in about 0.05 ms).
PROBE_S = 0.01

# The isolate's own context holds only this: each request's code runs in a fresh realm made by
# __flux_fresh, and `__flux` calls the prelude's bridge there (a wrapped function: strings cross a
# realm's boundary, and the host protocol is strings only). The function's code, in the realm,
# cannot reach the isolate's own global object.
_REALM_BRIDGE = "__flux"
_BRIDGE = """(function (prelude, script) {
  const g = globalThis;
  g.__flux_fresh = function () {
    g.__flux = undefined;
    const realm = new ShadowRealm();
    const bridge = realm.evaluate(prelude);
    realm.evaluate(script);
    g.__flux = bridge;
  };
})"""
_REALM_PROBE = "(() => { try { return new ShadowRealm().evaluate('1 + 1') === 2; } catch (e) { return false; } })()"


def _bridge_in_own_context() -> tuple[str, str]:
    """For an isolate whose function runs in its own context: the bridge's name and the code that
    binds it. A lexical binding at a script's top level is no property of the global object, so
    the function's code can reach it only by its name, which is random."""
    name = f"__flux_{secrets.token_hex(16)}"
    # An indirect eval gives the completion value of PRELUDE, a script of several files (statements),
    # as a realm's evaluate does: wrapping it in parentheses would take one expression only.
    return name, f"const {name} = (0, eval)({orjson.dumps(PRELUDE).decode()});"


# mini-racer answers every eval through a ctypes callback on the isolate's thread, and ctypes
# gives a thread that Python did not start a fresh Python thread state for each call and frees it
# after: an mmap and a munmap per eval, and a munmap makes every CPU running this process flush
# its TLB. A reused isolate keeps one thread state on its thread instead (measured in-process:
# 0.07 to 0.2 ms less per request), and frees it when the isolate closes.
_PYTHON = ctypes.pythonapi
_PYTHON.PyThreadState_Get.restype = ctypes.c_void_p
_PYTHON.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_PYTHON.PyThreadState_Delete.argtypes = [ctypes.c_void_p]


def _keep_thread_state() -> int:
    """On the isolate's thread, inside a callback: one more hold on its thread state, which the
    callback's own release then leaves alive for the next callbacks."""
    _PYTHON.PyGILState_Ensure()
    return _PYTHON.PyThreadState_Get()


def _free_thread_state(state: int) -> None:
    """A kept thread state, once its thread has ended (closing a context joins the isolate's thread)."""
    _PYTHON.PyThreadState_Clear(state)
    _PYTHON.PyThreadState_Delete(state)


class Isolate:
    """One V8 isolate holding the prelude and one function, ready for one request.

    Making, loading and freeing happen on worker threads for requests: `new_isolate_async`
    makes the context there and loads it with synchronous evals that no loop sees (the context
    is nobody else's yet). `renew` runs while the isolate is parked between requests, with an
    eval answered on the loop, and its periodic collection on a worker thread. Only the
    start-up fill (`IsolatePool.warm_now`) and closing a pool run on the loop. The context is
    bound to the running loop when it is made, so that `eval_cancelable` calls resolve on that
    loop. Both rest on mini-racer's internal seams, `_make_context(event_loop=...)` and its
    uncancelable-task queue (pinned: mini-racer 0.14).
    """

    __slots__ = ("_closing", "_handles", "_maker", "bridge", "context", "drain_code", "memory_limit", "parked_at", "posted", "posted_then", "renewable", "served",
                 "thread_state", "v8_isolate")

    def __init__(self, context: Any, maker: Any, *, bridge: str, renewable: bool = False, memory_limit: int = 0,
                 thread_state: int | None = None, v8_isolate: int | None = None) -> None:
        self.context = context  # py_mini_racer's Context, or a MiniRacer where its internals are missing
        self.bridge = bridge  # the name of the prelude's bridge(op, input) in the isolate's own context
        self.drain_code = f'{bridge}("drain")'
        self._handles: dict[str, Any] = {}  # mini-racer's handles of the code eval_then posts each step: made once
        self._maker = maker
        self._closing = threading.Lock()  # close() may come from the loop and a worker thread at once
        self.thread_state = thread_state  # the Python thread state kept on the isolate's thread
        self.renewable = renewable  # holds its function in a realm, and can make a fresh one
        self.memory_limit = memory_limit  # bytes: the hard heap limit set on the isolate
        self.served = 0
        self.parked_at = 0.0  # time.monotonic() when it last became ready for a request
        self.posted: int | None = None  # mini-racer's task id of eval_then's last `code`
        self.posted_then: int | None = None  # and of its `then`
        self.v8_isolate = v8_isolate  # V8's Isolate*, where its external memory is watched (flux.runtime.external)

    def memory_exhausted(self) -> bool:
        """Whether V8 reached the hard memory limit, in its heap or with the ArrayBuffers and
        WebAssembly memories outside it (`flux.runtime.external`): it then stops the JS running,
        which may have been a microtask after the eval that started it had answered."""
        if WATCH is not None and WATCH.exhausted(self.v8_isolate):
            return True
        return bool(self.context.was_hard_memory_limit_reached())

    async def eval_cancelable(self, code: str) -> object:
        return await self.context.eval_cancelable(code)

    async def eval_then(self, code: str, then: str) -> object:
        """Run `code`, then `then` once the microtasks `code` queued have run (an eval of its own);
        `then`'s result, or `code`'s error if it failed. Answers once the microtasks `then` queued
        have run too: `then` (the drain) runs built-ins the function can replace, and work they
        queue must count within the request, not delay the next request's fresh realm.

        Only an eval of nothing after them answers on the loop: `code`'s and `then`'s results wait
        in mini-racer's uncancelable-results queue, which holds both by the time it answers (an
        isolate runs its evals in order). That is one wake-up of the loop per call, where an answer
        per eval would take three (measured: 0.05 to 0.1 ms less per request for each). Neither
        `code` nor `then` is cancelable; an isolate whose request is cut short is salvaged
        (`salvage` stops both by their task ids) or closed, which stops them.
        """
        if isinstance(self.context, MiniRacer):  # no mini-racer internals: answered evals
            pending = asyncio.ensure_future(self.context.eval_cancelable(then))
            try:
                await self.context.eval_cancelable(code)
                result = await pending
            finally:
                pending.cancel()
            await self.context.eval_cancelable("0")
            return result
        context = self.context
        post = context._dll.mr_eval
        code_handle = context._python_to_value_handle(code)  # referenced until `code` has run
        self.posted = post(context._ctx, code_handle.raw, _UNCANCELABLE_TASK_CALLBACK_ID)
        then_handle = self._handle(then) if then == self.drain_code else context._python_to_value_handle(then)
        self.posted_then = post(context._ctx, then_handle.raw, _UNCANCELABLE_TASK_CALLBACK_ID)
        settled_error: JSEvalException | None = None
        try:
            await context._run_cancelable_mr_task(post, self._handle("0").raw)
        except JSEvalException as exc:  # V8 stopped it (the memory limit): `code` and `then` have answered
            settled_error = exc
        results = context._non_cancelable_mr_task_results_queue
        code_value = results.get_nowait() if not results.empty() else None
        then_value = results.get_nowait() if not results.empty() else None
        answered: object = None
        then_error: JSEvalException | None = None
        if then_value is not None:
            try:
                answered = context._value_handle_to_python(then_value)
            except JSEvalException as exc:
                then_error = exc
        if code_value is not None:
            try:
                context._value_handle_to_python(code_value)
            except JSEvalException as exc:
                exc.then_result = answered  # type: ignore[attr-defined]  # a drain still reads what came before a stop
                raise
        if then_error is not None:
            raise then_error
        if settled_error is not None:
            raise settled_error
        return answered

    def _handle(self, code: str) -> Any:
        """mini-racer's handle of `code`, one of the few evals posted every step (the drain, an eval
        of nothing): making one is a call into mini-racer and a copy of the text (measured: about
        8 us each on a busy machine). mini-racer only reads a handle's text when the eval runs, and
        frees it by the context's id, which is safe after the context has closed."""
        handle = self._handles.get(code)
        if handle is None:
            handle = self._handles[code] = self.context._python_to_value_handle(code)
        return handle

    async def salvage(self, code: str, *, timeout_s: float) -> object | None:
        """For a request its deadline cut short, before the isolate is discarded: stop JS still
        running in eval_then's `code` or `then` (cancelling the eval that answers does not reach
        them), then run `code` in what is left; None if that fails or overruns. V8 stops a running
        script without undoing what it did, so the function's state is as it was at the deadline."""
        if isinstance(self.context, MiniRacer):  # no task ids without mini-racer's internals
            return None
        for task in (self.posted, self.posted_then):
            if task is not None:
                self.context._dll.mr_cancel_task(self.context._ctx, task)  # ignored if it has ended
        try:
            async with asyncio.timeout(timeout_s):
                await self._stop_microtasks()
                # A stop that found no JS running stops the next JS instead: this drain, as it
                # starts, before it reads anything. The second one runs.
                for _ in range(2):
                    try:
                        return await self.context.eval_cancelable(code)
                    except JSEvalException:
                        continue
                return None
        except TimeoutError:
            return None

    async def _stop_microtasks(self) -> None:
        """Stop JS still running in the microtasks of an eval that has answered (a loop after an
        `await`), which cancelling the eval does not reach, and which would hold every eval behind
        it: an eval of nothing that does not answer at once says so, and V8 stops what runs."""
        probe = asyncio.ensure_future(self.context.eval_cancelable("0"))
        answered, _ = await asyncio.wait({probe}, timeout=PROBE_S)
        if not answered and WATCH is not None and self.v8_isolate is not None:
            WATCH.terminate(self.v8_isolate)
        try:
            await probe
        except JSEvalException:  # it was stopped itself, having found nothing else running
            pass

    async def renew(self, *, timeout_s: float) -> bool:
        """Replace the used realm with a fresh one; False when the isolate was retired instead.

        Runs while the isolate is parked: no request is using it. The fresh realm is made by an
        eval like a request's, answered on the loop: no worker thread and no GIL hand-offs on
        the way (measured in-process with requests back to back: 0.15 ms less per request at p50).
        An isolate that is retired, or whose renewal fails, times out (the
        function's top-level code runs again in every realm) or is cancelled, is closed.
        """
        self.served += 1
        if not self.renewable or self.served >= RETIRE_AFTER:
            self.close_soon()
            return False
        if self.served % COLLECT_EVERY == 0 and await _on_worker_thread(self._collected) is None:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                await self.context.eval_cancelable("__flux_fresh()")
        except BaseException:
            self.close_soon()  # also stops top-level code still spinning
            raise
        return True

    def _collected(self) -> Isolate | None:
        """Worker thread (both calls block until the isolate's thread is done): a full collection,
        then the isolate, or None once it was closed for keeping too much of its memory limit."""
        try:
            self.context.low_memory_notification()
            used = orjson.loads(self.context.heap_stats())["used_heap_size"]
        except BaseException:
            self.close()
            raise
        # Against the limit Flux set, not V8's own `heap_size_limit` (about 1.5 GB).
        if used > RETIRE_AT_HEAP_FRACTION * self.memory_limit:
            self.close()
            return None
        return self

    def close(self) -> None:
        """Free the isolate now; this also stops JS that is still running in it."""
        with self._closing:
            maker, self._maker = self._maker, None
            state, self.thread_state = self.thread_state, None
            if maker is not None:
                maker.__exit__(None, None, None)  # returns once the isolate's thread has ended
                if state is not None:
                    _free_thread_state(state)
                if WATCH is not None:
                    WATCH.forget(self.v8_isolate)
            elif isinstance(self.context, MiniRacer):
                self.context.close()

    def close_soon(self) -> None:
        """Free the isolate on a worker thread, off the response path."""
        try:
            asyncio.get_running_loop().run_in_executor(None, self.close)
        except RuntimeError:
            self.close()


def _eval_unshared(context: Any, code: str) -> object:
    """A synchronous eval from any thread, for a context no one else uses now (its results queue is single file)."""
    handle = context._python_to_value_handle(code)
    context._dll.mr_eval(context._ctx, handle.raw, _UNCANCELABLE_TASK_CALLBACK_ID)
    return context._value_handle_to_python(context._non_cancelable_mr_task_results_queue.get())


_realms_refused = False  # logged once: V8 started without ShadowRealm (an embedding application's flags)


def _load(context: Any, compiled: CompiledFunction) -> tuple[bool, str]:
    """Load the prelude and the function: in a fresh realm where possible (True), else in the
    isolate's own context, for one request (False); and the name of the bridge."""
    global _realms_refused
    assert compiled.script is not None
    if HOOK is not None and not _realms_refused:
        if _realms_work(context):
            _eval_unshared(context, f"{_BRIDGE}({orjson.dumps(PRELUDE).decode()}, {orjson.dumps(compiled.script).decode()})")
            _eval_unshared(context, "__flux_fresh()")
            return True, _REALM_BRIDGE
        _realms_refused = True
        log.warning("V8 has no ShadowRealm (started with other flags?): each isolate serves one request")
    bridge, code = _bridge_in_own_context()
    _eval_unshared(context, code)
    _eval_unshared(context, compiled.script)
    return False, bridge


def _realms_work(context: Any) -> bool:
    assert HOOK is not None
    try:
        HOOK.install(context)
    except RuntimeError:
        return False
    return _eval_unshared(context, _REALM_PROBE) is True


def _make_loaded(compiled: CompiledFunction, memory_mb: int, loop: asyncio.AbstractEventLoop) -> Isolate:
    """A context bound to `loop`, with the prelude and the function loaded; runs on any thread."""
    maker = _make_context(event_loop=loop)
    context = maker.__enter__()
    memory_limit = memory_mb * 1024 * 1024
    try:
        context.set_hard_memory_limit(memory_limit)
        v8_isolate = WATCH.install(context, memory_limit) if WATCH is not None else None
        renewable, bridge = _load(context, compiled)
        # An isolate serving one request gets few callbacks: it keeps no thread state.
        thread_state = on_isolate_thread(context, _keep_thread_state) if renewable else None
    except BaseException:
        maker.__exit__(None, None, None)
        raise
    return Isolate(context, maker, bridge=bridge, renewable=renewable, memory_limit=memory_limit, thread_state=thread_state,
                   v8_isolate=v8_isolate)


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
    bridge, code = _bridge_in_own_context()
    mr.eval(code)
    mr.eval(compiled.script)
    return Isolate(mr, None, bridge=bridge)


async def new_isolate_async(compiled: CompiledFunction, *, memory_mb: int) -> Isolate:
    """An isolate made and loaded on a worker thread, bound to the running loop."""
    if _make_context is None:
        return new_isolate(compiled, memory_mb=memory_mb)
    return await _on_worker_thread(_make_loaded, compiled, memory_mb, asyncio.get_running_loop())


async def _on_worker_thread(work: Any, *args: Any) -> Any:
    """`work(*args)` on a worker thread, returning an isolate or None. If the caller is cancelled
    meanwhile (a pool closing, a client gone), the thread still finishes, and the isolate it
    returns is closed rather than lost with its threads and memory."""
    future = asyncio.get_running_loop().run_in_executor(None, work, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_result)
        raise


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _close_result(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None and future.result() is not None:
        future.result().close_soon()


# Isolates beyond the pool's size, left over from a burst, are closed after idling this long.
IDLE_TRIM_S = 30.0
# A released isolate is renewed this long after its request hands it back, when another warm
# isolate can serve meanwhile. The request releases it before its COMMIT and its response: a
# renewal started at once takes a CPU (0.3 to 0.45 ms, twice that after an idle spell) while the
# COMMIT, the response and the client's read still need one, and its answer lands on the loop
# while the response is being written. Measured with requests interleaved across servers at 50
# requests/s: 0.13 to 0.24 ms less per request at p50, in each of 6 rounds; back to back, where
# the next request starts within the delay anyway, no difference beyond noise (0.05 ms more).
RENEW_DELAY_S = 0.002


class IsolatePool:
    """Warm isolates for one compiled function; `acquire()` hands out one with a fresh context.

    A request hands its isolate back with `release()` when it ended cleanly, or `discard()` when it
    failed (the isolate is never reused, and is closed on a worker thread). A maintenance pass
    renews released isolates, all at once (a fresh realm: 0.3 to 0.45 ms of the isolate's own thread
    each), each ready for the next request as soon as it is renewed; it holds them `RENEW_DELAY_S`
    after a release while another isolate is warm and no request waits. It makes new isolates (2 ms of
    CPU and more) only while warm plus handed-out isolates are fewer than `size`, or for a request
    that found none. A request that finds the pool empty while isolates are being renewed waits for
    one of them rather than making its own; only when every isolate is in use does it make one, so
    the pool grows to the concurrency it sees and stops growing there. Isolates beyond `size` are
    closed once they have idled for `IDLE_TRIM_S`.
    Where realms are unavailable every released isolate is closed and replaced, so under
    sustained load that refill runs nearly all the time, on the same cores as the requests
    (`bench/gateway.py`'s `flux-isolates` measures that mode against realms).
    """

    def __init__(self, compiled: CompiledFunction, *, size: int, memory_mb: int, timeout_ms: int = 5000) -> None:
        self.compiled = compiled
        self.size = size
        self.low_water = size // 2
        self.memory_mb = memory_mb
        self.timeout_ms = timeout_ms  # for the function's top-level code, which runs again in each fresh realm
        self._warm: list[Isolate] = []  # the last one is handed out first; the first idles longest
        self._used: list[Isolate] = []  # released, waiting for the maintenance pass
        self._renewing = 0  # getting a fresh realm now, each back in well under a millisecond
        self._making = 0  # new isolates the maintenance pass is making for the pool
        self._out = 0  # handed out (or to a waiting request), neither released nor discarded yet
        self._waiters: deque[asyncio.Future[Isolate | None]] = deque()  # requests waiting for a renewal
        self._maintenance: asyncio.Task | None = None
        self._renew_at = 0.0  # time.monotonic() before which the pass holds released isolates
        self._hold: asyncio.Future[None] | None = None  # the pass waiting for _renew_at
        self._trim: asyncio.TimerHandle | None = None
        self._closed = False
        self.made = 0  # isolates made over the pool's life
        self.acquire_times: list[float] = []  # seconds, for the bench and the function span

    def warm_now(self) -> None:
        while len(self._warm) < self.size:
            self._park(new_isolate(self.compiled, memory_mb=self.memory_mb))
            self.made += 1

    async def warm_async(self) -> None:
        """`warm_now` off the loop: each isolate made on a worker thread, for the running loop."""
        while len(self._warm) < self.size and not self._closed:
            self._park(await new_isolate_async(self.compiled, memory_mb=self.memory_mb))
            self.made += 1

    async def acquire(self) -> Isolate:
        started = time.perf_counter()
        isolate: Isolate | None = None
        if self._warm:
            isolate = self._warm.pop()
            self._out += 1
        elif not self._closed and len(self._waiters) < len(self._used) + self._renewing + self._making:
            isolate = await self._renewed()  # one is on its way, much sooner than a new one of its own
        if isolate is None:
            isolate = await new_isolate_async(self.compiled, memory_mb=self.memory_mb)
            self.made += 1
            self._out += 1
        self.acquire_times.append(time.perf_counter() - started)
        if len(self.acquire_times) > 10_000:
            del self.acquire_times[:5_000]
        if len(self._warm) <= self.low_water:
            self._schedule_maintenance()
        return isolate

    async def _renewed(self) -> Isolate | None:
        """The next isolate the maintenance pass makes ready, already counted as handed out;
        None if the pool closes first."""
        waiter: asyncio.Future[Isolate | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._end_hold()
        self._schedule_maintenance()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                self._out -= 1
                self._park(waiter.result())  # handed over just as the request was cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _park(self, isolate: Isolate) -> None:
        """An isolate ready for a request: to a waiting request, else to the warm list."""
        if self._closed:
            isolate.close_soon()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(isolate)
                self._out += 1
                return
        isolate.parked_at = time.monotonic()
        self._warm.append(isolate)

    def release(self, isolate: Isolate) -> None:
        """An isolate whose request ended cleanly: renewed by the maintenance pass, or freed."""
        self._out -= 1
        if self._closed:
            isolate.close_soon()
            return
        self._used.append(isolate)
        # While the next request has an isolate, the pass waits until this response is out.
        self._renew_at = time.monotonic() + RENEW_DELAY_S if self._warm else 0.0
        if not self._warm:
            self._end_hold()
        self._schedule_maintenance()

    def discard(self, isolate: Isolate) -> None:
        """An isolate whose request failed: closed on a worker thread, which also stops JS still
        running in it (freeing a heap a memory bomb filled takes milliseconds: not on the loop)."""
        self._out -= 1
        isolate.close_soon()

    def _schedule_maintenance(self) -> None:
        if self._closed or (self._maintenance is not None and not self._maintenance.done()):
            return
        try:
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain())
        except RuntimeError:  # no loop: the next acquire creates on demand
            self._maintenance = None

    async def _maintain(self) -> None:
        """Renew or free what requests have used, then refill. Used isolates come first at every
        step: while requests outpace a refill, the isolates they park would otherwise pile up
        until the process runs out of memory mappings (V8 then aborts the whole process)."""
        while not self._closed:
            if self._used:
                await self._hold_until_renew_at()
                used, self._used = self._used, []
                await self._renew(used)
                continue
            waiting = any(not waiter.done() for waiter in self._waiters)  # a renewal fell through
            if not waiting and len(self._warm) + self._out >= self.size:
                break
            self._making += 1
            try:
                isolate = await new_isolate_async(self.compiled, memory_mb=self.memory_mb)
            except Exception:  # noqa: BLE001 -- a failed warm-up must not kill the pool; acquire retries inline
                log.exception("could not warm an isolate for %s", self.compiled.name)
                self._send_waiters_away()
                break
            finally:
                self._making -= 1
            self.made += 1
            if self._closed:
                isolate.close_soon()
                return
            self._park(isolate)
        self._schedule_trim()

    async def _hold_until_renew_at(self) -> None:
        """Wait out `RENEW_DELAY_S` after the last release, unless no isolate is warm, or a
        request starts waiting for a renewal meanwhile (`_end_hold`)."""
        delay = self._renew_at - time.monotonic()
        if delay <= 0 or not self._warm:
            return
        loop = asyncio.get_running_loop()
        self._hold = hold = loop.create_future()
        timer = loop.call_later(delay, _resolve, hold)
        try:
            await hold
        finally:
            timer.cancel()
            self._hold = None

    def _end_hold(self) -> None:
        if self._hold is not None:
            _resolve(self._hold)

    async def _renew(self, used: list[Isolate]) -> None:
        """Renew `used` all at once; each is ready for a request as soon as it is renewed. If the
        pass is cancelled (the pool closing), so are the renewals, and their isolates are closed."""
        self._renewing += len(used)
        started: set[int] = set()  # renewals whose body ran: they close what they do not renew
        renewals = {asyncio.ensure_future(self._renew_one(isolate, started)): isolate for isolate in used}
        try:
            await asyncio.wait(renewals)
        except asyncio.CancelledError:
            for renewal, isolate in renewals.items():
                renewal.cancel()
                # Cancelled before its body ran (even if its task has ended: a task cancelled before
                # its first step only closes the coroutine), so nothing else will close it.
                if id(isolate) not in started:
                    self._renewing -= 1
                    isolate.close_soon()
            raise

    async def _renew_one(self, isolate: Isolate, started: set[int]) -> None:
        started.add(id(isolate))
        try:
            renewed = await isolate.renew(timeout_s=self.timeout_ms / 1000)  # closes what it does not renew
        except TimeoutError:
            log.error("%s: its top-level code did not finish within %d ms in a fresh realm; the isolate is closed",
                      self.compiled.function.display_path, self.timeout_ms)
            renewed = False
        except Exception:  # noqa: BLE001 -- this isolate is lost, the pool makes another
            log.exception("could not renew an isolate for %s; it is closed", self.compiled.name)
            renewed = False
        finally:
            self._renewing -= 1
        if renewed:
            self._park(isolate)

    def _send_waiters_away(self) -> None:
        """Requests waiting for an isolate that will not come make their own (see acquire)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _schedule_trim(self) -> None:
        if self._trim is None and not self._closed and len(self._warm) > self.size:
            self._trim = asyncio.get_running_loop().call_later(IDLE_TRIM_S, self._trim_idle)

    def _trim_idle(self) -> None:
        self._trim = None
        idle_since = time.monotonic() - IDLE_TRIM_S
        while len(self._warm) > self.size and self._warm[0].parked_at <= idle_since:
            self._warm.pop(0).close_soon()
        self._schedule_trim()

    def close(self) -> None:
        self._closed = True
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self._trim is not None:
            self._trim.cancel()
        self._send_waiters_away()
        for isolate in self._warm + self._used:
            isolate.close()
        self._warm.clear()
        self._used.clear()
