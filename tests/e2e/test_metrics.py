"""Metrics and the admin port end to end: every counter and gauge equals the ledger's sums
(and the simulator's bill), /metrics lives only on the admin port, the gauge survives restarts."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from proxy.config import Config
from proxy.core.pricing import format_usd
from proxy.core.usage import Tokenizer
from proxy.ledger import LedgerRow, now_us, period_of
from proxy.server.app import Proxy

from .support import (
    ACME_ONLY_MODEL,
    CHAT_MODEL,
    EMBEDDING_MODEL,
    LANGUAGE_MODEL,
    MESSAGES,
    SMALL_CHAT_MODEL,
    Meter,
    StartMeter,
    error_of,
    post_raw,
    usd,
)

Labels = tuple[tuple[str, str], ...]

# (tenant, feature, kind, model, stream, simulate)
TRAFFIC: list[tuple[str, str | None, str, str, bool, dict[str, Any]]] = [
    ("acme", "chat", "chat", CHAT_MODEL, False, {}),
    ("acme", "search", "chat", ACME_ONLY_MODEL, True, {}),
    ("acme", "search", "chat", CHAT_MODEL, True, {"usage": "cumulative"}),
    ("acme", "chat", "completions", LANGUAGE_MODEL, False, {}),
    ("acme", "search", "embeddings", EMBEDDING_MODEL, False, {}),
    ("acme", "checkout", "chat", CHAT_MODEL, False, {}),  # not a configured feature: "other"
    ("acme", None, "chat", CHAT_MODEL, False, {}),  # no feature: "none"
    ("globex", "chat", "chat", CHAT_MODEL, False, {}),
    ("globex", "search", "chat", SMALL_CHAT_MODEL, True, {"usage": "last"}),
    ("globex", "chat", "chat", ACME_ONLY_MODEL, False, {}),  # not allowed: rejected
    ("globex", "search", "chat", CHAT_MODEL, False, {"status": 500}),  # upstream_error
]


async def _send_traffic(meter: Meter) -> None:
    for i, (tenant, feature, kind, model, stream, simulate) in enumerate(TRAFFIC):
        body: dict[str, Any] = {"model": model, "stream": stream}
        if kind == "chat":
            body |= {"messages": MESSAGES, "max_tokens": 3 + i}
        elif kind == "completions":
            body |= {"prompt": "Metering in one line:", "max_tokens": 3 + i}
        else:
            body["input"] = ["first text to embed", "second"]
        if simulate:
            body["simulate"] = simulate
        headers = meter.auth(tenant) | ({"X-Meter-Feature": feature} if feature else {})
        environment = ("prod", "qa", None)[i % 3]  # qa is not a configured environment: "other"
        if environment:
            headers["X-Meter-Environment"] = environment
        path = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}[kind]
        await post_raw(meter.base_url + path, body, headers)


def _labels(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


def _expected(meter: Meter, rows: list[LedgerRow]) -> dict[str, Counter[Labels]]:
    """What each metric must read, recomputed from the ledger rows alone."""
    features = set(meter.config.attribution.features or ())

    def model(r: LedgerRow) -> str:
        return r.model if r.model in meter.config.prices else "other"

    def feature(r: LedgerRow) -> str:
        return "none" if r.feature is None else r.feature if r.feature in features else "other"

    environments = set(meter.config.attribution.environments or ())

    def environment(r: LedgerRow) -> str:
        if r.environment is None:
            return "none"
        return r.environment if r.environment in environments else "other"

    out: dict[str, Counter[Labels]] = {
        k: Counter() for k in ("requests", "tokens", "cost_pusd", "unknown", "spend_pusd")
    }
    period = period_of(now_us())
    for r in rows:
        tmf = {"tenant": r.tenant, "model": model(r), "feature": feature(r), "environment": environment(r)}
        out["requests"][_labels(**tmf, status=r.status)] += 1
        if r.prompt_tokens is not None:
            out["tokens"][_labels(**tmf, direction="input")] += r.prompt_tokens
        if r.completion_tokens is not None:
            out["tokens"][_labels(**tmf, direction="output")] += r.completion_tokens
        if r.cost_pusd is not None:
            out["cost_pusd"][_labels(**tmf)] += r.cost_pusd
            if r.period == period:
                out["spend_pusd"][_labels(tenant=r.tenant)] += r.cost_pusd
        if r.usage_source == "estimated" or (
            r.usage_source == "none" and r.status not in ("rejected", "upstream_error")
        ):
            out["unknown"][_labels(tenant=r.tenant, model=model(r))] += 1
    return out


def _assert_usd(samples: dict[Labels, float], pusd: Counter[Labels]) -> None:
    """Float USD samples equal exact pico-USD sums within 1e-12 relative."""
    assert set(samples) == set(pusd)
    for labels, value in samples.items():
        exact = usd(pusd[labels])
        assert abs(Decimal(value) - exact) <= exact * Decimal("1e-12"), (labels, value, exact)


async def test_metrics_equal_ledger_and_bill(meter: Meter) -> None:
    """After mixed traffic every counter and the spend gauge equal the ledger's exact sums."""
    await _send_traffic(meter)
    rows = await meter.rows()
    assert len(rows) == len(TRAFFIC)
    assert Counter(r.status for r in rows) == {"ok": 9, "rejected": 1, "upstream_error": 1}
    samples = await meter.metric_samples()
    want = _expected(meter, rows)

    assert samples["together_meter_requests_total"] == want["requests"]
    tokens = samples["together_meter_tokens_total"]
    assert all(v == int(v) for v in tokens.values()) and tokens == want["tokens"]
    assert samples["together_meter_usage_unknown_total"] == want["unknown"]
    _assert_usd(samples["together_meter_cost_usd_total"], want["cost_pusd"])
    _assert_usd(samples["together_meter_spend_month_to_date_usd"], want["spend_pusd"])
    assert {dict(k)["tenant"] for k in want["spend_pusd"]} == {"acme", "globex"}
    assert sum(want["spend_pusd"].values()) > 0

    # token totals per model equal what the simulator billed (embeddings: counted the same way)
    by_model: dict[str, list[int]] = {}
    for labels, value in tokens.items():
        d = dict(labels)
        by_model.setdefault(d["model"], [0, 0])[d["direction"] == "output"] += int(value)
    assert {m: tuple(v) for m, v in by_model.items()} == meter.sim.billed.totals()

    # latency histograms: one observation per forwarded request, one TTFT per stream
    durations = samples["together_meter_request_duration_seconds_count"]
    assert sum(durations.values()) == sum(r.status != "rejected" for r in rows)
    ttft = samples["together_meter_time_to_first_token_seconds_count"]
    assert sum(ttft.values()) == sum(r.stream and r.status == "ok" for r in rows) == 3


async def test_admin_port_endpoints(meter: Meter) -> None:
    """/healthz and /readyz answer 200; /admin/spend needs the operator token, not a tenant key."""
    await _send_traffic(meter)
    status, body = await meter.admin_get("/healthz")
    assert (status, orjson.loads(body)) == (200, {"status": "ok"})
    status, body = await meter.admin_get("/readyz")
    assert (status, orjson.loads(body)) == (
        200,
        {"ready": True, "ledger_writable": True, "accepting": True, "upstream_reachable": True},
    )
    for headers in (meter.auth("acme"), {}):
        status, body = await meter.admin_get("/admin/spend", headers)
        assert status == 401 and error_of(body)["code"] == "invalid_api_key"
    status, body = await meter.admin_get("/admin/spend", {"Authorization": f"Bearer {meter.admin_token}"})
    spend = _expected(meter, await meter.rows())["spend_pusd"]
    assert status == 200
    assert orjson.loads(body) == {
        "period": period_of(now_us()),
        "tenants": {dict(k)["tenant"]: {"spend_usd": format_usd(v)} for k, v in sorted(spend.items())},
    }


async def test_metrics_not_on_public_port(meter: Meter) -> None:
    """The public port answers /metrics (with or without a tenant key) with a JSON 404."""
    for headers in ({}, meter.auth()):
        status, _, body = await post_raw(meter.origin + "/metrics", None, headers, method="GET")
        assert status == 404 and error_of(body)["code"] == "unknown_url"
        assert b"together_meter_" not in body


async def test_spend_gauge_recomputed_after_restart(meter: Meter) -> None:
    """A proxy restarted on the same ledger file reports the same month-to-date spend."""
    await _send_traffic(meter)
    before = (await meter.metric_samples())["together_meter_spend_month_to_date_usd"]
    old = meter.proxy
    await meter.restart()
    assert meter.proxy is not old and (meter.backend == "postgres" or meter.ledger_path.exists())
    after = (await meter.metric_samples())["together_meter_spend_month_to_date_usd"]
    assert after == before
    _assert_usd(after, _expected(meter, await meter.rows())["spend_pusd"])
    status, _ = await meter.admin_get("/readyz")
    assert status == 200


async def test_two_proxies_in_one_process(meter: Meter, tmp_path: Path, tokenizer: Tokenizer) -> None:
    """A second Proxy in the same process has its own metrics (no global registry clash)."""
    config = replace(meter.config, ledger=replace(meter.config.ledger, path=str(tmp_path / "second.db")))
    second = Proxy(config, meter.proxy.secrets, tokenizer=tokenizer)  # DuplicateTimeseries today
    try:
        await second.start()
        await meter.openai().chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=2)
        first_samples = await meter.metric_samples()
        assert sum(first_samples["together_meter_requests_total"].values()) == 1
        status, _, body = await post_raw(
            f"http://127.0.0.1:{second.admin_port}/metrics", None, {}, method="GET"
        )
        assert status == 200 and b"together_meter_requests_total{" not in body
    finally:
        await second.stop()


async def test_contract_metric_families(meter: Meter) -> None:
    """The documented metric names are exposed, with the figures of one plain and one stream call."""
    client = meter.openai()
    await client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=2)
    stream = await client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=2, stream=True
    )
    assert len([c async for c in stream]) == 2
    samples = await meter.metric_samples()
    prompt = meter.sim.billed.entries[0]["prompt_tokens"]
    totals = {
        name: sum(samples.get(name, {}).values())
        for name in (
            "together_meter_requests_total",
            "together_meter_tokens_total",
            "together_meter_cost_usd_total",
            "together_meter_usage_unknown_total",
            "together_meter_spend_month_to_date_usd",
            "together_meter_request_duration_seconds_count",
            "together_meter_time_to_first_token_seconds_count",
            "together_meter_upstream_duration_seconds_count",
        )
    }
    cost = usd(2 * meter.cost(CHAT_MODEL, prompt, 2))
    assert {k: v for k, v in totals.items() if "usd" not in k} == {
        "together_meter_requests_total": 2,
        "together_meter_tokens_total": 2 * (prompt + 2),
        "together_meter_usage_unknown_total": 0,
        "together_meter_request_duration_seconds_count": 2,
        "together_meter_time_to_first_token_seconds_count": 1,
        "together_meter_upstream_duration_seconds_count": 2,
    }
    for name in ("together_meter_cost_usd_total", "together_meter_spend_month_to_date_usd"):
        assert abs(Decimal(totals[name]) - cost) <= cost * Decimal("1e-12"), name


async def test_readyz_fails_when_the_ledger_cannot_be_written(meter: Meter) -> None:
    """/readyz is 503 once the ledger is not writable, and requests get 503 with nothing sent."""
    assert (await meter.admin_get("/readyz"))[0] == 200
    await meter.proxy.ledger.close()  # the writer is gone: nothing can be committed
    status, body = await meter.admin_get("/readyz")
    assert status == 503 and json.loads(body)["ledger_writable"] is False
    before = len(meter.sim.billed.entries)
    status, _, body = await post_raw(
        meter.base_url + "/chat/completions",
        {"model": CHAT_MODEL, "messages": MESSAGES},
        meter.auth("acme"),
    )
    assert status == 503 and error_of(body)["code"] == "not_ready"
    assert len(meter.sim.billed.entries) == before


async def test_prices_sync_time_is_a_gauge(start_meter: StartMeter) -> None:
    """The price table's synced_at is exported as the last-sync timestamp gauge."""
    synced = "2026-11-20T08:30:00+00:00"

    def with_sync(config: Config) -> Config:
        table = replace(config.prices, extra={**config.prices.extra, "synced_at": synced})
        return replace(config, prices=table)

    async with start_meter(change=with_sync) as m:
        samples = await m.metric_samples()
    gauge = samples["together_meter_prices_last_sync_timestamp_seconds"]
    assert list(gauge.values()) == [dt.datetime.fromisoformat(synced).timestamp()]
