"""Loaded by the gateway process under bench/soak.py (PYTHONPATH): every FLUX_SOAK_PROBE_SECONDS
it writes what lives in the process (objects by type, isolates, connections' prepared statements,
gc counts) to FLUX_SOAK_PROBE as one JSON object, for the driver to sample. Bench only."""
from __future__ import annotations

import os

if os.environ.get("FLUX_SOAK_PROBE"):
    import collections
    import gc
    import json
    import sys
    import threading
    import time

    _OUT = os.environ["FLUX_SOAK_PROBE"]
    _EVERY = float(os.environ.get("FLUX_SOAK_PROBE_SECONDS", "10"))

    def _sample() -> dict:
        counts: collections.Counter[str] = collections.Counter()
        isolates = racers = handles = 0
        prepared: list[int] = []
        for obj in gc.get_objects():
            t = type(obj)
            name = f"{t.__module__}.{t.__qualname__}"
            counts[name] += 1
            if name == "flux.runtime.isolate.Isolate":
                if obj._maker is not None:  # closed ones drop their maker
                    isolates += 1
                    try:
                        handles += int(obj.context.value_count())
                    except Exception:
                        pass
            elif name == "py_mini_racer._mini_racer.MiniRacer" or t.__name__ == "MiniRacer":
                racers += 1
        host = sys.modules.get("flux.runtime.host")
        if host is not None:
            prepared = [len(p.names) for p in list(host._PREPARED.values())]
        try:
            from py_mini_racer._context import context_count
            contexts = context_count()  # every isolate alive, frozen out of gc's view or not
        except Exception:
            contexts = None
        return {
            "t": time.time(),
            "v8_contexts": contexts,
            "objects": sum(counts.values()),
            "top_types": counts.most_common(40),
            # Only isolates made since the gateway last froze its heap (start, reload): gc no longer
            # lists the others. v8_contexts counts them all.
            "isolates_since_freeze": isolates,
            "v8_value_handles": handles,
            "mini_racers": racers,
            "threads": threading.active_count(),
            "gc_counts": gc.get_count(),
            "gc_stats": gc.get_stats(),
            "prepared_per_conn": prepared,
            "tasks": _tasks(),
        }

    def _tasks() -> int | None:
        """asyncio tasks alive: the loop itself was frozen out of gc's view at start (gc.freeze), so it is
        found through a task made since."""
        import asyncio
        for obj in gc.get_objects():
            if isinstance(obj, asyncio.Task):
                return len(asyncio.all_tasks(obj.get_loop()))
        return None

    def _run() -> None:
        while True:
            time.sleep(_EVERY)
            try:
                data = _sample()
                tmp = _OUT + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, _OUT)
            except Exception as exc:  # a probe must never take the gateway down
                with open(_OUT + ".err", "a") as f:
                    f.write(repr(exc) + "\n")

    threading.Thread(target=_run, name="soak-probe", daemon=True).start()
