"""Redaction: what looking for every secret of a project costs per trace record.

    .venv/bin/python bench/redaction.py

One record shaped as the gateway bench's `item` request writes it (gateway, function, an INSERT
and a stub call: about 2 KB as JSON) holds no secret, as most records do; it is redacted for
projects of 1, 10, 50 and 500 tenants of three secrets each (plus two of the request's own), and
once more with a secret in it, which the walk then replaces. Prints microseconds per record
(the median of five runs); in-process, no database.
"""

from __future__ import annotations

import copy
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.redaction import Redactor  # noqa: E402 -- after the path is set

OWN = {"STRIPE_KEY": "sk_live_4f9a3b2c_DO_NOT_LEAK", "SLACK": "xoxb-1234567890-abcdefghij"}


def _span(name: str, **attributes: object) -> dict:
    return {"id": "0123456789abcdef", "parent": "fedcba9876543210", "name": name, "kind": "client", "start": 1.7e12,
            "duration_ms": 1.234, "status": "ok", "error": None, "attributes": attributes, "events": []}


RECORD = {
    "path": "/item",
    "spans": [
        _span("gateway", **{"flux.kind": "gateway", "http.method": "POST", "http.target": "/item", "http.status_code": 200}),
        _span("item", **{"flux.kind": "function", "code.filepath": "functions/item.js", "flux.code_version": "abcdef0123456789"}),
        _span("db.insert(items)", **{"flux.kind": "db", "db.system": "postgresql", "db.rows": 1,
                                     "db.statement": "INSERT INTO items (n) VALUES ($1) RETURNING id", "code.location": "functions/item.js:2:30"}),
        _span("fetch 127.0.0.1:4010", **{"flux.kind": "fetch", "http.method": "POST", "http.url": "http://127.0.0.1:4010/v1/charges",
                                         "http.status_code": 200, "code.location": "functions/item.js:3:30"}),
    ],
    "request": {"headers": {"host": "localhost:8000", "user-agent": "bench/1.0", "accept": "*/*", "content-type": "application/json",
                            "content-length": "9", "authorization": "[redacted]"},
                "query": {}, "body": {"n": 12345}, "body_truncated": False, "body_bytes": 9},
    "response": {"headers": {"content-type": "application/json", "x-flux-request-id": "550e8400-e29b-41d4-a716-446655440000"},
                 "body": {"id": 42, "charge": "ch_123"}, "body_truncated": False, "body_bytes": 30},
    "recording": {"v": 2, "truncated": False, "entropy": "", "events": [
        [0, "db", {"sql": "INSERT INTO items (n) VALUES ($1) RETURNING id", "params": [12345],
                   "result": {"rows": [{"id": 42}], "rowCount": 1, "command": "INSERT"}}],
        [1, "settled", 0],
        [2, "fetch", {"url": "http://127.0.0.1:4010/v1/charges", "method": "POST", "headers": {}, "body": "{\"id\":12345}",
                      "status": 200, "status_text": "OK", "url_final": "http://127.0.0.1:4010/v1/charges",
                      "response_headers": {"content-type": "application/json"}, "response_body": "{\"id\":\"ch_123\"}"}],
        [3, "settled", 2]]},
    "error": None,
}


def per_record_us(redactor: Redactor, record: dict, number: int = 2000) -> float:
    runs = [timeit.timeit(lambda: redactor.redact(record, OWN), number=number) / number * 1e6 for _ in range(5)]
    return statistics.median(runs)


def main() -> None:
    for tenants in (1, 10, 50, 500):
        values = [*OWN.values(), *(f"tenant{t}-secret{s}-{t * 7919 + s:08d}Xy" for t in range(1, tenants) for s in range(3))]
        redactor = Redactor(values)
        print(f"{tenants:>4} tenants, {len(redactor.forms):>5} forms: {per_record_us(redactor, RECORD):8.1f} us per record")
    hit = copy.deepcopy(RECORD)
    hit["recording"]["events"][2][2]["body"] = OWN["STRIPE_KEY"]
    print(f"   1 tenant, a secret in the record: {per_record_us(Redactor(OWN.values()), hit):8.1f} us per record")


if __name__ == "__main__":
    main()
