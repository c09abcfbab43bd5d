"""The user docs name every config key, price-table key and metric the code accepts or exports."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

import proxy.config
import proxy.core.pricing
from proxy.config import load_config
from proxy.core.budgets import Budget, BudgetBook, Periods
from proxy.ledger import LedgerRow, now_us, period_of
from proxy.server.metrics import Histogram, Metrics

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DOC = ROOT / "docs" / "configuration.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"
EXAMPLE_CONFIG = ROOT / "config" / "example.yaml"


def _backticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def _string_sets(node: ast.AST) -> list[set[str]]:
    """Every set literal made only of string constants under `node`."""
    found = []
    for n in ast.walk(node):
        if (
            isinstance(n, ast.Set)
            and n.elts
            and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in n.elts)
        ):
            found.append({e.value for e in n.elts})  # type: ignore[attr-defined]
    return found


def _config_key_names() -> set[str]:
    """Key names in TOP_KEYS and in every `check_keys({...})` call of proxy/config/__init__.py."""
    tree = ast.parse(Path(proxy.config.__file__).read_text(encoding="utf-8"))
    names: set[str] = set(proxy.config.TOP_KEYS)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "check_keys"
        ):
            for arg in node.args:
                for keys in _string_sets(arg):
                    names |= keys
    return names


def _config_key_paths(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Dotted key paths (`upstream.timeouts.connect`) accepted while loading the example config."""
    paths: set[str] = set()
    original = proxy.config._Reader.check_keys
    tenants = set(load_config(EXAMPLE_CONFIG).tenants)

    def recording(self: Any, allowed: set[str]) -> None:
        prefix = self.path
        head, _, rest = prefix.partition(".")
        if head == "tenants" and rest in tenants:
            prefix = "tenants.<name>"
        elif head == "tenants" and rest.split(".", 1)[0] in tenants:
            # budget mappings are documented once, as a table of their keys (leaves below)
            original(self, allowed)
            return
        paths.update(f"{prefix}.{k}" if prefix else k for k in allowed)
        original(self, allowed)

    monkeypatch.setattr(proxy.config._Reader, "check_keys", recording)
    load_config(EXAMPLE_CONFIG)
    return paths


def test_every_config_key_is_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each key accepted by proxy/config/__init__.py appears in backticks in docs/configuration.md."""
    documented = _backticked(CONFIG_DOC.read_text(encoding="utf-8"))
    paths = _config_key_paths(monkeypatch)
    missing = sorted(p for p in paths if p not in documented)
    # keys on code paths the example config does not reach must at least be named
    leaves = {d.rsplit(".", 1)[-1] for d in documented}
    missing += sorted(n for n in _config_key_names() if n not in leaves)
    assert not missing, f"config keys missing from {CONFIG_DOC.name}: {missing}"


def test_every_price_table_key_is_documented() -> None:
    """Each key proxy/core/pricing.py accepts in prices.yaml appears in docs/configuration.md."""
    tree = ast.parse(Path(proxy.core.pricing.__file__).read_text(encoding="utf-8"))
    names = set().union(*_string_sets(tree))  # the top-level and the per-model key sets
    assert {"models", "input", "output", "batch", "cached_input", "note", "batch_discount"} <= names
    documented = _backticked(CONFIG_DOC.read_text(encoding="utf-8"))
    missing = sorted(n for n in names if n not in documented)
    assert not missing, f"prices.yaml keys missing from {CONFIG_DOC.name}: {missing}"


def _exercised_metrics() -> Metrics:
    config = load_config(EXAMPLE_CONFIG)
    metrics = Metrics(config.attribution, config.prices.models)
    started = now_us()
    period = period_of(started)
    budget = Budget(100 * 10**12, hard_limit=True)
    book = BudgetBook({("acme", None): budget, ("acme", "search"): budget}, Periods())
    book.reset(period, [("acme", None, 2)])
    metrics.budgets = book
    metrics.record(
        LedgerRow(
            "req_test",
            "acme",
            "abcd1234",
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            "chat",
            "serverless",
            "chat",
            "prod",
            False,
            started,
            period,
            status="ok",
            finished_us=started + 1000,
            upstream_status=200,
            prompt_tokens=3000,
            completion_tokens=1000,
            usage_source="estimated",
            cost_pusd=6_000_000_000,
        )
    )
    metrics.upstream_error("timeout")
    metrics.on_commit(2, 0.001, True)
    metrics.prices_last_sync = 1_795_000_000.0
    metrics.dedicated = _exercised_follower_metrics()
    for h in vars(metrics).values():
        if isinstance(h, Histogram):
            h.observe(tuple("x" for _ in h.labelnames), 0.01)
    return metrics


def _exercised_follower_metrics() -> Any:
    """The dedicated endpoint follower's series, one of each (proxy/server/dedicated.py)."""
    from proxy.server.dedicated import FollowerMetrics

    follower = FollowerMetrics()
    follower.cost_pusd["endpoint-1"] = 54_200_000_000
    follower.minutes["endpoint-1"] = 1
    follower.unobserved["endpoint-1"] = 2
    follower.replicas[("endpoint-1", "2x_nvidia_a100_80gb_sxm")] = 1
    follower.last_observed["endpoint-1"] = 1_795_000_000.0
    follower.failed("straddled")
    return follower


def test_every_metric_is_documented() -> None:
    """Each family Metrics.collect() yields has a docs/metrics.md table row naming its labels."""
    text = METRICS_DOC.read_text(encoding="utf-8")
    problems = []
    for family in _exercised_metrics().collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        rows = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
        if not rows:
            problems.append(f"{name}: no table row")
            continue
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        problems += [
            f"{name}: label {label!r} not in its row"
            for label in sorted(labels)
            if f"`{label}`" not in rows[0]
        ]
    assert not problems, f"{METRICS_DOC.name}: {problems}"


def test_the_readme_route_table_lists_every_route_a_tenant_calls() -> None:
    """README's "Routes and how each is metered" names every route of the table (operator routes
    by family), with its ledger endpoint, so the table cannot silently fall behind the code."""
    from proxy.core.routes import ROUTES

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Routes and how each is metered", 1)[1].split("\n## ", 1)[0]
    table = re.sub(r"\{[a-z_]+\}", "{}", section)
    missing = [
        f"{r.method} {r.pattern} ({r.name})"
        for r in ROUTES.routes
        if r.kind != "operator"
        and (
            re.sub(r"\{[a-z_]+\}", "{}", r.pattern) not in table
            or (f"`{r.name}`" not in table and "list" not in r.name)
        )
    ]
    assert not missing, f"README route table lacks: {missing}"
