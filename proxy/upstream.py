"""The client to together.ai: a small keep-alive HTTP/1.1 pool on asyncio + httptools.

Why not aiohttp's client: on the hot path it costs more CPU than everything else the proxy does
per request (see docs/benchmarks.md); this client does only what a proxy needs: one prebuilt
header block, one write, a C parser, body chunks handed over as they arrive.

The upstream origin comes only from operator config (I9): nothing in a request can change where
it goes, redirects are never followed, and only allow-listed headers travel upstream with the
tenant's key replaced by the operator's together key. There is no retry: once bytes may have
reached the upstream, it may bill them.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Mapping
from types import TracebackType
from urllib.parse import urlsplit

import httptools

from .config import Upstream
from .errors import InvalidField, UpstreamError, UpstreamTimeout

# Headers a client may send that are useful upstream and reveal nothing about the tenant.
FORWARDED_HEADERS = ("accept", "user-agent")
HIGH_WATER = 1 << 20  # pause reading from the upstream while this much is buffered
IDLE_KEEPALIVE = 30.0  # drop pooled connections idle longer than this
UNREACHABLE_AFTER = 3  # consecutive attempts that could not reach the upstream: /readyz degrades
PROBE_TIMEOUT = 1.0  # longest a /readyz connect probe waits


class UpstreamStreamError(Exception):
    """The upstream connection failed or was cut after the response began."""


class _Connection(asyncio.Protocol):
    """One upstream connection; carries one exchange at a time."""

    def __init__(self, pool: UpstreamClient) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self._header_name = b""

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamStreamError(f"invalid HTTP from upstream: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.response
        if resp is not None and not resp.complete:
            if resp.started and resp.until_eof:
                resp._finish()  # a body delimited by the end of the connection
            else:
                self._fail(UpstreamStreamError("the upstream closed the connection"))

    # -- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self.response
        assert resp is not None
        resp._on_headers(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        resp = self.response
        assert resp is not None
        resp._on_body(body)

    def on_message_complete(self) -> None:
        resp = self.response
        assert resp is not None
        resp.keep_alive = self.parser.should_keep_alive()
        resp._finish()

    # -- helpers ----------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self.response is not None:
            self.response._fail(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """Status and headers as soon as they arrive; the body as chunks or whole."""

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._headers_fut: asyncio.Future[None] = loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._paused = False
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
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._raw_headers}
        self.until_eof = "content-length" not in self.headers and "chunked" not in self.headers.get(
            "transfer-encoding", ""
        )
        self.started = True
        if not self._headers_fut.done():
            self._headers_fut.set_result(None)

    def _on_body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
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
        """Return the connection to the pool if the exchange ended cleanly, else close it."""
        if self.released:
            return
        self.released = True
        self._conn.response = None
        if self.complete and self.keep_alive and self._error is None and not self._conn.closed:
            self._conn.pool._put(self._conn)
        else:
            self._conn.close()
            self._conn.pool._discard()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class UpstreamClient:
    """A bounded pool of keep-alive connections to the one configured upstream."""

    def __init__(self, config: Upstream, api_key: str) -> None:
        self.config = config
        self.base = config.url.rstrip("/")
        url = urlsplit(self.base)
        self.scheme = url.scheme
        self.host = url.hostname or "localhost"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base_path = url.path.rstrip("/")  # e.g. /v1
        default_port = self.port == (443 if url.scheme == "https" else 80)
        host_header = self.host if default_port else f"{self.host}:{self.port}"
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._fixed = (
            f"Host: {host_header}\r\nAuthorization: Bearer {api_key}\r\nAccept-Encoding: identity\r\n"
        ).encode("latin-1")
        self._idle: collections.deque[_Connection] = collections.deque()
        self._slots: asyncio.Semaphore | None = None
        self._open = 0
        self.failed_attempts = 0  # consecutive requests that could not connect, or were reset before headers

    @property
    def reachable(self) -> bool:
        """False after UNREACHABLE_AFTER requests in a row could not reach the upstream."""
        return self.failed_attempts < UNREACHABLE_AFTER

    async def probe(self) -> bool:
        """A TCP connect to the upstream origin (no request, nothing billed); success resets
        `reachable`, so readiness recovers without client traffic."""
        try:
            async with asyncio.timeout(min(self.config.connect_timeout, PROBE_TIMEOUT)):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        self.failed_attempts = 0
        return True

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.config.max_connections)

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def headers(self, incoming: Mapping[str, str], content_type: bool) -> dict[str, str]:
        """The exact header set sent upstream (besides Host and Content-Length)."""
        out = {"Authorization": "Bearer <operator key>", "Accept-Encoding": "identity"}
        if content_type:
            out["Content-Type"] = "application/json"
        for name in FORWARDED_HEADERS:
            value = incoming.get(name)
            if value is not None:
                out[name] = value
        return out

    def target_for(self, path: str) -> str:
        """`/v1/chat/completions` -> `<base path>/chat/completions`; `/v2/...` as it is."""
        if path.startswith("/v1/"):
            return self.base_path + path[3:]
        return path

    def _head(
        self,
        method: str,
        target: str,
        incoming: Mapping[str, str],
        body: bytes | None,
        content_type: str = "application/json",
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), self._fixed]
        for name in FORWARDED_HEADERS:
            value = incoming.get(name)
            if value is not None and "\r" not in value and "\n" not in value:
                lines.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
        if body is not None:
            if content_type == "application/json":  # the hot path: no encoding per request
                lines.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
            else:
                ctype = content_type.encode("latin-1", "replace")
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
        content_type: str = "application/json",
    ) -> UpstreamResponse:
        """Send and wait for the response headers, within the first-byte timeout.

        `content_type` goes with a body (a multipart upload names its boundary there); a value
        with a line break is refused so no header can be smuggled upstream.

        Failures before the headers become UpstreamError (502) or UpstreamTimeout (504).
        """
        target = self.target_for(path) + (f"?{query}" if query else "")
        if "\r" in content_type or "\n" in content_type:
            raise InvalidField("The Content-Type header is not valid.")
        head = self._head(method, target, incoming, body, content_type)
        conn: _Connection | None = None
        sent = False
        try:
            async with asyncio.timeout(self.config.first_byte_timeout):
                conn = await self._acquire()
                resp = UpstreamResponse(conn, asyncio.get_running_loop())
                conn.response = resp
                assert conn.transport is not None
                conn.transport.write(head + body if body else head)
                sent = True
                await resp._headers_fut
                self.failed_attempts = 0
                return resp
        except TimeoutError as exc:
            if conn is not None:
                conn.close()
                self._discard()
            what = (
                f"did not answer within {self.config.first_byte_timeout:g} s"
                if sent
                else "could not be connected to in time"
            )
            raise UpstreamTimeout(f"The upstream {what}.", sent=sent) from exc
        except (OSError, UpstreamStreamError) as exc:  # refused, reset, TLS, bad HTTP
            if conn is not None:  # connected, then reset or invalid HTTP (connect errors: _acquire)
                conn.close()
                self._discard()
                self.failed_attempts += 1
            raise UpstreamError(f"The upstream could not be reached ({type(exc).__name__}).") from exc

    async def _acquire(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_KEEPALIVE:
                return conn
            conn.close()
            self._discard()
        assert self._slots is not None, "UpstreamClient.start() was not awaited"
        await self._slots.acquire()
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.config.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except (OSError, TimeoutError):
            self.failed_attempts += 1  # refused, DNS, TLS, or no connection within `connect`
            self._slots.release()
            raise
        except BaseException:
            self._slots.release()
            raise
        self._open += 1
        return proto

    def _put(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _discard(self) -> None:
        """A connection closed: free its slot."""
        if self._open > 0 and self._slots is not None:
            self._open -= 1
            self._slots.release()
