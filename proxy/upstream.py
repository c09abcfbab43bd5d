"""One pooled aiohttp client to together.ai: header allow-list, no redirects, timeouts.

The upstream origin comes only from operator config (I9): nothing in a request body or header
can change where it goes. Only allow-listed headers travel upstream; the tenant's key is replaced
by the operator's together key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp

from .config import Upstream
from .errors import UpstreamError, UpstreamTimeout

# Headers a client may send that are useful upstream and reveal nothing about the tenant.
FORWARDED_HEADERS = ("accept", "user-agent")


class UpstreamClient:
    """Sends requests to the configured upstream and translates transport failures once."""

    def __init__(self, config: Upstream, api_key: str) -> None:
        self.config = config
        self.base = config.url.rstrip("/")
        # the origin (scheme://host:port) for paths that carry their own version prefix
        scheme, _, rest = self.base.partition("://")
        self.origin = f"{scheme}://{rest.split('/', 1)[0]}"
        self._auth = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections, ttl_dns_cache=300, keepalive_timeout=30,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout),
            auto_decompress=True,
            skip_auto_headers=("Accept-Encoding",),
            trust_env=False,  # no proxy settings from the environment redirect our traffic
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def headers(self, incoming: Mapping[str, str], content_type: bool) -> dict[str, str]:
        """The exact header set sent upstream: our key, identity encoding, the allow-list."""
        out = {"Authorization": self._auth, "Accept-Encoding": "identity"}
        if content_type:
            out["Content-Type"] = "application/json"
        for name in FORWARDED_HEADERS:
            value = incoming.get(name)
            if value is not None:
                out[name] = value
        return out

    def url_for(self, path: str) -> str:
        """`/v1/chat/completions` -> `<upstream base>/chat/completions`; `/v2/...` -> origin."""
        if path.startswith("/v1/"):
            return self.base + path[3:]
        return self.origin + path

    async def request(self, method: str, path: str, *, body: bytes | None,
                      incoming: Mapping[str, str], query: str = "") -> aiohttp.ClientResponse:
        """Send and wait for the response headers, within the first-byte timeout.

        Any failure before the headers arrive becomes UpstreamError (502) or UpstreamTimeout
        (504). There is no retry: bytes may have reached the upstream, which may bill them.
        """
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        url = self.url_for(path) + (f"?{query}" if query else "")
        try:
            async with asyncio.timeout(self.config.first_byte_timeout):
                return await self._session.request(
                    method, url, data=body, headers=self.headers(incoming, body is not None),
                    allow_redirects=False,
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The upstream did not answer within {self.config.first_byte_timeout:g} s."
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"The upstream could not be reached ({type(exc).__name__})."
            ) from exc
        except OSError as exc:
            raise UpstreamError(f"The upstream could not be reached ({type(exc).__name__}).") from exc
