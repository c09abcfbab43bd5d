"""Dockerfile, docker-compose.yml, the container config and the container tier's files hold together.

Static checks, in `make test`: compose parses, images are pinned, mounted host paths exist, ports
stay on loopback, the Dockerfile runs as non-root with a healthcheck and can build from prebuilt
wheels, config/docker.yaml loads and binds where the stack expects, `promtool check config`
accepts the compose Prometheus config (skipped without promtool, except under CI=true where a
missing promtool fails), and the override deploy/compose.ci.yml and deploy/container_checks.py
agree with the files they stand in for. Building and running the image and the stack is
`make container-test` (deploy/container-test.sh), which .ci/run runs after `make test`.
"""

from __future__ import annotations

import ast
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
COMPOSE_CI = ROOT / "deploy" / "compose.ci.yml"
CONTAINER_TEST = ROOT / "deploy" / "container-test.sh"
CONTAINER_CHECKS = ROOT / "deploy" / "container_checks.py"
E2E_PROMETHEUS = ROOT / "tests" / "e2e" / "test_prometheus.py"
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


def test_dockerfile_takes_prebuilt_wheels_only_from_a_wheelhouse_in_the_context() -> None:
    """The build stage uses wheelhouse/ offline when the context has one, else `pip wheel` from PyPI.

    The repository's .dockerignore keeps wheelhouse/ out of a plain `docker build .`, so that
    build is what it always was; deploy/container-test.sh builds from a context that has one.
    """
    runs = [rest for word, rest in _dockerfile_instructions() if word == "RUN"]
    (build,) = [run for run in runs if "pip wheel" in run]
    assert "--mount=type=bind,source=.,target=/context" in build
    assert "if [ -d /context/wheelhouse ]" in build
    assert "pip wheel --no-index --find-links /context/wheelhouse --wheel-dir /wheels ." in build
    assert "pip wheel --wheel-dir /wheels ." in build
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*" and not [line for line in ignore if "wheelhouse" in line]


def _compose_ci() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_CI.read_text(encoding="utf-8"))


def test_compose_ci_override_uses_host_networking_and_loopback_only() -> None:
    """deploy/compose.ci.yml: host networking, every listener on 127.0.0.1, no Grafana, no published ports."""
    services = _compose_ci()["services"]
    assert set(services) == {"proxy", "simulator", "prometheus", "alertmanager"}
    assert set(services) - {"simulator"} <= set(_compose()["services"])
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert "ports" not in service, name
        for volume in service.get("volumes", []):
            assert volume.endswith(":ro"), f"{name}: {volume}"
    assert "--upstream" in services["proxy"]["command"]
    upstream = services["proxy"]["command"][services["proxy"]["command"].index("--upstream") + 1]
    assert upstream.startswith("http://127.0.0.1:")
    simulator_port = upstream.removeprefix("http://127.0.0.1:").removesuffix("/v1")
    assert services["simulator"]["command"] == ["--host", "127.0.0.1", "--port", simulator_port]
    assert services["simulator"]["entrypoint"] == ["python", "-m", "proxy.simulator"]
    assert services["simulator"]["image"] == _compose()["services"]["proxy"]["image"]
    assert "--web.listen-address=127.0.0.1:9090" in services["prometheus"]["command"]
    assert "--web.listen-address=127.0.0.1:9093" in services["alertmanager"]["command"]
    assert "--cluster.listen-address=" in services["alertmanager"]["command"]


def test_compose_ci_override_resolves_the_names_prometheus_scrapes() -> None:
    """The compose service names config/prometheus-compose.yml scrapes resolve to 127.0.0.1 (host network)."""
    targets = re.findall(r'targets: \["([\w.-]+):(\d+)"\]', PROMETHEUS_COMPOSE.read_text(encoding="utf-8"))
    assert {host for host, _ in targets} == {"proxy", "alertmanager"}
    extra_hosts = _compose_ci()["services"]["prometheus"]["extra_hosts"]
    assert sorted(extra_hosts) == sorted(f"{host}:127.0.0.1" for host, _ in targets)
    # the images stand in for the pinned upstream ones, built by deploy/container-test.sh
    services = _compose_ci()["services"]
    for name in ("prometheus", "alertmanager"):
        assert services[name]["image"] == f"localhost/together-meter-ci/{name}:debian12"
        assert (ROOT / "deploy" / "images" / name / "Containerfile").is_file()
    script = CONTAINER_TEST.read_text(encoding="utf-8")
    assert 'podman tag "$image" "localhost/$PROJECT/$name:debian12"' in script


def test_container_checks_substitute_dashboard_variables_as_the_e2e_test_does() -> None:
    """deploy/container_checks.py and tests/e2e/test_prometheus.py turn panel queries into PromQL alike."""

    def constants(path: Path) -> dict[str, str]:
        found = {}
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in {"BUILTINS", "VARIABLE"}
            ):
                found[node.targets[0].id] = ast.unparse(node.value)
        return found

    expected = constants(E2E_PROMETHEUS)
    assert set(expected) == {"BUILTINS", "VARIABLE"}
    assert constants(CONTAINER_CHECKS) == expected


def test_ci_runs_the_container_tier_after_make_test_bounded_in_time() -> None:
    """.ci/run runs `make container-test` after `make test`; the target is bounded by `timeout`."""
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert "make test" in commands and "make container-test" in commands
    assert commands.index("make test") < commands.index("make container-test")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^container-test:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and re.search(
        r"timeout (--kill-after=\d+ )?\d+ bash deploy/container-test\.sh", recipe.group(1)
    )
    assert "container-test" in re.search(r"^\.PHONY:.*$", makefile, re.M).group(0)  # type: ignore[union-attr]
