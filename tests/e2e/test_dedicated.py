"""Dedicated endpoints end to end: `together-meter serve` processes follow an endpoint of the
simulator that scales 1 -> 3 -> 0 replicas; the ledger's endpoint-minutes cost exactly what the
simulator bills, and the chargeback spreads exactly that over the tenants by token share.

The simulator runs in this process, the proxies as real subprocesses. A test "minute" is 1 s
(`dedicated.minute_seconds: 1` and the fleet's `minute_seconds`, both test-only knobs); the clock
is the machine's, shared by both. SQLite: one proxy. PostgreSQL: two proxies on one database,
both following the same endpoint (replicas): every minute is still counted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import simulator
from proxy.config import Config, load_config
from proxy.core.auth import digest, new_key
from proxy.core.chargeback import DedicatedEndpoint
from proxy.core.dedicated import measured
from proxy.core.pricing import format_usd
from proxy.ledger import Ledger, LedgerRow
from proxy.ledger.factory import open_ledger
from proxy.simulator import DEDICATED, RunningSimulator
from proxy.simulator.endpoints import PROJECT
from tests.test_cli import run_cli

from .procs import ROOT, ProxyProcess
from .support import StartMeter

MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
ENDPOINT = "endpoint-e2e-shared-70b"
A100 = "2x_nvidia_a100_80gb_sxm"  # 5.42 cents a minute in the simulator
SCRIPT = [(0, 1), (2, 3), (5, 0)]  # 1 replica for 2 minutes, 3 for 3, then none
SETTLE_S = 30.0


def write_config(directory: Path, dsn: str | None, dedicated: str = "") -> tuple[Path, dict[str, str]]:
    """config/example.yaml with keys for acme and globex, the endpoint followed by the second."""
    keys = {"acme": new_key(), "globex": new_key()}
    text = (ROOT / "config" / "example.yaml").read_text()
    for tenant, what in (("acme", "Acme Corp, all models"), ("globex", "Globex, two models only")):
        old = f"    description: {what}\n"
        assert old in text, old
        text = text.replace(old, f"{old}    keys_sha256: [{digest(keys[tenant])}]\n")
    if dsn is not None:
        text = text.replace("  backend: sqlite\n", f"  backend: postgres\n  dsn: {dsn}\n")
        text = text.replace("  path: data/together-meter.db   # relative to the working directory\n", "")
        text = text.replace("  synchronous: normal ", "  # synchronous: normal ")
    text += (
        "dedicated:\n"
        "  poll_seconds: 0.05\n"
        "  minute_seconds: 1        # TEST ONLY: a billed minute of 1 s\n"
        f"{dedicated}"
        "dedicated_endpoints:\n"
        "  shared-70b:\n"
        f"    model: {MODEL}\n"
        f"    endpoint_id: {ENDPOINT}\n"
        "    hourly_usd: 3.36        # the fallback, unused while minutes are measured\n"
    )
    path = directory / "config.yaml"
    path.write_text(text)
    (directory / "prices.yaml").write_text((ROOT / "config" / "prices.yaml").read_text())
    return path, keys


@contextlib.asynccontextmanager
async def backend_dsn(backend: str) -> AsyncIterator[str | None]:
    if backend == "sqlite":
        yield None
        return
    from tests.pg import pg_database

    async with pg_database() as dsn:
        yield dsn


@contextlib.asynccontextmanager
async def proxies(
    config: Path, ledger: Path, upstream: str, n: int, logs: Path
) -> AsyncIterator[list[ProxyProcess]]:
    procs = [ProxyProcess(config, ledger, upstream, logs / f"proxy-{i}.log") for i in range(n)]
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield procs
    finally:
        for p in procs:
            await p.kill()


async def chat(session: aiohttp.ClientSession, proc: ProxyProcess, key: str, tokens: int) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "How busy is the shared endpoint?"}],
        "max_tokens": 64,
        "simulate": {"completion_tokens": tokens},
    }
    async with session.post(proc.url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def minutes_through(reader: Ledger, month: str, last_minute_us: int, minute_us: int) -> Any:
    """Wait (bounded) until the ledger has looked at the minute starting `last_minute_us`."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        found = measured(await reader.endpoint_minutes(month), minute_us)
        if found and found[0].last_minute >= last_minute_us:
            return found
        assert time.monotonic() < deadline, f"the follower did not reach minute {last_minute_us}: {found}"
        await asyncio.sleep(0.1)


def expected_charges(total: int, tokens: dict[str, int]) -> dict[str, int]:
    """Largest remainder by hand: floor each share, the rest one pico-USD each to the largest
    remainders, ties to the first tenant by name."""
    whole = sum(tokens.values())
    shares = {t: Fraction(total * n, whole) for t, n in tokens.items()}
    parts = {t: s.numerator // s.denominator for t, s in shares.items()}
    rest = total - sum(parts.values())
    for t in sorted(tokens, key=lambda t: (-(shares[t] - parts[t]), t))[:rest]:
        parts[t] += 1
    return parts


async def metric_total(procs: list[ProxyProcess], name: str) -> float:
    total = 0.0
    async with aiohttp.ClientSession() as s:
        for p in procs:
            async with s.get(p.admin + "/metrics") as r:
                text = await r.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == name and sample.labels.get("endpoint") == ENDPOINT:
                        total += sample.value
    return total


@pytest.mark.parametrize(("backend", "replicas"), [("sqlite", 1), ("postgres", 2)])
async def test_scaling_endpoint_costs_what_the_simulator_bills(
    tmp_path: Path, backend: str, replicas: int
) -> None:
    """1 -> 3 -> 0 replicas of 2x A100: the ledger's endpoint-minutes equal the simulator's bill to
    the pico-dollar (no minute missed, none twice, even with two proxies following); `report
    --chargeback` charges exactly that, spread by token share; `estimate --measured-month` compares
    it with the same tokens on Serverless and Batch."""
    sim: RunningSimulator = await simulator.start()
    try:
        fleet = sim.app[DEDICATED]
        fleet.minute_seconds = 1.0
        fleet.add(MODEL, A100, (), endpoint_id=ENDPOINT)  # STOPPED until its script runs
        async with backend_dsn(backend) as dsn:
            config_path, keys = write_config(tmp_path, dsn)
            config = load_config(config_path)
            ledger_file = tmp_path / "ledger.db"
            async with proxies(config_path, ledger_file, sim.url, replicas, tmp_path) as procs:
                m0 = fleet.minute_now() + 1
                fleet.script(ENDPOINT, SCRIPT, start_minute=m0)
                async with aiohttp.ClientSession() as session:
                    for i, (tenant, tokens) in enumerate(
                        [("acme", 40), ("globex", 25), ("acme", 33), ("globex", 7)]
                    ):
                        await chat(session, procs[i % len(procs)], keys[tenant], tokens)
                month = config.budgets.periods.of(m0 * 1_000_000)
                reader = open_ledger(config.ledger, path=str(ledger_file))
                try:
                    minute_us = config.dedicated.minute_us
                    (m,) = await minutes_through(reader, month, (m0 + 6) * minute_us, minute_us)
                    rows = await reader.rows(period=month)
                finally:
                    await reader.close()
                bill = fleet.bill_pusd()
                assert bill == 11 * 54_200_000_000  # 2 x 1 + 3 x 3 replica-minutes at 5.42 cents
                assert m.cost_pusd == bill, (m, fleet.bill())
                assert (m.replica_minutes, m.unobserved_minutes, m.unknown_minutes) == (11, 0, 0)
                counted = await metric_total(procs, "together_meter_dedicated_cost_usd_total")
                assert abs(counted - bill / 1e12) < 1e-12  # summed over the replicas: once
                await check_chargeback(config_path, ledger_file, backend, month, bill, rows, config)
    finally:
        await sim.stop()


V2_SCRIPT = [(0, 1), (2, 3), (5, 2), (7, 0)]  # desired; ready lags a minute scaling up


@pytest.mark.parametrize(("backend", "replicas"), [("sqlite", 1), ("postgres", 2)])
async def test_v2_autoscaling_endpoint_costs_what_the_simulator_bills(
    tmp_path: Path, backend: str, replicas: int
) -> None:
    """`dedicated.project_id` set: the proxies read together's v2 API. An autoscaling endpoint
    whose ready replicas go 1 -> 3 -> 2 -> 0 (v1 could only say "between min and max") is known
    every minute, and the ledger equals the simulator's per-hour bill to the pico-dollar under the
    rule (each minute row rounded half-up once); the chargeback charges exactly that."""
    sim: RunningSimulator = await simulator.start()
    try:
        fleet = sim.app[DEDICATED]
        fleet.minute_seconds = 1.0
        fleet.add(MODEL, A100, (), endpoint_id=ENDPOINT, autoscaling=(0, 3), ready_lag=1)
        async with backend_dsn(backend) as dsn:
            config_path, keys = write_config(tmp_path, dsn, f"  project_id: {PROJECT}\n")
            config = load_config(config_path)
            assert (config.dedicated.api, config.dedicated.project_id) == ("v2", PROJECT)
            ledger_file = tmp_path / "ledger.db"
            async with proxies(config_path, ledger_file, sim.url, replicas, tmp_path) as procs:
                m0 = fleet.minute_now() + 1
                fleet.script(ENDPOINT, V2_SCRIPT, start_minute=m0)
                async with aiohttp.ClientSession() as session:
                    for i, (tenant, tokens) in enumerate([("acme", 21), ("globex", 50), ("acme", 8)]):
                        await chat(session, procs[i % len(procs)], keys[tenant], tokens)
                month = config.budgets.periods.of(m0 * 1_000_000)
                reader = open_ledger(config.ledger, path=str(ledger_file))
                try:
                    minute_us = config.dedicated.minute_us
                    (m,) = await minutes_through(reader, month, (m0 + 8) * minute_us, minute_us)
                    rows = await reader.rows(period=month)
                finally:
                    await reader.close()
                entries = fleet.bill_v2(m0 + 8)
                assert [e["ready_replicas"] for e in entries] == [1, 1, 3, 3, 2, 2]
                bill = sum(e["billed_pusd"] for e in entries)
                assert bill == fleet.bill_v2_pusd() == 650_000_000_000  # 12 replica-minutes x 325 c/h
                assert m.cost_pusd == bill, (m, entries)
                assert (m.replica_minutes, m.unobserved_minutes, m.unknown_minutes) == (12, 0, 0)
                assert m.prices_per_hour == (Decimal(325),)
                counted = await metric_total(procs, "together_meter_dedicated_cost_usd_total")
                assert abs(counted - bill / 1e12) < 1e-12  # summed over the replicas: once
                await check_chargeback(config_path, ledger_file, backend, month, bill, rows, config)
    finally:
        await sim.stop()


async def check_chargeback(
    config_path: Path,
    ledger: Path,
    backend: str,
    month: str,
    bill: int,
    rows: list[LedgerRow],
    config: Config,
) -> None:
    """`report --chargeback` and `estimate --measured-month` (the CLI, on the same ledger)."""
    ledger_args = ("--ledger", str(ledger)) if backend == "sqlite" else ()
    code, out, err = await run_cli(
        "report",
        "--config",
        str(config_path),
        *ledger_args,
        "--month",
        month,
        "--chargeback",
        "--format",
        "json",
    )
    assert code == 0, err
    (ep,) = json.loads(out)["endpoints"]
    assert (ep["endpoint"], ep["source"], ep["endpoint_id"]) == ("shared-70b", "measured", ENDPOINT)
    assert ep["monthly_usd"] == format_usd(bill)
    tokens: dict[str, int] = {}
    for r in rows:
        if r.model == MODEL and r.status == "ok":
            tokens[r.tenant] = tokens.get(r.tenant, 0) + (r.prompt_tokens or 0) + (r.completion_tokens or 0)
    assert set(tokens) == {"acme", "globex"}
    expected = expected_charges(bill, tokens)
    charged = {t["tenant"]: t["charge_usd"] for t in ep["tenants"]}
    assert charged == {t: format_usd(p) for t, p in expected.items()}
    assert sum(Decimal(v) for v in charged.values()) == Decimal(bill) / 10**12
    code, out, err = await run_cli(
        "estimate", "--config", str(config_path), *ledger_args, "--measured-month", month, "--format", "json"
    )
    assert code == 0, err
    (row,) = json.loads(out)["dedicated_measured"]
    rates = config.prices.get(MODEL)
    assert rates is not None
    tin = sum(r.prompt_tokens or 0 for r in rows if r.model == MODEL and r.status == "ok")
    tout = sum(r.completion_tokens or 0 for r in rows if r.model == MODEL and r.status == "ok")
    compare = row["compare"]
    assert compare["dedicated_usd"] == format_usd(bill)
    assert compare["serverless_usd"] == format_usd(tin * rates.input + tout * rates.output)
    assert compare["batch_usd"] == format_usd(tin * rates.batch_input + tout * rates.batch_output)
    assert compare["cheapest"] == "batch"  # a few requests never pay for an endpoint
    assert row["measured"]["minutes_not_observed"] == 0


def following(config: Config) -> Config:
    """Follow ENDPOINT by 1 s "minutes", linked to a configured entry with a fallback figure."""
    linked = DedicatedEndpoint("shared-70b", MODEL, 1000 * 10**12, "monthly_usd 1000", ENDPOINT)
    fast = replace(config.dedicated, poll_seconds=0.05, minute_seconds=1.0)
    return replace(config, dedicated=fast, dedicated_endpoints=(linked,))


async def test_admin_api_charges_and_compares_the_measured_endpoint(start_meter: StartMeter) -> None:
    """In one proxy (both ledger backends): GET /admin/chargeback spreads the measured cost (not the
    configured $1,000), GET /admin/report lists the endpoint's minutes, POST /admin/estimate with
    measured_month compares it with Serverless and Batch; /metrics shows the follower's series."""
    async with start_meter(change=following) as meter:
        fleet = meter.sim.app[DEDICATED]
        fleet.minute_seconds = 1.0
        m0 = fleet.minute_now() + 1
        fleet.add(MODEL, A100, [(0, 2), (2, 1), (3, 0)], endpoint_id=ENDPOINT, start_minute=m0)
        for tenant, tokens in (("acme", 30), ("globex", 12)):
            client = meter.openai(tenant)
            await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=64,
                extra_body={"simulate": {"completion_tokens": tokens}},
            )
        month = meter.proxy.periods.of(m0 * 1_000_000)
        (m,) = await minutes_through(meter.proxy.ledger, month, (m0 + 4) * 1_000_000, 1_000_000)
        bill = fleet.bill_pusd()
        assert m.cost_pusd == bill == 5 * 54_200_000_000
        auth = {"Authorization": f"Bearer {meter.admin_token}"}
        status, body = await meter.admin_get(f"/admin/chargeback?month={month}", auth)
        assert status == 200, body
        (ep,) = json.loads(body)["endpoints"]
        assert (ep["source"], ep["monthly_usd"]) == ("measured", format_usd(bill))
        rows = [r for r in await meter.rows() if r.model == MODEL and r.status == "ok"]
        tokens = {
            t: sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in rows if r.tenant == t)
            for t in ("acme", "globex")
        }
        expected = expected_charges(bill, tokens)
        assert {t["tenant"]: t["charge_usd"] for t in ep["tenants"]} == {
            t: format_usd(p) for t, p in expected.items()
        }
        status, body = await meter.admin_get(f"/admin/report?month={month}", auth)
        assert status == 200
        (listed,) = json.loads(body)["dedicated"]
        assert (listed["endpoint_id"], listed["replica_minutes"], listed["cost_usd"]) == (
            ENDPOINT,
            5,
            format_usd(bill),
        )
        async with (
            aiohttp.ClientSession() as s,
            s.post(meter.admin + "/admin/estimate", json={"measured_month": month}, headers=auth) as r,
        ):
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert answer["estimates"] == []
        (row,) = answer["dedicated_measured"]
        assert row["compare"]["dedicated_usd"] == format_usd(bill) and row["compare"]["cheapest"] == "batch"
        samples = await meter.metric_samples()
        assert samples["together_meter_dedicated_cost_usd_total"][(("endpoint", ENDPOINT),)] == bill / 1e12
        assert samples["together_meter_dedicated_replicas"][(("endpoint", ENDPOINT), ("hardware", A100))] == 0
