"""Makes one metered request's ledger row terminal exactly once, whatever path it takes.

The relay (relay.py, stream_relay.py) calls one method per outcome: `finish` (a usage, seen or
estimated), `upstream_error`, `fail` (nothing came back), `broke_off` (the body was cut), and
`ensure_finished` as the last resort; the first call wins, later ones do nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from proxy.core.budgets import BudgetBook
from proxy.core.pricing import Rates, cost_pusd, format_usd, unit_cost_pusd
from proxy.core.units import Quantity
from proxy.core.usage import Usage
from proxy.errors import MeterError, UpstreamTimeout
from proxy.ledger import Ledger, LedgerRow, LedgerUnavailable
from proxy.server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sinks:
    """Where a finished request goes: the ledger, the counters, the budget book."""

    ledger: Ledger
    metrics: Metrics
    budgets: BudgetBook


class Recorder:
    """Makes one request's row terminal exactly once, whatever path the request takes."""

    __slots__ = (
        "choices",
        "cost_in_body",
        "cost_text",
        "finished",
        "loop",
        "model_label",
        "rates",
        "row",
        "sinks",
        "started",
        "t0",
        "usage_source",
    )

    def __init__(
        self,
        sinks: Sinks,
        row: LedgerRow,
        rates: Rates | None,
        t0: float,
        choices: int = 1,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.sinks, self.row, self.rates, self.t0 = sinks, row, rates, t0
        self.choices = choices  # the request's `n` (bounds a believable usage)
        # the serving loop, when the caller knows it: on Python 3.11 every
        # asyncio.get_running_loop() is a getpid() system call
        self.loop = loop or asyncio.get_running_loop()
        self.started = self.loop.time()
        self.finished = False
        self.cost_in_body = False  # the client opted in to usage.cost (relay.py)
        self.cost_text = "unknown"
        self.usage_source = "none"
        self.model_label = sinks.metrics.model_label(row.model)

    async def finish(
        self,
        status: str,
        usage: Usage | None,
        upstream_status: int | None,
        upstream_id: str | None,
        *,
        client_gone: bool,
        complete: bool,
    ) -> None:
        if self.finished:  # an earlier outcome won: it stays, cost text included
            return
        if client_gone and status in ("ok", "upstream_aborted", "upstream_timeout"):
            status = "client_aborted"
        cost = None
        if usage is not None and self.rates is not None:
            cost = cost_pusd(usage, self.rates, self.row.mode)
            reserved = self.row.reserved_pusd
            if reserved is not None and not 0 <= cost <= reserved and not self._plausible(cost):
                await self._out_of_bounds(
                    status, usage, cost, reserved, upstream_status, upstream_id, complete
                )
                return
            self.cost_text = format_usd(cost)
        if usage is None:
            row = self.row.terminal(
                status,
                upstream_status=upstream_status,
                cost_pusd=cost,
                stream_complete=complete,
                upstream_id=upstream_id,
            )
        else:
            self.usage_source = usage.source
            row = self.row.terminal(
                status,
                upstream_status=upstream_status,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                usage_source=usage.source,
                cost_pusd=cost,
                stream_complete=complete,
                upstream_id=upstream_id,
            )
        await self._commit(row)

    async def finish_units(
        self,
        quantity: Quantity,
        upstream_status: int,
        upstream_id: str | None,
        *,
        client_gone: bool,
        status: str = "ok",
        free: bool = False,
    ) -> None:
        """A route billed per megapixel, image or second: the quantity priced at the model's
        per-unit price (unknown, NULL, when the model has none for this unit); 0 if `free` (a
        call together does not bill itself: a video job's creation)."""
        if self.finished:
            return
        rates = self.rates
        cost = 0 if free else None
        if not free and rates is not None and rates.unit == quantity.unit:
            cost = unit_cost_pusd(quantity.micros, rates)
        if cost is not None:
            self.cost_text = format_usd(cost)
        self.usage_source = quantity.source
        row = self.row.terminal(
            "client_aborted" if client_gone else status,
            upstream_status=upstream_status,
            usage_source=quantity.source,
            cost_pusd=cost,
            stream_complete=status == "ok",
            upstream_id=upstream_id,
            unit=quantity.unit,
            quantity_micros=quantity.micros,
        )
        await self._commit(row)

    def quote(self, usage: Usage) -> str | None:
        """The cost `finish` will record for `usage`, as text (the reservation when the usage
        is not believable); None when the model has no price."""
        if self.rates is None:
            return None
        cost = cost_pusd(usage, self.rates, self.row.mode)
        reserved = self.row.reserved_pusd
        if reserved is not None and not 0 <= cost <= reserved and not self._plausible(cost):
            cost = reserved
        return format_usd(cost)

    def _plausible(self, cost: int) -> bool:
        """A usage above the reservation can still be real: without max_tokens the reservation
        assumes the configured output cap, and images or chat templates can make more prompt
        tokens than body bytes. What no request can cost is more than its model's whole context
        window, times its `n` choices, at the dearer of the two rates: only beyond that (or below
        0) is the upstream's usage not believed. Without a known context length, the
        reservation is the bound."""
        rates = self.rates
        if cost < 0 or rates is None or not rates.context_length:
            return False
        ceiling = rates.context_length * max(self.choices, 1) * max(*rates.for_mode(self.row.mode))
        return cost <= ceiling

    async def _out_of_bounds(
        self,
        status: str,
        usage: Usage,
        cost: int,
        reserved: int,
        upstream_status: int | None,
        upstream_id: str | None,
        complete: bool,
    ) -> None:
        """A usage costing more than the request's upper bound (or less than 0) is not believed:
        the row is charged the reservation, flagged estimated / usage_out_of_bounds."""
        log.warning(
            "usage out of bounds for request %s (model %s): %d prompt + %d completion tokens "
            "cost %s USD, above the reservation of %s USD; charging the reservation",
            self.row.request_id,
            self.row.model,
            usage.prompt_tokens,
            usage.completion_tokens,
            format_usd(cost),
            format_usd(reserved),
        )
        self.cost_text, self.usage_source = format_usd(reserved), "estimated"
        row = self.row.terminal(
            status,
            upstream_status=upstream_status,
            usage_source="estimated",
            cost_pusd=reserved,
            stream_complete=complete,
            error_code="usage_out_of_bounds",
            upstream_id=upstream_id,
        )
        await self._commit(row)

    async def upstream_error(self, upstream_status: int) -> None:
        """The upstream answered 4xx/5xx: it billed nothing, so the cost is known to be 0."""
        if self.finished:
            return
        self.sinks.metrics.upstream_error(f"http_{upstream_status // 100}xx")
        row = self.row.terminal(
            "upstream_error",
            upstream_status=upstream_status,
            cost_pusd=0,
            error_code=f"upstream_{upstream_status}",
        )
        self.cost_text = "0"
        await self._commit(row)

    def reserved_cost(self) -> int | None:
        """What a request we cannot measure is charged: its reservation (None if unpriced)."""
        return self.row.reserved_pusd

    async def fail(self, exc: MeterError) -> None:
        """Forwarding failed before a response: unreachable (nothing billed) or timed out."""
        if self.finished:
            return
        if isinstance(exc, UpstreamTimeout) and exc.sent:
            # the upstream may be generating (and billing) a response we will never see
            self.sinks.metrics.upstream_error("timeout")
            row = self.row.terminal(
                "upstream_timeout",
                usage_source="estimated",
                cost_pusd=self.reserved_cost(),
                error_code=exc.code,
            )
        elif isinstance(exc, UpstreamTimeout):  # no connection in time: nothing was sent
            self.sinks.metrics.upstream_error("connect_timeout")
            row = self.row.terminal("upstream_timeout", cost_pusd=0, error_code="connect_timeout")
        else:
            self.sinks.metrics.upstream_error("unreachable")
            row = self.row.terminal("upstream_error", cost_pusd=0, error_code=exc.code)
        await self._commit(row)

    async def broke_off(self, exc: MeterError, upstream_status: int) -> None:
        """The upstream answered, then its body broke off or stalled: it may have billed the
        whole request, so the row carries the reservation (an upper bound), flagged estimated."""
        if self.finished:
            return
        self.sinks.metrics.upstream_error("body_broken")
        if upstream_status != 200:  # an error answer that broke off: still nothing billed
            await self._commit(
                self.row.terminal(
                    "upstream_error", upstream_status=upstream_status, cost_pusd=0, error_code=exc.code
                )
            )
            return
        status = "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_aborted"
        row = self.row.terminal(
            status,
            upstream_status=upstream_status,
            usage_source="estimated",
            cost_pusd=self.reserved_cost(),
            error_code=exc.code,
        )
        await self._commit(row)

    async def ensure_finished(self) -> None:
        """Last resort (cancellation, a bug): still make the row terminal, at reserved cost."""
        if self.finished:
            return
        row = self.row.terminal(
            "shutdown_aborted", usage_source="estimated", cost_pusd=self.reserved_cost(), error_code="aborted"
        )
        await asyncio.shield(self._commit(row))

    async def _commit(self, row: LedgerRow) -> None:
        if self.finished:
            return
        self.finished = True
        # counters are bumped by the ledger when the row commits (even if we are cancelled)
        try:
            made = await self.sinks.ledger.finish(row)
        except LedgerUnavailable:
            log.error(
                "ledger: could not record request %s; it stays in flight until the ledger "
                "commits it, else the reaper charges its reservation",
                row.request_id,
            )
            return
        if not made:  # a shared ledger's reaper settled it first: drop our local reservation
            self.sinks.budgets.release(row.tenant, row.feature, row.reserved_pusd or 0)
        self.sinks.metrics.request_duration.observe(
            (row.endpoint, "true" if row.stream else "false"), time.perf_counter() - self.t0
        )
