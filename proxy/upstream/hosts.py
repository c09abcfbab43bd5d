"""The upstream hosts: together's API host and, when configured, a separate inference host.

`upstream.url` serves every route; `upstream.inference_url` (optional) takes the inference paths
(`routes.INFERENCE_HOST_PATHS`: chat, completions, embeddings, rerank, images, audio), as
together's SDK 3.x sends them to api-inference.together.ai. Each host has its own keep-alive pool
and the same operator key; which host answered is invisible to the tenant. Both come only from the
operator's config (I9): the path picks the host, never anything else in the request.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from dataclasses import replace
from typing import Any

from proxy.config import Upstream
from proxy.core.routes import INFERENCE_HOST_PATHS
from proxy.upstream.client import JSON_CT, UpstreamClient, UpstreamResponse


class Upstreams:
    """One `UpstreamClient` per configured host; `request` sends a path to its host."""

    def __init__(self, config: Upstream, api_key: str) -> None:
        self.config = config
        self.api = UpstreamClient(config, api_key)
        self.inference = (
            self.api
            if config.inference_url is None or config.inference_url == config.url
            else UpstreamClient(replace(config, url=config.inference_url), api_key)
        )
        self.clients = (self.api,) if self.inference is self.api else (self.api, self.inference)

    def client_for(self, path: str) -> UpstreamClient:
        """The client of the host that serves `path` (a route's upstream path)."""
        return self.inference if path in INFERENCE_HOST_PATHS else self.api

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None,
        incoming: Mapping[str, str],
        query: str = "",
        content_type: str = JSON_CT,
    ) -> Coroutine[Any, Any, UpstreamResponse]:
        """`UpstreamClient.request` on the host of `path` (no extra frame: the call is returned)."""
        client = self.inference if path in INFERENCE_HOST_PATHS else self.api
        return client.request(
            method, path, body=body, incoming=incoming, query=query, content_type=content_type
        )

    @property
    def base(self) -> str:
        """The API host's base URL (`upstream.url`)."""
        return self.api.base

    @property
    def reachable(self) -> bool:
        """False while any host had UNREACHABLE_AFTER failed attempts in a row."""
        return all(c.reachable for c in self.clients)

    @property
    def failed_attempts(self) -> int:
        return max(c.failed_attempts for c in self.clients)

    @property
    def open_connections(self) -> int:
        return sum(c.open_connections for c in self.clients)

    async def probe(self) -> bool:
        """A TCP connect probe of every host (see UpstreamClient.probe); True if all connect."""
        results = [await c.probe() for c in self.clients]
        return all(results)

    async def start(self) -> None:
        for c in self.clients:
            await c.start()

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


__all__ = ["Upstreams"]
