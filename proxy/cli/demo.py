"""`together-meter demo`: the proxy in front of the simulator, real SDK traffic, a spend table.

Everything runs in this process on loopback, with fresh random tenant keys and a fresh SQLite
ledger under .demo/; it stops by itself (or on Ctrl-C) and leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from proxy import simulator
from proxy.config import Config, load_config
from proxy.core.auth import digest, new_key
from proxy.core.pricing import format_usd
from proxy.ledger import LedgerRow
from proxy.server.app import Proxy, Secrets, with_overrides

DEMO_DIR = Path(".demo")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _demo_config(config: Config, upstream: str, keys: dict[str, str]) -> Config:
    ledger = DEMO_DIR / "ledger.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
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
    t = Table(title="Spend by tenant and model (from the ledger)")
    for col in ("tenant", "model", "requests", "input tok", "output tok", "cost USD", "estimated"):
        t.add_column(col, justify="left" if col in ("tenant", "model") else "right")
    total = [0, 0, 0, 0, 0]
    for (tenant, model), g in sorted(groups.items()):
        t.add_row(tenant, model, str(g[0]), str(g[1]), str(g[2]), format_usd(g[3]), str(g[4]))
        total = [a + b for a, b in zip(total, g, strict=True)]
    t.add_row(
        "[b]total",
        "",
        str(total[0]),
        str(total[1]),
        str(total[2]),
        f"[b]{format_usd(total[3])}",
        str(total[4]),
    )
    return t


def _budget_table(proxy: Proxy) -> Table:
    t = Table(title=f"Budgets, period {proxy.budgets.period} ({proxy.periods.timezone})")
    for col in ("tenant", "feature", "budget USD", "limit", "spent USD", "reserved", "remaining USD"):
        t.add_column(col, justify="left" if col in ("tenant", "feature", "limit") else "right")
    for (tenant, feature), (budget, spent, reserved) in sorted(proxy.budgets.snapshot().items(), key=str):
        t.add_row(
            tenant,
            feature or "(all)",
            format_usd(budget.monthly_pusd),
            "hard" if budget.hard_limit else "soft",
            format_usd(spent),
            format_usd(reserved),
            format_usd(budget.monthly_pusd - spent - reserved),
        )
    return t


async def run_demo(config_path: str, *, keep_running: bool = False, requests: int = 40) -> int:
    from openai import AsyncOpenAI

    console = Console(width=None if sys.stdout.isatty() else 160)
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    DEMO_DIR.mkdir(exist_ok=True)  # noqa: ASYNC240 - start-up, before any traffic
    base = load_config(config_path)
    sim = await simulator.start()
    keys = {name: new_key() for name in base.tenants}
    config = _demo_config(base, sim.url, keys)
    proxy = Proxy(config, Secrets("sim-operator-key", admin_token=new_key()))
    await proxy.start()
    try:
        base_url = f"http://127.0.0.1:{proxy.port}/v1"
        console.print(f"proxy on [b]{base_url}[/b] -> simulator {sim.url}; ledger {config.ledger.path}")
        clients = {t: AsyncOpenAI(base_url=base_url, api_key=k, max_retries=0) for t, k in keys.items()}
        plan = _plan(config, requests)
        sem = asyncio.Semaphore(8)

        async def one(item: dict[str, Any]) -> None:
            async with sem:
                await _send(clients[item["tenant"]], item, config)

        await asyncio.gather(*(one(i) for i in plan))
        for c in clients.values():
            await c.close()
        rows = await proxy.ledger.rows()
        console.print(_spend_table(rows))
        console.print(_budget_table(proxy))
        billed = sim.billed.totals()
        ledger_upstream: dict[str, list[int]] = {}
        for r in rows:
            if r.usage_source == "upstream":
                a = ledger_upstream.setdefault(r.model, [0, 0])
                a[0] += r.prompt_tokens or 0
                a[1] += r.completion_tokens or 0
        sim_reported = {
            m: list(v)
            for m, v in billed.items()
            if any(e["model"] == m and e["usage_reported"] for e in sim.billed.entries)
        }
        match = all(ledger_upstream.get(m) == v for m, v in sim_reported.items())
        console.print(
            f"{len(plan)} requests sent, {len(rows)} ledger rows; upstream-reported "
            f"tokens match the simulator's billing: {'yes' if match else 'NO'}"
        )
        admin = f"http://127.0.0.1:{proxy.admin_port}"
        console.print(f"metrics: {admin}/metrics   health: {admin}/healthz   ready: {admin}/readyz")
        if keep_running:
            for tenant, key in keys.items():
                console.print(f"  demo key for {tenant}: {key}")
            console.print("serving until Ctrl-C ...")
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        return 0 if match and len(rows) == len(plan) else 1
    finally:
        await proxy.stop()
        await sim.stop()
