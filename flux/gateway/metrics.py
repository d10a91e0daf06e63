"""`GET /_flux/metrics`: the gateway's counters in Prometheus' text format (version 0.0.4).

Per answer the gateway adds one to a counter and one to a histogram bucket (a few microseconds on
the loop); everything else is read when scraped, from what /_flux/health shows. Labels are the
function (empty for an answer no function was routed to: a 401, a 404) and the status: both
bounded by the project, never by what clients send. Tenants are not labels: they can be many.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

# Seconds: from a fast function's answer to past the default 5 s time limit (timeout_ms).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ENGINE_STATES = ("starting", "active", "standby", "retrying", "stopped")


class _Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bucket
        self.total = 0.0
        self.count = 0


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.durations: dict[str, _Histogram] = {}
        self.traces_api_refused = 0  # /_flux/requests answered 401: a missing or wrong API key

    def observe(self, function: str | None, status: int, seconds: float) -> None:
        key = (function or "", status)
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.durations.get(key[0])
        if histogram is None:
            histogram = self.durations[key[0]] = _Histogram()
        histogram.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        histogram.total += seconds
        histogram.count += 1

    def render(self, health: dict[str, Any]) -> str:
        """The exposition text, with the gauges of `health` (what /_flux/health answers)."""
        lines: list[str] = []
        _family(lines, "flux_requests_total", "counter", "Answers given, by function (empty: none was routed) and status.",
                ((f'{{function="{_label(f)}",status="{s}"}}', n) for (f, s), n in sorted(self.requests.items())))
        lines += ["# HELP flux_request_duration_seconds Time from a request's arrival to its answer, by function.",
                  "# TYPE flux_request_duration_seconds histogram"]
        for function, histogram in sorted(self.durations.items()):
            name = _label(function)
            cumulative = 0
            for bound, count in zip((*BUCKETS, "+Inf"), histogram.counts):
                cumulative += count
                lines.append(f'flux_request_duration_seconds_bucket{{function="{name}",le="{bound}"}} {cumulative}')
            lines.append(f'flux_request_duration_seconds_sum{{function="{name}"}} {_number(histogram.total)}')
            lines.append(f'flux_request_duration_seconds_count{{function="{name}"}} {histogram.count}')
        _gauge(lines, "flux_requests_running", "Functions executing now.", health.get("running"))
        _gauge(lines, "flux_requests_queued", "Requests waiting for a worker.", health.get("queued"))
        _gauge(lines, "flux_workers", "Functions that may execute at once (--workers).", health.get("workers"))
        _family(lines, "flux_requests_refused_total", "counter", "Requests answered 503 at capacity.", [("", health.get("refused"))])
        _family(lines, "flux_traces_api_refused_total", "counter", "Reads of /_flux/requests refused 401: a missing or wrong API key.",
                [("", self.traces_api_refused)])
        _gauge(lines, "flux_function_load_errors", "Functions that failed to load.", len(health.get("load_errors") or ()))
        _gauge(lines, "flux_reload_failing", "1 while the project's files on disk failed to reload (reload_error).",
               int(health.get("reload_error") is not None))
        traces = health.get("traces")
        if traces is not None:
            _gauge(lines, "flux_traces_pending", "Trace records not written yet.", traces["pending"])
            _gauge(lines, "flux_traces_pending_bytes", "Bytes of the trace records not written yet.", traces["pending_bytes"])
            _gauge(lines, "flux_traces_waiting_seconds", "How long the database has not taken the batch in hand.", traces["waiting_seconds"])
            for key, text in (("written", "written"), ("dropped", "dropped: the queue was full"),
                              ("failed", "refused by the database for what they hold")):
                _family(lines, f"flux_traces_{key}_total", "counter", f"Trace records {text}.", [("", traces[key])])
        database = health.get("database")
        if database is not None and database["reachable"] is not None:
            _gauge(lines, "flux_database_reachable", "1 when the last check of the functions' database answered.",
                   int(database["reachable"]))
        engine = health.get("engine")
        if engine is not None:
            _family(lines, "flux_engine_state", "gauge", "The CDC engine's state in this process (1: the one it is in).",
                    ((f'{{state="{state}"}}', int(engine["state"] == state)) for state in ENGINE_STATES))
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, text: str, samples: Iterable[tuple[str, Any]]) -> None:
    lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {_number(value)}" for labels, value in samples if value is not None]


def _gauge(lines: list[str], name: str, text: str, value: Any) -> None:
    _family(lines, name, "gauge", text, [("", value)])


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
