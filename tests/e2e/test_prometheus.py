"""A real Prometheus scraping the proxy: every dashboard panel expression and every recording rule
evaluates to data, and the per-tenant spend it reports equals the ledger's.

`prometheus` comes from the Debian package `prometheus`. Without it this test is skipped, except
under CI (CI=true), where a missing binary is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .support import (
    ACME_ONLY_MODEL,
    CHAT_MODEL,
    EMBEDDING_MODEL,
    LANGUAGE_MODEL,
    MESSAGES,
    SMALL_CHAT_MODEL,
    Meter,
    closed_port,
    post_raw,
    usd,
)

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus.yml"
RULES_DIR = ROOT / "config" / "rules"
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"
WAIT_S = 30.0
# Grafana's built-in range variables, replaced by a fixed window; template variables match all.
BUILTINS = {"$__range": "1h", "$__rate_interval": "1m", "$__interval": "15s"}
VARIABLE = re.compile(r"\$\{?\w+\}?")
# Recording rules allowed to stay empty in a short test, and why. Every recording rule needs at
# least two samples only (windows of 5m..6h are evaluated over what exists), so none is exempt;
# their queries must still succeed.
EXEMPT_RULES: dict[str, str] = {}

# (tenant, feature, environment, endpoint, model, stream, simulate)
Traffic = tuple[str, str | None, str | None, str, str, bool, dict[str, Any]]
TRAFFIC: list[Traffic] = [
    ("acme", "chat", "prod", "chat", CHAT_MODEL, False, {"cached_tokens": 4}),  # a cache hit
    ("acme", "search", "staging", "chat", ACME_ONLY_MODEL, True, {}),
    ("acme", "summarize", None, "completions", LANGUAGE_MODEL, False, {}),
    ("acme", "search", "prod", "embeddings", EMBEDDING_MODEL, False, {}),  # usage unknown
    ("globex", "chat", "dev", "chat", CHAT_MODEL, False, {}),
    ("globex", "search", "prod", "chat", SMALL_CHAT_MODEL, True, {}),
    ("globex", "chat", "prod", "chat", ACME_ONLY_MODEL, False, {}),  # not allowed: rejected
    ("globex", "search", "dev", "chat", CHAT_MODEL, False, {"status": 500}),  # upstream_error
    ("acme", "search", "prod", "images", "black-forest-labs/FLUX.1-schnell", False, {}),  # megapixels
]
PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "images": "/images/generations",
}


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path:
        return path
    message = "prometheus is not installed: `apt-get install prometheus` (Debian package prometheus)"
    if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
        pytest.fail(f"CI=true but {message}")
    pytest.skip(f"SKIPPED, {message}")


def _write_config(directory: Path, admin_port: int) -> Path:
    """config/prometheus.yml and its rules, scraping only this proxy's admin port every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config.pop("alerting")  # no Alertmanager here
    (job,) = config["scrape_configs"]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{admin_port}"]}]
    shutil.copytree(RULES_DIR, directory / "rules")
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


class Prometheus:
    """A running `prometheus` process on a loopback port and its HTTP query API."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process, self.url, self.log = process, f"http://127.0.0.1:{port}", log

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of `expr`; fails with Prometheus' error if the query does not succeed."""
        async with (
            aiohttp.ClientSession() as s,
            s.get(self.url + "/api/v1/query", params={"query": expr}) as r,
        ):
            body = await r.json()
        assert r.status == 200 and body["status"] == "success", (expr, r.status, body)
        assert body["data"]["resultType"] == "vector", (expr, body["data"])
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def ready(self) -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(self.url + "/-/ready") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]


@pytest.fixture
def prometheus_binary() -> str:
    return _prometheus_binary()


def _start(binary: str, config: Path, directory: Path) -> Prometheus:
    port = closed_port()
    log = directory / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    return Prometheus(process, port, log)


def _stop(prom: Prometheus) -> None:
    prom.process.terminate()
    try:
        prom.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        prom.process.kill()
        prom.process.wait(timeout=10)


async def _send(meter: Meter, rounds: int) -> None:
    for n in range(rounds):
        for i, (tenant, feature, environment, endpoint, model, stream, simulate) in enumerate(TRAFFIC):
            body: dict[str, Any] = {"model": model, "stream": stream}
            if endpoint == "chat":
                body |= {"messages": MESSAGES, "max_tokens": 5 + i + n}
            elif endpoint == "completions":
                body |= {"prompt": "Metering in one line:", "max_tokens": 5 + i + n}
            elif endpoint == "images":
                body = {"model": model, "prompt": "a meter", "width": 512, "height": 512}
            else:
                body["input"] = ["first text to embed", "second"]
            if simulate:
                body["simulate"] = simulate
            headers = meter.auth(tenant)
            if feature:
                headers["X-Meter-Feature"] = feature
            if environment:
                headers["X-Meter-Environment"] = environment
            await post_raw(meter.base_url + PATHS[endpoint], body, headers)


def _dashboard_exprs() -> Iterator[tuple[str, str, str]]:
    """(dashboard title, panel title, expression with template variables substituted)."""
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name, value in BUILTINS.items():
                    expr = expr.replace(name, value)
                yield dashboard["title"], panel["title"], VARIABLE.sub(".*", expr)


def _recording_rules() -> list[str]:
    return [
        rule["record"]
        for path in sorted(RULES_DIR.glob("*.yml"))
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
        if "record" in rule
    ]


async def _wait(prom: Prometheus, what: str, condition: Any) -> None:
    """Poll the async `condition()` until it is true, for at most WAIT_S seconds."""
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        if prom.process.poll() is not None:
            raise AssertionError(f"prometheus exited ({prom.process.returncode}):\n{prom.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{prom.output()}")
        await asyncio.sleep(0.25)


def _by_tenant(result: list[dict[str, Any]]) -> dict[str, float]:
    return {s["metric"]["tenant"]: float(s["value"][1]) for s in result}


def _close(actual: dict[str, float], expected: dict[str, Decimal]) -> bool:
    if set(actual) != set(expected):
        return False
    return all(abs(Decimal(repr(actual[t])) - v) <= abs(v) * Decimal("1e-12") for t, v in expected.items())


async def test_dashboards_and_rules_evaluate_in_a_real_prometheus(
    meter: Meter, prometheus_binary: str, tmp_path: Path
) -> None:
    """Every panel expression and recording rule returns data; Prometheus' spend equals the ledger's."""
    await _send(meter, rounds=1)  # the series exist from the first scrape
    config = _write_config(tmp_path, meter.proxy.admin_port)
    prom = _start(prometheus_binary, config, tmp_path)
    try:
        await _wait(prom, "prometheus ready", prom.ready)

        async def scraped(times: int) -> bool:
            up = await prom.query('count_over_time(up{job="together-meter"}[1m])')
            return bool(up) and float(up[0]["value"][1]) >= times

        await _wait(prom, "two scrapes", lambda: scraped(2))
        await _send(meter, rounds=2)  # counters grow between scrapes: rates are not all 0
        rows = await meter.wait_terminal(len(TRAFFIC) * 3)
        expected: dict[str, Decimal] = {}
        for row in rows:
            expected[row.tenant] = expected.get(row.tenant, Decimal(0)) + usd(row.cost_pusd or 0)
        assert set(expected) == {"acme", "globex"} and all(expected.values())

        spend_mtd = "max by (tenant) (together_meter_spend_month_to_date_usd)"
        spend_counter = "sum by (tenant) (together_meter_cost_usd_total)"

        async def caught_up() -> bool:
            mtd, counter = await prom.query(spend_mtd), await prom.query(spend_counter)
            return _close(_by_tenant(mtd), expected) and _close(_by_tenant(counter), expected)

        await _wait(prom, "the last traffic scraped", caught_up)
        await _wait(prom, "more scrapes", lambda: scraped(6))

        rules = _recording_rules()
        assert rules and not set(EXEMPT_RULES) - set(rules)

        async def empty() -> list[str]:
            missing = [f"rule {name}" for name in rules if not await prom.query(name)]
            for dashboard, panel, expr in _dashboard_exprs():
                if not await prom.query(expr):
                    missing.append(f"{dashboard} / {panel}: {expr}")
            return [m for m in missing if m.removeprefix("rule ") not in EXEMPT_RULES]

        async def all_data() -> bool:
            return not await empty()

        try:
            await _wait(prom, "every expression to return data", all_data)
        except AssertionError:
            raise AssertionError("empty results:\n" + "\n".join(await empty())) from None

        for name in EXEMPT_RULES:  # may be empty, but must evaluate
            await prom.query(name)
        assert _close(_by_tenant(await prom.query(spend_mtd)), expected)
        assert _close(_by_tenant(await prom.query(spend_counter)), expected)
    finally:
        _stop(prom)
