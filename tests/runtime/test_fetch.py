"""`flux.runtime.fetch`: the allow-list, and the `Transport` contract behind `ctx.fetch` against a real local HTTP server."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from flux.pg.cluster import free_port
from flux.project import FetchConfig
from flux.runtime.fetch import AiohttpTransport, FetchPolicy
from flux.runtime.host import HostCallError


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


def test_a_call_returns_status_reason_lower_cased_headers_and_the_body_as_bytes_and_text():
    async def main() -> None:
        async with _echo_transport() as (transport, base):
            result = await transport.send("POST", base + "/v1/charges", {"X-Key": "k"}, b'{"amount": 5}', 5.0)
        assert (result.status, result.reason, result.url) == (201, "Created", base + "/v1/charges")
        assert result.headers["x-answer"] == "42" and result.headers["content-type"].startswith("application/json")
        sent = json.loads(result.text)
        assert (sent["target"], sent["body"], sent["headers"]["x-key"]) == ("/v1/charges", '{"amount": 5}', "k")
        assert result.body == result.text.encode()
        assert "content-type" not in sent["headers"]  # the caller's to set: no application/octet-stream added

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
            later = json.loads((await transport.send("GET", base + "/echo", {}, None, 5.0)).text)
        assert "cookie" not in later["headers"]

    asyncio.run(main())


def test_a_call_without_an_answer_in_time_raises_timeout_error():
    async def main() -> None:
        async with _echo_transport() as (transport, base):
            with pytest.raises(TimeoutError, match="no response within 200 ms"):
                await transport.send("GET", base + "/slow", {}, None, 0.2)

    asyncio.run(main())


async def _failure(url: str) -> str:
    """The text of the OSError a call to `url` raises, from a transport of its own."""
    transport = AiohttpTransport()
    try:
        with pytest.raises(OSError) as failed:
            await transport.send("GET", url, {}, None, 5.0)
    finally:
        await transport.aclose()
    return str(failed.value)


def test_a_call_that_cannot_connect_raises_os_error_naming_the_host_and_the_reason():
    """It quoted aiohttp's text: "ClientConnectorError: Cannot connect to host 127.0.0.1:N
    ssl:default [Connect call failed ('127.0.0.1', N)]"."""
    port = free_port()
    assert asyncio.run(_failure(f"http://127.0.0.1:{port}/")) == f"could not connect to 127.0.0.1:{port}: connection refused"


def test_a_host_whose_name_does_not_resolve_is_said_so():
    text = asyncio.run(_failure("http://flux-test.invalid/"))  # .invalid never resolves (RFC 6761)
    assert text.startswith("could not connect to flux-test.invalid:80: its name did not resolve (")


def test_a_server_that_closes_without_answering_is_said_so():
    async def main() -> str:
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
        try:
            return await _failure(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        finally:
            server.close()

    assert asyncio.run(main()) == "the server closed the connection without an answer"


def test_proxies_from_the_environment_are_not_used(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there

    async def main() -> None:
        async with _echo_transport() as (transport, base):
            result = await transport.send("GET", base + "/echo", {}, None, 5.0)
        assert result.status == 201

    asyncio.run(main())


GZIPPED = gzip.compress(b"x" * 3000)


@pytest.mark.parametrize("framing", ["content-length: 300", "connection: close",
                                     f"content-length: {len(GZIPPED)}\r\ncontent-encoding: gzip"],
                         ids=["declared", "undeclared", "gzip"])
def test_a_response_body_over_the_cap_raises_os_error_however_it_is_framed(monkeypatch, framing):
    """Counted as decoded: a gzip body's Content-Length counts its compressed bytes."""
    from flux.runtime import fetch

    monkeypatch.setattr(fetch, "MAX_FETCH_RESPONSE_BYTES", 100)
    assert len(GZIPPED) < 100

    def reply(target: str, headers: dict[str, str], body: bytes) -> bytes:
        return f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode() + (GZIPPED if "gzip" in framing else b"x" * 300)

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


async def _answer(raw: bytes) -> tuple[int, dict[str, str], tuple[str, ...], bytes, str]:
    """What the transport makes of `raw`, an upstream's whole answer to any request."""
    result = await _transport_result(raw)
    return result.status, result.headers, result.set_cookies, result.body, result.text


@pytest.mark.parametrize(("raw", "text"), [
    (b"HTTP/1.1 204 No Content\r\n\r\n", ""),
    (b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ntransfer-encoding: chunked\r\n\r\n4\r\nh\xc3\xa9l\r\n0\r\n\r\n", "hél"),
    (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ntransfer-encoding: chunked\r\n\r\n"
     b"2\r\n{}\r\n0\r\n\r\n", "{}"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n\xff!\r\n0\r\n\r\n", "\ufffd!"),
    (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=iso-8859-1\r\ncontent-length: 4\r\n\r\ncaf\xe9", "café"),
    (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=no-such\r\ncontent-length: 2\r\n\r\nok", "ok"),
], ids=["204", "chunked-html", "chunked-problem-json", "chunked-no-type", "latin-1-charset", "unknown-charset"])
def test_a_body_is_text_in_its_declared_charset_else_utf_8(raw, text):
    """No Content-Length, no charset: aiohttp's get_encoding() would refuse a body read as a stream."""
    assert asyncio.run(_answer(raw))[4] == text


def test_header_values_are_latin_1_and_repeated_ones_are_all_kept():
    raw = (b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2; Path=/\r\n"
           b"X-Multi: one\r\nx-multi: two\r\ncontent-length: 0\r\n\r\n")
    status, headers, cookies, body, _ = asyncio.run(_answer(raw))
    assert (headers["x-name"], headers["x-multi"], headers["set-cookie"]) == ("café", "one, two", "a=1, b=2; Path=/")
    assert cookies == ("a=1", "b=2; Path=/") and body == b""


@pytest.mark.parametrize(("reason", "text"), [(b"Non trouv\xe9", "Non trouvé"), (b"Caf\xc3\xa9", "Café")], ids=["latin-1", "utf-8"])
def test_a_reason_phrase_that_is_not_utf_8_is_read_one_character_per_byte(reason, text):
    """aiohttp made its byte a lone surrogate, which the settle could not write for the function: a 500 of Flux's own."""
    result = asyncio.run(_transport_result(b"HTTP/1.1 404 " + reason + b"\r\ncontent-length: 0\r\n\r\n"))
    assert (result.status, result.reason) == (404, text)


@pytest.mark.parametrize("charset", ["undefined", "idna", "punycode", "base64", "no-such-charset"])
def test_a_body_declared_in_a_codec_that_is_no_charset_is_read_as_utf_8(charset):
    """`charset=undefined` (Python names the codec but it refuses every byte) raised inside Flux: a 500 of its own."""
    body = "café".encode()
    result = asyncio.run(_transport_result(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=" + charset.encode()
                                           + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body))
    assert (result.status, result.text) == (200, "café")


async def _transport_result(raw: bytes):
    server, base = await _server(lambda target, headers, body: raw)
    transport = AiohttpTransport()
    try:
        return await transport.send("GET", base + "/", {}, None, 5.0)
    finally:
        await transport.aclose()
        server.close()


@pytest.mark.parametrize("entry", ["[::1]:18351", "[::1]", "::1"])
def test_an_ipv6_host_matches_its_allow_entry_and_is_named_in_brackets(entry):
    policy = FetchPolicy(FetchConfig(allow=(entry,)))
    host, hostport = policy.parse("http://[::1]:18351/v1")
    assert hostport == "[::1]:18351"
    policy.check(host, hostport)  # allowed: no error
    with pytest.raises(HostCallError) as refused:
        policy.check(*policy.parse("http://[::2]:18351/v1"))
    assert refused.value.info["message"] == "outbound calls to [::2]:18351 are not allowed: add it to [fetch] allow in flux.toml"


@pytest.mark.parametrize("url", ["http://usr:pw-9Kq@127.0.0.1:18351/v1", "http://pw-9Kq@127.0.0.1:18351/v1", "https://:pw-9Kq@example.com/"])
def test_a_url_with_credentials_is_refused_as_fetch_refuses_it(url):
    """The HTTP client would send them as Basic auth: the secret base64-encoded, which redaction cannot know."""
    with pytest.raises(HostCallError) as refused:
        FetchPolicy(FetchConfig()).parse(url)
    assert refused.value.info["name"] == "TypeError" and "credentials" in refused.value.info["message"]
    assert "pw-9Kq" not in refused.value.info["message"]


async def _calls_on_one_upstream(first: bytes, stray: bytes, paths: list[str]) -> tuple[list[bytes], int]:
    """The bodies `paths`' calls get, one after another, from an upstream that answers the first
    request with `first`, then sends `stray` unasked 50 ms later, and answers each later request
    with the number of the connection it came on; and how many connections were made."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /first "):
                    writer.write(first)
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(stray)
                else:
                    writer.write(_response("200 OK", b"connection %d" % number))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    transport = AiohttpTransport()
    try:
        bodies = []
        for path in paths:
            bodies.append((await transport.send("GET", base + path, {}, None, 5.0)).body)
            await asyncio.sleep(0.1)
        return bodies, connections
    finally:
        await transport.aclose()
        server.close()


def test_an_answer_an_upstream_sends_unasked_never_reaches_the_next_call():
    """aiohttp queued it on the pooled connection: the next call (another tenant's, even) got it
    as its answer, and each call after that got the answer of the call before it."""
    stray = _response("200 OK", b"tenant-a-charge")
    bodies, connections = asyncio.run(_calls_on_one_upstream(_response("200 OK", b"first"), stray, ["/first", "/next", "/next"]))
    assert bodies == [b"first", b"connection 2", b"connection 2"] and connections == 2


def test_bytes_past_an_answers_content_length_close_its_connection():
    first = _response("200 OK", b"abc")[:-3] + b"abc" + _response("200 OK", b"tenant-a-charge")
    bodies, connections = asyncio.run(_calls_on_one_upstream(first, b"", ["/first", "/next"]))
    assert bodies == [b"abc", b"connection 2"] and connections == 2


def test_calls_one_after_another_share_one_kept_alive_connection():
    bodies, connections = asyncio.run(_calls_on_one_upstream(b"", b"", ["/next", "/next", "/next"]))
    assert bodies == [b"connection 1"] * 3 and connections == 1


_OK = b"content-length: 2\r\n\r\nok"


@pytest.mark.parametrize(("raw", "said"), [
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
     "the server's answer is not valid HTTP (Invalid character in chunk size)"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 5\r\n\r\nokxyz",
     "the server's answer is not valid HTTP (Duplicate Content-Length)"),
    (b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100_000 + b"\r\n" + _OK,
     "the server's answer is not valid HTTP (Got more than 8190 bytes when reading)"),
    (b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(10_000)) + _OK,
     "the server's answer is not valid HTTP (Too many headers received)"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n" + _OK, "the server's answer is not valid HTTP (Invalid header token)"),
    (b"HTTP/1.1 1000 Weird\r\n" + _OK, "the server's answer is not valid HTTP (Bad status line)"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
     "the server's response body ended early (Not enough data to satisfy content length header (received 3 of 10 bytes))"),
    (b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 5\r\n\r\nabcde",
     "the server's response body did not decode (Can not decode content-encoding: gzip)"),
], ids=["chunk-size", "content-lengths", "100-kb-header", "10000-headers", "no-colon", "status-1000", "short-body", "bad-gzip"])
def test_an_answer_that_is_not_http_raises_os_error_saying_what_is_wrong_in_one_line(raw, said):
    """aiohttp's text read "ClientResponseError: 400, message=..." (a status nobody sent), with the
    URL, and the bytes it quoted under a caret on lines of their own."""
    assert asyncio.run(_failure_of(raw)) == said


@pytest.mark.parametrize("status", [b"099", b"600", b"999", b"101"])
def test_a_status_out_of_http_range_or_a_protocol_switch_raises_os_error(status):
    """They reached the function as a Response (a 101's connection switched to a protocol it cannot speak)."""
    said = asyncio.run(_failure_of(b"HTTP/1.1 " + status + b" Odd\r\nupgrade: x\r\nconnection: upgrade\r\n" + _OK))
    assert said == f"the server's answer is not valid HTTP for fetch (status {int(status)})"


async def _failure_of(raw: bytes) -> str:
    """The text of the OSError a call raises when the upstream answers `raw` and closes."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        return await _failure(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
    finally:
        server.close()


def test_a_host_that_never_answers_leaves_connections_for_calls_to_other_hosts():
    """Its calls held all 100 connections until their timeouts: a call to a healthy host (another
    tenant's) waited for one and timed out."""
    async def main() -> int:
        hung = await asyncio.start_server(lambda reader, writer: asyncio.sleep(30), "127.0.0.1", 0)
        healthy, base = await _server(_echo)
        transport = AiohttpTransport()
        stuck = [asyncio.create_task(transport.send("GET", f"http://127.0.0.1:{hung.sockets[0].getsockname()[1]}/", {}, None, 30.0))
                 for _ in range(110)]
        try:
            await asyncio.sleep(0.3)
            return (await transport.send("GET", base + "/echo", {}, None, 2.0)).status
        finally:
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
            await transport.aclose()
            hung.close()
            healthy.close()

    assert asyncio.run(main()) == 201


@pytest.mark.parametrize(("entry", "url"), [
    ("bücher.example", "http://xn--bcher-kva.example/v1"),  # what new URL("http://bücher.example/v1") gives
    ("xn--bcher-kva.example", "http://BÜCHER.example/v1"),
    ("bücher.example:8080", "http://Bücher.example:8080/v1"),
    ("[::ffff:127.0.0.1]:80", "http://[::FFFF:7f00:1]/v1"),
], ids=["unicode-entry", "punycode-entry", "mixed-case", "ipv6-forms"])
def test_a_host_matches_its_allow_entry_as_the_http_client_connects_to_it(entry, url):
    """An entry written in Unicode refused every call made with a URL object, which gives punycode."""
    policy = FetchPolicy(FetchConfig(allow=(entry,)))
    policy.check(*policy.parse(url))  # allowed: no error


@pytest.mark.parametrize(("entry", "url"), [
    ("faß.de", "http://fass.de/"),  # IDNA 2003 made them one name; the HTTP client does not
    ("api.example", "http://api.example.evil/"),
    ("api.example", "http://api.example./"),
    ("api.example:443", "http://api.example/"),
    ("127.0.0.1", "http://2130706433/"),
    ("127.0.0.1:4010", "http://user@127.0.0.1:4010/"),
], ids=["eszett", "suffix", "trailing-dot", "default-port", "decimal-ip", "userinfo"])
def test_a_host_the_allow_list_does_not_name_is_refused_however_it_is_written(entry, url):
    policy = FetchPolicy(FetchConfig(allow=(entry,)))
    with pytest.raises(HostCallError):
        policy.check(*policy.parse(url))
