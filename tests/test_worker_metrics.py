"""The supervisor's merge of its workers' metrics (`serve --workers N`, proxy/server/worker_metrics.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import load_config
from proxy.core.budgets import Budget, BudgetBook, Periods
from proxy.ledger import LedgerRow, now_us, period_of
from proxy.server.metrics import Metrics
from proxy.server.worker_metrics import Tally, WorkerSlot, collect, merged

ROOT = Path(__file__).resolve().parent.parent
CONFIG = load_config(ROOT / "config" / "example.yaml")
MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def metrics() -> Metrics:
    return Metrics(CONFIG.attribution, CONFIG.prices.models)


def row(
    status: str = "ok", prompt: int = 3000, completion: int = 1000, cost: int | None = 6_000_000_000
) -> LedgerRow:
    started = now_us()
    return LedgerRow(
        "req_x", "acme", "abcd1234", MODEL, "chat", "serverless", "search", "prod", False, started,
        period_of(started), status=status, finished_us=started + 1000, upstream_status=200,
        prompt_tokens=prompt, completion_tokens=completion, usage_source="upstream", cost_pusd=cost,
    )  # fmt: skip


def via_wire(m: Metrics) -> Tally:
    """What the supervisor receives from a worker: the tally through JSON and back."""
    return Tally.from_wire(json.loads(json.dumps(Tally.of(m).to_wire())))


def slot_of(index: int, m: Metrics, in_flight: int = 0) -> WorkerSlot:
    slot = WorkerSlot(index, pid=1000 + index)
    slot.update({"tally": Tally.of(m).to_wire(), "ready": True, "in_flight": in_flight}, now=0.0)
    return slot


def scrape(own: Metrics, slots: list[WorkerSlot]) -> Samples:
    class Source:
        def collect(self) -> Iterator[Metric]:
            return collect(own, slots)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Source())
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_counters_are_summed_exactly_over_workers() -> None:
    """Requests, tokens and pico-USD of two workers add up as integers on the merged view."""
    a, b = metrics(), metrics()
    for _ in range(3):
        a.record(row())
    b.record(row(prompt=10, completion=7, cost=123_456_789))
    b.record(row(status="client_aborted", prompt=1, completion=2, cost=3))
    a.upstream_error("timeout")
    b.upstream_error("timeout")
    b.on_commit(4, 0.001, True)
    view = merged(metrics(), [slot_of(0, a), slot_of(1, b)])
    key = ("acme", MODEL, "search", "prod")
    assert view.requests == {(*key, "ok"): 4, (*key, "client_aborted"): 1}
    assert view.tokens == {(*key, "input"): 9011, (*key, "output"): 3009}
    assert view.cost_pusd == {key: 18_123_456_792}
    assert view.upstream_errors == {"timeout": 2}
    assert (view.ledger_rows, view.ledger_commits) == (4, 1)


def test_an_exited_workers_last_counts_are_kept() -> None:
    """After a worker exits, its slot's new worker starts from 0 but the merged counter never drops."""
    first = metrics()
    for _ in range(5):
        first.record(row())
    slot = slot_of(0, first, in_flight=2)
    before = merged(metrics(), [slot]).requests
    slot.retire()
    assert slot.pid is None and slot.in_flight == 0
    after_exit = merged(metrics(), [slot])
    second = metrics()
    second.record(row(status="upstream_error", cost=0))
    slot.update({"tally": Tally.of(second).to_wire(), "ready": True}, now=1.0)
    after_restart = merged(metrics(), [slot]).requests
    key = ("acme", MODEL, "search", "prod", "ok")
    assert before[key] == after_exit.requests[key] == after_restart[key] == 5
    assert after_restart[("acme", MODEL, "search", "prod", "upstream_error")] == 1
    assert after_exit.in_flight == 0
    assert slot.total().requests() == 6


def test_histograms_merge_bucket_by_bucket() -> None:
    """Bucket counts add element-wise and sums add; _count is the total of observations."""
    a, b = metrics(), metrics()
    for value in (0.0004, 0.003, 0.003):
        a.request_duration.observe(("chat", "false"), value)
    for value in (0.003, 7.0):
        b.request_duration.observe(("chat", "false"), value)
    b.request_duration.observe(("chat", "true"), 0.2)
    view = merged(metrics(), [slot_of(0, a), slot_of(1, b)])
    counts, total = view.request_duration.series[("chat", "false")]
    assert counts[0] == 1 and counts[3] == 3 and counts[13] == 1 and sum(counts) == 5
    assert abs(total - 7.0094) < 1e-9
    samples = scrape(metrics(), [slot_of(0, a), slot_of(1, b)])
    series = samples["together_meter_request_duration_seconds_bucket"]
    assert series[(("endpoint", "chat"), ("le", "0.005"), ("stream", "false"))] == 4
    assert series[(("endpoint", "chat"), ("le", "+Inf"), ("stream", "false"))] == 5
    assert (
        samples["together_meter_request_duration_seconds_count"][(("endpoint", "chat"), ("stream", "true"))]
        == 1
    )


def test_gauges_in_flight_is_summed_over_live_workers_only() -> None:
    """requests_in_flight is the sum of running workers; an exited worker's in-flight count is gone."""
    a, b = slot_of(0, metrics(), in_flight=3), slot_of(1, metrics(), in_flight=4)
    assert scrape(metrics(), [a, b])["together_meter_requests_in_flight"][()] == 7
    b.retire()
    assert scrape(metrics(), [a, b])["together_meter_requests_in_flight"][()] == 3


def test_budget_gauges_come_from_the_supervisors_book_with_worker_reservations() -> None:
    """Spend and budget come from the supervisor's book; reserved is what the workers hold."""
    own = metrics()
    period = period_of(now_us())
    book = BudgetBook({("acme", None): Budget(500 * 10**12, hard_limit=True)}, Periods())
    book.reset(period, [("acme", None, 7 * 10**12)])
    own.budgets = book
    book.hold({("acme", None): 2 * 10**12, ("globex", None): 99})  # globex has no budget here
    samples = scrape(own, [slot_of(0, metrics()), slot_of(1, metrics())])
    assert samples["together_meter_spend_month_to_date_usd"][(("tenant", "acme"),)] == 7.0
    assert samples["together_meter_budget_reserved_usd"][(("tenant", "acme"),)] == 2.0
    assert samples["together_meter_budget_remaining_usd"][(("tenant", "acme"),)] == 491.0
    book.hold({})
    assert book.snapshot()[("acme", None)][2] == 0


def test_the_wire_keeps_integers_of_any_size_exact() -> None:
    """A pico-USD total beyond 2**64 crosses the JSON wire unchanged, and so do histogram sums."""
    m = metrics()
    m.record(row(cost=2**70 + 1))
    m.ttft.observe((MODEL,), 0.1 + 0.2)
    tally = via_wire(m)
    assert tally.counters["cost_pusd"] == {("acme", MODEL, "search", "prod"): 2**70 + 1}
    assert tally.histograms["ttft"][(MODEL,)][1] == 0.1 + 0.2
    assert tally == Tally.of(m)


def test_every_counter_on_metrics_is_merged_and_in_flight_is_not() -> None:
    """Counters are found on Metrics, not listed: each dict and int counter travels; in_flight does not."""
    m = metrics()
    m.header_timeout("public")
    m.in_flight = 9
    tally = Tally.of(m)
    assert tally.counters["header_timeouts"] == {"public": 1}
    assert "in_flight" not in tally.scalars
    assert set(tally.scalars) == {"ledger_errors", "ledger_rows", "ledger_commits"}
    assert {"requests", "tokens", "cost_pusd", "usage_unknown", "upstream_errors"} <= set(tally.counters)
    assert set(tally.histograms) == {
        "request_duration",
        "ttft",
        "upstream_duration",
        "overhead",
        "ledger_write",
    }


def test_a_histogram_with_other_buckets_is_left_out() -> None:
    """Bucket lists of another width (another version's buckets) are dropped, never misaligned."""
    m = metrics()
    tally = Tally.from_wire({"histograms": {"ttft": [[[MODEL], [1, 2, 3], 0.5]]}})
    tally.into(m)
    assert m.ttft.series == {}


def test_per_worker_series_show_the_spread_restarts_and_cpu() -> None:
    """worker_requests_total counts each slot's requests (exited workers included); up, restarts, CPU."""
    a, b = metrics(), metrics()
    for _ in range(3):
        a.record(row())
    b.record(row())
    s0, s1 = slot_of(0, a), slot_of(1, b)
    s0.cpu_live = 1.5
    s0.retire()
    s0.restarts = 1
    s0.update({"tally": Tally.of(b).to_wire(), "ready": False, "cpu_seconds": 0.25}, now=2.0)
    s0.pid = 2000
    samples = scrape(metrics(), [s0, s1])
    assert samples["together_meter_worker_requests_total"] == {(("worker", "0"),): 4, (("worker", "1"),): 1}
    assert samples["together_meter_worker_restarts_total"][(("worker", "0"),)] == 1
    assert samples["together_meter_worker_up"] == {(("worker", "0"),): 0, (("worker", "1"),): 1}
    assert samples["together_meter_worker_cpu_seconds_total"][(("worker", "0"),)] == 1.75
    assert (
        samples["together_meter_requests_total"][
            (
                ("environment", "prod"),
                ("feature", "search"),
                ("model", MODEL),
                ("status", "ok"),
                ("tenant", "acme"),
            )
        ]
        == 5
    )


def test_merged_scrape_has_every_family_of_a_single_process_and_the_worker_ones_are_documented() -> None:
    """The supervisor renders the same families as one process, plus worker_* rows in docs/metrics.md."""
    single = {f.name for f in metrics().collect()}
    fleet = list(collect(metrics(), [slot_of(0, metrics())]))
    assert {f.name for f in fleet} - single == {
        "together_meter_worker_up",
        "together_meter_worker_restarts",
        "together_meter_worker_requests",
        "together_meter_worker_cpu_seconds",
        "together_meter_worker_resident_memory_bytes",
    }
    doc = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    for family in fleet:
        if family.name.startswith("together_meter_worker_"):
            name = family.name + ("_total" if family.type == "counter" else "")
            assert re.search(rf"^\| `{name}` \|.*`worker`", doc, re.MULTILINE), name


def nonempty(t: Tally) -> tuple[dict[str, object], dict[str, int], dict[str, object]]:
    return (
        {n: s for n, s in t.counters.items() if s},
        t.scalars,
        {n: b for n, b in t.histograms.items() if b},
    )


def test_after_its_first_state_a_worker_sends_only_the_series_that_changed() -> None:
    """Each push carries only changed series, and the supervisor's copy still equals the worker's totals."""
    m, slot = metrics(), WorkerSlot(0, pid=1)
    sent = Tally()

    def push() -> Tally:
        nonlocal sent
        now = Tally.of(m)
        delta, sent = now.changed_since(sent), now
        slot.update({"tally": json.loads(json.dumps(delta.to_wire())), "ready": True}, now=0.0)
        return delta

    m.record(row())
    m.record(row(status="client_aborted"))
    m.ttft.observe((MODEL,), 0.2)
    m.on_commit(3, 0.002, True)
    first = push()
    assert len(first.counters["requests"]) == 2 and first.scalars["ledger_rows"] == 3
    m.record(row())
    second = push()
    key = ("acme", MODEL, "search", "prod")
    assert second.counters == {
        "requests": {(*key, "ok"): 2},
        "tokens": {(*key, "input"): 9000, (*key, "output"): 3000},
        "cost_pusd": {key: 18_000_000_000},
    }
    assert (second.scalars, second.histograms) == ({}, {})
    assert nonempty(push()) == ({}, {}, {})
    assert nonempty(slot.live) == nonempty(Tally.of(m))
