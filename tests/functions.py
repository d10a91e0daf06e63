"""Helpers for runtime and gateway tests: projects on disk, a real local HTTP stub, a gateway to call.

The stub is a real HTTP server on 127.0.0.1 (these machines have no internet): `/ok` answers
JSON, `/slow` waits `?ms=` before answering, `/jitter` waits a random time up to `?max=` ms (drawn
afresh each call, so that overlapping calls settle in an order of their own each run) and answers
status `?status=` (200 by default) with what it waited and a random token,
`/status/N` answers status N, `/echo` returns
what it was sent, `/cookie` sets the cookie `session=<SESSION_COOKIE>`. Answers framed as
upstreams frame them: `/empty` is 204 with no content-type, `/chunked` chunked text/html (UTF-8,
no charset), `/bytes` the 256 byte values (application/octet-stream), `/headers` repeated
headers (two Set-Cookie, two X-Multi) and a latin-1 byte in X-Name, `/mirror` the bytes it was sent, `/gzip` gzip-encoded JSON.
"""

from __future__ import annotations

import gzip
import json
import random
import textwrap
import threading
import time
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

SESSION_COOKIE = "upstream-session-8c1f0e"


def write_project(root: Path, functions: dict[str, str], toml: str = "") -> Path:
    (root / "functions").mkdir(parents=True, exist_ok=True)
    (root / "flux.toml").write_text(textwrap.dedent(toml) or '[project]\nname = "test"\n')
    for name, source in functions.items():
        (root / "functions" / f"{name}.js").write_text(textwrap.dedent(source).lstrip())
    return root


_GZIPPED = gzip.compress(b'{"zipped": "caf\xc3\xa9"}', mtime=0)
_FRAMED = {
    "/empty": b"HTTP/1.1 204 No Content\r\n\r\n",
    "/chunked": b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ntransfer-encoding: chunked\r\n\r\n"
                b"7\r\n<p>h\xc3\xa9l\r\n6\r\nlo</p>\r\n0\r\n\r\n",
    "/bytes": b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 256\r\n\r\n" + bytes(range(256)),
    "/gzip": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s"
             % (len(_GZIPPED), _GZIPPED),
    "/headers": b"HTTP/1.1 200 OK\r\nset-cookie: a=1; Path=/\r\nset-cookie: b=2; Path=/\r\nx-multi: one\r\nx-multi: two\r\n"
                b"x-name: caf\xe9\r\ncontent-length: 0\r\n\r\n",
}


class _StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append({"path": url.path, "query": url.query, "method": self.command, "headers": dict(self.headers),
                                     "body": body.decode("utf-8", "replace"), "raw": body})
        if url.path in _FRAMED:
            self.wfile.write(_FRAMED[url.path])
            return
        if url.path == "/mirror":
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
            return
        status, payload = 200, {"id": "cus_123", "path": url.path}
        if url.path.startswith("/slow"):
            time.sleep(int(parse_qs(url.query).get("ms", ["2000"])[0]) / 1000)
        elif url.path == "/jitter":
            query = parse_qs(url.query)
            slept = random.uniform(0, float(query.get("max", ["20"])[0]))
            time.sleep(slept / 1000)
            status = int(query.get("status", ["200"])[0])
            payload = {"slept": round(slept, 3), "token": random.getrandbits(32), "query": url.query}
        elif url.path.startswith("/status/"):
            status = int(url.path.rsplit("/", 1)[1])
            payload = {"error": "rate limited" if status == 429 else "failed"}
        elif url.path.startswith("/echo"):
            payload = {"method": self.command, "body": body.decode("utf-8", "replace"), "authorization": self.headers.get("authorization")}
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            if url.path.startswith("/cookie"):
                self.send_header("set-cookie", f"session={SESSION_COOKIE}; HttpOnly")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the caller timed out and left
            pass

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


class Stub:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
        self.server.daemon_threads = True
        self.server.requests = []
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.server.requests

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@asynccontextmanager
async def _gateway_app(root: Path, dsn: str | None, *, sink: Any, workers: int, pool_size: int, record: bool, **queue: Any):
    from flux.gateway.app import Gateway, create_app
    from flux.project import load_project
    from flux.runtime.fetch import AiohttpTransport
    from flux.runtime.host import DbPool

    pool = None
    if dsn is not None:
        pool = DbPool(dsn, min_size=1, max_size=16, open=False)
        await pool.open(wait=True)
    transport = AiohttpTransport()
    gateway = Gateway(load_project(root), transport=transport, db_pool=pool, sink=sink, workers=workers,
                      pool_size=pool_size, record=record, **queue)
    try:
        yield gateway, create_app(gateway)
    finally:
        await transport.aclose()
        if pool is not None:
            await pool.close()


@asynccontextmanager
async def running_gateway(root: Path, dsn: str | None, *, sink: Any = None, workers: int = 64, pool_size: int = 2,
                          record: bool = True, **queue: Any):
    """A Gateway over a real database pool and real HTTP, with its Quart test client. `queue`:
    the Gateway's max_queue and queue_timeout."""
    async with _gateway_app(root, dsn, sink=sink, workers=workers, pool_size=pool_size, record=record, **queue) as (gateway, app):
        async with app.test_app() as test_app:
            yield gateway, test_app.test_client()


@asynccontextmanager
async def served_gateway(root: Path, dsn: str | None = None, *, sink: Any = None):
    """A Gateway served by real Hypercorn on a free port, and `exchange(request) -> (status, headers,
    body)` that sends raw HTTP/1.1 bytes and reads the answer as it came on the wire (the test
    client rebuilds a response, adding a content-length and a content-type of its own).
    `headers` is a list of (lower-cased name, value), repeated headers included."""
    import asyncio

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from flux.gateway.server import bind_sockets

    [sock] = bind_sockets("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = config.errorlog = None
    stop = asyncio.Event()

    async def exchange(request: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # the request says `connection: close`
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
        return int(status_line.split()[1]), headers, body

    async with _gateway_app(root, dsn, sink=sink, workers=8, pool_size=1, record=True) as (gateway, app):
        server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))
        for _ in range(200):  # until it listens
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        try:
            yield gateway, exchange
        finally:
            stop.set()
            await server
