"""Errors end to end: bad input is refused with an OpenAI-shaped body and never forwarded or
billed; upstream failures are passed through or translated, and each leaves one exact row."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.core.routes import ROUTES

from .support import (
    ACME_ONLY_MODEL,
    CHAT_MODEL,
    MESSAGES,
    Meter,
    StartMeter,
    closed_port,
    error_of,
    post_raw,
)

BODY_LIMIT = 4096
INVALID = "invalid_request_error"


def _body(**fields: Any) -> bytes:
    return orjson.dumps({"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 2, **fields})


@dataclass(frozen=True)
class Bad:
    """A request the proxy must refuse, and how."""

    name: str
    status: int
    type: str
    code: str
    key: str | None  # a tenant name, "unknown" for a made-up key, None for no Authorization
    body: bytes | None = None
    method: str = "POST"
    path: str = "/chat/completions"
    rejected_row: bool = True  # authenticated, metered route: one `rejected` row at cost 0


BAD_INPUTS = [
    Bad("missing_key", 401, INVALID, "invalid_api_key", None, _body(), rejected_row=False),
    Bad("unknown_key", 401, INVALID, "invalid_api_key", "unknown", _body(), rejected_row=False),
    Bad("invalid_json", 400, INVALID, "invalid_json", "acme", b'{"model": "x", "messages": ['),
    Bad("stream_not_bool", 400, INVALID, "invalid_field", "acme", _body(stream="yes")),
    Bad("messages_not_list", 400, INVALID, "invalid_field", "acme", _body(messages="hello")),
    Bad("negative_max_tokens", 400, INVALID, "invalid_field", "acme", _body(max_tokens=-1)),
    Bad(
        "unpriced_model",
        400,
        INVALID,
        "model_not_priced",
        "acme",
        _body(model="acme-labs/not-in-the-price-table"),
    ),
    Bad(
        "model_not_allowed",
        403,
        "permission_error",
        "model_not_allowed",
        "globex",
        _body(model=ACME_ONLY_MODEL),
    ),
    Bad(
        "body_too_large",
        413,
        INVALID,
        "request_too_large",
        "acme",
        _body(messages=[{"role": "user", "content": "x" * 2 * BODY_LIMIT}]),
    ),
    Bad(
        "unknown_route", 404, INVALID, "unknown_url", "acme", _body(), path="/assistants", rejected_row=False
    ),
    Bad("get_on_chat", 405, INVALID, "method_not_allowed", "acme", method="GET", rejected_row=False),
]


def _headers(meter: Meter, key: str | None) -> dict[str, str]:
    if key is None:
        return {}
    if key == "unknown":
        return {"Authorization": "Bearer tm-not-a-key-of-any-tenant"}
    return meter.auth(key)


def _small_body_limit(config: Any) -> Any:
    return replace(config, limits=replace(config.limits, max_body_bytes=BODY_LIMIT))


@pytest.fixture
async def small(start_meter: StartMeter) -> AsyncIterator[Meter]:
    """A meter whose body limit is 4 KiB."""
    async with start_meter(change=_small_body_limit) as m:
        yield m


async def _assert_refused(meter: Meter, bad: Bad) -> None:
    seen, billed, before = len(meter.upstream_seen), len(meter.sim.billed.entries), len(await meter.rows())
    status, headers, body = await post_raw(
        meter.base_url + bad.path, bad.body, _headers(meter, bad.key), method=bad.method
    )
    assert status == bad.status, body
    assert meter.operator_key.encode() not in body
    err = error_of(body)
    assert (err["type"], err["code"]) == (bad.type, bad.code)
    assert headers["content-type"].startswith("application/json")
    assert len(meter.upstream_seen) == seen and len(meter.sim.billed.entries) == billed
    new = (await meter.rows())[before:]
    if not bad.rejected_row:
        assert new == []
        return
    (row,) = new
    assert (row.request_id, row.tenant, row.status, row.error_code) == (
        headers["x-request-id"],
        bad.key,
        "rejected",
        bad.code,
    )
    assert row.cost_pusd == 0 and row.prompt_tokens is None and row.upstream_status is None


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda b: b.name)
async def test_bad_input_refused(small: Meter, bad: Bad) -> None:
    """Each bad input: its status and OpenAI error body; nothing forwarded, nothing billed."""
    await _assert_refused(small, bad)
    assert small.upstream_seen == [] and small.sim.billed.entries == []


async def test_chunked_body_too_large(small: Meter) -> None:
    """A chunked body (no Content-Length) over the limit is a 413 too, and is not forwarded."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * BODY_LIMIT
        yield _body()

    async with (
        aiohttp.ClientSession() as s,
        s.post(
            small.base_url + "/chat/completions",
            data=chunks(),
            headers={**small.auth(), "Content-Type": "application/json"},
        ) as r,
    ):
        status, body, request_id = r.status, await r.read(), r.headers["x-request-id"]
    assert status == 413 and error_of(body)["code"] == "request_too_large"
    (row,) = await small.rows()
    assert (row.request_id, row.status, row.cost_pusd) == (request_id, "rejected", 0)
    assert small.upstream_seen == []


async def test_sdk_raises_matching_errors(meter: Meter) -> None:
    """The openai SDK maps our 401/400/403 bodies to its error classes with our codes."""
    bogus = openai.AsyncOpenAI(base_url=meter.base_url, api_key="tm-bogus", max_retries=0)
    async with bogus:
        with pytest.raises(openai.AuthenticationError) as auth:
            await bogus.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as unpriced:
        await meter.openai().chat.completions.create(model="x/unpriced", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await meter.openai("globex").chat.completions.create(model=ACME_ONLY_MODEL, messages=MESSAGES)
    assert [(e.value.status_code, e.value.code) for e in (auth, unpriced, denied)] == [
        (401, "invalid_api_key"),
        (400, "model_not_priced"),
        (403, "model_not_allowed"),
    ]
    assert meter.upstream_seen == []
    assert [(r.tenant, r.status, r.cost_pusd) for r in await meter.rows()] == [
        ("acme", "rejected", 0),
        ("globex", "rejected", 0),
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("status", "error_class"), [(500, openai.InternalServerError), (429, openai.RateLimitError)]
)
async def test_upstream_status_passed_through(
    meter: Meter, status: int, error_class: type, stream: bool
) -> None:
    """An upstream 500/429 reaches the client with its status and body; a cost-0 error row."""
    with pytest.raises(error_class) as info:
        await meter.openai().chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES, stream=stream, extra_body={"simulate": {"status": status}}
        )
    assert info.value.status_code == status and "simulated error" in info.value.message
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "stream": stream, "simulate": {"status": status}}
    got, headers, proxied = await post_raw(meter.base_url + "/chat/completions", body, meter.auth())
    want, dheaders, direct = await post_raw(
        meter.sim.url + "/chat/completions", body, {"Authorization": f"Bearer {meter.operator_key}"}
    )
    assert (got, proxied) == (want, direct) == (status, direct)
    assert headers.get("Retry-After") == dheaders.get("Retry-After") == ("1" if status == 429 else None)
    assert meter.sim.billed.entries == []
    rows = await meter.rows()
    assert [r.request_id for r in rows] == [
        info.value.response.headers["x-request-id"],
        headers["x-request-id"],
    ]
    for row in rows:
        assert (row.status, row.upstream_status, row.cost_pusd, row.usage_source) == (
            "upstream_error",
            status,
            0,
            "none",
        )
        assert row.error_code == f"upstream_{status}" and row.stream is stream


async def test_unreachable_upstream(start_meter: StartMeter) -> None:
    """An upstream nobody listens on: 502 upstream_unreachable and an upstream_error row."""
    async with start_meter(upstream=f"http://127.0.0.1:{closed_port()}/v1") as meter:
        with pytest.raises(openai.InternalServerError) as info:
            await meter.openai().chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
        status, headers, body = await post_raw(
            meter.base_url + "/chat/completions", _body(stream=True), meter.auth()
        )
        assert info.value.status_code == status == 502
        err = error_of(body)
        assert (err["type"], err["code"]) == ("upstream_error", "upstream_unreachable")
        assert info.value.code == "upstream_unreachable"
        rows = await meter.rows()
        assert [r.request_id for r in rows] == [
            info.value.response.headers["x-request-id"],
            headers["x-request-id"],
        ]
        for row in rows:
            assert (row.status, row.cost_pusd, row.usage_source, row.upstream_status) == (
                "upstream_error",
                0,
                "none",
                None,
            )
            assert row.error_code == "upstream_unreachable"


async def test_silent_upstream_times_out(
    start_meter: StartMeter, silent_upstream: tuple[str, list[str]]
) -> None:
    """No response headers within first_byte: 504, and a row charged at its reservation."""
    url, hits = silent_upstream

    def short_first_byte(config: Any) -> Any:
        return replace(config, upstream=replace(config.upstream, first_byte_timeout=0.5))

    async with start_meter(upstream=url, change=short_first_byte) as meter:
        body = _body()
        t0 = time.monotonic()
        status, headers, answer = await post_raw(meter.base_url + "/chat/completions", body, meter.auth())
        elapsed = time.monotonic() - t0
        assert status == 504 and 0.5 <= elapsed < 3.0
        err = error_of(answer)
        assert (err["type"], err["code"]) == ("upstream_error", "upstream_timeout")
        assert hits == ["/v1/chat/completions"]
        (row,) = await meter.rows()
        rates = meter.config.prices.get(CHAT_MODEL)
        assert rates is not None
        assert (row.request_id, row.status, row.error_code, row.usage_source) == (
            headers["x-request-id"],
            "upstream_timeout",
            "upstream_timeout",
            "estimated",
        )
        # the upstream may still bill it: charged at the bound reserved before forwarding
        assert row.cost_pusd == row.reserved_pusd == len(body) * rates.input + 2 * rates.output


async def test_still_serves_after_every_error(small: Meter, caplog: pytest.LogCaptureFixture) -> None:
    """After every bad input and upstream error in a row, a normal request is served and billed."""
    caplog.set_level(logging.DEBUG)
    for bad in BAD_INPUTS:
        await _assert_refused(small, bad)
    client = small.openai()
    for status in (500, 429):
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(
                model=CHAT_MODEL, messages=MESSAGES, extra_body={"simulate": {"status": status}}
            )
    r = await client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=3)
    assert r.choices[0].message.content == "Hello from the"
    (entry,) = small.sim.billed.entries
    rows = await small.rows()
    assert [row.status for row in rows] == ["rejected"] * sum(b.rejected_row for b in BAD_INPUTS) + [
        "upstream_error",
        "upstream_error",
        "ok",
    ]
    assert (rows[-1].prompt_tokens, rows[-1].completion_tokens) == (entry["prompt_tokens"], 3)
    assert rows[-1].cost_pusd == small.cost(CHAT_MODEL, entry["prompt_tokens"], 3)
    secrets = [small.operator_key, *small.keys.values()]
    assert not [r for r in caplog.records if any(k in r.getMessage() for k in secrets)]


@pytest.mark.sqlite_only  # no ledger involved
async def test_unknown_url_message_names_every_served_route_family(meter: Meter) -> None:
    """The 404 `unknown_url` message names a family (a path prefix) for every route of the route
    table a tenant may call, /v2/projects/{project}/models and the grantable operator routes too."""
    status, _, body = await post_raw(meter.origin + "/v1/assistants", None, meter.auth(), method="GET")
    err = error_of(body)
    assert (status, err["code"]) == (404, "unknown_url")
    listed = [f.rstrip(".") for f in re.findall(r"/v[12]/[^\s,;]+", err["message"].split("serves", 1)[1])]
    assert "/v2/projects/{project}/models" in listed
    for route in ROUTES.routes:
        assert any(route.pattern == f or route.pattern.startswith(f + "/") for f in listed), route.pattern
