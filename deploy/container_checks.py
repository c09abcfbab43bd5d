"""Run the built image and the compose stack with podman, and check them (deploy/container-test.sh).

Two tiers, each cleaning up after itself (containers and volumes removed, images kept):

image  The image alone, as `docker run` would run it: `keys create` works in it, `serve` answers
       /healthz and /readyz, the image's HEALTHCHECK passes, the process runs as uid 10001, a
       metered request (plain and streaming) through it to the simulator (run from the same image)
       is priced, counted and recorded, and SIGTERM with a request in flight lets that request
       finish and exits 0 within the grace period.
stack  docker-compose.yml plus deploy/compose.ci.yml (host networking, local Prometheus and
       Alertmanager images) under podman-compose: the proxy's compose healthcheck passes,
       Prometheus scrapes the proxy (target up, traffic visible), loads every rule group of
       config/rules (each rule evaluated without error), discovers Alertmanager, and evaluates
       every Grafana dashboard query without error; `stop` ends the proxy with exit code 0.

Standard library plus PyYAML (the project's own dependency). Every wait is bounded by a deadline.
Only host networking and loopback addresses are used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "config" / "rules"
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"
COMPOSE_FILES = ("docker-compose.yml", "deploy/compose.ci.yml")
PROJECT = "together-meter-ci"
# Grafana's built-in variables and the template variables, substituted exactly as
# tests/e2e/test_prometheus.py does (tests/test_deploy_files.py checks that the two agree).
BUILTINS = {"$__range": "1h", "$__rate_interval": "1m", "$__interval": "15s"}
VARIABLE = re.compile(r"\$\{?\w+\}?")

API, ADMIN = 8787, 9787  # docker.yaml's ports (the HEALTHCHECK asks 9787)
PROMETHEUS, ALERTMANAGER = 9090, 9093
CHAT_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
UID = 10001
GRACE_S = 40  # docker stop -t 40 / compose stop_grace_period: 40s
ADMIN_TOKEN = "ci-admin-token-not-secret"
FAKE_TOGETHER_KEY = "ci-fake-together-key"  # the simulator accepts any key; nothing leaves the host


class CheckFailed(AssertionError):
    pass


def log(message: str) -> None:
    print(f"[container-checks {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ok(message: str) -> None:
    log(f"ok: {message}")


def check(condition: object, message: object) -> None:
    if not condition:
        raise CheckFailed(str(message))


# ---- podman ------------------------------------------------------------------------------------


def podman(*args: str, check_rc: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check_rc and proc.returncode != 0:
        raise CheckFailed(f"$ podman {' '.join(args)}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def container_logs(name: str) -> str:
    proc = podman("logs", name, check_rc=False, timeout=30)
    return (proc.stdout + proc.stderr)[-6000:]


def inspect_container(name: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(podman("container", "inspect", name).stdout)
    return data[0]


def remove_containers(*names: str) -> None:
    for name in names:
        podman("rm", "--force", "--volumes", "--time", "5", name, check_rc=False, timeout=60)


# ---- HTTP --------------------------------------------------------------------------------------


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    status, _, body = http("GET", url, headers=headers)
    check(status == 200, f"GET {url}: HTTP {status}: {body[:500]!r}")
    return json.loads(body)


def wait_for(
    what: str, condition: Callable[[], Any], timeout: float, alive: Callable[[], None] | None = None
) -> Any:
    """Poll `condition` (exceptions count as not yet) until truthy, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        if alive:
            alive()
        try:
            result = condition()
            if result:
                return result
            last = result
        except (OSError, CheckFailed, ValueError, KeyError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(0.25)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def require_free_ports(*ports: int, wait: float = 60) -> None:
    """The fixed ports of docker.yaml and the compose configs, free on the host (waits a little)."""

    def busy() -> list[int]:
        return [p for p in ports if not port_free(p)]

    if busy():
        log(f"waiting up to {wait:.0f} s for ports {busy()} (host networking needs them)")
    wait_for(f"ports {list(ports)} to be free on this host", lambda: not busy(), wait)


def free_port() -> int:
    """A loopback port nobody listens on now (for the simulator, whose port is ours to choose)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def metered_requests(api: str, key: str) -> None:
    """One plain and one streaming chat completion, each priced by the proxy."""
    headers = {"Authorization": f"Bearer {key}", "X-Meter-Feature": "chat", "X-Meter-Environment": "dev"}
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}
    status, response_headers, raw = http("POST", f"{api}/v1/chat/completions", body, headers)
    check(status == 200, f"metered request: HTTP {status}: {raw[:500]!r}")
    cost = response_headers.get("x-meter-cost-usd", "")
    check(response_headers.get("x-request-id"), "metered request: no x-request-id")
    check(cost and float(cost) > 0, f"metered request: x-meter-cost-usd {cost!r}")
    check(response_headers.get("x-meter-usage-source") == "upstream", response_headers)
    usage = json.loads(raw)["usage"]
    check(usage["completion_tokens"] > 0, f"metered request: usage {usage}")
    status, _, raw = http("POST", f"{api}/v1/chat/completions", body | {"stream": True}, headers)
    text = raw.decode()
    check(
        status == 200 and text.rstrip().endswith("data: [DONE]"), f"streaming request: {status} {text[-300:]}"
    )
    check(
        re.search(r"^: x-meter-cost-usd=0\.\d*[1-9]", text, re.M),
        f"streaming request: no cost line: {text[-300:]}",
    )
    ok(f"metered requests (plain and streaming) priced: x-meter-cost-usd={cost}")


def requests_counted(admin: str, tenant: str = "acme") -> float:
    status, _, raw = http("GET", f"{admin}/metrics")
    check(status == 200, f"/metrics: HTTP {status}")
    total = 0.0
    for line in raw.decode().splitlines():
        if line.startswith("together_meter_requests_total{") and f'tenant="{tenant}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- tier 1: the image alone -------------------------------------------------------------------


def create_key(image: str, config_dir: Path) -> str:
    """`together-meter keys create` in the image, writing keys.yaml into the (writable) CI config dir."""
    proc = podman(
        "run", "--rm", "--network", "none", "--no-healthcheck",
        "-v", f"{config_dir}:/etc/together-meter",
        image, "keys", "create", "--tenant", "acme", "--config", "/etc/together-meter/docker.yaml",
    )  # fmt: skip
    key = proc.stdout.strip().splitlines()[-1]
    check(key.startswith("tm-"), f"keys create printed {proc.stdout!r}")
    check((config_dir / "keys.yaml").stat().st_uid == UID, "keys.yaml not written by uid 10001")
    ok("`keys create` ran in the image as uid 10001 and wrote keys.yaml")
    return key


def image_tier(image: str, config_dir: Path) -> str:
    sim, proxy, volume = "tm-ci-simulator", "tm-ci-proxy", "tm-ci-ledger"
    require_free_ports(API, ADMIN)
    simulator_port = free_port()
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    check(config.get("User") == f"{UID}:{UID}", f"image USER is {config.get('User')!r}")
    check(config.get("Entrypoint") == ["together-meter"], config.get("Entrypoint"))
    check(config.get("StopSignal") == "SIGTERM", config.get("StopSignal"))
    health = info.get("Healthcheck") or {}
    check("/healthz" in " ".join(health.get("Test") or []), f"image has no /healthz HEALTHCHECK: {health}")
    version = podman("run", "--rm", "--network", "none", "--no-healthcheck", "--entrypoint", "python", image,
                     "-c", "import sys; print(sys.version.split()[0])").stdout.strip()  # fmt: skip
    check(version.startswith("3.11."), f"python in the image is {version}")
    ok(f"image config: USER {UID}:{UID}, HEALTHCHECK /healthz, STOPSIGNAL SIGTERM; python {version}")

    key = create_key(image, config_dir)
    remove_containers(sim, proxy)
    podman("volume", "rm", "--force", volume, check_rc=False)
    try:
        podman("run", "-d", "--name", sim, "--network", "host", "--no-healthcheck", "--entrypoint", "python",
               image, "-m", "proxy.simulator", "--port", str(simulator_port))  # fmt: skip
        podman(
            "run", "-d", "--name", proxy, "--network", "host",
            "-v", f"{config_dir}:/etc/together-meter:ro", "-v", f"{volume}:/var/lib/together-meter",
            "-e", f"TOGETHER_API_KEY={FAKE_TOGETHER_KEY}", "-e", f"TOGETHER_METER_ADMIN_TOKEN={ADMIN_TOKEN}",
            image, "serve", "--config", "/etc/together-meter/docker.yaml",
            "--upstream", f"http://127.0.0.1:{simulator_port}/v1",
        )  # fmt: skip
        api, admin = f"http://127.0.0.1:{API}", f"http://127.0.0.1:{ADMIN}"

        def running() -> None:
            for name in (sim, proxy):
                if not inspect_container(name)["State"]["Running"]:
                    raise CheckFailed(f"container {name} exited:\n{container_logs(name)}")

        wait_for("/healthz", lambda: http("GET", f"{admin}/healthz")[0] == 200, 60, running)
        ok("/healthz answers 200")
        ready = wait_for(
            "/readyz", lambda: json.loads(http("GET", f"{admin}/readyz")[2]).get("ready"), 30, running
        )
        check(ready is True, ready)
        ok("/readyz answers ready (ledger writable, upstream reachable)")
        proc = podman("healthcheck", "run", proxy, check_rc=False, timeout=30)
        check(proc.returncode == 0, f"the image's HEALTHCHECK failed: {proc.stdout}{proc.stderr}")
        ok("the image's HEALTHCHECK command passes (podman healthcheck run)")

        pid = inspect_container(proxy)["State"]["Pid"]
        status = Path(f"/proc/{pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
        check(
            uids and set(uids.group(1).split()) == {str(UID)},
            f"container process uids: {uids and uids.group(1)}",
        )
        inside = podman("exec", proxy, "id", "-u").stdout.strip()
        check(inside == str(UID), f"id -u in the container: {inside}")
        ok(f"the server process (host pid {pid}) runs as uid {UID} (real, effective, saved, fs)")

        metered_requests(api, key)
        check(requests_counted(admin) == 2, f"/metrics counts {requests_counted(admin)} acme requests, not 2")
        budgets = get_json(f"{admin}/admin/budgets", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        check("acme" in json.dumps(budgets), f"/admin/budgets: {budgets}")
        ledger = podman(
            "exec", proxy, "stat", "-c", "%u %s", "/var/lib/together-meter/together-meter.db"
        ).stdout
        check(ledger.split()[0] == str(UID), f"ledger file owner/size: {ledger}")
        month = time.strftime("%Y-%m", time.gmtime())  # docker.yaml: budgets.timezone UTC
        config = "/etc/together-meter/docker.yaml"
        report = podman("exec", proxy, "together-meter", "report", "--config", config,
                        "--month", month, "--by", "tenant", "--format", "csv").stdout  # fmt: skip
        check("acme" in report, f"`together-meter report` in the container shows no acme row:\n{report}")
        ok(f"counted in /metrics, /admin/budgets answers, the ledger on the volume (owned by uid {UID}) "
           "holds the rows (`together-meter report` in the container)")  # fmt: skip

        sigterm_with_request_in_flight(proxy, api, key)
        return key
    finally:
        remove_containers(proxy, sim)
        podman("volume", "rm", "--force", volume, check_rc=False)


def sigterm_with_request_in_flight(proxy: str, api: str, key: str) -> None:
    """SIGTERM while a slow request is in flight: the request completes, the process exits 0 in time."""
    result: dict[str, Any] = {}
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 5,
        "simulate": {"delay_ms": 1500},
    }

    def slow() -> None:
        try:
            result["response"] = http(
                "POST", f"{api}/v1/chat/completions", body, {"Authorization": f"Bearer {key}"}, timeout=30
            )
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)  # the request has reached the simulator and waits there
    started = time.monotonic()
    podman("kill", "--signal", "TERM", proxy)
    wait = podman("wait", proxy, check_rc=False, timeout=GRACE_S + 5)
    elapsed = time.monotonic() - started
    thread.join(timeout=30)
    state = inspect_container(proxy)["State"]
    logs = container_logs(proxy)
    check(not state["Running"], f"still running {elapsed:.1f} s after SIGTERM")
    check(
        state["ExitCode"] == 0, f"exit code {state['ExitCode']} after SIGTERM (wait: {wait.stdout})\n{logs}"
    )
    check(elapsed < GRACE_S, f"took {elapsed:.1f} s to stop (grace {GRACE_S} s)")
    check("Traceback" not in logs, f"traceback in the logs:\n{logs}")
    status = result.get("response", (None,))[0]
    check(status == 200, f"the in-flight request got {result} instead of finishing")
    ok(
        f"SIGTERM: the in-flight request finished (200), exit code 0 after {elapsed:.1f} s"
        f" (grace {GRACE_S} s)"
    )


# ---- tier 2: the compose stack -----------------------------------------------------------------


def rule_groups() -> dict[str, int]:
    """{group name: number of rules} of config/rules/*.yml."""
    groups: dict[str, int] = {}
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            groups[group["name"]] = len(group["rules"])
    return groups


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard, panel, expression) for every target of every panel, variables substituted."""
    found = []
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name, value in BUILTINS.items():
                    expr = expr.replace(name, value)
                found.append((dashboard["title"], panel["title"], VARIABLE.sub(".*", expr)))
    return found


class Compose:
    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        files = [arg for f in COMPOSE_FILES for arg in ("-f", f)]
        self.base = [*command, "--in-pod", "false", "-p", PROJECT, *files]
        self.env = env

    def run(
        self, *args: str, timeout: float = 180, check_rc: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.base, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check_rc and proc.returncode != 0:
            raise CheckFailed(
                f"$ podman-compose {' '.join(args)}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"
            )
        return proc


def container(service: str) -> str:
    return f"{PROJECT}_{service}_1"


def stack_tier(compose_command: list[str], config_dir: Path, key: str) -> None:
    require_free_ports(API, ADMIN, PROMETHEUS, ALERTMANAGER)
    env = os.environ | {
        "TOGETHER_API_KEY": FAKE_TOGETHER_KEY,
        "TOGETHER_METER_ADMIN_TOKEN": ADMIN_TOKEN,
        "GRAFANA_ADMIN_PASSWORD": "ci-not-used-grafana-is-not-started",
        "TM_CI_CONFIG_DIR": str(config_dir),
        "TM_CI_SIMULATOR_PORT": str(free_port()),
    }
    compose = Compose(compose_command, env)
    compose.run("down", "--volumes", timeout=120, check_rc=False)  # leftovers of an interrupted run
    api, admin = f"http://127.0.0.1:{API}", f"http://127.0.0.1:{ADMIN}"
    prometheus, alertmanager = f"http://127.0.0.1:{PROMETHEUS}", f"http://127.0.0.1:{ALERTMANAGER}"
    services = ["proxy", "simulator", "prometheus", "alertmanager"]

    def running() -> None:
        for service in services:
            try:
                state = inspect_container(container(service))["State"]
            except CheckFailed:
                continue  # not created yet
            if not state["Running"]:
                raise CheckFailed(
                    f"{service} exited ({state['ExitCode']}):\n{container_logs(container(service))}"
                )

    try:
        # The proxy first: compose's `depends_on: condition: service_healthy` (podman-compose cannot
        # wait for health on podman 4.3), and its traffic is there for Prometheus' first scrape.
        compose.run("up", "-d", "--no-build", "proxy", "simulator")

        def healthy() -> bool:
            return (
                podman("healthcheck", "run", container("proxy"), check_rc=False, timeout=30).returncode == 0
            )

        wait_for("the proxy's compose healthcheck", healthy, 60, running)
        ok("proxy: compose healthcheck passes")
        wait_for("/readyz", lambda: json.loads(http("GET", f"{admin}/readyz")[2]).get("ready"), 30, running)
        metered_requests(api, key)

        compose.run("up", "-d", "--no-build", "prometheus", "alertmanager")
        wait_for("Prometheus ready", lambda: http("GET", f"{prometheus}/-/ready")[0] == 200, 60, running)
        wait_for("Alertmanager ready", lambda: http("GET", f"{alertmanager}/-/ready")[0] == 200, 60, running)
        ok("Prometheus and Alertmanager ready")

        def target_up() -> bool:
            targets = get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
            ours = [t for t in targets if t["labels"].get("job") == "together-meter"]
            check(len(ours) == 1, f"scrape targets: {targets}")
            check(ours[0]["scrapeUrl"] == "http://proxy:9787/metrics", ours[0]["scrapeUrl"])
            return ours[0]["health"] == "up"

        wait_for("the proxy's scrape target to be up", target_up, 45, running)
        ok("Prometheus scrape target http://proxy:9787/metrics (job together-meter) is up")

        expected = rule_groups()

        def rules_evaluated() -> bool:
            groups = get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
            loaded = {g["name"]: len(g["rules"]) for g in groups}
            check(loaded == expected, f"rule groups loaded {loaded}, config/rules has {expected}")
            errors = [
                (r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r.get("lastError")
            ]
            check(not errors, f"rules failing to evaluate: {errors}")
            return all(r.get("health") == "ok" for g in groups for r in g["rules"])

        wait_for("every rule evaluated", rules_evaluated, 45, running)
        ok(f"rule groups loaded and every rule evaluated without error: {expected}")

        managers = get_json(f"{prometheus}/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
        check([m["url"] for m in managers] == ["http://alertmanager:9093/api/v2/alerts"], managers)
        status = get_json(f"{alertmanager}/api/v2/status")
        check(
            "budget-webhook" in status["config"]["original"],
            "Alertmanager did not load config/alertmanager.yml",
        )
        ok(
            "Prometheus discovered Alertmanager (http://alertmanager:9093);"
            " Alertmanager loaded alertmanager.yml"
        )

        def query(expr: str) -> list[Any]:
            status, _, raw = http(
                "GET", f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            )
            body = json.loads(raw)
            check(status == 200 and body.get("status") == "success", f"{expr}: HTTP {status} {body}")
            result: list[Any] = body["data"]["result"]
            return result

        def traffic_seen() -> bool:
            result = query('sum(together_meter_requests_total{job="together-meter",tenant="acme"})')
            return bool(result) and float(result[0]["value"][1]) >= 2

        wait_for("the metered requests in Prometheus", traffic_seen, 45, running)
        ok("the metered requests are visible in Prometheus")

        exprs = dashboard_exprs()
        check(len(exprs) >= 20, f"only {len(exprs)} dashboard queries found")
        failures, with_data = [], 0
        for dashboard, panel, expr in exprs:
            try:
                with_data += bool(query(expr))
            except CheckFailed as exc:
                failures.append(f"{dashboard} / {panel}: {exc}")
        check(not failures, "dashboard queries failing in Prometheus:\n" + "\n".join(failures))
        ok(f"all {len(exprs)} dashboard queries evaluate without error ({with_data} already return data)")

        started = time.monotonic()
        compose.run("stop", "proxy", timeout=GRACE_S + 30)
        state = inspect_container(container("proxy"))["State"]
        elapsed = time.monotonic() - started
        check(state["ExitCode"] == 0, f"proxy exit code {state['ExitCode']} after compose stop")
        check(elapsed < GRACE_S, f"compose stop took {elapsed:.1f} s")
        ok(f"`podman-compose stop proxy`: exit code 0 after {elapsed:.1f} s")
    except CheckFailed:
        for service in services:
            with contextlib.suppress(CheckFailed, subprocess.TimeoutExpired):
                log(f"--- logs of {service} ---\n{container_logs(container(service))}")
        raise
    finally:
        # `rm --volumes` first: podman-compose's `down --volumes` leaves the anonymous volume of
        # the image's VOLUME behind (the simulator's); then down removes the named volumes
        remove_containers(*(container(s) for s in services))
        compose.run("down", "--volumes", timeout=180, check_rc=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", required=True, help="the proxy image (compose's together-meter:0.1.0)")
    parser.add_argument("--config-dir", required=True, type=Path, help="writable CI copy of config/")
    parser.add_argument("--podman-compose", required=True, help="the podman-compose executable")
    parser.add_argument("--tier", choices=("all", "image", "stack"), default="all")
    args = parser.parse_args(argv)
    # `timeout` (or Ctrl-C) ends the run through the `finally` blocks that remove the containers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    key = ""
    try:
        if args.tier in ("all", "image"):
            started = time.monotonic()
            key = image_tier(args.image, args.config_dir)
            log(f"image tier passed in {time.monotonic() - started:.1f} s")
        if args.tier in ("all", "stack"):
            started = time.monotonic()
            key = key or create_key(args.image, args.config_dir)
            stack_tier([args.podman_compose], args.config_dir, key)
            log(f"stack tier passed in {time.monotonic() - started:.1f} s")
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        log(f"FAILED: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
