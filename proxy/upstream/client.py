"""The client to together.ai: a small keep-alive HTTP/1.1 pool on asyncio + httptools.

Why not aiohttp's client: on the hot path it costs more CPU than everything else the proxy does
per request (see docs/benchmarks.md); this client does only what a proxy needs: one prebuilt
header block, one write, a C parser, body chunks handed over as they arrive.

The upstream origin comes only from operator config (I9): nothing in a request can change where
it goes, redirects are never followed, and only allow-listed headers travel upstream with the
tenant's key replaced by the operator's together key. There is no retry: once bytes may have
reached the upstream, it may bill them.

Every exit path gives the pool slot back: a connection is pooled again only after an exchange
that ended cleanly (whole response read by the parser, keep-alive, request fully written);
anything else (errors, timeouts, cancellation, an early release) closes it and frees its slot.

The environment is read once, when the client is built: HTTPS_PROXY / HTTP_PROXY / NO_PROXY
(an http:// proxy, used with CONNECT) and, through OpenSSL's default verify paths,
SSL_CERT_FILE / SSL_CERT_DIR.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import os
import re
import ssl
import time
import urllib.request
import zlib
from collections.abc import Mapping
from types import TracebackType
from urllib.parse import unquote, urlsplit

import httptools

from proxy.config import Upstream
from proxy.errors import BadRequest, ConfigError, InvalidField, UpstreamError, UpstreamTimeout

# Headers a client may send that are useful upstream and reveal nothing about the tenant.
FORWARDED_HEADERS = ("accept", "user-agent")
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
JSON_CT = "application/json"
HIGH_WATER = 1 << 20  # pause reading from the upstream while this much is buffered
IDLE_KEEPALIVE = 30.0  # drop pooled connections idle longer than this
UNREACHABLE_AFTER = 3  # consecutive attempts that could not reach the upstream: /readyz degrades
PROBE_TIMEOUT = 1.0  # longest a /readyz connect probe waits
MAX_HEAD_BYTES = 64 * 1024  # a response head larger than this (names + values + overhead) is refused
MAX_HEADERS = 200  # ... and so is one with more header fields than this
HEADER_OVERHEAD = 32  # counted per header field on top of its name and value (as HPACK does)
MAX_PROXY_HEAD = 8 * 1024  # the longest answer to CONNECT we read from a proxy
MAX_INFLATE_CHUNK = 64 * 1024 * 1024  # one received chunk of a coded body may inflate to this much

# What a header value we write may hold: visible ASCII, space and tab (no CR, LF, NUL, DEL, or
# non-ASCII that could split or bend the head). The request target: 0x21..0x7E (see _head).
_NOT_FIELD_VALUE = re.compile(r"[^\t\x20-\x7e]")
_PROXY_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})[ \r]")
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_HEAD_SLACK = 8 * 1024  # raw head bytes beyond MAX_HEAD_BYTES: status line, whitespace httptools strips


class UpstreamStreamError(Exception):
    """The upstream connection failed or was cut after the response began, or the response
    cannot be passed on (too large a head, an unsupported or broken Content-Encoding)."""


class UpstreamProxyError(ConnectionError):
    """The HTTP proxy could not open a tunnel to the upstream: counted as not reachable."""


class _Connection(asyncio.Protocol):
    """One upstream connection; carries one exchange at a time."""

    def __init__(self, pool: UpstreamClient) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.counted = False  # holds one of the pool's slots (set by _acquire, cleared by _discard)
        self.idle_since = 0.0
        self._head_raw = 0  # bytes received for the current response until its head was complete
        self._interim = False  # parsing a 1xx answer: the final one follows on the same exchange
        self.single_use = False  # to an object store (store.py): closed after its one exchange
        self._writable: asyncio.Future[None] | None = None  # set while the transport is paused

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is not None and not resp.started:
            self._head_raw += len(data)  # bounds the head's size from above: see on_headers_complete
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            cause = exc.__context__  # what one of our callbacks raised, if it was one of them
            if not isinstance(cause, UpstreamStreamError):
                cause = UpstreamStreamError(f"invalid HTTP from upstream: {exc}")
            self._fail(cause)
            self.abort()
            return
        if resp is not None and not resp.started and self._head_raw > MAX_HEAD_BYTES + _HEAD_SLACK:
            # httptools gathers a header whole before handing it over: bound an endless one
            self._fail(UpstreamStreamError(f"the upstream response head exceeds {MAX_HEAD_BYTES} bytes"))
            self.abort()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport takes more bytes (a streamed request body)."""
        if self._writable is not None and not self.closed:
            await asyncio.shield(self._writable)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()
        resp = self.response
        if resp is None:
            self.pool._forget(self)  # an idle connection the upstream closed: its slot is free now
        elif not resp.complete:
            if resp.started and resp.until_eof:
                try:
                    resp._finish()  # a body delimited by the end of the connection
                except UpstreamStreamError as err:  # ... whose coded body was cut short
                    resp._fail(err)
            else:
                self._fail(UpstreamStreamError("the upstream closed the connection"))

    # -- httptools callbacks (raising one stops the parser: see data_received) --------------

    def on_message_begin(self) -> None:
        resp = self.response
        if resp is None or resp.complete:  # bytes past the end of the answer: out of step
            raise UpstreamStreamError("the upstream sent bytes after its response")

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.response
        assert resp is not None
        resp._raw_headers.append((name, value))  # sizes are checked once, at the end of the head

    def on_headers_complete(self) -> None:
        resp = self.response
        assert resp is not None
        fields = resp._raw_headers
        # The exact count (names + values + HEADER_OVERHEAD per field) is never above the raw
        # bytes received plus HEADER_OVERHEAD per field: only a head that big is counted.
        if len(fields) > MAX_HEADERS or (
            self._head_raw + HEADER_OVERHEAD * len(fields) > MAX_HEAD_BYTES
            and _head_size(fields) > MAX_HEAD_BYTES
        ):
            raise UpstreamStreamError(
                f"the upstream response head exceeds {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} fields"
            )
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                raise UpstreamStreamError("the upstream switched protocols")
            self._interim = True  # 100 Continue, 103 Early Hints: skipped
            fields.clear()
            return
        resp._on_headers(status)

    def on_body(self, body: bytes) -> None:
        resp = self.response
        assert resp is not None
        resp._on_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        resp = self.response
        assert resp is not None
        # (after HEAD too: the parser then reached the end of the message by its own framing)
        resp.keep_alive = self.parser.should_keep_alive()
        resp._finish()

    # -- helpers ----------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self.response is not None:
            self.response._fail(exc)

    def close(self) -> None:
        """Graceful: for connections that are idle (nothing half sent or half read)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """At once, dropping unsent bytes: a request nobody waits for must not be completed."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _head_size(fields: list[tuple[bytes, bytes]]) -> int:
    return sum(len(name) + len(value) for name, value in fields) + HEADER_OVERHEAD * len(fields)


class _Inflater:
    """Incremental decoding of a gzip or deflate body (sent despite our `identity`).

    Each received chunk is decoded as it arrives, so a coded stream still flows chunk by chunk.
    HTTP's "deflate" is zlib-wrapped, but some servers send it raw: the first two bytes tell.
    """

    __slots__ = ("_coding", "_fed", "_gzip", "_pending", "_z")

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._gzip = coding != "deflate"
        self._z = zlib.decompressobj(_GZIP_WBITS) if self._gzip else None
        self._pending = b""
        self._fed = False

    def feed(self, data: bytes) -> bytes:
        self._fed = True
        z = self._z
        if z is None:
            data = self._pending + data  # deflate: the first two bytes tell zlib from raw
            if len(data) < 2:
                self._pending = data
                return b""
            self._pending = b""
            zlib_wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            z = self._z = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
        out: list[bytes] = []
        room = MAX_INFLATE_CHUNK
        try:
            while data:
                if z.eof:
                    if not self._gzip:
                        raise UpstreamStreamError("the upstream sent bytes after its deflate body")
                    z = self._z = zlib.decompressobj(_GZIP_WBITS)  # the next gzip member
                piece = z.decompress(data, room)
                room -= len(piece)
                if z.unconsumed_tail or room <= 0:
                    raise UpstreamStreamError(f"the upstream's {self._coding} body inflates too much")
                out.append(piece)
                data = z.unused_data
        except zlib.error as exc:
            raise UpstreamStreamError(f"invalid {self._coding} body from upstream: {exc}") from exc
        return out[0] if len(out) == 1 else b"".join(out)

    def finish(self) -> bytes:
        """The rest of the decoded body at its end; UpstreamStreamError if it was cut short."""
        if not self._fed:
            return b""  # no body at all (e.g. a 204 that names a coding)
        if self._z is None or not self._z.eof:
            raise UpstreamStreamError(f"the upstream's {self._coding} body is cut short")
        return self._z.flush()


class _NoBody(_Inflater):
    """The body of an answer to HEAD: there is none, whatever the headers say."""

    def __init__(self) -> None:
        super().__init__("identity")

    def feed(self, data: bytes) -> bytes:
        return b""

    def finish(self) -> bytes:
        return b""


_NO_BODY = _NoBody()


def _decoder_for(raw_headers: list[tuple[bytes, bytes]]) -> _Inflater | None:
    """None for no coding or `identity`; UpstreamStreamError for one we cannot decode."""
    codings = [
        c.strip().lower()
        for name, value in raw_headers
        if name.lower() == b"content-encoding"
        for c in value.decode("latin-1").split(",")
    ]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return _Inflater(codings[0])
    raise UpstreamStreamError(f"unsupported Content-Encoding {', '.join(codings)[:80]!r} from upstream")


class UpstreamResponse:
    """Status and headers as soon as they arrive; the body as chunks or whole.

    A gzip/deflate body is decoded on the way (`headers` then lacks content-encoding and
    content-length, which described the coded bytes).
    """

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop, head_only: bool = False) -> None:
        self._conn = conn
        self._loop = loop
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._headers_fut: asyncio.Future[None] = loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._paused = False
        self._decoder: _Inflater | None = None
        self._head_only = head_only  # the answer to HEAD: no body, whatever its headers say
        self.status = 0
        self.headers: dict[str, str] = {}
        self.started = False
        self.complete = False
        self.keep_alive = False
        self.until_eof = False
        self.released = False

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    # -- fed by the connection --------------------------------------------------------------

    def _on_headers(self, status: int) -> None:
        self.status = status
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._raw_headers}
        self.until_eof = "content-length" not in headers and "chunked" not in headers.get(
            "transfer-encoding", ""
        )
        if self._head_only:
            self._decoder = _NO_BODY  # drops whatever body a server might send anyway
        elif "content-encoding" in headers:  # rare: we ask for identity
            self._decoder = _decoder_for(self._raw_headers)
            if self._decoder is not None:
                del headers["content-encoding"]
                headers.pop("content-length", None)
        self.headers = headers
        self.started = True
        if not self._headers_fut.done():
            self._headers_fut.set_result(None)
        if self._head_only:
            self._finish()  # keep_alive stays False unless the parser itself reaches the end

    def _on_body(self, data: bytes) -> None:
        if self._decoder is not None:
            data = self._decoder.feed(data)
            if not data:
                return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        w = self._waiter  # _wake, inline: this runs once per body chunk
        if w is not None and not w.done():
            w.set_result(None)

    def _finish(self) -> None:
        """The body ended; UpstreamStreamError if its coding says it was cut short."""
        if self._decoder is not None:
            tail = self._decoder.finish()
            if tail:
                self._chunks.append(tail)
                self._buffered += len(tail)
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:  # the first cause is the one worth reporting
            self._error = exc
        if not self._headers_fut.done():
            self._headers_fut.set_exception(exc)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- consumed by the relay --------------------------------------------------------------

    async def readany(self) -> bytes:
        """The body bytes received since the last call; b"" at the end of the body."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            await self._waiter
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self._conn.transport is not None:
            self._paused = False
            self._conn.transport.resume_reading()
        return data

    async def read(self, limit: int) -> bytes:
        """The whole body, or UpstreamStreamError past `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await self.readany()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                raise UpstreamStreamError(f"the upstream response exceeds {limit} bytes")
            parts.append(chunk)

    def release(self) -> None:
        """Return the connection to the pool if the exchange ended cleanly, else close it.

        Cleanly: the parser saw the whole response, keep-alive, no error, and the whole request
        left (an answer can come before the end of a large body: those bytes are still queued).
        """
        if self.released:
            return
        self.released = True
        conn = self._conn
        conn.response = None
        transport = conn.transport
        if (
            self.complete
            and self.keep_alive
            and not conn.single_use
            and self._error is None
            and not conn.closed
            and transport is not None
            and transport.get_write_buffer_size() == 0
        ):
            if self._paused:  # complete but not all read: the next exchange must be read
                transport.resume_reading()
            conn.pool._put(conn)
        else:
            conn.pool._discard(conn)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class _Proxy:
    """An HTTP proxy reached with CONNECT. Its credentials live only inside `connect_head`,
    which no repr or message shows."""

    __slots__ = ("connect_head", "host", "port")

    def __init__(self, host: str, port: int, connect_head: bytes) -> None:
        self.host = host
        self.port = port
        self.connect_head = connect_head

    def __repr__(self) -> str:
        return f"_Proxy({self.host}:{self.port})"


def _expire(headers: asyncio.Future[None]) -> None:
    """The first-byte timeout of a request on a pooled connection ran out."""
    if not headers.done():
        headers.set_exception(TimeoutError())


def _field_value_ok(value: str) -> bool:
    return _NOT_FIELD_VALUE.search(value) is None


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _proxy_from_env(scheme: str, host: str, authority: str) -> _Proxy | None:
    """The proxy HTTPS_PROXY (https) or HTTP_PROXY (http) names unless NO_PROXY exempts `host`;
    lower-case names win, as in urllib and curl. ConfigError for a proxy we cannot use."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme)
    # proxy_bypass_environment: stdlib, but missing from typeshed
    if not url or urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
        return None
    names = (f"{scheme}_proxy", f"{scheme.upper()}_PROXY")  # the one urllib took, for messages
    var = next((n for n in names if os.environ.get(n)), names[1])
    if "://" not in url:
        url = "http://" + url  # a bare host:port, as curl reads it
    parts = urlsplit(url)
    if parts.scheme.lower() != "http":  # never echo the URL: it may hold a password
        raise ConfigError(
            "environment", var, f"the proxy must be an http:// URL (CONNECT), not {parts.scheme}://"
        )
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigError("environment", var, "the proxy URL has an invalid port") from None
    if not parts.hostname:
        raise ConfigError("environment", var, "the proxy URL has no host")
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        head += f"Proxy-Authorization: Basic {base64.b64encode(credentials).decode()}\r\n"
    return _Proxy(parts.hostname, port, (head + "\r\n").encode("latin-1"))


class _TunnelReader(asyncio.Protocol):
    """Reads a proxy's answer to CONNECT (at most MAX_PROXY_HEAD bytes); `answered` resolves on
    a 2xx with the transport paused, so no upstream byte is read before its protocol takes over."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answered: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.answered.done():
            return
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0 and len(self._buf) <= MAX_PROXY_HEAD:
            return  # more to come
        if end < 0 or end + 4 > MAX_PROXY_HEAD:
            self._settle(UpstreamProxyError(f"the proxy's answer exceeds {MAX_PROXY_HEAD} bytes"))
            return
        assert self.transport is not None
        self.transport.pause_reading()
        m = _PROXY_STATUS.match(self._buf)
        if m is None or not m.group(1).startswith(b"2"):
            status = m.group(1).decode() if m else "no HTTP status"
            self._settle(UpstreamProxyError(f"the proxy refused the tunnel ({status})"))
        elif end + 4 != len(self._buf):  # the upstream speaks only after us: nothing may follow
            self._settle(UpstreamProxyError("the proxy sent bytes after its answer"))
        else:
            self._settle(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(UpstreamProxyError("the proxy closed the connection"))

    def _settle(self, exc: Exception | None) -> None:
        if self.answered.done():
            return
        if exc is None:
            self.answered.set_result(None)
        else:
            self.answered.set_exception(exc)


class UpstreamClient:
    """A bounded pool of keep-alive connections to the one configured upstream.

    Raises ConfigError when the proxy named by the environment cannot be used.
    """

    def __init__(self, config: Upstream, api_key: str) -> None:
        self.config = config
        self.base = config.url.rstrip("/")
        url = urlsplit(self.base)
        self.scheme = url.scheme
        self.host = url.hostname or "localhost"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base_path = url.path.rstrip("/")  # e.g. /v1
        authority = _authority(self.host, self.port)
        default_port = self.port == (443 if url.scheme == "https" else 80)
        host_header = authority.rsplit(":", 1)[0] if default_port else authority
        # Certificate and hostname verified, SNI sent; OpenSSL's default verify paths honour
        # SSL_CERT_FILE / SSL_CERT_DIR (read here, once; pinned by tests/test_upstream.py).
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._proxy = _proxy_from_env(self.scheme, self.host, authority)
        self._fixed = (
            f"Host: {host_header}\r\nAuthorization: Bearer {api_key}\r\nAccept-Encoding: identity\r\n"
        ).encode("latin-1")
        self._idle: collections.deque[_Connection] = collections.deque()
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # start()'s (get_running_loop: a syscall)
        self._open = 0
        self._closed = False
        self.failed_attempts = 0  # consecutive requests that could not connect, or were reset before headers

    @property
    def reachable(self) -> bool:
        """False after UNREACHABLE_AFTER requests in a row could not reach the upstream."""
        return self.failed_attempts < UNREACHABLE_AFTER

    @property
    def proxy_address(self) -> str | None:
        """host:port of the CONNECT proxy in use (no credentials), or None."""
        return None if self._proxy is None else _authority(self._proxy.host, self._proxy.port)

    @property
    def open_connections(self) -> int:
        """Connections holding a pool slot, idle ones included."""
        return self._open

    async def probe(self) -> bool:
        """A TCP connect to the upstream origin, or to the proxy when one applies (no request,
        nothing billed); success resets `reachable`, so readiness recovers without traffic."""
        host, port = (self.host, self.port) if self._proxy is None else (self._proxy.host, self._proxy.port)
        try:
            async with asyncio.timeout(min(self.config.connect_timeout, PROBE_TIMEOUT)):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        self.failed_attempts = 0
        return True

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.config.max_connections)
        self._loop = asyncio.get_running_loop()
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    def headers(self, incoming: Mapping[str, str], content_type: bool) -> dict[str, str]:
        """The exact header set sent upstream (besides Host and Content-Length)."""
        out = {"Authorization": "Bearer <operator key>", "Accept-Encoding": "identity"}
        if content_type:
            out["Content-Type"] = JSON_CT
        for name in FORWARDED_HEADERS:
            value = incoming.get(name)
            if value is not None:
                out[name] = value
        return out

    def target_for(self, path: str) -> str:
        """`/v1/chat/completions` -> `<base path>/chat/completions`; `/v2/...` as it is. A base
        URL without a path (`https://api.together.ai`) takes every path as it is."""
        if path.startswith("/v1/") and self.base_path:
            return self.base_path + path[3:]
        return path

    def _head(
        self,
        method: str,
        target: str,
        incoming: Mapping[str, str],
        body: bytes | None,
        content_type: str = JSON_CT,
    ) -> bytes:
        """The request head; BadRequest/InvalidField for anything that could split or bend it
        (the last line of defence against request smuggling: nothing is dropped or replaced)."""
        if method not in METHODS:
            raise BadRequest("The request method is not allowed upstream.")
        # isascii + isprintable + no space == only 0x21..0x7E, at half the cost of a regex
        if target[:1] != "/" or not (target.isascii() and target.isprintable()) or " " in target:
            raise BadRequest("The request target is not valid.")
        lines = [f"{method} {target} HTTP/1.1\r\n".encode("ascii"), self._fixed]
        for name in FORWARDED_HEADERS:
            value = incoming.get(name)
            if value is not None:
                if not (value.isascii() and value.isprintable()) and not _field_value_ok(value):
                    raise InvalidField(f"The {name} header is not valid.")
                lines.append(f"{name}: {value}\r\n".encode("ascii"))
        if body is not None:
            if content_type == JSON_CT:  # the hot path: no check nor encoding per request
                lines.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
            else:
                if not _field_value_ok(content_type):
                    raise InvalidField("The Content-Type header is not valid.")
                ctype = content_type.encode("ascii")
                lines.append(b"Content-Type: %s\r\nContent-Length: %d\r\n" % (ctype, len(body)))
        lines.append(b"\r\n")
        return b"".join(lines)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None,
        incoming: Mapping[str, str],
        query: str = "",
        content_type: str = JSON_CT,
    ) -> UpstreamResponse:
        """Send and wait for the response headers, within the first-byte timeout.

        A method outside METHODS, a target with a byte outside 0x21..0x7E, or a header value
        (forwarded ones, `content_type`) with a control or non-ASCII byte is refused with
        BadRequest/InvalidField (400) before any connection is taken.

        Failures before the headers become UpstreamError (502) or UpstreamTimeout (504). On any
        exit but the returned response (cancellation included) the connection is closed and
        its slot freed.
        """
        target = self.target_for(path) + ("?" + query if query else "")
        head = self._head(method, target, incoming, body, content_type)
        conn: _Connection | None = None
        sent = False
        loop = self._loop or asyncio.get_running_loop()
        expiry: asyncio.TimerHandle | None = None
        try:
            conn = self._pooled()
            if conn is None:  # connect, send and get the headers, all within the first-byte timeout
                async with asyncio.timeout(self.config.first_byte_timeout):
                    conn = await self._acquire()
                    resp = self._send(conn, loop, method, head, body)
                    sent = True
                    await resp._headers_fut
            else:  # a pooled connection (the usual case): one timer on the headers, no context
                resp = self._send(conn, loop, method, head, body)
                sent = True
                expiry = loop.call_later(self.config.first_byte_timeout, _expire, resp._headers_fut)
                await resp._headers_fut
        except BaseException as exc:
            if conn is not None:  # never reuse it: half an exchange may be on the wire
                self._discard(conn)
            failure = self._failure(exc, conn is not None, sent)
            if failure is None:
                raise  # cancellation and the like pass through unchanged
            raise failure from exc
        finally:
            if expiry is not None:
                expiry.cancel()
        self.failed_attempts = 0
        return resp

    @staticmethod
    def _send(
        conn: _Connection, loop: asyncio.AbstractEventLoop, method: str, head: bytes, body: bytes | None
    ) -> UpstreamResponse:
        resp = UpstreamResponse(conn, loop, method == "HEAD")
        conn.response = resp
        conn._head_raw = 0
        assert conn.transport is not None
        conn.transport.write(head + body if body else head)
        return resp

    def _failure(self, exc: BaseException, connected: bool, sent: bool) -> UpstreamError | None:
        """The HTTP error for a failed exchange; None for what must propagate as it is."""
        if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
            what = (
                f"did not answer within {self.config.first_byte_timeout:g} s"
                if sent
                else "could not be connected to in time"
            )
            return UpstreamTimeout(f"The upstream {what}.", sent=sent)
        if isinstance(exc, OSError | UpstreamStreamError):  # refused, reset, TLS, proxy, bad HTTP
            if connected:  # connect errors were counted by _acquire
                self.failed_attempts += 1
            return UpstreamError(f"The upstream could not be reached ({type(exc).__name__}).")
        return None

    def _pooled(self) -> _Connection | None:
        """The most recently used idle connection still open and fresh, else None."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_KEEPALIVE:
                return conn
            self._discard(conn)
        return None

    async def _acquire(self) -> _Connection:
        conn = self._pooled()
        if conn is not None:
            return conn
        slots = self._slots
        assert slots is not None, "UpstreamClient.start() was not awaited"
        await slots.acquire()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                conn = await self._connect()
        except (OSError, TimeoutError):
            self.failed_attempts += 1  # refused, DNS, TLS, proxy, or no connection within `connect`
            slots.release()
            raise
        except BaseException:
            slots.release()
            raise
        conn.counted = True
        self._open += 1
        return conn

    async def _connect(self) -> _Connection:
        return await self.connect_to(self.host, self.port, self._ssl, self._proxy)

    async def connect_to(
        self, host: str, port: int, tls: ssl.SSLContext | None, proxy: _Proxy | None
    ) -> _Connection:
        """A new connection to host:port (directly or through `proxy`), outside the pool: the
        upstream's own through `_acquire`, an object store's through store.py."""
        loop = asyncio.get_running_loop()
        if proxy is not None:
            return await self._connect_tunnel(loop, proxy, host, tls)
        _, conn = await loop.create_connection(
            lambda: _Connection(self), host, port, ssl=tls, server_hostname=host if tls else None
        )
        return conn

    async def _connect_tunnel(
        self, loop: asyncio.AbstractEventLoop, proxy: _Proxy, host: str, tls: ssl.SSLContext | None
    ) -> _Connection:
        """A connection through an HTTP proxy: CONNECT, a 2xx, then TLS to the upstream over the
        tunnel. A plain-http upstream is tunnelled too (one code path; the proxy sees no request)."""
        transport, reader = await loop.create_connection(lambda: _TunnelReader(loop), proxy.host, proxy.port)
        try:
            transport.write(proxy.connect_head)
            await reader.answered
            if transport.is_closing():  # closed right after its 2xx: the reader got connection_lost
                raise UpstreamProxyError("the proxy closed the tunnel")
            conn = _Connection(self)
            if tls is None:
                transport.set_protocol(conn)
                conn.connection_made(transport)
                transport.resume_reading()
                return conn
            secured = await loop.start_tls(transport, conn, tls, server_hostname=host)
            if secured is None:
                raise UpstreamProxyError("TLS could not be started over the tunnel")
            conn.connection_made(secured)
            return conn
        except BaseException:
            transport.abort()
            raise

    def _put(self, conn: _Connection) -> None:
        if self._closed:
            self._discard(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _discard(self, conn: _Connection) -> None:
        """Close a connection that will not be reused and free its slot (once per connection)."""
        conn.abort()
        if conn.counted:
            conn.counted = False
            self._open -= 1
            if self._slots is not None:
                self._slots.release()

    def _forget(self, conn: _Connection) -> None:
        """An idle connection was closed (by the upstream, or by close()): out of the pool."""
        if conn.counted:
            with contextlib.suppress(ValueError):  # close() popped it already
                self._idle.remove(conn)
            self._discard(conn)
