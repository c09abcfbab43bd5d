"""The Prometheus and Alertmanager configs are valid; promtool's rule tests pass and cover every rule.

promtool comes from the Debian package `prometheus`, amtool from `prometheus-alertmanager`. Without
them these tests are skipped, except under CI (CI=true), where a missing tool is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus.yml"
RULES_DIR = ROOT / "config" / "rules"
RULE_TESTS_DIR = ROOT / "tests" / "rules"
ALERTMANAGER_CONFIG = ROOT / "config" / "alertmanager.yml"
RUNBOOK = re.compile(r"^docs/(budgets|operations)\.md#[a-z0-9-]+$")


def _tool(name: str, package: str) -> str:
    """Path of `name`; skip (fail under CI) when it is not installed."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed: `apt-get install {package}` (Debian package {package})"
    if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
        pytest.fail(f"CI=true but {message}")
    pytest.skip(f"SKIPPED, {message}")


def _run(*args: str) -> str:
    """Run a command from the repository root; fail with its whole output unless it exits 0."""
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    output = f"$ {' '.join(args)}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert proc.returncode == 0, output
    return output


def _rel(paths: list[Path]) -> list[str]:
    assert paths, "no files found"
    return [str(p.relative_to(ROOT)) for p in sorted(paths)]


def _rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def _rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.test.yml"))


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rules() -> list[dict[str, Any]]:
    return [rule for path in _rule_files() for group in _load(path)["groups"] for rule in group["rules"]]


def _rule_tests() -> list[dict[str, Any]]:
    return [test for path in _rule_test_files() for test in _load(path)["tests"]]


def test_prometheus_config_is_valid() -> None:
    """`promtool check config` accepts config/prometheus.yml and the rule files it loads."""
    _run(_tool("promtool", "prometheus"), "check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT)))


def test_rule_files_are_valid() -> None:
    """`promtool check rules` accepts every file in config/rules/."""
    _run(_tool("promtool", "prometheus"), "check", "rules", *_rel(_rule_files()))


def test_rule_unit_tests_pass() -> None:
    """`promtool test rules` passes for every tests/rules/*.test.yml."""
    _run(_tool("promtool", "prometheus"), "test", "rules", *_rel(_rule_test_files()))


def test_prometheus_config_loads_the_rules_and_scrapes_the_admin_port() -> None:
    """The scrape config targets the admin port as job together-meter and loads config/rules/*.yml."""
    config = _load(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["rules/*.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "together-meter"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9787"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]


def test_every_alert_is_exercised_by_a_rule_test() -> None:
    """Each alert name in config/rules/ appears as an `alertname` in some tests/rules/ alert test."""
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    tested = {case["alertname"] for test in _rule_tests() for case in test.get("alert_rule_test", [])}
    assert alerts, "no alerts found in config/rules/"
    assert sorted(alerts - tested) == []


def test_every_alert_fires_in_some_rule_test() -> None:
    """Each alert is expected to fire at least once (not only to stay silent) in tests/rules/."""
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    firing = {
        case["alertname"]
        for test in _rule_tests()
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert sorted(alerts - firing) == []


def test_every_recording_rule_is_checked_by_a_rule_test() -> None:
    """Each recorded series name appears in the `expr` of some promql_expr_test in tests/rules/."""
    records = {rule["record"] for rule in _rules() if "record" in rule}
    exprs = " ".join(case["expr"] for test in _rule_tests() for case in test.get("promql_expr_test", []))
    checked = {name for name in records if re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", exprs)}
    assert sorted(records - checked) == []


def test_every_alert_has_summary_description_and_runbook() -> None:
    """Alerts carry summary, description and a runbook anchor in docs/budgets.md or docs/operations.md."""
    for rule in _rules():
        if "alert" not in rule:
            continue
        annotations = rule.get("annotations", {})
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert RUNBOOK.match(annotations["runbook"]), (rule["alert"], annotations["runbook"])
        assert "severity" in rule.get("labels", {}), rule["alert"]


def test_alertmanager_config_routes_budget_alerts_to_the_webhook() -> None:
    """TenantBudget* alerts go to the budget webhook grouped by tenant and alertname; the rest to ops."""
    config = _load(ALERTMANAGER_CONFIG)
    route = config["route"]
    assert route["receiver"] == "ops"
    (budget,) = [r for r in route["routes"] if r.get("matchers") == ['alertname=~"TenantBudget.*"']]
    assert set(budget["group_by"]) == {"tenant", "alertname"}
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers[budget["receiver"]]["webhook_configs"][0]["url"] == "http://127.0.0.1:5001/budget-alerts"
    assert "ops" in receivers
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert {a for a in alerts if a.startswith("TenantBudget")} == {
        "TenantBudgetThreshold",
        "TenantBudgetExceeded",
        "TenantBudgetExhaustionPredicted",
    }


def test_alertmanager_config_is_valid() -> None:
    """`amtool check-config` accepts config/alertmanager.yml."""
    _run(
        _tool("amtool", "prometheus-alertmanager"), "check-config", str(ALERTMANAGER_CONFIG.relative_to(ROOT))
    )


def _slack_example() -> str:
    """The commented Slack receiver between the BEGIN/END markers, uncommented."""
    text = ALERTMANAGER_CONFIG.read_text(encoding="utf-8")
    match = re.search(r"^ *# BEGIN slack example\n(.*?)^ *# END slack example$", text, re.S | re.M)
    assert match, "Slack example markers not found"
    return "".join(re.sub(r"^  # ?", "  ", line) for line in match.group(1).splitlines(keepends=True))


def test_alertmanager_slack_example_is_valid(tmp_path: Path) -> None:
    """The commented Slack receiver, once uncommented, is a valid receiver with its URL read from a file."""
    example = _slack_example()
    (receiver,) = yaml.safe_load(example)
    slack = receiver["slack_configs"][0]
    assert "api_url_file" in slack and "api_url" not in slack
    assert "tenant" in slack["title"] and "threshold" in slack["text"]
    config = tmp_path / "alertmanager.yml"
    config.write_text(ALERTMANAGER_CONFIG.read_text(encoding="utf-8") + example, encoding="utf-8")
    _run(_tool("amtool", "prometheus-alertmanager"), "check-config", str(config))
