"""The `Transport` contract behind `ctx.fetch`, against a real local HTTP server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from flux.pg.cluster import free_port
from flux.runtime.host import AiohttpTransport


async def _server(reply: Callable[[str, dict[str, str], bytes], bytes]) -> tuple[asyncio.Server, str]:
    """An HTTP/1.1 server whose answer to each request is `reply(target, headers, body)`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                lines = head.split("\r\n")
                target = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                writer.write(reply(target, headers, body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):  # the client left, or the test ended
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _response(status: str, body: bytes, *extra: str) -> bytes:
    head = "\r\n".join([f"HTTP/1.1 {status}", f"content-length: {len(body)}", *extra])
    return head.encode() + b"\r\n\r\n" + body


def _echo(target: str, headers: dict[str, str], body: bytes) -> bytes:
    if target == "/redirect":
        return _response("302 Found", b"", "Location: /elsewhere")
    if target == "/cookie":
        return _response("200 OK", b"set", "Set-Cookie: session=tenant-a-secret; Path=/")
    if target == "/slow":
        return b""  # never answers
    echoed = json.dumps({"target": target, "headers": headers, "body": body.decode()}).encode()
    return _response("201 Created", echoed, "Content-Type: application/json; charset=utf-8", "X-Answer: 42")


@asynccontextmanager
async def _echo_transport() -> AsyncIterator[tuple[AiohttpTransport, str]]:
    """A transport and the base URL of an `_echo` server, both closed afterwards."""
    server, base = await _server(_echo)
    transport = AiohttpTransport()
    try:
        yield transport, base
    finally:
        await transport.aclose()
        server.close()


def test_a_call_returns_status_reason_lower_cased_headers_and_the_body_as_text():
    async def main() -> None:
        async with _echo_transport() as (transport, base):
            result = await transport.send("POST", base + "/v1/charges", {"X-Key": "k"}, '{"amount": 5}', 5.0)
        assert (result.status, result.reason, result.url) == (201, "Created", base + "/v1/charges")
        assert result.headers["x-answer"] == "42" and result.headers["content-type"].startswith("application/json")
        sent = json.loads(result.body)
        assert (sent["target"], sent["body"], sent["headers"]["x-key"]) == ("/v1/charges", '{"amount": 5}', "k")

    asyncio.run(main())


def test_redirects_are_returned_not_followed():
    async def main() -> None:
        async with _echo_transport() as (transport, base):
            result = await transport.send("GET", base + "/redirect", {}, None, 5.0)
        assert (result.status, result.headers["location"]) == (302, "/elsewhere")

    asyncio.run(main())


def test_a_cookie_one_call_receives_is_never_sent_on_a_later_call():
    async def main() -> None:
        async with _echo_transport() as (transport, base):
            await transport.send("GET", base + "/cookie", {}, None, 5.0)
            later = json.loads((await transport.send("GET", base + "/echo", {}, None, 5.0)).body)
        assert "cookie" not in later["headers"]

    asyncio.run(main())


def test_a_call_without_an_answer_in_time_raises_timeout_error():
    async def main() -> None:
        async with _echo_transport() as (transport, base):
            with pytest.raises(TimeoutError, match="no response within 200 ms"):
                await transport.send("GET", base + "/slow", {}, None, 0.2)

    asyncio.run(main())


def test_a_call_that_cannot_connect_raises_os_error():
    async def main() -> None:
        transport = AiohttpTransport()
        try:
            with pytest.raises(OSError):
                await transport.send("GET", f"http://127.0.0.1:{free_port()}/", {}, None, 5.0)
        finally:
            await transport.aclose()

    asyncio.run(main())


def test_proxies_from_the_environment_are_not_used(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there

    async def main() -> None:
        async with _echo_transport() as (transport, base):
            result = await transport.send("GET", base + "/echo", {}, None, 5.0)
        assert result.status == 201

    asyncio.run(main())


@pytest.mark.parametrize("framing", ["content-length: 30", "connection: close"])
def test_a_response_body_over_the_cap_raises_os_error_whether_or_not_it_declares_its_length(monkeypatch, framing):
    from flux.runtime import host

    monkeypatch.setattr(host, "MAX_FETCH_RESPONSE_BYTES", 10)

    def reply(target: str, headers: dict[str, str], body: bytes) -> bytes:
        return f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode() + b"x" * 30

    async def main() -> None:
        server, base = await _server(reply)
        transport = AiohttpTransport()
        try:
            with pytest.raises(OSError, match="the response body is over"):
                await transport.send("GET", base + "/big", {}, None, 5.0)
        finally:
            await transport.aclose()
            server.close()

    asyncio.run(main())
