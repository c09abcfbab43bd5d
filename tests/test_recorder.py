"""proxy/server/recorder.py: one terminal row per request, whatever outcome comes first, on a
real SQLite ledger with the real counters and budget book."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config import Attribution
from proxy.core.budgets import BudgetBook, Periods
from proxy.core.pricing import Rates, cost_pusd
from proxy.core.usage import Usage
from proxy.errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout
from proxy.ledger import IN_FLIGHT, LedgerRow, now_us, period_of
from proxy.ledger.sqlite import SQLiteLedger
from proxy.server.metrics import Metrics
from proxy.server.recorder import Recorder, Sinks

RATES = Rates(
    input=900_000, output=3_300_000, batch_input=450_000, batch_output=1_650_000, context_length=8192
)
RESERVED = 1_000 * RATES.input + 100 * RATES.output


@pytest.fixture
async def sinks(tmp_path: Path) -> AsyncIterator[Sinks]:
    metrics = Metrics(Attribution(), ["m"])
    ledger = SQLiteLedger(tmp_path / "ledger.db", on_terminal=metrics.record)
    await ledger.open()
    try:
        yield Sinks(ledger, metrics, BudgetBook({}, Periods()))
    finally:
        await ledger.close()


async def begun(sinks: Sinks, n: int = 0, reserved: int | None = RESERVED) -> Recorder:
    now = now_us()
    row = LedgerRow(
        f"req-{n}",
        "acme",
        "k",
        "m",
        "chat",
        "serverless",
        None,
        None,
        False,
        now,
        period_of(now),
        reserved_pusd=reserved,
    )
    await sinks.ledger.begin(row)
    return Recorder(sinks, row, RATES if reserved is not None else None, time.perf_counter())


async def only_row(sinks: Sinks) -> LedgerRow:
    rows = await sinks.ledger.rows()
    assert len(rows) == 1 and rows[0].status != IN_FLIGHT
    return rows[0]


async def test_finish_prices_the_usage_and_the_first_outcome_wins(sinks: Sinks) -> None:
    """finish() records the exact cost; any later outcome (error, last resort) changes nothing."""
    meter = await begun(sinks)
    await meter.finish("ok", Usage(100, 20), 200, "up-1", client_gone=False, complete=True)
    await meter.upstream_error(500)
    await meter.ensure_finished()
    row = await only_row(sinks)
    assert (row.status, row.cost_pusd, row.usage_source) == (
        "ok",
        cost_pusd(Usage(100, 20), RATES),
        "upstream",
    )
    assert meter.cost_text == "0.000156" and row.upstream_id == "up-1"
    assert sinks.metrics.requests[("acme", "m", "none", "none", "ok")] == 1


async def test_a_client_gone_turns_ok_into_client_aborted(sinks: Sinks) -> None:
    """A usage learnt after the client left is recorded as client_aborted, still priced."""
    meter = await begun(sinks)
    await meter.finish("ok", Usage(10, 5), 200, None, client_gone=True, complete=True)
    row = await only_row(sinks)
    assert row.status == "client_aborted" and row.cost_pusd == cost_pusd(Usage(10, 5), RATES)


async def test_an_impossible_usage_is_charged_the_reservation(sinks: Sinks) -> None:
    """More than the whole context window can cost is not believed: the reservation is charged."""
    meter = await begun(sinks)
    await meter.finish("ok", Usage(10**7, 10**7), 200, None, client_gone=False, complete=True)
    row = await only_row(sinks)
    assert (row.cost_pusd, row.usage_source, row.error_code) == (RESERVED, "estimated", "usage_out_of_bounds")


async def test_a_long_answer_within_the_context_is_billed_as_reported(sinks: Sinks) -> None:
    """Above the reservation but possible (no max_tokens): billed exactly as reported."""
    meter = await begun(sinks)
    usage = Usage(1_000, 4_000)
    await meter.finish("ok", usage, 200, None, client_gone=False, complete=True)
    row = await only_row(sinks)
    assert row.cost_pusd == cost_pusd(usage, RATES) > RESERVED and row.usage_source == "upstream"


@pytest.mark.parametrize(
    ("exc", "status", "cost", "code"),
    [
        (UpstreamError("refused"), "upstream_error", 0, "upstream_unreachable"),
        (UpstreamTimeout("no connect", sent=False), "upstream_timeout", 0, "connect_timeout"),
        (UpstreamTimeout("silent", sent=True), "upstream_timeout", RESERVED, "upstream_timeout"),
    ],
)
async def test_fail_charges_the_reservation_only_when_the_request_was_sent(
    sinks: Sinks, exc: UpstreamError, status: str, cost: int, code: str
) -> None:
    """Nothing sent: cost 0; sent and no answer: the reservation (it may have been billed)."""
    meter = await begun(sinks)
    await meter.fail(exc)
    row = await only_row(sinks)
    assert (row.status, row.cost_pusd, row.error_code) == (status, cost, code)


async def test_broken_bodies(sinks: Sinks) -> None:
    """A 200 whose body broke off is charged the reservation; a broken error answer 0."""
    meter = await begun(sinks, 1)
    await meter.broke_off(UpstreamProtocolError("cut"), 200)
    other = await begun(sinks, 2)
    await other.broke_off(UpstreamProtocolError("cut"), 503)
    rows = {r.request_id: r for r in await sinks.ledger.rows()}
    assert (rows["req-1"].status, rows["req-1"].cost_pusd) == ("upstream_aborted", RESERVED)
    assert (rows["req-2"].status, rows["req-2"].cost_pusd) == ("upstream_error", 0)


async def test_an_unpriced_model_is_recorded_with_unknown_cost(sinks: Sinks) -> None:
    """No rates: the usage is kept, the cost is NULL (never 0)."""
    meter = await begun(sinks, reserved=None)
    await meter.finish("ok", Usage(10, 5), 200, None, client_gone=False, complete=True)
    row = await only_row(sinks)
    assert (row.prompt_tokens, row.cost_pusd) == (10, None)


async def test_the_last_resort_charges_the_reservation(sinks: Sinks) -> None:
    """A request that ended without any outcome (cancelled) becomes shutdown_aborted."""
    meter = await begun(sinks)
    await meter.ensure_finished()
    row = await only_row(sinks)
    assert (row.status, row.cost_pusd, row.error_code) == ("shutdown_aborted", RESERVED, "aborted")
