"""Hostile input (issue 7, point 5): oversized, compressed, malformed, spoofed or trickled
requests are refused or neutralised before anything reaches the upstream, and never change
the tenant or the upstream target. tests/e2e/test_errors.py holds the plain bad-input cases."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
from aiohttp import web

from .support import CHAT_MODEL, MESSAGES, Meter, StartMeter, error_of, post_raw

BODY_LIMIT = 64 * 1024
RSS_SLACK = 48 * 1024 * 1024  # allocator noise; a bomb or a buffered body would be far larger
BASE_HEADERS = {"host", "authorization", "accept-encoding", "content-type", "content-length"}


def _body(**fields: Any) -> bytes:
    return orjson.dumps({"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 2, **fields})


def _limits(**changes: Any) -> Any:
    def change(config: Any) -> Any:
        return replace(config, limits=replace(config.limits, **changes))

    return change


@pytest.fixture
async def small(start_meter: StartMeter) -> AsyncIterator[Meter]:
    """A meter with a 64 KiB body limit and a 1 s body deadline."""
    async with start_meter(change=_limits(max_body_bytes=BODY_LIMIT, body_timeout=1.0)) as m:
        yield m


@pytest.fixture
async def trap() -> AsyncIterator[tuple[int, list[str]]]:
    """Another loopback server: no request may ever reach it."""
    hits: list[str] = []

    async def note(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="trapped")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", note)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner.addresses[0][1], hits
    finally:
        await runner.cleanup()


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


async def _raw(port: int, request: bytes, *, within: float = 10.0) -> bytes:
    """Send raw bytes on a fresh loopback connection; everything the server answers until close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(within):
            return await reader.read(65536)
    finally:
        writer.close()


def _status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _json_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


async def _assert_413(meter: Meter, status: int, body: bytes) -> None:
    assert status == 413, body
    assert error_of(body)["code"] == "request_too_large"
    assert meter.upstream_seen == [] and meter.sim.billed.entries == []


async def test_oversized_body_with_content_length(small: Meter) -> None:
    """A 4 MiB body declared in Content-Length: 413, nothing forwarded, memory not grown by it."""
    body = _body(messages=[{"role": "user", "content": "x" * (4 << 20)}])
    rss = _rss()
    status, _, answer = await post_raw(small.base_url + "/chat/completions", body, small.auth())
    await _assert_413(small, status, answer)
    assert _rss() - rss < RSS_SLACK


async def test_oversized_chunked_body_bounded(small: Meter) -> None:
    """A 64 MiB chunked body (no Content-Length): 413 at the limit, the rest never buffered."""
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1024):  # 1024 x 64 KiB = 64 MiB at most
            sent += 65536
            yield b" " * 65536

    rss = _rss()
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            small.base_url + "/chat/completions",
            data=chunks(),
            headers={**small.auth(), "Content-Type": "application/json"},
        ) as r,
    ):
        status, answer = r.status, await r.read()
    await _assert_413(small, status, answer)
    assert sent < 64 << 20  # the answer came before the client finished sending
    assert _rss() - rss < RSS_SLACK
    (row,) = await small.rows()
    assert (row.status, row.error_code, row.cost_pusd) == ("rejected", "request_too_large", 0)


async def test_gzip_bomb_refused(small: Meter) -> None:
    """A gzip body of ~200 KiB that inflates to 200 MiB: 413 once the inflated size passes the
    limit (aiohttp inflates in bounded chunks), nothing forwarded, memory bounded."""
    inflated = 200 << 20
    bomb = gzip.compress(b'{"model": "' + b"a" * inflated + b'"}', compresslevel=9)
    assert len(bomb) < 1 << 20
    rss = _rss()
    status, _, answer = await post_raw(
        small.base_url + "/chat/completions", bomb, {**small.auth(), "Content-Encoding": "gzip"}
    )
    await _assert_413(small, status, answer)
    assert _rss() - rss < RSS_SLACK


async def test_small_gzip_body_is_forwarded_inflated(small: Meter) -> None:
    """A valid gzip body within the limit is accepted and forwarded inflated (no Content-Encoding)."""
    status, _, answer = await post_raw(
        small.base_url + "/chat/completions",
        gzip.compress(_body()),
        {**small.auth(), "Content-Encoding": "gzip"},
    )
    assert status == 200, answer
    (seen,) = small.upstream_seen
    assert "content-encoding" not in seen["headers"]


@pytest.mark.parametrize(
    ("name", "body", "code"),
    [
        ("nested_arrays", b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
        (
            "nested_in_object",
            b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "invalid_json",
        ),
        ("nested_objects", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "invalid_json"),
        ("stream_string_true", _body(stream="true"), "invalid_field"),
        ("stream_int", _body(stream=1), "invalid_field"),
        ("not_utf8", b'{"model": "\xff\xfe"}', "invalid_json"),
        (
            "nested_stream_with_options",  # stream_options must be rewritten: too deep to re-encode
            _body(stream=True, stream_options={})[:-1] + b',"x":' + b"[" * 1000 + b"]" * 1000 + b"}",
            "invalid_json",
        ),
        ("feature_trailing_newline", _body(metadata={"feature": "chat\n"}), "invalid_field"),
    ],
)
async def test_malformed_body_is_400(meter: Meter, name: str, body: bytes, code: str) -> None:
    """Deep nesting, a non-boolean stream, invalid UTF-8: 400 with its code, the proxy still serves."""
    status, _, answer = await post_raw(meter.base_url + "/chat/completions", body, meter.auth())
    assert status == 400, answer
    assert error_of(answer)["code"] == code
    assert meter.upstream_seen == []
    status, _, answer = await post_raw(meter.base_url + "/chat/completions", _body(), meter.auth())
    assert status == 200, answer


async def test_deeply_nested_stream_forwarded_with_usage_option(meter: Meter) -> None:
    """A stream body nested 1000 levels deep (orjson writes at most 255): forwarded as the client
    sent it plus stream_options.include_usage, answered 200 and recorded ok."""
    body = _body(stream=True)[:-1] + b',"x":' + b"[" * 1000 + b"]" * 1000 + b"}"
    status, _, answer = await post_raw(meter.base_url + "/chat/completions", body, meter.auth())
    assert status == 200 and answer.endswith(b"data: [DONE]\n\n"), answer[-200:]
    (entry,) = meter.sim.billed.entries
    assert entry["body"]["stream_options"] == {"include_usage": True}
    (row,) = await meter.wait_terminal(1)
    assert (row.status, row.usage_source) == ("ok", "upstream")


async def test_body_fields_do_not_change_the_target(meter: Meter, trap: tuple[int, list[str]]) -> None:
    """api_base, base_url, url, host in the body are passed on as data; the request still goes
    to the configured upstream and nothing else is contacted."""
    port, hits = trap
    elsewhere = f"http://127.0.0.1:{port}/v1"
    body = _body(api_base=elsewhere, base_url=elsewhere, url=elsewhere, host=f"127.0.0.1:{port}")
    status, _, answer = await post_raw(meter.base_url + "/chat/completions", body, meter.auth())
    assert status == 200, answer
    (seen,) = meter.upstream_seen
    assert (seen["path"], seen["headers"]["host"]) == ("/v1/chat/completions", f"127.0.0.1:{meter.sim.port}")
    assert hits == []
    assert meter.proxy.upstream.base == meter.sim.url


async def test_spoofed_headers_change_neither_tenant_nor_upstream(meter: Meter) -> None:
    """globex's key with acme-claiming X-Tenant/X-Forwarded/Host headers: the row is globex's and
    the upstream receives exactly the allow-listed headers."""
    spoof = f"127.0.0.1:{meter.proxy.port}"
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: acme.example\r\n"
        f"Authorization: Bearer {meter.keys['globex']}\r\n"
        "X-Tenant: acme\r\nX-Tenant-Id: acme\r\nX-Forwarded-For: 10.0.0.1\r\n"
        "X-Forwarded-Host: evil.example\r\nForwarded: for=10.0.0.1;host=evil.example\r\n"
        "X-Meter-Tenant: acme\r\nCookie: session=acme\r\nX-Api-Key: acme\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(_body())}\r\nConnection: close\r\n\r\n"
    ).encode() + _body()
    answer = await _raw(meter.proxy.port, request)
    assert _status_of(answer) == 200, answer
    (row,) = await meter.wait_terminal(1)
    assert (row.tenant, row.status) == ("globex", "ok")
    (seen,) = meter.upstream_seen
    assert set(seen["headers"]) == BASE_HEADERS
    assert seen["headers"]["host"] == f"127.0.0.1:{meter.sim.port}" != spoof
    assert seen["headers"]["authorization"] == f"Bearer {meter.operator_key}"
    assert seen["headers"]["accept-encoding"] == "identity"


async def test_upstream_headers_with_sdk_style_client(meter: Meter) -> None:
    """A client sending Accept and User-Agent: those two join the allow-listed set, nothing else."""
    status, _, _ = await post_raw(
        meter.base_url + "/chat/completions",
        _body(),
        {
            **meter.auth(),
            "X-Stainless-Lang": "python",
            "OpenAI-Organization": "org-acme",
            "User-Agent": "t/1",
        },
    )
    assert status == 200
    (seen,) = meter.upstream_seen
    assert set(seen["headers"]) == BASE_HEADERS | {"accept", "user-agent"}
    assert seen["headers"]["user-agent"] == "t/1"


@pytest.mark.parametrize("second", ["acme", "globex"])
async def test_duplicate_authorization_refused(meter: Meter, second: str) -> None:
    """Two Authorization header lines (even the same key twice): 401, nothing forwarded, no row."""
    body = _body()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {meter.keys['globex']}\r\nAuthorization: Bearer {meter.keys[second]}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    answer = await _raw(meter.proxy.port, request)
    assert _status_of(answer) == 401, answer
    assert error_of(_json_of(answer))["code"] == "invalid_api_key"
    assert meter.upstream_seen == [] and await meter.rows() == []


async def test_upstream_redirect_not_followed(start_meter: StartMeter, trap: tuple[int, list[str]]) -> None:
    """An upstream answering 302 to another port: the client gets the 302 as an upstream error
    without its Location header, the row is upstream_error at cost 0, the other port sees nothing."""
    port, hits = trap

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(
            status=302,
            headers={"Location": f"http://127.0.0.1:{port}{request.path}"},
            content_type="application/json",
            body=b'{"error": {"message": "moved", "type": "x", "code": null}}',
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        upstream = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        async with start_meter(upstream=upstream) as m:
            for stream in (False, True):
                status, headers, _ = await post_raw(
                    m.base_url + "/chat/completions", _body(stream=stream), m.auth()
                )
                assert status == 302 and "location" not in headers
            rows = await m.wait_terminal(2)
            assert [(r.status, r.upstream_status, r.cost_pusd) for r in rows] == [
                ("upstream_error", 302, 0)
            ] * 2
    finally:
        await runner.cleanup()
    assert hits == []


async def test_slow_body_cut_at_deadline_while_others_served(small: Meter) -> None:
    """A body trickled one byte per 200 ms: 408 at limits.body_timeout (1 s) and a rejected row,
    while a normal request on another connection is answered meanwhile."""
    body = _body()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {small.keys['acme']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", small.proxy.port)
    t0 = time.monotonic()
    try:
        writer.write(head)

        async def trickle() -> None:
            for i in range(len(body)):  # bounded: the body length, about 30 s at most
                writer.write(body[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0.2)

        trickler = asyncio.create_task(trickle())
        status, _, answer = await post_raw(small.base_url + "/chat/completions", body, small.auth())
        assert status == 200, answer
        async with asyncio.timeout(5):
            response = await reader.read(65536)
        elapsed = time.monotonic() - t0
        trickler.cancel()
    finally:
        writer.close()
    assert _status_of(response) == 408, response
    assert error_of(_json_of(response))["code"] == "request_timeout"
    assert 0.9 < elapsed < 3.0
    assert len(small.upstream_seen) == 1
    statuses = sorted(r.status for r in await small.wait_terminal(2))
    assert statuses == ["ok", "rejected"]
