"""A local stand-in for a payment API (Stripe-shaped), so the example runs offline.

    python3 stubs/payments.py            # answers at once on http://127.0.0.1:4010
    python3 stubs/payments.py --slow     # waits 10 s before each answer (or STUB_SLOW=1)
    python3 stubs/payments.py --port 4011   # or PORT=4011

POST /v1/customers and POST /v1/charges answer 200 with JSON carrying a fresh id; any other
path answers 404. --slow makes create_user's ctx.fetch hit its timeout ([fetch] timeout_ms
in flux.toml is 2000), so you can watch a failed request in `flux trace`.

Standard library only. It keeps nothing: every answer is made up from the request.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_SECONDS = 10.0
PREFIXES = {"/v1/customers": "cus", "/v1/charges": "ch"}


class PaymentsHandler(BaseHTTPRequestHandler):
    server_version = "payments-stub/1"
    slow = False

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        prefix = PREFIXES.get(self.path.split("?", 1)[0].rstrip("/"))
        if prefix is None:
            self._answer(404, {"error": {"message": f"no such endpoint: POST {self.path}"}})
            return
        try:
            fields = json.loads(raw) if raw else {}
        except ValueError:
            self._answer(400, {"error": {"message": "body must be JSON"}})
            return
        if self.slow:
            time.sleep(SLOW_SECONDS)
        obj = {"id": f"{prefix}_{secrets.token_hex(7)}", "object": "customer" if prefix == "cus" else "charge",
               "created": int(time.time()), "livemode": False}
        if isinstance(fields, dict):
            obj.update({k: v for k, v in fields.items() if k not in obj})
        self._answer(200, obj)

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the caller gave up (a timed-out fetch); nothing to tell it

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"payments-stub: {format % args}\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local payment API stub for the Flux example.")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "4010")))
    parser.add_argument("--slow", action="store_true", default=os.environ.get("STUB_SLOW", "") not in ("", "0"),
                        help=f"wait {SLOW_SECONDS:.0f} s before every answer")
    args = parser.parse_args(argv)
    PaymentsHandler.slow = args.slow
    server = ThreadingHTTPServer((args.host, args.port), PaymentsHandler)
    server.daemon_threads = True
    mode = f"slow: every answer waits {SLOW_SECONDS:.0f} s" if args.slow else "fast"
    print(f"payments-stub listening on http://{args.host}:{server.server_port} ({mode})", flush=True)
    print("  POST /v1/customers -> {\"id\": \"cus_...\"}   POST /v1/charges -> {\"id\": \"ch_...\"}", flush=True)
    print("  Ctrl-C stops it.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
