"""`together-meter demo`: the proxy in front of the simulator, real SDK traffic, a spend table.

Everything runs in this process on loopback, with fresh random tenant keys and a fresh SQLite
ledger, on the config and price table shipped in the package (proxy/config/defaults: copies of
config/example.yaml and config/prices.yaml) unless --config names another. It works in a
temporary directory removed at the end (--keep DIR keeps the ledger and config there instead),
stops by itself (or on Ctrl-C) and leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import logging
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from proxy import simulator
from proxy.cli.tables import add_columns, print_table
from proxy.cli.tables import console as stdout_console
from proxy.config import Config, load_config
from proxy.core.auth import digest, new_key
from proxy.core.pricing import format_usd
from proxy.ledger import LedgerRow, now_us
from proxy.server.app import Proxy, Secrets, with_overrides

DEFAULT_FILES = ("example.yaml", "prices.yaml")  # in proxy/config/defaults, shipped as package data


def preflight(keep: str | None) -> str | None:
    """Why the demo cannot run (a usage error), or None."""
    if importlib.util.find_spec("openai") is None:
        return (
            "the demo sends its traffic with the openai SDK, which is not installed: pip install openai "
            "(or install together-meter with its extra: pip install -e '.[demo]')"
        )
    if keep is not None and Path(keep).exists() and (not Path(keep).is_dir() or any(Path(keep).iterdir())):
        return f"--keep {keep}: not an empty directory (the demo writes a fresh ledger and config there)"
    return None


@contextlib.contextmanager
def _work_dir(keep: str | None) -> Iterator[Path]:
    """--keep DIR (created if missing, kept), else a temporary directory removed at the end."""
    if keep is not None:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="together-meter-demo-") as tmp:
        yield Path(tmp)


def write_defaults(directory: Path) -> Path:
    """The packaged config and price table written to `directory`; the config's path."""
    shipped = files("proxy.config") / "defaults"
    for name in DEFAULT_FILES:
        (directory / name).write_bytes((shipped / name).read_bytes())
    return directory / DEFAULT_FILES[0]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _demo_config(config: Config, upstream: str, keys: dict[str, str], ledger: Path) -> Config:
    tenants = {n: replace(t, key_digests=(digest(keys[n]),)) for n, t in config.tenants.items()}
    port = config.listen.port if _port_free(config.listen.host, config.listen.port) else 0
    admin = config.admin.port if _port_free(config.admin.host, config.admin.port) else 0
    config = replace(config, tenants=tenants)
    return with_overrides(config, upstream=upstream, port=port, admin_port=admin, ledger_path=ledger)


def _plan(config: Config, n: int) -> list[dict[str, Any]]:
    """A mixed burst: both tenants, two features, chat (stream and not), completions, embeddings."""
    chat_models = [m for m, r in config.prices.models.items() if r.type == "chat"]
    plan = []
    for i in range(n):
        tenant = sorted(config.tenants)[i % len(config.tenants)]
        allowed = config.tenants[tenant].models
        models = [m for m in chat_models if allowed is None or m in allowed] or chat_models
        kind = "chat"
        if allowed is None and i % 10 == 4:
            kind = "embeddings"
        elif allowed is None and i % 10 == 8:
            kind = "completions"
        plan.append(
            {
                "tenant": tenant,
                "kind": kind,
                "model": models[(i // 2) % len(models)],
                "stream": kind != "embeddings" and i % 3 == 0,
                "feature": ("chat", "search")[(i // 3) % 2],
                "max_tokens": 8 + (i * 7) % 40,
            }
        )
    return plan


async def _send(client: Any, item: dict[str, Any], config: Config) -> None:
    headers = {"X-Meter-Feature": item["feature"], "X-Meter-Environment": "dev"}
    prompt = f"Request {item['max_tokens']}: summarize why metering LLM spend matters."
    if item["kind"] == "embeddings":
        emb = next(m for m, r in config.prices.models.items() if r.type == "embedding")
        await client.embeddings.create(model=emb, input=[prompt, prompt[::-1]], extra_headers=headers)
    elif item["kind"] == "completions":
        lang = next(m for m, r in config.prices.models.items() if r.type == "language")
        await client.completions.create(
            model=lang, prompt=prompt, max_tokens=item["max_tokens"], extra_headers=headers
        )
    elif item["stream"]:
        stream = await client.chat.completions.create(
            model=item["model"],
            messages=[{"role": "user", "content": prompt}],
            max_tokens=item["max_tokens"],
            stream=True,
            extra_headers=headers,
        )
        async for _ in stream:
            pass
    else:
        await client.chat.completions.create(
            model=item["model"],
            messages=[{"role": "user", "content": prompt}],
            max_tokens=item["max_tokens"],
            extra_headers=headers,
        )


def _spend_table(rows: list[LedgerRow]) -> Table:
    groups: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        g = groups.setdefault((r.tenant, r.model), [0, 0, 0, 0, 0])
        g[0] += 1
        g[1] += r.prompt_tokens or 0
        g[2] += r.completion_tokens or 0
        g[3] += r.cost_pusd or 0
        g[4] += r.usage_source == "estimated"
    total = [sum(col) for col in zip(*groups.values(), strict=True)] if groups else [0] * 5
    cells = [[tenant, model, *_spend_cells(g)] for (tenant, model), g in sorted(groups.items())]
    cells.append(["[b]total", "", *_spend_cells(total, "[b]")])
    t = Table(title="Spend by tenant and model (from the ledger)")
    heads = ("tenant", "model", "requests", "input tok", "output tok", "cost USD", "estimated")
    add_columns(t, heads, cells, labels=2)
    for line in cells:
        t.add_row(*line)
    return t


def _spend_cells(g: list[int], bold: str = "") -> list[str]:
    return [str(g[0]), str(g[1]), str(g[2]), f"{bold}{format_usd(g[3])}", str(g[4])]


def _budget_table(proxy: Proxy) -> Table:
    cells = [
        [
            tenant,
            feature or "(all)",
            "hard" if budget.hard_limit else "soft",
            format_usd(budget.monthly_pusd),
            format_usd(spent),
            format_usd(reserved),
            format_usd(budget.monthly_pusd - spent - reserved),
        ]
        for (tenant, feature), (budget, spent, reserved) in sorted(proxy.budgets.snapshot().items(), key=str)
    ]
    t = Table(title=f"Budgets, period {proxy.budgets.period} ({proxy.periods.timezone})")
    heads = ("tenant", "feature", "limit", "budget USD", "spent USD", "reserved", "remaining USD")
    add_columns(t, heads, cells, labels=3)
    for line in cells:
        t.add_row(*line)
    return t


async def run_demo(
    config_path: str | None, *, keep_running: bool = False, requests: int = 40, keep: str | None = None
) -> int:
    """The demo on `config_path` (None: the packaged defaults); 0 when the ledger matches."""
    console = stdout_console()
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with _work_dir(keep) as work:
        config = config_path or str(write_defaults(work))
        base = load_config(config)
        code = await _run(console, base, work / "ledger.db", keep_running, requests)
        console.print("stopped: the proxy and the simulator are down", soft_wrap=True)
        if keep is None:
            console.print(f"removed {work} with the demo's ledger (--keep DIR keeps them)", soft_wrap=True)
            return code
        month = base.budgets.periods.of(now_us())
        console.print(f"ledger kept in {work / 'ledger.db'}; its report:", soft_wrap=True)
        console.print(
            f"  together-meter report --config {config} --ledger {work / 'ledger.db'} --month {month}",
            soft_wrap=True,
        )
    return code


async def _run(console: Console, base: Config, ledger: Path, keep_running: bool, requests: int) -> int:
    """Simulator and proxy up, the burst, the tables, the check; both stopped before returning."""
    sim = await simulator.start()
    keys = {name: new_key() for name in base.tenants}
    config = _demo_config(base, sim.url, keys, ledger)
    admin_token = new_key()
    proxy = Proxy(config, Secrets("sim-operator-key", admin_token=admin_token))
    try:
        await proxy.start()
        base_url = f"http://127.0.0.1:{proxy.port}/v1"
        console.print(f"proxy on [b]{base_url}[/b] -> simulator {sim.url}; ledger {ledger}", soft_wrap=True)
        plan = _plan(config, requests)
        await _burst(base_url, keys, plan, config)
        rows = await proxy.ledger.rows()
        print_table(console, _spend_table(rows))
        print_table(console, _budget_table(proxy))
        match = _matches_simulator(rows, sim)
        console.print(
            f"{len(plan)} requests sent, {len(rows)} ledger rows; upstream-reported "
            f"tokens match the simulator's billing: {'yes' if match else 'NO'}",
            soft_wrap=True,
        )
        if keep_running:
            await _serve_until_interrupted(console, proxy, keys, admin_token)
        return 0 if match and len(rows) == len(plan) else 1
    finally:
        await proxy.stop()
        await sim.stop()


async def _burst(base_url: str, keys: dict[str, str], plan: list[dict[str, Any]], config: Config) -> None:
    """The plan sent with the openai SDK, eight requests at a time."""
    from openai import AsyncOpenAI

    clients = {t: AsyncOpenAI(base_url=base_url, api_key=k, max_retries=0) for t, k in keys.items()}
    sem = asyncio.Semaphore(8)

    async def one(item: dict[str, Any]) -> None:
        async with sem:
            await _send(clients[item["tenant"]], item, config)

    try:
        await asyncio.gather(*(one(i) for i in plan))
    finally:
        for c in clients.values():
            await c.close()


def _matches_simulator(rows: list[LedgerRow], sim: simulator.RunningSimulator) -> bool:
    """Upstream-reported tokens in the ledger equal what the simulator billed, per model."""
    ledger_upstream: dict[str, list[int]] = {}
    for r in rows:
        if r.usage_source == "upstream":
            a = ledger_upstream.setdefault(r.model, [0, 0])
            a[0] += r.prompt_tokens or 0
            a[1] += r.completion_tokens or 0
    sim_reported = {
        m: list(v)
        for m, v in sim.billed.totals().items()
        if any(e["model"] == m and e["usage_reported"] for e in sim.billed.entries)
    }
    return all(ledger_upstream.get(m) == v for m, v in sim_reported.items())


async def _serve_until_interrupted(console: Console, proxy: Proxy, keys: dict[str, str], token: str) -> None:
    """--keep-running: the live URLs and throw-away keys, then serve until Ctrl-C."""
    admin = f"http://127.0.0.1:{proxy.admin_port}"
    lines = [
        f"metrics: {admin}/metrics   health: {admin}/healthz   ready: {admin}/readyz",
        f"spend page: {admin}/admin/   operator token: {token}",
        *(f"  demo key for {tenant}: {key}" for tenant, key in keys.items()),
        "serving until Ctrl-C ...",
    ]
    for line in lines:
        console.print(line, soft_wrap=True)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
