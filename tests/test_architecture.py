"""The house rules of docs/architecture.md: no import circles, a light `import proxy`, and the
import-linter contracts of pyproject.toml (also run by `make test` as `lint-imports`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("aiohttp", "asyncpg", "prometheus_client", "httptools", "uvloop", "tiktoken", "yaml", "rich")


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_no_import_circles() -> None:
    """No module of the package imports itself back through others (type-only imports count)."""
    graph = grimp.build_graph("proxy", exclude_type_checking_imports=False)
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    """The check above can fail: a circle added to a real graph is reported."""
    graph = grimp.build_graph("proxy", exclude_type_checking_imports=False)
    graph.add_import(importer="proxy.core.pricing", imported="proxy.server.relay")
    cycles = import_cycles(graph)
    assert any("proxy.core.pricing" in c and "proxy.server.relay" in c for c in cycles), cycles


@pytest.mark.parametrize("module", ["proxy", "proxy.core.pricing", "proxy.core.report", "proxy.core.routes"])
def test_importing_the_package_or_the_core_loads_nothing_heavy(module: str) -> None:
    """`import proxy` and the pure core load no framework, driver, metrics client or tokenizer."""
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_public_names_still_resolve() -> None:
    """The lazy exports of `proxy` are the real objects."""
    import proxy
    from proxy.core.pricing import cost_pusd
    from proxy.server.app import Proxy

    assert proxy.cost_pusd is cost_pusd and proxy.Proxy is Proxy
    with pytest.raises(AttributeError):
        _ = proxy.nothing_here  # type: ignore[attr-defined]


def test_import_contracts_hold() -> None:
    """lint-imports keeps every contract of pyproject.toml (layers, the pure core, the simulator)."""
    exe = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(exe)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "0 broken" in out.stdout


# the request path: what every proxied request runs through
REQUEST_PATH = [
    "proxy/core/calls.py",
    "proxy/core/routes.py",
    "proxy/core/sse.py",
    "proxy/core/streaming.py",
    "proxy/server/relay.py",
    "proxy/server/stream_relay.py",
    "proxy/server/recorder.py",
    "proxy/server/dispatch.py",
    "proxy/server/objects.py",
    "proxy/server/passthrough.py",
    "proxy/server/uploads.py",
    "proxy/upstream/store.py",
    "proxy/server/responses.py",
]
MAX_LINES = 60
MAX_COMPLEXITY = 15


def test_request_path_functions_are_short() -> None:
    """No function on the request path is longer than MAX_LINES lines (docstring included)."""
    import ast

    long = []
    for name in REQUEST_PATH:
        tree = ast.parse((ROOT / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_LINES:
                    long.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_request_path_functions_are_simple() -> None:
    """No function on the request path has a cyclomatic complexity above MAX_COMPLEXITY (ruff C901)."""
    ruff = Path(sys.executable).with_name("ruff")
    args = [
        str(ruff),
        "check",
        "--select",
        "C901",
        "--config",
        f"lint.mccabe.max-complexity={MAX_COMPLEXITY}",
    ]
    out = subprocess.run([*args, *REQUEST_PATH], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout[-3000:]
