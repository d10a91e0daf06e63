"""A sink on a worker thread, so that the engine decodes while the sink commits.

`PipelinedSink` wraps another sink (an `EncodingSink`) and makes every call on it from one
worker thread, in the order the engine made them; only encoding rows happens on the caller's.
`write`, `backfill` and `commit` return as soon as they are queued; `durable` reports the last
commit that has completed. The engine acknowledges to the server
only what `durable` reports, so delivery stays exactly once: a crash loses the queue and the
open sink transaction, and the server resends everything after the last durable progress.

Without it, every sink commit stops the engine twice: while the server ingests the rest of the
COPY, and while it flushes the commit to disk. Meanwhile nothing reads the stream, so the
walsender stalls too (measured: about a fifth of a backlog drain's wall time).

The queue is bounded in rows (plus the one call in progress): a sink slower than the stream
blocks the engine instead of growing its memory.

An error in the worker ends the worker: the queue is dropped (nothing after the failed call
may commit), and the next call from the engine raises the error. The engine then closes the
session and reconnects, as it does for any other sink error.

What it does not do: it does not retry, reorder or merge calls; `close()` discards what is not
committed (`wait_durable()` first keeps it).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flux.cdc.assembler import Backfill, MutationRow
from flux.cdc.sink import EncodingSink, Progress
from flux.errors import ConnectionLostError

log = logging.getLogger("flux.cdc")

JOIN_TIMEOUT = 30.0  # seconds close() waits for a call in progress before giving up on the worker


@dataclass(frozen=True, slots=True)
class Durable:
    """What has committed through this sink: the last progress, and the mutations it covered in all."""

    progress: Progress | None
    mutations: int


class PipelinedSink:
    """Runs `sink` on a worker thread. Create one per engine session; `close()` ends it."""

    def __init__(self, sink: EncodingSink, *, max_queued_rows: int) -> None:
        self._sink = sink
        self._max_queued_rows = max(1, max_queued_rows)
        self._queue: deque[tuple[str, Any]] = deque()
        self._queued_rows = 0
        self._pending_commits = 0
        self._running: str | None = None  # the kind of call the worker is making now
        self._durable = Durable(None, 0)
        self._error: BaseException | None = None
        self._closing = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="flux-sink", daemon=True)
        self._thread.start()

    # -- the engine's side -------------------------------------------------------------------

    @property
    def durable(self) -> Durable:
        """The last completed commit; raises the worker's error if it failed."""
        if self._error is not None:
            raise self._error
        return self._durable

    @property
    def pending_commits(self) -> int:
        """Commits queued or in progress, not yet durable; raises the worker's error if it failed
        (its commits never become durable, so the engine must not take them for done)."""
        if self._error is not None:
            raise self._error
        return self._pending_commits

    def load_progress(self, slot_name: str) -> Progress | None:
        return self._call(lambda: self._sink.load_progress(slot_name))

    def write(self, rows: Sequence[MutationRow]) -> None:
        """Queue rows for the open sink transaction; waits while the queue is full.

        The rows are encoded here, on the caller's thread: the worker then holds the GIL only
        briefly between its calls to the server, so it answers the server as soon as it can.
        """
        encoded = self._sink.encode(rows)
        with self._changed:
            while self._queued_rows >= self._max_queued_rows and self._error is None:
                self._changed.wait()
            self._put("write", encoded, rows=encoded.rows)

    def backfill(self, backfill: Backfill) -> None:
        with self._changed:
            self._put("backfill", backfill)

    def commit(self, progress: Progress, *, mutations: int) -> None:
        """Queue the commit of everything queued so far, with `progress`; `durable` says when it is done."""
        with self._changed:
            self._put("commit", (progress, mutations))
            self._pending_commits += 1

    def wait_durable(self, timeout: float) -> Durable:
        """Wait until every queued commit has completed; raises the worker's error."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._error is not None or not self._pending_commits, timeout):
                raise ConnectionLostError(f"The mutation store did not commit within {timeout:.0f}s")
        return self.durable

    def rollback(self) -> None:
        """Drop what is queued and roll back the open sink transaction."""
        if self._error is not None:  # the worker has stopped: the sink is this thread's now
            self._sink.rollback()
        else:
            self._call(self._sink.rollback, discard=True)

    def close(self) -> None:
        """Stop the worker, roll back what did not commit, and close the sink."""
        with self._changed:
            self._closing = True
            self._drop_queue()
        self._thread.join(JOIN_TIMEOUT)
        if self._thread.is_alive():
            # Stuck in a call on a dead connection, which holds the connection's lock: a rollback
            # would wait behind it. Closing does not wait, ends that call, and the server rolls back.
            log.warning("the mutation store did not answer within %.0fs; closing its connection", JOIN_TIMEOUT)
        else:
            self._sink.rollback()
        self._sink.close()

    # -- internals (the lock is `_changed`) ----------------------------------------------------

    def _put(self, kind: str, payload: Any, *, rows: int = 0) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise ConnectionLostError("The mutation store connection is closed")
        self._queue.append((kind, payload))
        self._queued_rows += rows
        self._changed.notify_all()

    def _drop_queue(self) -> None:
        self._queue.clear()
        self._queued_rows = 0
        self._pending_commits = 1 if self._running == "commit" else 0
        self._changed.notify_all()

    def _call(self, fn: Callable[[], Any], *, discard: bool = False) -> Any:
        """Run `fn` on the worker after what is queued (instead of it, with `discard`) and return its result."""
        done = threading.Event()
        result: list[Any] = []

        def call() -> None:
            result.append(fn())
            done.set()

        with self._changed:
            if discard:
                self._drop_queue()
            self._put("call", call)
            # The worker notifies after every call, and when it fails (which drops this one).
            self._changed.wait_for(lambda: done.is_set() or self._error is not None)
        if self._error is not None:
            raise self._error
        return result[0]

    def _work(self) -> None:
        sink = self._sink
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closing)
                if self._closing:
                    return
                kind, payload = self._queue.popleft()
                if kind == "write":
                    self._queued_rows -= payload.rows
                    self._changed.notify_all()  # room in the queue
                self._running = kind
            try:
                if kind == "write":
                    sink.write_encoded(payload)
                elif kind == "backfill":
                    sink.backfill(payload)
                elif kind == "commit":
                    sink.commit(payload[0], mutations=payload[1])
                else:
                    payload()
            except BaseException as exc:  # noqa: BLE001 -- handed to the engine, which decides what to do
                with self._changed:
                    self._error = exc  # set first: from now on every accessor raises it
                    self._running = None
                    self._queue.clear()
                    self._queued_rows = 0
                    self._changed.notify_all()
                return
            with self._changed:
                self._running = None
                if kind == "commit":
                    self._pending_commits -= 1
                    self._durable = Durable(payload[0], self._durable.mutations + payload[1])
                self._changed.notify_all()
