"""The SDK matrix's moving parts: the SDK variants, a driver run, the simulator in a thread and the
proxy as a real `together-meter serve` process (tests/e2e/test_sdk_matrix.py puts them together).

Everything listens on loopback; every wait and every process is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy import simulator
from proxy.simulator import RunningSimulator, SimulatorOptions
from tests.sdk.envs import DRIVERS, NODE_PROJECT, Envs

ROOT = Path(__file__).resolve().parents[2]
DRIVER_TIMEOUT_S = 150.0  # one driver process, all its lines (each SDK call has 20 s at most)
READY_WITHIN_S = 20.0
OPERATOR_KEY = "sk-operator-canary-matrix-93d1"

TOKEN_LINES = ("chat", "chat_stream", "completions", "embeddings")
BATCH_LINES = ("batches_create", "batches_retrieve", "batches_list", "batches_cancel")
ALL_LINES = (
    *TOKEN_LINES,
    "rerank",
    "images",
    "audio_speech",
    "audio_transcription",
    "files_upload",
    *BATCH_LINES,
    "models_list",
    "videos",
)
OPENAI_LINES = tuple(line for line in ALL_LINES if line not in ("rerank", "videos"))  # no such calls
# the npm together-ai SDK's files.upload with the fetch work-around its Node users need (README)
TOGETHER_AI_LINES = (*ALL_LINES, "files_upload_duplex")


@dataclass(frozen=True)
class Variant:
    """One SDK line in one base-URL form: how to run its driver and which lines it runs."""

    label: str  # X-Meter-Environment of its rows
    sdk: str  # together | together-ai | openai
    version_prefix: str  # the installed SDK's version must start with this
    runtime: str  # together1 | together2 | test-venv | node
    driver: str  # file under tests/sdk/drivers (python) or tests/sdk/node (node)
    base_path: str | None  # appended to the proxy's origin ("/v1" or ""); None: env var only
    lines: tuple[str, ...]
    env_base: dict[str, str] = field(default_factory=dict)  # env var -> path appended to the origin
    project_id: str | None = None

    def base_url(self, origin: str) -> str | None:
        return None if self.base_path is None else origin + self.base_path


VARIANTS = (
    Variant("together1", "together", "1.", "together1", "together1.py", "/v1", ALL_LINES),
    Variant("together2", "together", "2.", "together2", "together2.py", "/v1", ALL_LINES),
    Variant("together3", "together", "3.", "test-venv", "together3.py", "", ALL_LINES, project_id="p"),
    # a 3.x user who adds /v1 (the SDK then sends /v1/v1/..., /v1/v2/...): served all the same
    Variant("together3-v1", "together", "3.", "test-venv", "together3.py", "/v1", ALL_LINES, project_id="p"),
    Variant(
        "together-ai",
        "together-ai",
        "0.52.",
        "node",
        "together_ai.cjs",
        "/v1",
        TOGETHER_AI_LINES,
        env_base={"TOGETHER_API_BASE_URL": "/v1"},  # its files.upload reads only this
    ),
    Variant("openai-py", "openai", "", "test-venv", "openai_py.py", "/v1", OPENAI_LINES),
    Variant("openai-node", "openai", "7.60.", "node", "openai_node.cjs", "/v1", OPENAI_LINES),
    # the environment-variable forms (no base_url argument at all)
    Variant(
        "together1-env",
        "together",
        "1.",
        "together1",
        "together1.py",
        None,
        ("chat",),
        {"TOGETHER_BASE_URL": "/v1"},
    ),
    Variant(
        "together2-env",
        "together",
        "2.",
        "together2",
        "together2.py",
        None,
        ("chat",),
        {"TOGETHER_BASE_URL": "/v1"},
    ),
    Variant(
        "together3-env",
        "together",
        "3.",
        "test-venv",
        "together3.py",
        None,
        ("chat", "models_list"),
        {"TOGETHER_BASE_URL": ""},
        project_id="p",
    ),
    Variant(
        "together-ai-env",
        "together-ai",
        "0.52.",
        "node",
        "together_ai.cjs",
        None,
        ("chat",),
        {"TOGETHER_BASE_URL": "/v1"},
    ),
)


@dataclass
class DriverRun:
    """What one driver process reported."""

    variant: Variant
    results: dict[str, dict[str, Any]]  # line -> {"ok", "fields" | "error", "seconds"}
    done: dict[str, Any] | None  # the final {"line": "_done", "sdk", "version"}, if it got there
    returncode: int | None
    stderr: str
    seconds: float


def _command(variant: Variant, envs: Envs) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOGETHER_", "OPENAI_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # a call that would leave loopback (an SDK ignoring its base URL) fails at once instead
    env.update(
        HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", NO_PROXY="127.0.0.1,localhost"
    )
    if variant.runtime == "node":
        env["NODE_PATH"] = str(envs.node_modules)
        return [str(envs.node), str(NODE_PROJECT / variant.driver)], env
    python = {"together1": envs.together1, "together2": envs.together2}.get(
        variant.runtime, Path(sys.executable)
    )
    env.pop("PYTHONPATH", None)  # the driver sees its own SDK only, never the repository's packages
    return [str(python), str(DRIVERS / variant.driver)], env


def run_driver(
    variant: Variant, envs: Envs, origin: str, api_key: str, data: dict[str, Any], workdir: Path
) -> DriverRun:
    """Run one variant's driver to the end (bounded); its JSON lines parsed."""
    spec = {
        "base_url": variant.base_url(origin),
        "api_key": api_key,
        "label": variant.label,
        "lines": list(variant.lines),
        "data": {**data, "project_id": variant.project_id},
    }
    spec_path = workdir / f"spec-{variant.label}.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    cmd, env = _command(variant, envs)
    cmd.append(str(spec_path))
    for name, path in variant.env_base.items():
        env[name] = origin + path
    started = time.monotonic()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S, env=env, cwd=workdir
        )
        stdout, stderr, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr, code = f"timed out after {DRIVER_TIMEOUT_S:.0f} s", None
    results: dict[str, dict[str, Any]] = {}
    final = None
    for text in stdout.splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(text)
            if isinstance(obj, dict) and obj.get("line") == "_done":
                final = obj
            elif isinstance(obj, dict) and obj.get("line") in variant.lines:
                results[obj["line"]] = obj
    return DriverRun(variant, results, final, code, stderr[-3000:], time.monotonic() - started)


class SimulatorThread:
    """The simulator on its own event loop in a thread, so the synchronous test can drive the
    SDK processes; batch jobs wait an hour before they run, so a created batch can be cancelled."""

    def __init__(self, options: SimulatorOptions) -> None:
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="simulator", daemon=True)
        self.sim: RunningSimulator | None = None

    def __enter__(self) -> SimulatorThread:
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(simulator.start(options=self.options), self.loop)
        self.sim = future.result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.sim is not None:
                asyncio.run_coroutine_threadsafe(self.sim.stop(), self.loop).result(timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=15)
            if not self.thread.is_alive():
                self.loop.close()

    @property
    def url(self) -> str:
        assert self.sim is not None
        return self.sim.url

    def entries(self) -> list[dict[str, Any]]:
        """A copy of the billed log (read between requests: the list only grows)."""
        assert self.sim is not None
        return list(self.sim.billed.entries)


@contextlib.contextmanager
def serving(config: Path, upstream: str, ledger: Path, log: Path, ports: tuple[int, int]) -> Iterator[str]:
    """`together-meter serve` as a process until the block ends (SIGTERM, then SIGKILL); yields
    its origin once /readyz answers 200."""
    port, admin_port = ports
    cmd = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--upstream", upstream]
    cmd += ["--port", str(port), "--admin-port", str(admin_port), "--ledger", str(ledger)]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, "TOGETHER_API_KEY": OPERATOR_KEY}, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + READY_WITHIN_S
        while True:
            assert proc.poll() is None, (
                f"proxy exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}"
            )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, f"proxy not ready in {READY_WITHIN_S} s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """A mono 16-bit WAV of silence: the transcription lines' input."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * int(seconds * rate))
    return path
