"""`ctx.fetch` on the host: the allow-list, the span's tool name, and the outbound call itself.

`Transport` is the seam for outbound calls: `AiohttpTransport` in production (aiohttp costs
about a fifth of httpx's CPU per call, and outbound calls were most of the gateway's Python
work); its connections are `UpstreamConnection`s, closed when bytes come that answer no request.
`FetchPolicy` applies the allow-list of flux.toml's [fetch], refuses a request HTTP cannot carry as
the function wrote it, and names spans after [tools]. The request protocol around a call (its span, its tape entry, the function's Response) is the
executor's and the prelude's.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import ContentEncodingError, ContentLengthError, HttpProcessingError, TransferEncodingError
from yarl import URL

from flux.project import FetchConfig
from flux.runtime.host import HostCallError

MAX_RECORDED_FETCH_BODY = 1024 * 1024
# A ctx.fetch response is read whole into the gateway's memory (the isolate's limit does not cover
# it), so it is refused past this.
MAX_FETCH_RESPONSE_BYTES = 16 * 1024 * 1024
# The gateway's outbound connections, for every request (aiohttp's default).
MAX_CONNECTIONS = 100


@dataclass(frozen=True, slots=True)
class FetchResult:
    """An upstream response as `ctx.fetch` gives it. `headers` has lower-cased names, each value
    its bytes as latin-1 (one character per byte, as fetch's Headers has them), and a repeated
    header's values joined with ", " (as Headers.get joins them); `set_cookies` has each
    Set-Cookie value, which a join would garble. `body` is the body's bytes (any Content-Encoding
    undone); `text` is them decoded with the declared charset, else as UTF-8, a byte that does not
    decode becoming U+FFFD."""

    status: int
    headers: dict[str, str]
    body: bytes
    text: str
    url: str
    reason: str = ""
    set_cookies: tuple[str, ...] = ()


class Transport(Protocol):
    """Outbound HTTP. Raises `TimeoutError` on timeout and `OSError` when the call cannot be made."""

    async def send(self, method: str, url: str, headers: dict[str, str], body: bytes | None, timeout_s: float) -> FetchResult: ...


class AiohttpTransport:
    """`ctx.fetch` over one aiohttp session (its connection pool), made at the first call: it
    needs the running loop. Redirects are not followed, proxies from the environment are not
    used, and cookies are never kept: a cookie one request receives must not reach another's
    call (another tenant's, even). The request's content-type is the caller's alone (aiohttp
    would add application/octet-stream to any body)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def send(self, method: str, url: str, headers: dict[str, str], body: bytes | None, timeout_s: float) -> FetchResult:
        if self._session is None:
            # A host that stops answering holds its connections until each call's timeout: it may
            # hold half of them, so that calls to other hosts (other tenants') still get one.
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=MAX_CONNECTIONS // 2)
            # The protocol each new connection gets (aiohttp has no public hook for it).
            connector._factory = functools.partial(UpstreamConnection, loop=asyncio.get_running_loop())
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        try:
            async with self._session.request(
                method, url, headers=headers, data=body, skip_auto_headers=_NO_AUTO_HEADERS,
                allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                if not 100 <= response.status <= 599 or response.status == 101:
                    # Out of HTTP's range (RFC 9110), or a switch to another protocol on this connection,
                    # which a function cannot speak: fetch fails either as a network error.
                    raise OSError(f"the server's answer is not valid HTTP for fetch (status {response.status})")
                content = await _read_capped(response)
                charset = response.charset
        except TimeoutError:  # aiohttp's timeouts are asyncio's, which are TimeoutError since 3.11
            raise TimeoutError(f"no response within {timeout_s * 1000:.0f} ms") from None
        except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a URL aiohttp cannot send to
            raise OSError(_client_error_text(exc)) from None
        headers_in: dict[str, str] = {}
        cookies: list[str] = []
        # raw_headers: aiohttp's own values decode the bytes as UTF-8, a byte that is not becoming
        # a lone surrogate, which JSON (and so the function) cannot take.
        for raw_name, raw_value in response.raw_headers:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            if name == "set-cookie":
                cookies.append(value)
            headers_in[name] = f"{headers_in[name]}, {value}" if name in headers_in else value
        return FetchResult(status=response.status, headers=headers_in, body=content, text=_decode(content, charset),
                           url=str(response.url), reason=_reason(response.reason or ""), set_cookies=tuple(cookies))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class UpstreamConnection(ResponseHandler):
    """A connection to an upstream that is closed as soon as it receives bytes that answer no
    request: an answer the server sent unasked, or past the end of the one asked for. aiohttp
    parses whatever comes while a connection waits in its pool and queues it for the next request
    sent on it: that request (another tenant's, even) read the stray answer as its own, and every
    later request on the connection got the answer of the one before it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._awaiting = False  # a request was sent on this connection and its answer is not all in
        self._answer: Any = None  # that answer's body, once its head came

    def set_response_params(self, **params: Any) -> None:  # aiohttp calls it for each request it sends here
        self._awaiting, self._answer = True, None
        super().set_response_params(**params)

    def feed_data(self, data: Any, size: int = 0) -> None:  # a parsed answer: (head, body)
        code = data[0].code
        if 100 <= code < 200 and code != 101:  # an interim answer (100 Continue, 103 Early Hints)
            pass
        elif self._awaiting and self._answer is None:
            self._answer = data[1]
        else:
            self._stray()
            return
        super().feed_data(data, size)

    def data_received(self, data: bytes) -> None:
        if data and not self._awaiting:
            self._stray()
            return
        super().data_received(data)
        if self._answer is not None and self._answer.is_eof():
            self._awaiting = False

    def _stray(self) -> None:
        self._awaiting = False
        if self.transport is not None:
            self.transport.close()  # never reused: the pool takes only connected ones


def _client_error_text(exc: Exception) -> str:
    """The HTTP client's error as the function and `flux why` show it. A connect error names the
    host and the system's reason ("connection refused"), not aiohttp's own text ("Cannot connect to
    host ... ssl:default [Connect call failed ...]")."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"could not connect to {exc.host}:{exc.port}: its TLS certificate was refused ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        if isinstance(cause, socket.gaierror):  # its errno is the resolver's, which os.strerror does not know
            reason = f"its name did not resolve ({cause.strerror})"
        elif cause.errno:
            reason = os.strerror(cause.errno).lower()  # asyncio's own text quotes the address as a tuple
        else:
            reason = str(cause) or type(cause).__name__
        return f"could not connect to {exc.host}:{exc.port}: {reason}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without an answer"
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, HttpProcessingError):
        cause = cause.__cause__
    if cause is not None:  # the answer did not parse: aiohttp's text says "400", a status nobody sent
        while isinstance(cause.__cause__, HttpProcessingError):  # the parser's own, with its own class
            cause = cause.__cause__
        # Its first line, without the bytes it quotes (a caret under a copy of the line, or a repr).
        said = (cause.message or type(cause).__name__).split("\n")[0].split(": b'")[0].split(". Please install")[0].rstrip(":. ")
        if isinstance(cause, (ContentLengthError, TransferEncodingError)):
            return f"the server's response body ended early ({said})"
        if isinstance(cause, ContentEncodingError):
            return f"the server's response body did not decode ({said})"
        return f"the server's answer is not valid HTTP ({said})"
    return f"{type(exc).__name__}: {exc}"


_NO_AUTO_HEADERS = frozenset({"Content-Type"})


def _reason(text: str) -> str:
    """The status line's reason phrase. aiohttp reads it as UTF-8, a byte that is not becoming a lone
    surrogate (an old server's latin-1 "Non trouv\xe9"), which JSON cannot carry to the function: writing
    the settle raised inside Flux, a 500. Such a phrase is read one character per byte, as headers are."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("latin-1")
    return text


def _decode(content: bytes, charset: str | None) -> str:
    """The body as text: its declared charset, else UTF-8 (JSON's, and the web's default), never
    failing. (aiohttp's get_encoding() guesses, and refuses a body read as a stream.)"""
    codec = text_codec(charset) if charset else None
    return content.decode(codec or "utf-8", "replace")


# Python's codecs that are no charset: they rewrite the bytes they read (`\x41` into `A`), or
# refuse every byte whatever the error handler says (`undefined`, `idna` and `punycode` raise
# UnicodeError: a declared `charset=undefined` failed inside Flux, a 500).
NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined"})


def text_codec(charset: str) -> str | None:
    """Python's codec for a declared charset; None for one Python does not know, or a codec that is
    no charset (NOT_CHARSETS, and bytes-to-bytes codecs such as base64)."""
    try:
        info = codecs.lookup(charset)
    except LookupError:
        return None
    if info.name in NOT_CHARSETS or not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    """The body as the function gets it (decompressed), refused (OSError) past
    MAX_FETCH_RESPONSE_BYTES before it is all in memory. Counted as it is decoded: a declared
    Content-Length counts compressed bytes, and 30 KB of gzip can be 30 MB."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_FETCH_RESPONSE_BYTES:
            raise OSError(f"the response body is over {MAX_FETCH_RESPONSE_BYTES // (1024 * 1024)} MB, the most ctx.fetch reads")
        chunks.append(chunk)
    return b"".join(chunks)


# RFC 9110's token (a method, a header name), and what would end a header's line early.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LINE_BREAKING = re.compile(r"[\0\r\n]")
# fetch refuses them: CONNECT would open a tunnel, TRACE and TRACK echo the request's headers back.
_FORBIDDEN_METHODS = frozenset({"CONNECT", "TRACE", "TRACK"})
# Headers that frame the body or manage the connection, which ctx.fetch refuses as undici does.
_CLIENTS_HEADERS = ("transfer-encoding", "upgrade", "keep-alive")


def _type_error(message: str) -> HostCallError:
    return HostCallError({"name": "TypeError", "message": f"ctx.fetch: {message}"})


def connected_host(host: str) -> str:
    """A host as the HTTP client (yarl) connects to it: lower case, a non-ASCII name in punycode
    (UTS #46), an IPv6 address in its shortest form; one it refuses, lower-cased."""
    try:
        return URL.build(scheme="http", host=host).raw_host or host.lower()
    except ValueError:
        return host.lower()


def _allow_entry(entry: str) -> tuple[str, str | None]:
    """An allow-list entry, host or host:port ([v6]:port, or a bare IPv6 address), as (connected
    host, port or None)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, None
    return connected_host(host), port


class FetchPolicy:
    """The allow-list and the host-to-tool map of flux.toml [fetch] and [tools]."""

    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        # The allow-list as (host, port or None), each host as the HTTP client connects to it.
        self._allowed = None if config.allow is None else frozenset(map(_allow_entry, config.allow))

    def parse(self, url: str) -> tuple[str, str]:
        """(host, host:port) of an absolute http(s) URL, the host spelled as in the URL (a secret
        in it is then the text redaction knows), an IPv6 one in its brackets ("[::1]:8080", not
        the ambiguous "::1:8080"); HostCallError otherwise."""
        try:
            parts = urlsplit(url)
            port = parts.port  # ValueError when out of range or not a number
        except ValueError as exc:
            raise HostCallError({"name": "TypeError", "message": f"ctx.fetch: {url!r} is not a valid URL ({exc})"}) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HostCallError({"name": "TypeError", "message": f"ctx.fetch needs an absolute http(s) URL, not {url!r}"})
        if "@" in parts.netloc:
            # As the Fetch standard refuses them. The HTTP client would send them base64-encoded
            # (Basic auth), a form of a secret that redaction cannot know, and an upstream may echo it.
            raise HostCallError({"name": "TypeError", "message": "ctx.fetch: a URL with credentials (user:password@host) "
                                 "is refused, as fetch refuses it; send them in an authorization header"})
        written = parts.netloc  # the host as written (parts.hostname is lower-cased)
        host = written[:written.find("]") + 1] if written.startswith("[") else written.partition(":")[0]
        return host, f"{host}:{port or (443 if parts.scheme == 'https' else 80)}"

    def check(self, host: str, hostport: str) -> None:
        """HostCallError unless the allow-list lets calls reach `host`: compared as the HTTP client
        connects to it, so hosts match in any case, an IPv6 host with or without its brackets, and
        a non-ASCII one as written or in punycode (as a URL object gives it)."""
        if self._allowed is None:
            return
        connected = connected_host(host.strip("[]"))
        if (connected, None) not in self._allowed and (connected, hostport.rpartition(":")[2]) not in self._allowed:
            raise HostCallError({
                "name": "FetchNotAllowed",
                "message": f"outbound calls to {hostport} are not allowed: add it to [fetch] allow in flux.toml",
            })

    def check_request(self, url: str, method: str, headers: dict[str, str], body_size: int) -> None:
        """HostCallError (a TypeError, as fetch throws one) for a request HTTP cannot carry as the
        function wrote it: a method or header name that is no token, a value with NUL, CR or LF
        (request splitting: the rest of the value a header, or a request, of the function's making),
        a method fetch forbids, or framing of the function's own (below); FetchNotAllowed for a
        `host` header naming a host outside the allow-list (the upstream would serve that host,
        when it serves several: a CDN's, a proxy's). Checked on the host, where the function cannot
        replace the builtins that check."""
        if not _TOKEN.fullmatch(method):
            raise _type_error(f"{method!r} is not a valid HTTP method")
        if method in _FORBIDDEN_METHODS:
            raise _type_error(f"{method} is a method fetch refuses")
        for name, value in headers.items():
            if not _TOKEN.fullmatch(name):
                raise _type_error(f"{name!r} is not a valid header name")
            if _LINE_BREAKING.search(value):
                raise _type_error(f"the value of header {name!r} holds a NUL, CR or LF")
        # The body's framing and the connection are the HTTP client's: aiohttp sent a
        # content-length of the function's with the body cut to it, or short of it, and a
        # transfer-encoding: chunked with the body unchunked and a content-length of its own, so
        # an upstream read the rest of the body, or the next call on that kept-alive connection
        # (another tenant's), as a request.
        length = headers.get("content-length")
        if length is not None and length != str(body_size):
            raise _type_error(f"the content-length header says {length!r}, and the body is {body_size} bytes: leave it to ctx.fetch")
        for name in _CLIENTS_HEADERS:
            if name in headers:
                raise _type_error(f"the {name} header is the HTTP client's to set")
        if headers.get("connection", "close").lower() not in ("close", "keep-alive"):
            raise _type_error("the connection header can only be close or keep-alive")
        if "host" in headers and self.config.allow is not None:
            try:
                host, hostport = self.parse(f"{urlsplit(url).scheme}://{headers['host']}/")
            except HostCallError:
                raise _type_error(f"the host header {headers['host']!r} is no host[:port]") from None
            self.check(host, hostport)

    def span_name(self, url: str, host: str, hostport: str, explicit: str | None) -> str:
        if explicit:
            return str(explicit)
        tools = self.config.tools
        tool = tools.get(hostport.lower()) or tools.get(host.lower()) or tools.get(host.strip("[]").lower())
        if tool is None:
            return f"fetch {hostport}"
        segments = [s for s in urlsplit(url).path.split("/") if s]
        return f"{tool}.{segments[-1]}" if segments else tool
