"""Dockerfile, docker-compose.yml and the container config hold together (Docker itself cannot run here).

What is checked: compose parses, images are pinned, mounted host paths exist, ports stay on loopback,
the Dockerfile runs as non-root with a healthcheck, config/docker.yaml loads and binds where the
stack expects, and `promtool check config` accepts the compose Prometheus config (skipped without
promtool, except under CI=true where a missing promtool fails).
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

from proxy.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKER_CONFIG = ROOT / "config" / "docker.yaml"
PROMETHEUS_COMPOSE = ROOT / "config" / "prometheus-compose.yml"
CONTAINER_CONFIG_DIR = "/etc/together-meter"
LEDGER_DIR = "/var/lib/together-meter"
# Written by other work in progress: a mount of these may point at a path not created yet.
PENDING_PREFIXES = ("grafana/",)


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path relative to the repo, container path) of each bind mount of a service."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith(("./", "/", "../")):
            mounts.append((os.path.normpath(source), target))
    return mounts


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and bool(re.search(r"\d", tag))


def test_compose_services_are_pinned_images_or_builds() -> None:
    """Every compose service builds from this repo or uses an image with an exact tag, never latest."""
    services = _compose()["services"]
    assert {"proxy", "prometheus", "alertmanager", "grafana"} <= set(services)
    for name, service in services.items():
        assert "build" in service or _pinned(service.get("image", "")), f"{name}: {service.get('image')!r}"
    assert "latest" not in COMPOSE.read_text(encoding="utf-8")


def test_compose_host_paths_exist() -> None:
    """Each host path the compose file mounts exists in the repository (grafana/ once it is written)."""
    missing, pending = [], []
    for name, service in _compose()["services"].items():
        for source, _ in _bind_mounts(service):
            if (ROOT / source).exists():
                continue
            (pending if source.startswith(PENDING_PREFIXES) else missing).append(f"{name}: {source}")
    assert not missing, f"mounted host paths missing from the repo: {missing}"
    if pending:
        print(f"not yet in the repo (grafana work in progress): {pending}")


def test_compose_mounts_config_read_only_and_ledger_on_a_volume() -> None:
    """Repo files are mounted read-only (config/ at /etc/together-meter); the ledger is on a named volume."""
    compose = _compose()
    proxy = compose["services"]["proxy"]
    assert "./config:/etc/together-meter:ro" in proxy["volumes"]
    ledger = [v for v in proxy["volumes"] if v.split(":")[1] == LEDGER_DIR]
    assert ledger and ledger[0].split(":")[0] in compose["volumes"]
    config_arg = proxy["command"][proxy["command"].index("--config") + 1]
    assert config_arg == f"{CONTAINER_CONFIG_DIR}/{DOCKER_CONFIG.name}"
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if volume.startswith("./"):
                assert volume.endswith(":ro"), f"{name}: {volume} is not mounted read-only"


def test_compose_ports_are_published_on_loopback_only() -> None:
    """Every published port is bound to 127.0.0.1 on the host."""
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_compose_secrets_come_from_the_environment() -> None:
    """The together key, admin token and Grafana password are ${VAR} references, never values."""
    services = _compose()["services"]
    env = services["proxy"]["environment"]
    assert env["TOGETHER_API_KEY"].startswith("${TOGETHER_API_KEY")
    assert env["TOGETHER_METER_ADMIN_TOKEN"].startswith("${TOGETHER_METER_ADMIN_TOKEN")
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_compose_grafana_provisioning_matches_the_mounts() -> None:
    """Grafana's dashboard provider reads the mounted dashboards; its data source is compose's Prometheus."""
    grafana = _compose()["services"]["grafana"]
    targets = {source: target for source, target in _bind_mounts(grafana)}
    providers = sorted((ROOT / "grafana" / "provisioning" / "dashboards").glob("*.y*ml"))
    sources = sorted((ROOT / "grafana" / "provisioning" / "datasources").glob("*.y*ml"))
    if not providers and not sources:
        pytest.skip("SKIPPED: grafana/provisioning is not written yet")
    for path in providers:
        for provider in yaml.safe_load(path.read_text(encoding="utf-8")).get("providers", []):
            assert provider["options"]["path"].startswith(targets["grafana/dashboards"]), path
    for path in sources:
        for source in yaml.safe_load(path.read_text(encoding="utf-8")).get("datasources", []):
            if source.get("type") == "prometheus":
                assert source["url"].rstrip("/") == "http://prometheus:9090", path


def test_dockerfile_is_non_root_with_healthcheck_and_pinned_base() -> None:
    """The image runs as a non-root user, checks /healthz, exposes both ports and pins its base."""
    instructions = _dockerfile_instructions()
    args = {word: [rest for w, rest in instructions if w == word] for word, _ in instructions}
    assert args["USER"] and args["USER"][-1].split(":")[0] not in {"root", "0"}
    assert any("/healthz" in rest for rest in args["HEALTHCHECK"])
    assert set(" ".join(args["EXPOSE"]).split()) >= {"8787", "9787"}
    for base in args["FROM"]:
        image = base.split()[0]
        assert _pinned(image), f"FROM {image} is not pinned to an exact tag"
    assert "latest" not in DOCKERFILE.read_text(encoding="utf-8")
    assert args["ENTRYPOINT"] == ['["together-meter"]']
    assert any(LEDGER_DIR in rest for rest in args["VOLUME"])


def test_docker_config_loads_and_binds_all_interfaces() -> None:
    """config/docker.yaml loads, listens on 0.0.0.0 (the container's network) and writes to the volume."""
    config = load_config(DOCKER_CONFIG)
    assert config.listen.host == "0.0.0.0"
    assert config.admin.host == "0.0.0.0"
    assert config.ledger.path.startswith(LEDGER_DIR + "/")
    targets = set(re.findall(r'targets: \["proxy:(\d+)"\]', PROMETHEUS_COMPOSE.read_text(encoding="utf-8")))
    assert targets == {str(config.admin.port)}


def test_prometheus_compose_config_is_valid() -> None:
    """`promtool check config` accepts config/prometheus-compose.yml and the rules it loads."""
    promtool = shutil.which("promtool")
    if not promtool:
        message = "promtool is not installed: `apt-get install prometheus` (Debian package prometheus)"
        if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
            pytest.fail(f"CI=true but {message}")
        pytest.skip(f"SKIPPED, {message}")
    args = [promtool, "check", "config", str(PROMETHEUS_COMPOSE.relative_to(ROOT))]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}"
    assert "1 rule files found" in proc.stdout + proc.stderr
    compose = yaml.safe_load(PROMETHEUS_COMPOSE.read_text(encoding="utf-8"))
    assert [job["job_name"] for job in compose["scrape_configs"]] == ["together-meter"]
