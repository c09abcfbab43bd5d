"""Prometheus metrics: exact per-label totals kept as integers, rendered at scrape time.

Counters hold integers (tokens, requests, pico-USD) and are converted to floats only when
Prometheus reads them, so the process never accumulates float error. Label values are bounded:
tenants and models come from config, features and environments are capped to a configured set
(others become `other`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from proxy.config import Attribution
from proxy.core.budgets import BudgetBook
from proxy.core.pricing import Rates, cache_savings_pusd
from proxy.core.ratelimits import LastSeen
from proxy.core.routes import OBJECT_ENDPOINTS
from proxy.ledger import LedgerRow

PREFIX = "together_meter_"
NONE_LABEL = "none"
OTHER_LABEL = "other"
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class Histogram:
    """A labelled histogram with fixed buckets; observe() is a bisect and two adds."""

    __slots__ = ("buckets", "doc", "labelnames", "name", "series")

    def __init__(self, name: str, doc: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.buckets = tuple(buckets)
        self.series: dict[tuple[str, ...], list[Any]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [[0] * (len(self.buckets) + 1), 0.0]
        s[0][bisect.bisect_left(self.buckets, value)] += 1
        s[1] += value

    def collect(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for labels, (counts, total) in sorted(self.series.items()):
            cumulative, acc = [], 0
            for bound, c in zip((*map(str, self.buckets), "+Inf"), counts, strict=True):
                acc += c
                cumulative.append((bound, acc))
            fam.add_metric(list(labels), cumulative, total)
        return fam


class MetricSource(Protocol):
    """Something that renders metric families (the supervisor of `serve --workers N`)."""

    def collect(self) -> Iterator[Metric]: ...


class LabelCap:
    """Maps free-form attribution values to a bounded label set."""

    __slots__ = ("_allowed", "_limit", "_seen")

    def __init__(self, allowed: Iterable[str] | None, limit: int) -> None:
        self._allowed = None if allowed is None else frozenset(allowed)
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if value is None:
            return NONE_LABEL
        if self._allowed is not None:
            return value if value in self._allowed else OTHER_LABEL
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return OTHER_LABEL


class Metrics:
    """All of the proxy's own metrics, plus a registry that renders them."""

    def __init__(self, attribution: Attribution, models: Iterable[str]) -> None:
        self.feature_label = LabelCap(attribution.features, attribution.max_label_values)
        self.environment_label = LabelCap(attribution.environments, attribution.max_label_values)
        self._models = frozenset(models)
        self._rates = _rates_of(models)  # what caching saved is priced at these
        self.requests: dict[tuple[str, str, str, str, str], int] = {}
        self.tokens: dict[tuple[str, str, str, str, str], int] = {}
        self.cached_tokens: dict[tuple[str, str, str, str], int] = {}  # a part of tokens "input"
        self.cache_savings_pusd: dict[tuple[str, str, str, str], int] = {}
        self.cost_pusd: dict[tuple[str, str, str, str], int] = {}
        self.usage_unknown: dict[tuple[str, str], int] = {}
        self.unit_micros: dict[tuple[str, str, str], int] = {}  # (tenant, model, unit): millionths
        self.ledger_errors = 0
        self.ledger_rows = 0
        self.ledger_commits = 0
        self.in_flight = 0
        self.upstream_errors: dict[str, int] = {}
        self.header_timeouts: dict[str, int] = {}  # listener -> connections closed, head late
        self.malformed_requests: dict[str, int] = {}  # listener -> malformed heads answered 400
        self.rate_limits = LastSeen()  # together's rate-limit headers, last values per model
        self.prices_last_sync: float | None = None
        self.budgets: BudgetBook | None = None  # month-to-date spend and budget gauges
        # `serve --workers N`: the supervisor's /metrics renders its workers' merged totals
        self.fleet: MetricSource | None = None
        self.dedicated: MetricSource | None = None  # the dedicated endpoint follower's series
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from request received to its ledger row committed (the end of the response "
            "is written right after).",
            ("endpoint", "stream"),
            LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Streams: time from request received to the first content chunk relayed.",
            ("model",),
            LATENCY_BUCKETS,
        )
        self.upstream_duration = Histogram(
            PREFIX + "upstream_duration_seconds",
            "Time from forwarding to the upstream's response headers.",
            ("endpoint",),
            LATENCY_BUCKETS,
        )
        self.overhead = Histogram(
            PREFIX + "proxy_overhead_seconds",
            "Time the proxy itself added before forwarding (auth, parse, ledger begin).",
            ("endpoint",),
            OVERHEAD_BUCKETS,
        )
        self.ledger_write = Histogram(
            PREFIX + "ledger_commit_seconds",
            "Duration of one ledger group commit.",
            (),
            (*OVERHEAD_BUCKETS, 1.0, 5.0),
        )

    def _rate_limit_family(self) -> GaugeMetricFamily:
        return _rate_limit_gauges(self.rate_limits)

    def model_label(self, model: str) -> str:
        return model if model in self._models else OTHER_LABEL

    def record(self, row: LedgerRow) -> None:
        """Count one finished request (called once, after its row committed)."""
        model = self.model_label(row.model)
        feature = self.feature_label(row.feature)
        env = self.environment_label(row.environment)
        key = (row.tenant, model, feature, env, row.status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if row.prompt_tokens is not None:
            k = (row.tenant, model, feature, env, "input")
            self.tokens[k] = self.tokens.get(k, 0) + row.prompt_tokens
        if row.completion_tokens is not None:
            k = (row.tenant, model, feature, env, "output")
            self.tokens[k] = self.tokens.get(k, 0) + row.completion_tokens
        if row.cost_pusd is not None:
            k3 = (row.tenant, model, feature, env)
            self.cost_pusd[k3] = self.cost_pusd.get(k3, 0) + row.cost_pusd
        if row.cached_tokens:
            self._count_cache(row, (row.tenant, model, feature, env))
        if row.quantity_micros is not None:
            k4 = (row.tenant, model, row.unit)
            self.unit_micros[k4] = self.unit_micros.get(k4, 0) + row.quantity_micros
        if row.usage_source == "estimated" or (
            row.usage_source == "none"
            and row.status not in ("rejected", "upstream_error")
            # files and batches calls: together bills nothing for them, their cost is known 0
            and not (row.cost_pusd == 0 and row.endpoint in OBJECT_ENDPOINTS)
        ):
            k2 = (row.tenant, model)
            self.usage_unknown[k2] = self.usage_unknown.get(k2, 0) + 1

    def _count_cache(self, row: LedgerRow, key: tuple[str, str, str, str]) -> None:
        """Cached prompt tokens of a row, and what they saved at the rates in force now."""
        cached = row.cached_tokens or 0
        self.cached_tokens[key] = self.cached_tokens.get(key, 0) + cached
        if row.cost_pusd is not None:  # a row charged its reservation or unpriced saved nothing known
            saved = cache_savings_pusd(cached, self._rates.get(row.model), row.mode)
            self.cache_savings_pusd[key] = self.cache_savings_pusd.get(key, 0) + saved

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1

    def header_timeout(self, listener: str) -> None:
        """A connection on `listener` (public|admin) was closed: its request head was late."""
        self.header_timeouts[listener] = self.header_timeouts.get(listener, 0) + 1

    def malformed_request(self, listener: str) -> None:
        """A malformed request head on `listener` (public|admin) was answered 400."""
        self.malformed_requests[listener] = self.malformed_requests.get(listener, 0) + 1

    def on_commit(self, rows: int, seconds: float, ok: bool) -> None:
        """Called from the ledger writer thread after each group commit (or failed attempt)."""
        if not ok:
            self.ledger_errors += 1
            return
        self.ledger_rows += rows
        self.ledger_commits += 1
        self.ledger_write.observe((), seconds)

    def set_models(self, models: Iterable[str]) -> None:
        """Priced models (and their rates) after a config reload (others are labelled `other`)."""
        self._models = frozenset(models)
        self._rates = _rates_of(models)

    # -- rendering ----------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        if self.fleet is not None:
            yield from self.fleet.collect()
            return
        yield self._rate_limit_family()
        fam = CounterMetricFamily(
            PREFIX + "requests",
            "Requests by final status.",
            labels=("tenant", "model", "feature", "environment", "status"),
        )
        for k, v in sorted(self.requests.items()):
            fam.add_metric(list(k), v)
        yield fam
        fam = CounterMetricFamily(
            PREFIX + "tokens",
            "Tokens metered (input = prompt).",
            labels=("tenant", "model", "feature", "environment", "direction"),
        )
        for k, v in sorted(self.tokens.items()):
            fam.add_metric(list(k), v)
        yield fam
        fam = CounterMetricFamily(
            PREFIX + "cost_usd",
            "Cost of metered requests in USD.",
            labels=("tenant", "model", "feature", "environment"),
        )
        for k3, p in sorted(self.cost_pusd.items()):
            fam.add_metric(list(k3), p / 1e12)
        yield fam
        yield from self._cache_families()
        fam = CounterMetricFamily(
            PREFIX + "units",
            "Quantities metered in together's units other than tokens: megapixel, image, audio_second, "
            "video_second (tokens are in tokens_total).",
            labels=("tenant", "model", "unit"),
        )
        for k4, q in sorted(self.unit_micros.items()):
            fam.add_metric(list(k4), q / 1e6)
        yield fam
        fam = CounterMetricFamily(
            PREFIX + "usage_unknown",
            "Requests whose usage the upstream did not report (estimated).",
            labels=("tenant", "model"),
        )
        for k2, v in sorted(self.usage_unknown.items()):
            fam.add_metric(list(k2), v)
        yield fam
        fam = CounterMetricFamily(PREFIX + "upstream_errors", "Upstream failures by kind.", labels=("kind",))
        for kind, v in sorted(self.upstream_errors.items()):
            fam.add_metric([kind], v)
        yield fam
        fam = CounterMetricFamily(
            PREFIX + "header_timeouts",
            "Connections closed because their request head did not arrive within limits.header_timeout.",
            labels=("listener",),
        )
        for listener, v in sorted(self.header_timeouts.items()):
            fam.add_metric([listener], v)
        yield fam
        fam = CounterMetricFamily(
            PREFIX + "malformed_requests",
            "Request heads that could not be parsed (bad request line or header, too long), answered 400.",
            labels=("listener",),
        )
        for listener, v in sorted(self.malformed_requests.items()):
            fam.add_metric([listener], v)
        yield fam
        yield CounterMetricFamily(
            PREFIX + "ledger_write_errors", "Ledger group commits that failed.", value=self.ledger_errors
        )
        yield CounterMetricFamily(
            PREFIX + "ledger_rows_written",
            "Ledger row writes committed (begin and finish).",
            value=self.ledger_rows,
        )
        yield GaugeMetricFamily(
            PREFIX + "requests_in_flight",
            "Admitted requests (row begun) not yet recorded.",
            value=self.in_flight,
        )
        if self.budgets is not None:
            yield from budget_gauges(self.budgets)
        if self.dedicated is not None:
            yield from self.dedicated.collect()
        if self.prices_last_sync is not None:
            yield GaugeMetricFamily(
                PREFIX + "prices_last_sync_timestamp_seconds",
                "Unix time of the last successful `prices sync`.",
                value=self.prices_last_sync,
            )
        for h in (self.request_duration, self.ttft, self.upstream_duration, self.overhead, self.ledger_write):
            yield h.collect()

    def _cache_families(self) -> Iterator[Metric]:
        """Cached prompt tokens and what caching saved (both from rows that reported a cache hit)."""
        labels = ("tenant", "model", "feature", "environment")
        fam = CounterMetricFamily(
            PREFIX + "cached_tokens",
            "Cached prompt tokens reported by the upstream (a part of tokens_total{direction=input}).",
            labels=labels,
        )
        for k, v in sorted(self.cached_tokens.items()):
            fam.add_metric(list(k), v)
        yield fam
        fam = CounterMetricFamily(
            PREFIX + "cache_savings_usd",
            "What caching saved in USD: cached tokens x (input rate - cached_input rate).",
            labels=labels,
        )
        for k, p in sorted(self.cache_savings_pusd.items()):
            fam.add_metric(list(k), p / 1e12)
        yield fam


def _rates_of(models: Iterable[str]) -> Mapping[str, Rates]:
    """The price table's rates when `models` is its model -> Rates mapping (else no rates)."""
    return models if isinstance(models, Mapping) else MappingProxyType({})  # not a counter dict


def budget_gauges(book: BudgetBook) -> Iterator[Metric]:
    """Month-to-date spend per tenant and the state of each tenant-wide budget."""
    spend = GaugeMetricFamily(
        PREFIX + "spend_month_to_date_usd",
        "Spend in the current budget period (calendar month), recomputed from the ledger at start.",
        labels=("tenant",),
    )
    for tenant, p in sorted(book.spent_all.items()):
        spend.add_metric([tenant], p / 1e12)
    yield spend
    names = {
        "budget_usd": "Monthly budget of the tenant.",
        "budget_remaining_usd": "Budget minus spend minus reservations (negative: overspent).",
        "budget_reserved_usd": "Cost reserved by the tenant's requests in flight.",
        "budget_hard_limit": "1 if requests are refused at the budget, 0 if it only alerts.",
        "budget_period_end_timestamp_seconds": "Unix time when the current budget period ends.",
    }
    fams = {n: GaugeMetricFamily(PREFIX + n, doc, labels=("tenant",)) for n, doc in names.items()}
    thresholds = GaugeMetricFamily(
        PREFIX + "budget_alert_threshold_ratio",
        "A configured alert threshold, as a fraction of the budget.",
        labels=("tenant", "threshold"),
    )
    end = book.periods.bounds(book.period)[1] if book.period else 0.0
    for (tenant, feature), (budget, spent, reserved) in sorted(book.snapshot().items(), key=str):
        if feature is not None:
            continue  # feature budgets: see GET /admin/budgets
        fams["budget_usd"].add_metric([tenant], budget.monthly_pusd / 1e12)
        fams["budget_remaining_usd"].add_metric([tenant], (budget.monthly_pusd - spent - reserved) / 1e12)
        fams["budget_reserved_usd"].add_metric([tenant], reserved / 1e12)
        fams["budget_hard_limit"].add_metric([tenant], 1.0 if budget.hard_limit else 0.0)
        fams["budget_period_end_timestamp_seconds"].add_metric([tenant], end)
        for t in budget.alert_at:
            thresholds.add_metric([tenant, str(t)], float(t))
    yield from fams.values()
    yield thresholds


def _rate_limit_gauges(seen: LastSeen) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(
        PREFIX + "upstream_rate_limit",
        "The last value of together.ai's rate-limit headers seen per model "
        "(x-ratelimit-limit|remaining|reset, x-tokenlimit-limit|remaining).",
        labels=("model", "kind"),
    )
    for (model, kind), value in sorted(seen.values.items()):
        fam.add_metric([model, kind], value)
    return fam


class _Adapter:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()


def build_registry(metrics: Metrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Adapter(metrics))
    ProcessCollector(namespace="together_meter", registry=registry)  # registers itself here only
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
