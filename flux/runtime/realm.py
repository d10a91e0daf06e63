"""Fresh JS contexts inside a reused V8 isolate, through `ShadowRealm`.

Why: a mini-racer isolate per request costs about 1.5 ms of CPU to make, load and free, and
freeing it hands memory back to the OS with `munmap`, which flushes the TLB of the CPU serving
requests (bench/README.md, "Gateway: the runs ..."). A new V8 context in a live isolate, loaded with the prelude
and the function, costs 0.3 to 0.45 ms and returns no memory to the OS.

How: `new ShadowRealm()` is a new native context (its own global object and its own built-ins)
in the same isolate, reachable only through strings, numbers and wrapped functions. V8 asks the
embedder to make that context (`Isolate::SetHostCreateShadowRealmContextCallback`), and
mini-racer leaves the hook unset, so `new ShadowRealm()` throws "Not supported". mini-racer's
library exports V8's C++ API, so Flux sets the hook itself with ctypes. The callback does what
Node's does: `Context::New(isolate)`.

The symbols are V8's mangled C++ names, which encode the argument types, so a V8 whose
signatures differ has none of them. Then `HOOK` is None and each isolate serves one request:
slower, never wrong. `FLUX_REALMS=off` in the environment does the same on purpose.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import py_mini_racer
from py_mini_racer._context import _UNCANCELABLE_TASK_CALLBACK_ID

log = logging.getLogger("flux.runtime")
T = TypeVar("T")

# mini-racer's library, whose V8 symbols Flux calls (here and flux.runtime.external).
LIBRARY_PATH = Path(py_mini_racer.__file__).with_name("libmini_racer.so")
# V8 14 (mini-racer 0.14), Itanium C++ ABI.
GET_CURRENT = "_ZN2v87Isolate10GetCurrentEv"
_SET_HOOK = "_ZN2v87Isolate39SetHostCreateShadowRealmContextCallbackEPFNS_10MaybeLocalINS_7ContextEEENS_5LocalIS2_EEE"
_CONTEXT_NEW = (
    "_ZN2v87Context3NewEPNS_7IsolateEPNS_22ExtensionConfigurationENS_10MaybeLocalINS_14ObjectTemplateEEE"
    "NS5_INS_5ValueEEENS_33DeserializeInternalFieldsCallbackEPNS_14MicrotaskQueueE"
    "NS_30DeserializeContextDataCallbackENS_29DeserializeAPIWrapperCallbackE"
)


class _Callback(ctypes.Structure):
    """V8's Deserialize*Callback: a function pointer and its data, passed by value."""

    _fields_ = [("callback", ctypes.c_void_p), ("data", ctypes.c_void_p)]


_HookType = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)  # MaybeLocal<Context>(Local<Context>)


class RealmHook:
    """V8's ShadowRealm hook, set per isolate."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._get_current = getattr(library, GET_CURRENT)
        self._get_current.argtypes = []
        self._get_current.restype = ctypes.c_void_p
        self._set_hook = getattr(library, _SET_HOOK)
        self._set_hook.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._set_hook.restype = None
        context_new = getattr(library, _CONTEXT_NEW)
        context_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                _Callback, ctypes.c_void_p, _Callback, _Callback]
        context_new.restype = ctypes.c_void_p
        get_current = self._get_current

        # Runs on the isolate's thread, inside `new ShadowRealm()`, with the isolate entered and a
        # handle scope open. Defaults everywhere: no extensions, no global template, the isolate's
        # microtask queue (so the host's drain-after-eval sees the realm's promise jobs).
        def create_context(_initiator: int) -> int:
            return context_new(get_current(), None, None, None, _Callback(), None, _Callback(), _Callback())

        self._callback = _HookType(create_context)  # kept alive here: V8 holds only the raw pointer
        self._callback_address = ctypes.cast(self._callback, ctypes.c_void_p).value

    def install(self, context: Any) -> None:
        """Set the hook on the isolate of `context`, a mini-racer Context that no one else uses yet.

        V8 wants the `Isolate*`, which only the isolate's own thread can read
        (`Isolate::GetCurrent`).
        """
        isolate = on_isolate_thread(context, self._get_current)
        if not isolate:
            raise RuntimeError("could not read the V8 isolate of a mini-racer context")
        self._set_hook(isolate, self._callback_address)


def on_isolate_thread(context: Any, work: Callable[[], T]) -> T:
    """`work()` run on the isolate's own thread; `context` is a mini-racer Context no one else uses yet.

    mini-racer delivers an uncancelable eval's result from that thread, inside the eval's task,
    so a tap on its results queue runs `work` there, with the GIL held.
    """
    results = context._non_cancelable_mr_task_results_queue
    outcome: list[Any] = []

    class Tap(queue.Queue):
        def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
            try:
                outcome.append((True, work()))
            except BaseException as exc:  # noqa: BLE001 -- re-raised on the caller's thread, below
                outcome.append((False, exc))
            results.put(item, block, timeout)

    # mini-racer's Context is a frozen dataclass; the tap is removed before the context is shared.
    object.__setattr__(context, "_non_cancelable_mr_task_results_queue", Tap())
    try:
        code = context._python_to_value_handle("0")
        context._dll.mr_eval(context._ctx, code.raw, _UNCANCELABLE_TASK_CALLBACK_ID)
        results.get()
    finally:
        object.__setattr__(context, "_non_cancelable_mr_task_results_queue", results)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _load() -> RealmHook | None:
    if os.environ.get("FLUX_REALMS", "").strip().lower() in ("0", "off", "false", "no"):
        log.info("FLUX_REALMS is off: each isolate serves one request")
        return None
    try:
        return RealmHook(ctypes.CDLL(str(LIBRARY_PATH)))
    except (OSError, AttributeError) as exc:  # another platform's library, or another V8
        log.info("fresh contexts in reused isolates are unavailable (%s); each isolate serves one request", exc)
        return None


HOOK = _load()
