"""proxy/upstream/hosts.py: the API host and the optional inference host, each its own pool.

Two raw loopback servers stand for together's two hosts; the request lines they receive show
which path went where and with which target and Host header.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.config import Upstream
from proxy.core.routes import INFERENCE_HOST_PATHS
from proxy.upstream.client import UpstreamClient
from proxy.upstream.hosts import Upstreams
from tests.upstream_support import RawServer, answering, bounded, response

OPERATOR_KEY = "sk-operator-hosts-5e1b"


@pytest.fixture
async def two_hosts() -> AsyncIterator[tuple[RawServer, RawServer]]:
    api = await RawServer(answering(response(b'"api"'))).start()
    inference = await RawServer(answering(response(b'"inference"'))).start()
    try:
        yield api, inference
    finally:
        await api.close()
        await inference.close()


async def _call(hosts: Upstreams, method: str, path: str) -> bytes:
    body = b"{}" if method == "POST" else None
    async with await bounded(hosts.request(method, path, body=body, incoming={})) as resp:
        assert resp.status == 200
        return await resp.read(1 << 20)


def _request_lines(server: RawServer) -> list[bytes]:
    return [r.split(b"\r\n", 1)[0] for peer in server.peers for r in peer.requests]


@pytest.mark.parametrize(
    ("url", "path", "target"),
    [
        ("https://api.together.ai/v1", "/v1/chat/completions", "/v1/chat/completions"),
        ("https://api.together.xyz/v1", "/v1/files/f-1/content", "/v1/files/f-1/content"),
        ("https://api.together.ai/v1", "/v2/projects/p/models", "/v2/projects/p/models"),
        ("https://api.together.ai", "/v1/chat/completions", "/v1/chat/completions"),
        ("https://api.together.ai", "/v2/videos", "/v2/videos"),
        ("http://127.0.0.1:9/base/v1", "/v1/models", "/base/v1/models"),
    ],
)
def test_target_for_keeps_the_version_of_a_bare_origin(url: str, path: str, target: str) -> None:
    """A base URL's path replaces `/v1`; a bare origin (no path) takes every path as it is."""
    assert UpstreamClient(Upstream(url=url), OPERATOR_KEY).target_for(path) == target


async def test_inference_paths_go_to_the_inference_host(two_hosts: tuple[RawServer, RawServer]) -> None:
    """chat/completions/embeddings reach `inference_url`; files, batches and models `url`, each
    with that host's own Host header and the operator's key."""
    api, inference = two_hosts
    hosts = Upstreams(
        Upstream(
            url=f"http://127.0.0.1:{api.port}/v1",
            inference_url=f"http://localhost:{inference.port}/v1",
            connect_timeout=2.0,
            first_byte_timeout=5.0,
        ),
        OPERATOR_KEY,
    )
    await hosts.start()
    try:
        calls = [
            ("POST", "/v1/chat/completions", b'"inference"'),
            ("GET", "/v1/models", b'"api"'),
            ("POST", "/v1/embeddings", b'"inference"'),
            ("GET", "/v1/batches/b-1", b'"api"'),
            ("POST", "/v1/completions", b'"inference"'),
            ("GET", "/v2/projects/p/models", b'"api"'),
        ]
        for method, path, answer in calls:
            assert await _call(hosts, method, path) == answer, path
        assert hosts.open_connections == 2 and hosts.reachable
    finally:
        await hosts.close()
    assert _request_lines(inference) == [
        b"POST /v1/chat/completions HTTP/1.1",
        b"POST /v1/embeddings HTTP/1.1",
        b"POST /v1/completions HTTP/1.1",
    ]
    assert _request_lines(api) == [
        b"GET /v1/models HTTP/1.1",
        b"GET /v1/batches/b-1 HTTP/1.1",
        b"GET /v2/projects/p/models HTTP/1.1",
    ]
    heads = [r for peer in inference.peers for r in peer.requests]
    assert all(f"Host: localhost:{inference.port}\r\n".encode() in h for h in heads)
    assert all(f"Authorization: Bearer {OPERATOR_KEY}\r\n".encode() in h for h in heads)


async def test_without_inference_url_one_pool_serves_everything(
    two_hosts: tuple[RawServer, RawServer],
) -> None:
    """No `inference_url` (or the same URL): a single client, every path to `url`."""
    api, _ = two_hosts
    url = f"http://127.0.0.1:{api.port}/v1"
    for config in (Upstream(url=url), Upstream(url=url, inference_url=url)):
        hosts = Upstreams(config, OPERATOR_KEY)
        assert hosts.clients == (hosts.api,) and hosts.inference is hosts.api
        assert all(hosts.client_for(p) is hosts.api for p in INFERENCE_HOST_PATHS)
        await hosts.start()
        try:
            assert await _call(hosts, "POST", "/v1/chat/completions") == b'"api"'
        finally:
            await hosts.close()


async def test_readiness_needs_both_hosts(two_hosts: tuple[RawServer, RawServer]) -> None:
    """The connect probe fails when the inference host cannot be reached, though the API host can."""
    api, inference = two_hosts
    port = inference.port
    await inference.close()
    hosts = Upstreams(
        Upstream(
            url=f"http://127.0.0.1:{api.port}/v1",
            inference_url=f"http://127.0.0.1:{port}/v1",
            connect_timeout=1.0,
        ),
        OPERATOR_KEY,
    )
    await hosts.start()
    try:
        assert await hosts.api.probe()
        assert not await hosts.probe()
    finally:
        await hosts.close()
