"""Memory outside V8's heap, counted against an isolate's memory limit.

Why: mini-racer's hard memory limit measures the JS heap only. The bytes of an `ArrayBuffer`, a
typed array or a `WebAssembly.Memory` live outside it (V8 calls them external memory), so a
function could fill gigabytes of them under a 128 MB limit, and take the whole process (every
tenant) down with the machine's memory.

How: V8 knows each isolate's external memory, and starts a full garbage collection whenever it
grows by a few tens of megabytes. A GC epilogue callback, set per isolate through V8's C++ API
with ctypes (as `flux.runtime.realm` sets its hook), reads the isolate's heap statistics after
each full collection, and stops the JS running (`TerminateExecution`) when the live heap plus
external memory is over the limit. `exhausted()` then says so, and the request ends as a memory
bomb does.

What this does not guarantee: the check runs after a collection, so a function can pass the
limit by what it allocates between two (V8 collects every 64 MB or so of external growth), and
by one allocation (V8 refuses an `ArrayBuffer` of 2 GB or more). Without the symbols (another
V8) or mini-racer's internals, nothing is watched: `WATCH` is None.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from flux.runtime.realm import GET_CURRENT, LIBRARY_PATH, on_isolate_thread

log = logging.getLogger("flux.runtime")

# V8 14 (mini-racer 0.14), Itanium C++ ABI.
_ADD_EPILOGUE = "_ZN2v87Isolate21AddGCEpilogueCallbackEPFvPS0_NS_6GCTypeENS_15GCCallbackFlagsEPvES4_S2_"
_HEAP_STATISTICS = "_ZN2v87Isolate17GetHeapStatisticsEPNS_14HeapStatisticsE"
_NEW_HEAP_STATISTICS = "_ZN2v814HeapStatisticsC1Ev"
_TERMINATE = "_ZN2v87Isolate18TerminateExecutionEv"

# v8::GCType: full collections only (a mark-compact, or incremental marking that ends in one).
# Scavenges run often and free young buffers only; external growth always brings a full one.
_FULL_GC = 4 | 8
# v8::HeapStatistics is 14 machine words (size_t, and one bool padded to one); read by index.
_USED_HEAP_SIZE = 4
_EXTERNAL_MEMORY = 7
_STATISTICS_WORDS = 32  # room to spare: V8 writes only its own fields

_CallbackType = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


class ExternalMemoryWatch:
    """The GC callback, shared by every isolate: each passes its limit, in bytes, as the callback's data."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._get_current = getattr(library, GET_CURRENT)
        self._get_current.argtypes = []
        self._get_current.restype = ctypes.c_void_p
        self._add_epilogue = getattr(library, _ADD_EPILOGUE)
        self._add_epilogue.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self._add_epilogue.restype = None
        statistics = getattr(library, _HEAP_STATISTICS)
        statistics.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        statistics.restype = None
        new_statistics = getattr(library, _NEW_HEAP_STATISTICS)
        new_statistics.argtypes = [ctypes.c_void_p]
        new_statistics.restype = None
        terminate = getattr(library, _TERMINATE)
        terminate.argtypes = [ctypes.c_void_p]
        terminate.restype = None
        # Isolates (V8's Isolate*) stopped for passing their limit; an isolate leaves it when closed.
        self.stopped: set[int] = set()
        stopped = self.stopped

        # Runs on the isolate's thread, right after a full collection, inside whatever JS allocated.
        def after_gc(isolate: int, _type: int, _flags: int, limit: int | None) -> None:
            words = (ctypes.c_size_t * _STATISTICS_WORDS)()
            new_statistics(words)
            statistics(isolate, words)
            if limit and words[_USED_HEAP_SIZE] + words[_EXTERNAL_MEMORY] > limit:
                stopped.add(isolate)
                terminate(isolate)

        self._terminate = terminate
        self._callback = _CallbackType(after_gc)  # kept alive here: V8 holds only the raw pointer
        self._callback_address = ctypes.cast(self._callback, ctypes.c_void_p).value

    def install(self, context: Any, limit: int) -> int:
        """Watch the isolate of `context` (a mini-racer Context no one else uses yet) against `limit`
        bytes; V8's Isolate*, by which `exhausted` and `forget` know it."""

        def add() -> int:
            isolate = self._get_current()
            self._add_epilogue(isolate, self._callback_address, limit, _FULL_GC)
            return isolate

        isolate = on_isolate_thread(context, add)
        if not isolate:
            raise RuntimeError("could not read the V8 isolate of a mini-racer context")
        return isolate

    def terminate(self, isolate: int) -> None:
        """Stop the JS running in `isolate` now (V8 allows it from any thread), or else the next JS it runs."""
        self._terminate(isolate)

    def exhausted(self, isolate: int | None) -> bool:
        return isolate is not None and isolate in self.stopped

    def forget(self, isolate: int | None) -> None:
        """An isolate closed: its address may be a new isolate's next."""
        self.stopped.discard(isolate)  # type: ignore[arg-type]


def _load() -> ExternalMemoryWatch | None:
    try:
        return ExternalMemoryWatch(ctypes.CDLL(str(LIBRARY_PATH)))
    except (OSError, AttributeError) as exc:  # another platform's library, or another V8
        log.warning("memory outside the JS heap (ArrayBuffers, WebAssembly memory) is not counted against the "
                    "isolates' memory limit: %s", exc)
        return None


WATCH = _load()
