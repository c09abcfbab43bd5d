"""PUT a tenant's upload to the presigned object-store URL together handed out.

The together SDKs upload a file's bytes to a presigned URL (an S3-style object store), not to
the API. When the proxy relays that PUT (docs/batches.md#uploads), this is the client it uses:
one connection per upload, never pooled with the API's, and no Authorization header (the URL's
own signature is the authority; the operator's key never leaves for the store). The URL was
checked when it came from the upstream (core/uploads.store_url: https, or the upstream's own
origin) and is checked again here, byte by byte, before it is written. The body streams from
the client to the store with back-pressure; HTTPS_PROXY / NO_PROXY apply as for the upstream.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

from proxy.config import Upstream
from proxy.core.uploads import StoreURL
from proxy.errors import BadRequest, ConfigError, MeterError, UpstreamError, UpstreamTimeout
from proxy.upstream.client import (
    UpstreamClient,
    UpstreamResponse,
    UpstreamStreamError,
    _authority,
    _Connection,
    _proxy_from_env,
)


class BodySourceError(Exception):
    """The bytes to upload stopped coming (the client went away or sent fewer than it said)."""


class ObjectStore:
    """Sends presigned PUTs for the proxy's upload relay; see the module docstring."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client
        self.config: Upstream = client.config
        self._tls: ssl.SSLContext | None = None  # made on first use: most proxies never relay

    def head(self, url: StoreURL, length: int) -> bytes:
        """The request head: the target exactly as signed, the store's Host, the length."""
        target = url.target
        if target[:1] != "/" or not (target.isascii() and target.isprintable()) or " " in target:
            raise BadRequest("The object store URL is not valid.")
        return (
            f"PUT {target} HTTP/1.1\r\nHost: {url.authority}\r\nContent-Length: {length}\r\n"
            "Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
        ).encode("ascii")

    async def put(self, url: StoreURL, length: int, body: AsyncIterator[bytes]) -> UpstreamResponse:
        """Stream `length` bytes of `body` to `url`; the store's response once its head arrived.

        BodySourceError or a MeterError raised by `body` passes through (the store connection is
        cut, so no partial object is stored); failures of the store become UpstreamError (502)
        or UpstreamTimeout (504).
        """
        head = self.head(url, length)
        conn: _Connection | None = None
        try:
            conn = await self._connect(url)
            resp = UpstreamResponse(conn, asyncio.get_running_loop())
            conn.response = resp
            assert conn.transport is not None
            conn.transport.write(head)
            await self._send(conn, resp, body)
            async with asyncio.timeout(self.config.first_byte_timeout):
                await resp._headers_fut
        except BaseException as exc:
            if conn is not None:  # never half an upload: a cut connection stores nothing
                conn.abort()
            if isinstance(exc, OSError | TimeoutError | UpstreamStreamError):
                raise _failure(exc) from exc
            raise
        return resp

    async def _connect(self, url: StoreURL) -> _Connection:
        tls = None
        if url.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            proxy = _proxy_from_env(url.scheme, url.host, _authority(url.host, url.port))
        except ConfigError as exc:
            raise UpstreamError(f"The object store cannot be reached: {exc.problem}") from None
        async with asyncio.timeout(self.config.connect_timeout):
            conn = await self.client.connect_to(url.host, url.port, tls, proxy)
        conn.single_use = True
        return conn

    async def _send(self, conn: _Connection, resp: UpstreamResponse, body: AsyncIterator[bytes]) -> None:
        """The body, chunk by chunk, each write waiting until the store takes more; stops early
        when the store answered first (an error) or closed the connection."""
        assert conn.transport is not None
        async for chunk in body:
            if resp.started or conn.closed:
                return
            conn.transport.write(chunk)
            async with asyncio.timeout(self.config.idle_timeout):
                await conn.drain()


def _failure(exc: BaseException) -> MeterError:
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("The object store did not take the upload in time.")
    return UpstreamError(f"The object store could not be reached ({type(exc).__name__}).")


__all__ = ["BodySourceError", "ObjectStore"]
