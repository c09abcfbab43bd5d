"""Secrets (issue 7, points 6 and 8): keys and prompts never leak into logs, error bodies,
response headers, /metrics or the ledger file; wrong keys are refused and rate-limited per
client address; /metrics and /admin live only on the admin listener."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.core.auth import FailureLimiter
from proxy.errors import RateLimited

from .support import CHAT_MODEL, Meter, StartMeter, error_of, post_raw

CANARY_PROMPT = "canary-prompt-4be1e0c2-do-not-store"
CANARY_WRONG_KEY = "tm-canary-wrong-key-93d7"
MESSAGES = [{"role": "user", "content": CANARY_PROMPT}]


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 5, **fields}


async def _leave_mid_stream(meter: Meter) -> None:
    body = _body(stream=True, max_tokens=40, simulate={"chunk_delay_ms": 10})
    async with (
        aiohttp.ClientSession() as s,
        s.post(meter.base_url + "/chat/completions", json=body, headers=meter.auth()) as r,
    ):
        await r.content.readline()  # first bytes, then go away


async def test_no_secret_anywhere(meter: Meter, caplog: pytest.LogCaptureFixture) -> None:
    """ok, stream, upstream error, 401, 400 and a disconnect: no tenant key, operator key or
    prompt text in any log record, error body, response header, /metrics or ledger byte."""
    caplog.set_level(logging.DEBUG, logger="proxy")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    canaries = [meter.keys["acme"], meter.operator_key, CANARY_PROMPT, CANARY_WRONG_KEY]
    url = meter.base_url + "/chat/completions"
    answers = []
    for body, headers in [
        (_body(), meter.auth()),
        (_body(stream=True), meter.auth()),
        (_body(simulate={"status": 500}), meter.auth()),
        (_body(simulate={"status": 429}), meter.auth()),
        (_body(), {"Authorization": f"Bearer {CANARY_WRONG_KEY}"}),
        (_body(), {"Authorization": f"Basic {meter.keys['acme']}"}),
        (_body(stream="yes"), meter.auth()),
        (_body(max_tokens=-1), meter.auth()),
    ]:
        answers.append(await post_raw(url, body, headers))
    answers.append(await post_raw(url, b'{"messages": "' + CANARY_PROMPT.encode(), meter.auth()))
    await _leave_mid_stream(meter)
    assert len(await meter.wait_terminal(8)) == 8  # 401s leave no row
    assert sorted(s for s, _, _ in answers) == [200, 200, 400, 400, 400, 401, 401, 429, 500]
    exposed = [b for s, _, b in answers if s != 200]  # error bodies
    exposed += [orjson.dumps(list(h.items())) for _, h, _ in answers]  # every response header
    exposed.append((await meter.metrics_text()).encode())
    await meter.restart()  # start-up and shutdown log lines are checked too
    for suffix in ("", "-wal", "-shm"):
        path = meter.ledger_path.with_name(meter.ledger_path.name + suffix)
        if path.exists():
            exposed.append(path.read_bytes())
    logged = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {getattr(r, 'args', '')}" for r in caplog.records
    )
    assert any(r.levelno >= logging.INFO for r in caplog.records)  # the capture saw records
    for canary in canaries:
        assert canary not in logged
        assert all(canary.encode() not in blob for blob in exposed), canary
    rows = await meter.rows()
    assert rows and all(CANARY_PROMPT not in repr(r) and meter.keys["acme"] not in repr(r) for r in rows)


def _limit(n: int) -> Any:
    def change(config: Any) -> Any:
        return replace(config, limits=replace(config.limits, auth_failures_per_minute=n))

    return change


@pytest.fixture
async def limited(start_meter: StartMeter) -> AsyncIterator[Meter]:
    """A meter allowing 5 failed authentications per address and minute."""
    async with start_meter(change=_limit(5)) as m:
        yield m


async def test_wrong_keys_rate_limited_per_address(limited: Meter) -> None:
    """5 wrong keys get 401; then the address gets 429 too_many_auth_failures, even with a correct
    key; another address (::1 vs 127.0.0.1 is not available everywhere: a second limiter entry)
    is unaffected; nothing is forwarded and no row is written."""
    url = limited.base_url + "/chat/completions"
    wrong = {"Authorization": "Bearer tm-wrong"}
    statuses = [(await post_raw(url, _body(), wrong))[0] for _ in range(5)]
    assert statuses == [401] * 5
    for headers in (wrong, limited.auth("acme"), {}):
        status, answer_headers, answer = await post_raw(url, _body(), headers)
        assert status == 429, answer
        assert (error_of(answer)["type"], error_of(answer)["code"]) == (
            "rate_limit_error",
            "too_many_auth_failures",
        )
        assert "x-request-id" in answer_headers
    status, _, _ = await post_raw(limited.base_url + "/models", None, limited.auth(), method="GET")
    assert status == 429
    assert limited.upstream_seen == [] and await limited.rows() == []
    limiter = limited.proxy.relay.auth_failures
    limiter.check("127.0.0.2")  # another peer: not limited
    assert len(limiter._peers) == 1


async def test_correct_keys_do_not_count(start_meter: StartMeter) -> None:
    """Successful requests never add to the failure count (limit 2, 4 good requests, 1 bad)."""
    async with start_meter(change=_limit(2)) as m:
        url = m.base_url + "/chat/completions"
        for _ in range(4):
            assert (await post_raw(url, _body(), m.auth()))[0] == 200
        assert (await post_raw(url, _body(), {"Authorization": "Bearer tm-x"}))[0] == 401
        assert (await post_raw(url, _body(), m.auth()))[0] == 200


async def test_limit_zero_disables(start_meter: StartMeter) -> None:
    """auth_failures_per_minute: 0 never limits (40 wrong keys, all 401)."""
    async with start_meter(change=_limit(0)) as m:
        url = m.base_url + "/chat/completions"
        statuses = await asyncio.gather(
            *(post_raw(url, _body(), {"Authorization": "Bearer tm-x"}) for _ in range(40))
        )
        assert {s for s, _, _ in statuses} == {401}


def test_failure_limiter_window_and_memory_bound() -> None:
    """A peer is limited until its window ends; the tracked peers never exceed max_peers."""
    now = [0.0]
    lim = FailureLimiter(3, window=60.0, max_peers=100, clock=lambda: now[0])
    for _ in range(3):
        lim.check("a")
        lim.failed("a")
    with pytest.raises(RateLimited):
        lim.check("a")
    lim.check("b")
    now[0] = 60.0
    lim.check("a")  # window over
    for i in range(1000):
        lim.failed(f"peer-{i}")
    assert len(lim._peers) == 100


async def test_admin_routes_not_on_public_port(meter: Meter) -> None:
    """/admin/*, /healthz, /readyz are 404 on the public port, with or without keys; a tenant key
    gets 401 on every /admin route of the admin port."""
    admin_auth = {"Authorization": f"Bearer {meter.admin_token}"}
    for path in ("/admin/spend", "/admin/reload", "/admin/report", "/readyz", "/healthz", "/admin"):
        for headers in ({}, meter.auth(), admin_auth):
            status, _, body = await post_raw(meter.origin + path, None, headers, method="GET")
            assert status == 404 and error_of(body)["code"] == "unknown_url", (path, status)
    for path in ("/admin/spend", "/admin/report", "/admin/budgets", "/admin/chargeback", "/admin/nope"):
        status, body = await meter.admin_get(path, meter.auth("acme"))
        assert status == 401 and error_of(body)["code"] == "invalid_api_key"
    status, _, body = await post_raw(meter.admin + "/admin/reload", None, meter.auth(), method="POST")
    assert status == 401
    status, body = await meter.admin_get("/metrics")
    assert status == 200  # the admin listener does serve it
