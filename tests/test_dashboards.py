"""The Grafana dashboards are well-formed and consistent with their provisioning files.

Static checks only: each dashboard validates against Grafana's own dashboard schema
(grafana/schema/dashboard.schema.json, generated from the `Dashboard` type of @grafana/schema, the
version of the Grafana image in docker-compose.yml), which is shown to catch a wrong type, a
misspelled key and a bad enum value; then the project's own rules. tests/e2e/test_prometheus.py
(and `make container-test`) evaluate every panel expression in Prometheus.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
SCHEMA = ROOT / "grafana" / "schema" / "dashboard.schema.json"
SCHEMA_GENERATOR = ROOT / "grafana" / "schema" / "generate.sh"
COMPOSE = ROOT / "docker-compose.yml"
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


def grafana_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA.read_text(encoding="utf-8"))
    return schema


def schema_errors(document: dict[str, Any]) -> list[jsonschema.ValidationError]:
    """Every violation of Grafana's dashboard schema, including those inside anyOf branches."""
    validator = jsonschema.Draft7Validator(grafana_schema())
    found, pending = [], list(validator.iter_errors(document))
    while pending:
        error = pending.pop()
        found.append(error)
        pending.extend(error.context or [])
    return found


def describe(errors: list[jsonschema.ValidationError]) -> str:
    return "\n".join(f"  {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}" for e in errors)


def test_the_schema_is_grafanas_own_for_the_grafana_in_compose() -> None:
    """The committed schema comes from @grafana/schema of the Grafana version compose runs, unedited.

    Closed where Grafana's types are closed (so misspelled keys are errors), open exactly where
    Grafana's CUE source leaves its types open (template variables, annotations).
    """
    schema = grafana_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    version = schema["x-grafana-schema-version"]
    grafana_image = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]["grafana"]["image"]
    assert grafana_image == f"grafana/grafana:{version}"
    assert f"@grafana/schema@{version}" in schema["$comment"]
    assert f"GRAFANA_SCHEMA_VERSION={version}\n" in SCHEMA_GENERATOR.read_text(encoding="utf-8")
    definitions = schema["definitions"]
    assert schema["$ref"] == "#/definitions/Dashboard"
    closed = [
        "Dashboard",
        "Panel",
        "RowPanel",
        "GridPos",
        "FieldConfigSource",
        "FieldConfig",
        "ThresholdsConfig",
    ]
    assert {name: definitions[name]["additionalProperties"] for name in closed} == dict.fromkeys(
        closed, False
    )
    opened = ["VariableModel", "AnnotationQuery", "AnnotationTarget"]
    assert {name: definitions[name]["additionalProperties"] for name in opened} == dict.fromkeys(opened, True)


def test_dashboard_validates_against_grafanas_schema(dashboard: dict[str, Any]) -> None:
    """Every key, type and enum value of the dashboard is one Grafana's dashboard model accepts."""
    errors = list(jsonschema.Draft7Validator(grafana_schema()).iter_errors(dashboard))
    assert not errors, f"{dashboard['title']} does not match Grafana's dashboard schema:\n{describe(errors)}"


def _panel_with(dashboard: dict[str, Any], predicate: Callable[[dict[str, Any]], bool]) -> int:
    return next(i for i, panel in enumerate(dashboard["panels"]) if predicate(panel))


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


# (what is broken, how, (path of the error, JSON Schema keyword that must report it))
Mutation = tuple[str, Callable[[dict[str, Any]], None], Callable[[dict[str, Any]], tuple[list[Any], str]]]


def _threshold_panel(d: dict[str, Any]) -> int:
    return _panel_with(d, lambda p: "thresholds" in p.get("fieldConfig", {}).get("defaults", {}))


def _threshold_panel_renamed(d: dict[str, Any]) -> int:
    return _panel_with(d, lambda p: "treshold" in p.get("fieldConfig", {}).get("defaults", {}))


MUTATIONS: list[Mutation] = [
    (
        "wrong type: schemaVersion as a string",
        lambda d: d.update(schemaVersion=str(d["schemaVersion"])),
        lambda d: (["schemaVersion"], "type"),
    ),
    (
        "wrong type: a panel's gridPos.w as a string",
        lambda d: d["panels"][0]["gridPos"].update(w="12"),
        lambda d: (["panels", 0, "gridPos", "w"], "type"),
    ),
    (
        "wrong type: a variable's multi as a string",
        lambda d: d["templating"]["list"][0].update(multi="true"),
        lambda d: (["templating", "list", 0, "multi"], "type"),
    ),
    (
        "misspelled key at the top: refesh",
        lambda d: _rename(d, "refresh", "refesh"),
        lambda d: ([], "additionalProperties"),
    ),
    (
        "misspelled key in a panel: titel",
        lambda d: _rename(d["panels"][1], "title", "titel"),
        lambda d: (["panels", 1], "additionalProperties"),
    ),
    (
        "misspelled key in a panel's fieldConfig.defaults: thresholds -> treshold",
        lambda d: _rename(
            d["panels"][_threshold_panel(d)]["fieldConfig"]["defaults"], "thresholds", "treshold"
        ),
        lambda d: (
            ["panels", _threshold_panel_renamed(d), "fieldConfig", "defaults"],
            "additionalProperties",
        ),
    ),
    (
        "bad enum: graphTooltip 3",
        lambda d: d.update(graphTooltip=3),
        lambda d: (["graphTooltip"], "enum"),
    ),
    (
        "bad enum: a variable's hide 5 (variables are open, their known keys still checked)",
        lambda d: d["templating"]["list"][0].update(hide=5),
        lambda d: (["templating", "list", 0, "hide"], "enum"),
    ),
    (
        "bad enum: a variable's type querry",
        lambda d: d["templating"]["list"][0].update(type="querry"),
        lambda d: (["templating", "list", 0, "type"], "enum"),
    ),
    (
        "bad enum: thresholds mode relative",
        lambda d: d["panels"][_threshold_panel(d)]["fieldConfig"]["defaults"]["thresholds"].update(
            mode="relative"
        ),
        lambda d: (["panels", _threshold_panel(d), "fieldConfig", "defaults", "thresholds", "mode"], "enum"),
    ),
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_grafanas_schema_catches_a_broken_copy(mutation: Mutation) -> None:
    """A copy of the Spend dashboard broken in one place fails validation, at that place."""
    what, mutate, expected = mutation
    original = load_dashboard(DASHBOARDS_DIR / "spend.json")
    assert schema_errors(original) == []
    broken = copy.deepcopy(original)
    mutate(broken)
    assert broken != original, what
    path, keyword = expected(broken)
    errors = schema_errors(broken)
    assert errors, f"{what}: the schema accepted it"
    matching = [e for e in errors if list(e.absolute_path) == path and e.validator == keyword]
    assert matching, f"{what}: no {keyword!r} error at {path}; got:\n{describe(errors)}"


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
