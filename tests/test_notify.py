"""proxy/server/notify.py: one webhook POST per crossing, retried with backoff, recorded after a 2xx."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import proxy.server.notify
from proxy.config import Notify
from proxy.core.budgets import Crossing
from proxy.ledger.sqlite import SQLiteLedger
from proxy.server.notify import Notifier, payload

if TYPE_CHECKING:
    from conftest import WebhookReceiver

PERIOD = "2026-11"
BUDGET = 100 * 10**12  # $100
HALF = Crossing("acme", None, PERIOD, Decimal("0.5"), BUDGET, 50_250_000_000_000)
EIGHTY = Crossing("acme", None, PERIOD, Decimal("0.8"), BUDGET, 81 * 10**12)
SEARCH = Crossing("acme", "search", PERIOD, Decimal("1.0"), 10**12, 1_200_000_000_000)
PAYLOAD_KEYS = {
    "event",
    "tenant",
    "feature",
    "period",
    "threshold",
    "budget_usd",
    "spent_usd",
    "remaining_usd",
    "hard_limit",
    "sent_at",
}


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SQLiteLedger]:
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    await ledger.open()
    try:
        yield ledger
    finally:
        await ledger.close()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy.server.notify, "FIRST_BACKOFF", 0.01)


async def deliver(
    notifier: Notifier, *batches: tuple[list[Crossing], dict[tuple[str, str | None], bool]]
) -> None:
    """Start the notifier, enqueue the batches, wait until all were delivered or given up."""
    await notifier.start()
    try:
        for crossings, hard in batches:
            notifier.enqueue(crossings, hard)
        await notifier.drain(within=10)
    finally:
        await notifier.stop()


def test_payload_is_the_documented_body() -> None:
    """payload() has exactly the documented keys; money as exact decimal strings."""
    body = payload(HALF, hard_limit=True)
    assert set(body) == PAYLOAD_KEYS
    sent_at = dt.datetime.fromisoformat(body.pop("sent_at"))
    assert sent_at.utcoffset() == dt.timedelta(0)
    assert body == {
        "event": "budget_threshold",
        "tenant": "acme",
        "feature": None,
        "period": PERIOD,
        "threshold": 0.5,
        "budget_usd": "100",
        "spent_usd": "50.25",
        "remaining_usd": "49.75",
        "hard_limit": True,
    }


def test_payload_past_the_budget_has_negative_remaining() -> None:
    """Spend beyond the budget shows as a negative remaining amount."""
    body = payload(SEARCH, hard_limit=False)
    assert (body["feature"], body["threshold"], body["remaining_usd"]) == ("search", 1.0, "-0.2")


async def test_one_post_per_crossing_with_the_documented_body(
    webhook: WebhookReceiver, ledger: SQLiteLedger
) -> None:
    """Each crossing is POSTed exactly once as JSON and recorded in the ledger."""
    notifier = Notifier(Notify(webhook.url, timeout=2, max_attempts=3), ledger)
    await deliver(notifier, ([HALF, EIGHTY], {("acme", None): True}), ([SEARCH], {}))
    assert len(webhook.posts) == 3
    assert set(webhook.content_types) == {"application/json"}
    for body in webhook.posts:
        assert set(body) == PAYLOAD_KEYS
    assert [(b["feature"], b["threshold"], b["hard_limit"]) for b in webhook.posts] == [
        (None, 0.5, True),
        (None, 0.8, True),
        ("search", 1.0, False),  # not in the hard-limit map: reported as soft
    ]
    assert webhook.posts[1]["spent_usd"] == "81" and webhook.posts[1]["remaining_usd"] == "19"
    assert set(await ledger.notifications(PERIOD)) == {
        ("acme", None, "0.5"),
        ("acme", None, "0.8"),
        ("acme", "search", "1.0"),
    }
    assert (notifier.delivered, notifier.failed) == (3, 0)


async def test_retries_after_500_with_doubling_backoff(
    webhook: WebhookReceiver, ledger: SQLiteLedger
) -> None:
    """Two 500s, then a 200: three POSTs of the same body, spaced by at least 1x and 2x the backoff."""
    webhook.fail_first = 2
    notifier = Notifier(Notify(webhook.url, timeout=2, max_attempts=3), ledger)
    await deliver(notifier, ([HALF], {}))
    assert len(webhook.posts) == 3
    assert all(p["threshold"] == 0.5 for p in webhook.posts)
    first_gap, second_gap = (b - a for a, b in zip(webhook.times, webhook.times[1:], strict=False))
    assert first_gap >= proxy.server.notify.FIRST_BACKOFF
    assert second_gap >= 2 * proxy.server.notify.FIRST_BACKOFF
    assert await ledger.notifications(PERIOD) == [("acme", None, "0.5")]
    assert (notifier.delivered, notifier.failed) == (1, 0)


async def test_nothing_is_recorded_before_the_receiver_answers(
    webhook: WebhookReceiver, ledger: SQLiteLedger
) -> None:
    """While the POST waits for its answer the ledger has no record; the 2xx records it."""
    webhook.hold.clear()
    notifier = Notifier(Notify(webhook.url, timeout=5, max_attempts=1), ledger)
    await notifier.start()
    try:
        notifier.enqueue([HALF], {})
        async with asyncio.timeout(5):
            await webhook.arrived.wait()
        assert await ledger.notifications(PERIOD) == []
        webhook.hold.set()
        await notifier.drain(within=5)
    finally:
        await notifier.stop()
    assert await ledger.notifications(PERIOD) == [("acme", None, "0.5")]


async def test_after_max_attempts_nothing_is_recorded(webhook: WebhookReceiver, ledger: SQLiteLedger) -> None:
    """A receiver that keeps failing gets exactly max_attempts POSTs; nothing is recorded."""
    webhook.fail_first = 100
    notifier = Notifier(Notify(webhook.url, timeout=2, max_attempts=4), ledger)
    await deliver(notifier, ([HALF], {}))
    assert len(webhook.posts) == 4
    assert await ledger.notifications(PERIOD) == []
    assert (notifier.delivered, notifier.failed) == (0, 1)


async def test_a_crossing_given_up_does_not_block_the_next(
    webhook: WebhookReceiver, ledger: SQLiteLedger
) -> None:
    """After one crossing exhausts its attempts, the next one in the queue is still delivered."""
    webhook.fail_first = 2
    notifier = Notifier(Notify(webhook.url, timeout=2, max_attempts=2), ledger)
    await deliver(notifier, ([HALF, EIGHTY], {}))
    assert [p["threshold"] for p in webhook.posts] == [0.5, 0.5, 0.8]
    assert await ledger.notifications(PERIOD) == [("acme", None, "0.8")]
    assert (notifier.delivered, notifier.failed) == (1, 1)


async def test_unreachable_receiver_is_given_up_after_max_attempts(ledger: SQLiteLedger) -> None:
    """Connection errors count as failed attempts; the request path never sees them."""
    notifier = Notifier(Notify("http://127.0.0.1:9/hook", timeout=1, max_attempts=2), ledger)
    await deliver(notifier, ([HALF], {}))
    assert (notifier.delivered, notifier.failed) == (0, 1)
    assert await ledger.notifications(PERIOD) == []


async def test_without_webhook_url_nothing_is_queued_or_sent(
    webhook: WebhookReceiver, ledger: SQLiteLedger
) -> None:
    """With no webhook_url, crossings are dropped at enqueue: setting a URL later sends nothing."""
    notifier = Notifier(Notify(None), ledger)
    notifier.enqueue([HALF, EIGHTY], {})
    notifier.settings = Notify(webhook.url, timeout=2, max_attempts=1)  # as a reload would
    await deliver(notifier)
    assert webhook.posts == []
    assert await ledger.notifications(PERIOD) == []
    assert (notifier.delivered, notifier.failed) == (0, 0)


class FlakyStore:
    """A notification store whose first write fails, as a locked database would."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, str | None, str, str]] = []
        self.calls = 0

    async def claim_notification(self, tenant: str, feature: str | None, period: str, threshold: str) -> bool:
        return True

    async def release_notification(
        self, tenant: str, feature: str | None, period: str, threshold: str
    ) -> None:
        return None

    async def record_notification(
        self, tenant: str, feature: str | None, period: str, threshold: str
    ) -> bool:
        self.calls += 1
        if self.calls == 1:
            raise sqlite3.OperationalError("database is locked")
        self.recorded.append((tenant, feature, period, threshold))
        return True


async def test_a_store_error_does_not_stop_the_notifier(webhook: WebhookReceiver) -> None:
    """When recording one delivery fails, that crossing counts as failed and the next is delivered."""
    store = FlakyStore()
    notifier = Notifier(Notify(webhook.url, timeout=2, max_attempts=1), store)
    await deliver(notifier, ([HALF, EIGHTY], {}))
    assert [p["threshold"] for p in webhook.posts] == [0.5, 0.8]
    assert store.recorded == [("acme", None, PERIOD, "0.8")]
    assert (notifier.delivered, notifier.failed) == (1, 1)


async def test_timeout_follows_reloaded_settings(webhook: WebhookReceiver, ledger: SQLiteLedger) -> None:
    """A notify.timeout changed after start (a reload) bounds the next attempt."""
    webhook.hold.clear()  # the receiver never answers
    notifier = Notifier(Notify(webhook.url, timeout=30, max_attempts=1), ledger)
    await notifier.start()
    try:
        await asyncio.sleep(0.05)  # the delivery task is running with the first settings
        notifier.settings = Notify(webhook.url, timeout=0.2, max_attempts=1)
        notifier.enqueue([HALF], {})
        await notifier.drain(within=5)
    finally:
        await notifier.stop()
    assert len(webhook.posts) == 1
    assert (notifier.delivered, notifier.failed) == (0, 1)
