"""The Grafana dashboards are well-formed and consistent with their provisioning files.

Static checks only; tests/e2e/test_prometheus.py evaluates every panel expression in Prometheus.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD_MOUNT = "/var/lib/grafana/dashboards"
REQUIRED_VARIABLES = {"tenant", "model", "feature", "environment"}
# Grafana's own variables, defined by Grafana rather than by the dashboard.
BUILTIN_VARIABLES = {"__range", "__rate_interval", "__interval", "__all"}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def dashboard_paths() -> list[Path]:
    paths = sorted(DASHBOARDS_DIR.glob("*.json"))
    assert paths, f"no dashboards in {DASHBOARDS_DIR}"
    return paths


def load_dashboard(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]


def variables_in(text: str) -> set[str]:
    return {a or b for a, b in VARIABLE.findall(text)}


def provisioned_uid() -> str:
    (source,) = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    assert source["type"] == "prometheus"
    uid: str = source["uid"]
    return uid


@pytest.fixture(params=[p.name for p in dashboard_paths()])
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load_dashboard(DASHBOARDS_DIR / request.param)


def test_spend_and_operations_dashboards_exist() -> None:
    """grafana/dashboards holds the Spend and Operations dashboards, with distinct uids."""
    dashboards = [load_dashboard(p) for p in dashboard_paths()]
    assert {"Spend", "Operations"} <= {d["title"] for d in dashboards}
    uids = [d["uid"] for d in dashboards]
    assert len(uids) == len(set(uids)), uids


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    """Top-level keys Grafana needs are present; each panel has a type, title, position and targets."""
    for key in ("uid", "title", "schemaVersion", "panels", "templating", "time"):
        assert key in dashboard, key
    assert dashboard.get("id") is None, "a provisioned dashboard must not carry a database id"
    for panel in panels(dashboard):
        assert isinstance(panel.get("id"), int), panel.get("title")
        assert panel.get("type") and panel.get("title"), panel
        assert set(panel["gridPos"]) >= {"x", "y", "w", "h"}, panel["title"]
        x, w = panel["gridPos"]["x"], panel["gridPos"]["w"]
        assert x >= 0 and x + w <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), panel["title"]
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]
            assert all(t.get("expr", "").strip() for t in panel["targets"]), panel["title"]


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    """No two panels of a dashboard share an id."""
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), sorted(ids)


def test_every_datasource_reference_resolves_to_the_provisioned_one(dashboard: dict[str, Any]) -> None:
    """Panels, their targets and the query variables all name the provisioned Prometheus uid."""
    uid = provisioned_uid()
    refs: list[tuple[str, Any]] = []
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        refs.append((panel["title"], panel.get("datasource")))
        refs.extend((f"{panel['title']} / {t['refId']}", t.get("datasource")) for t in panel["targets"])
    refs.extend((f"${v['name']}", v.get("datasource")) for v in dashboard["templating"]["list"])
    wrong = [(where, ref) for where, ref in refs if ref != {"type": "prometheus", "uid": uid}]
    assert wrong == []


def test_template_variables_are_defined_and_used(dashboard: dict[str, Any]) -> None:
    """Every $var in an expression is a template variable, and every template variable is used."""
    variables = dashboard["templating"]["list"]
    defined = {v["name"] for v in variables}
    assert defined >= REQUIRED_VARIABLES
    for v in variables:
        assert v["type"] == "query" and v["definition"].startswith("label_values("), v["name"]
        assert v["query"]["query"] == v["definition"], v["name"]
    used = set().union(*(variables_in(e) for e in panel_exprs(dashboard)))
    assert sorted(used - defined - BUILTIN_VARIABLES) == []
    assert sorted(defined - used) == []


def test_provisioning_loads_the_dashboard_directory() -> None:
    """The dashboard provider reads the directory the dashboards are mounted at."""
    (provider,) = yaml.safe_load(PROVIDERS.read_text(encoding="utf-8"))["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARD_MOUNT
    assert DASHBOARD_MOUNT in (ROOT / "grafana" / "README.md").read_text(encoding="utf-8")
