"""Metrics of `serve --workers N`: each worker's totals, sent to the supervisor and merged there.

A worker sends its `Metrics` as a `Tally` (exact integer counters, histogram bucket counts and
sums) every PUSH_INTERVAL seconds and once more when it exits: the first time whole, then only
the series that changed (a push costs the JSON of the active series, not of all of them). The
supervisor's /metrics then shows, for each series:

* counters and histograms: the sum of the supervisor's own tally, every running worker's latest
  tally, and the last tally of every worker that exited (a restart never makes a counter go down);
* `requests_in_flight`: the sum over running workers only;
* spend and budget gauges: the supervisor's budget book (the shared ledger's accounts, with the
  reservations its workers report), like a single process;
* per worker slot (`worker="0"` ... `"N-1"`): up, restarts, requests, CPU and memory.

What counts as a counter is found, not listed: every integer and every dict of integers on
`Metrics` (except the gauges in LIVE_GAUGES), and every `Histogram`. A counter added to
`Metrics` later is merged without a change here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.server.metrics import PREFIX, Histogram, Metrics

PUSH_INTERVAL = 0.5  # seconds between two states a worker sends
LIVE_GAUGES = frozenset({"in_flight"})  # summed over running workers, never kept after an exit

Key = tuple[str, ...] | str
Series = dict[Key, int]
Buckets = dict[tuple[str, ...], tuple[list[int], float]]


@dataclass
class Tally:
    """The cumulative metrics of one process, or the sum of several."""

    counters: dict[str, Series] = field(default_factory=dict)  # Metrics attribute -> label key -> n
    scalars: dict[str, int] = field(default_factory=dict)  # unlabelled counters
    histograms: dict[str, Buckets] = field(default_factory=dict)  # per label key: counts, sum

    @classmethod
    def of(cls, metrics: Metrics) -> Tally:
        """A copy of the counters and histograms of `metrics` (a few µs per hundred series)."""
        tally = cls()
        for name, value in vars(metrics).items():
            if name in LIVE_GAUGES or isinstance(value, bool):
                continue
            if isinstance(value, int):
                tally.scalars[name] = value
            elif isinstance(value, Histogram):
                tally.histograms[name] = {k: (list(s[0]), s[1]) for k, s in value.series.items()}
            elif isinstance(value, dict) and all(type(v) is int for v in value.values()):
                tally.counters[name] = dict(value)
        return tally

    def add(self, other: Tally) -> None:
        """Add `other` to this tally, series by series and bucket by bucket."""
        for name, series in other.counters.items():
            mine = self.counters.setdefault(name, {})
            for key, n in series.items():
                mine[key] = mine.get(key, 0) + n
        for name, n in other.scalars.items():
            self.scalars[name] = self.scalars.get(name, 0) + n
        for name, buckets in other.histograms.items():
            hist = self.histograms.setdefault(name, {})
            for key, (counts, total) in buckets.items():
                have = hist.get(key)
                if have is None:
                    hist[key] = (list(counts), total)
                elif len(have[0]) == len(counts):
                    hist[key] = ([a + b for a, b in zip(have[0], counts, strict=True)], have[1] + total)

    def changed_since(self, before: Tally) -> Tally:
        """The series whose value differs from `before`: all a worker sends after its first state."""
        out = Tally()
        for name, series in self.counters.items():
            old = before.counters.get(name, {})
            counters = {k: v for k, v in series.items() if old.get(k) != v}
            if counters:
                out.counters[name] = counters
        out.scalars = {n: v for n, v in self.scalars.items() if before.scalars.get(n) != v}
        for name, buckets in self.histograms.items():
            old_buckets = before.histograms.get(name, {})
            changed = {k: b for k, b in buckets.items() if old_buckets.get(k) != b}
            if changed:
                out.histograms[name] = changed
        return out

    def overwrite(self, changes: Tally) -> None:
        """Take the values of the series in `changes` (the series it lacks stay as they are)."""
        for name, series in changes.counters.items():
            self.counters.setdefault(name, {}).update(series)
        self.scalars.update(changes.scalars)
        for name, buckets in changes.histograms.items():
            self.histograms.setdefault(name, {}).update(buckets)

    def requests(self) -> int:
        """Requests counted (every terminal status)."""
        return sum(self.counters.get("requests", {}).values())

    def into(self, metrics: Metrics) -> None:
        """Make these totals the counters and histograms of `metrics` (a copy being rendered)."""
        for name, series in self.counters.items():
            if isinstance(getattr(metrics, name, None), dict):
                setattr(metrics, name, dict(series))
        for name, n in self.scalars.items():
            if isinstance(getattr(metrics, name, None), int):
                setattr(metrics, name, n)
        for name, buckets in self.histograms.items():
            mine = getattr(metrics, name, None)
            if not isinstance(mine, Histogram):
                continue
            hist = copy.copy(mine)
            width = len(mine.buckets) + 1
            hist.series = {k: [list(c), t] for k, (c, t) in buckets.items() if len(c) == width}
            setattr(metrics, name, hist)

    # -- the wire: JSON (Python's json keeps integers of any size exact) ---------------------------

    def to_wire(self) -> dict[str, Any]:
        return {
            "counters": {n: [[_key_out(k), v] for k, v in s.items()] for n, s in self.counters.items()},
            "scalars": self.scalars,
            "histograms": {
                n: [[list(k), c, t] for k, (c, t) in b.items()] for n, b in self.histograms.items()
            },
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Tally:
        """The tally `to_wire` described; entries of the wrong shape are left out."""
        tally = cls()
        for name, entries in data.get("counters", {}).items():
            tally.counters[name] = {
                _key_in(k): v for k, v in entries if type(v) is int and isinstance(k, str | list)
            }
        tally.scalars = {n: v for n, v in data.get("scalars", {}).items() if type(v) is int}
        for name, entries in data.get("histograms", {}).items():
            tally.histograms[name] = {
                tuple(k): ([int(c) for c in counts], float(total)) for k, counts, total in entries
            }
        return tally


def _key_out(key: Key) -> list[str] | str:
    return key if isinstance(key, str) else list(key)


def _key_in(key: list[str] | str) -> Key:
    return key if isinstance(key, str) else tuple(key)


@dataclass
class WorkerSlot:
    """What the supervisor knows of worker slot `index`: the running process and the exited ones."""

    index: int
    pid: int | None = None
    live: Tally = field(default_factory=Tally)  # the running worker's latest tally
    retired: Tally = field(default_factory=Tally)  # the last tallies of this slot's exited workers
    ready: bool = False
    reasons: list[str] = field(default_factory=list)
    in_flight: int = 0
    reserved: dict[tuple[str, str | None], int] = field(default_factory=dict)
    cpu_live: float = 0.0
    cpu_retired: float = 0.0
    rss_bytes: int = 0
    state_at: float | None = None  # monotonic time of the latest state
    restarts: int = 0

    def update(self, state: dict[str, Any], now: float) -> None:
        """A `state` message of this slot's running worker (its series that changed)."""
        self.live.overwrite(Tally.from_wire(state.get("tally", {})))
        self.ready = bool(state.get("ready"))
        self.reasons = [str(r) for r in state.get("reasons", [])]
        self.in_flight = int(state.get("in_flight", 0))
        self.reserved = {(t, f): int(n) for t, f, n in state.get("reserved", [])}
        self.cpu_live = float(state.get("cpu_seconds", 0.0))
        self.rss_bytes = int(state.get("rss_bytes", 0))
        self.state_at = now

    def retire(self) -> None:
        """The running worker exited: keep its last totals, drop what only a live process has."""
        self.retired.add(self.live)
        self.cpu_retired += self.cpu_live
        self.live, self.cpu_live = Tally(), 0.0
        self.pid, self.ready, self.state_at = None, False, None
        self.in_flight, self.rss_bytes, self.reserved = 0, 0, {}

    def total(self) -> Tally:
        tally = Tally()
        tally.add(self.retired)
        tally.add(self.live)
        return tally


def merged(own: Metrics, slots: Iterable[WorkerSlot]) -> Metrics:
    """A copy of `own` (the supervisor's metrics) holding the totals of it and every worker."""
    slots = list(slots)
    total = Tally.of(own)
    for slot in slots:
        total.add(slot.retired)
        total.add(slot.live)
    view = copy.copy(own)
    view.fleet = None  # render this copy itself
    total.into(view)
    view.in_flight = own.in_flight + sum(s.in_flight for s in slots)
    return view


def collect(own: Metrics, slots: Iterable[WorkerSlot]) -> Iterator[Metric]:
    """Every family of a single process, merged over the workers, then the per-worker ones."""
    slots = list(slots)
    yield from merged(own, slots).collect()
    yield from worker_families(slots)


def worker_families(slots: Iterable[WorkerSlot]) -> Iterator[Metric]:
    slots = sorted(slots, key=lambda s: s.index)
    families = (
        (
            GaugeMetricFamily,
            "worker_up",
            "1 when the worker of this slot is running and ready, else 0.",
            lambda s: 1.0 if s.pid is not None and s.ready else 0.0,
        ),
        (
            CounterMetricFamily,
            "worker_restarts",
            "Times the worker of this slot exited unexpectedly and was started again.",
            lambda s: s.restarts,
        ),
        (
            CounterMetricFamily,
            "worker_requests",
            "Requests counted by the workers of this slot (running and exited).",
            lambda s: s.retired.requests() + s.live.requests(),
        ),
        (
            CounterMetricFamily,
            "worker_cpu_seconds",
            "CPU time (user + system) of the workers of this slot (running and exited).",
            lambda s: s.cpu_retired + s.cpu_live,
        ),
        (
            GaugeMetricFamily,
            "worker_resident_memory_bytes",
            "Resident memory of the running worker of this slot.",
            lambda s: s.rss_bytes,
        ),
    )
    for kind, name, doc, value in families:
        fam = kind(PREFIX + name, doc, labels=("worker",))
        for slot in slots:
            fam.add_metric([str(slot.index)], value(slot))
        yield fam
