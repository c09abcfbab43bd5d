"""The built-in budget webhook end to end: one POST per threshold per period, across restarts."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest

import proxy.server.notify
from proxy.config import Config, Notify
from proxy.core.budgets import Budget
from proxy.core.pricing import PriceTable, Rates

from .support import MESSAGES, Meter, StartMeter

if TYPE_CHECKING:
    from conftest import WebhookReceiver

FLAT = "test/flat-rate"  # $0 per 1M input, $1 per 1M output: 1 output token = 1e6 pico-USD
BUDGET = Budget(100_000_000, hard_limit=True, alert_at=(Decimal("0.5"), Decimal("0.8"), Decimal("1.0")))


def with_webhook(url: str, max_attempts: int = 3) -> Any:
    """A config change: the flat-rate model, acme's $0.0001 hard budget, the webhook at `url`."""

    def change(config: Config) -> Config:
        models = dict(config.prices.models)
        models[FLAT] = Rates(0, 1_000_000, 0, 500_000)
        prices = PriceTable(models, config.prices.source)
        tenants = dict(config.tenants)
        tenants["acme"] = replace(tenants["acme"], budget=BUDGET)
        notify = Notify(url, timeout=2, max_attempts=max_attempts)
        return replace(config, prices=prices, tenants=tenants, notify=notify)

    return change


async def spend(meter: Meter, *output_tokens: int) -> None:
    """One request per entry, each costing exactly that many output tokens at $1 per 1M."""
    async with aiohttp.ClientSession() as s:
        for n in output_tokens:
            body = {"model": FLAT, "messages": MESSAGES, "max_tokens": n}
            async with s.post(
                meter.base_url + "/chat/completions",
                data=orjson.dumps(body),
                headers={**meter.auth("acme"), "Content-Type": "application/json"},
            ) as r:
                assert r.status == 200, await r.text()


async def test_each_threshold_posts_once_and_not_again_after_a_restart(
    start_meter: StartMeter, webhook: WebhookReceiver
) -> None:
    """Crossing 0.5 and 0.8 sends one POST each; more spend and a restart send nothing new."""
    async with start_meter(change=with_webhook(webhook.url)) as meter:
        await spend(meter, 30, 30)  # 60 % of the budget: 0.5 crossed
        await meter.proxy.notifier.drain()
        assert [p["threshold"] for p in webhook.posts] == [0.5]
        await spend(meter, 30)  # 90 %: 0.8 crossed
        await meter.proxy.notifier.drain()
        period = meter.proxy.budgets.period
        half, eighty = webhook.posts
        assert {k: v for k, v in half.items() if k != "sent_at"} == {
            "event": "budget_threshold",
            "tenant": "acme",
            "feature": None,
            "period": period,
            "threshold": 0.5,
            "budget_usd": "0.0001",
            "spent_usd": "0.00006",
            "remaining_usd": "0.00004",
            "hard_limit": True,
        }
        assert (eighty["threshold"], eighty["spent_usd"], eighty["remaining_usd"]) == (
            0.8,
            "0.00009",
            "0.00001",
        )
        await spend(meter, 5)  # 95 %: no new threshold
        await meter.proxy.notifier.drain()
        assert len(webhook.posts) == 2
        assert set(await meter.proxy.ledger.notifications(period)) == {
            ("acme", None, "0.5"),
            ("acme", None, "0.8"),
        }

        await meter.restart()
        await meter.proxy.notifier.drain()
        assert len(webhook.posts) == 2  # delivered before the restart: not sent again

        await spend(meter, 5)  # exactly 100 %: the restarted proxy still reports what is new
        await meter.proxy.notifier.drain()
        assert [p["threshold"] for p in webhook.posts] == [0.5, 0.8, 1.0]
        assert webhook.posts[-1]["remaining_usd"] == "0"


async def test_a_notification_that_failed_is_sent_after_a_restart(
    start_meter: StartMeter, webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crossing whose every attempt failed is not recorded, so the next start delivers it once."""
    monkeypatch.setattr(proxy.server.notify, "FIRST_BACKOFF", 0.01)
    webhook.fail_first = 2
    async with start_meter(change=with_webhook(webhook.url, max_attempts=2)) as meter:
        await spend(meter, 60)
        await meter.proxy.notifier.drain()
        assert len(webhook.posts) == 2 and webhook.accepted == []
        assert meter.proxy.notifier.failed == 1
        period = meter.proxy.budgets.period
        assert await meter.proxy.ledger.notifications(period) == []

        await meter.restart()  # the receiver answers 200 from now on
        await meter.proxy.notifier.drain()
        assert [p["threshold"] for p in webhook.accepted] == [0.5]
        assert webhook.accepted[0]["spent_usd"] == "0.00006"
        assert await meter.proxy.ledger.notifications(period) == [("acme", None, "0.5")]

        await meter.restart()
        await meter.proxy.notifier.drain()
        assert len(webhook.posts) == 3
