"""The command line, run as a real subprocess: keys, config errors, serve errors, prices list/sync/check."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy import simulator
from proxy.config import load_config
from proxy.config.prices import load_price_table
from proxy.core.auth import KeyStore, digest
from proxy.core.pricing import pusd_rate_to_decimal

ROOT = Path(__file__).resolve().parent.parent


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "config" / "example.yaml", tmp_path / "example.yaml")
    shutil.copy(ROOT / "config" / "prices.yaml", tmp_path / "prices.yaml")
    return tmp_path


async def test_keys_create_prints_key_once_and_stores_only_its_digest(config_dir: Path) -> None:
    """`keys create` prints a new key; the keys file holds its SHA-256, never the key."""
    cfg = str(config_dir / "example.yaml")
    code, out, err = await run_cli("keys", "create", "--tenant", "acme", "--config", cfg)
    assert code == 0, err
    key = out.strip()
    assert key.startswith("tm-") and len(key) > 40
    stored = (config_dir / "keys.yaml").read_text()
    assert key not in stored and key not in err
    entries = yaml.safe_load(stored)["keys"]
    assert [e["tenant"] for e in entries] == ["acme"]
    assert entries[0]["sha256"] == digest(key)
    # and the proxy's key store now maps that key to the tenant
    principal = KeyStore(load_config(cfg).key_index()).authenticate(f"Bearer {key}")
    assert principal.tenant == "acme"
    code2, out2, _ = await run_cli("keys", "create", "--tenant", "acme", "--config", cfg)
    assert code2 == 0 and out2.strip() != key
    assert len(yaml.safe_load((config_dir / "keys.yaml").read_text())["keys"]) == 2


async def test_keys_create_for_unknown_tenant_is_a_config_error(config_dir: Path) -> None:
    """An unknown tenant exits 2 and names the tenants that exist."""
    code, out, err = await run_cli(
        "keys", "create", "--tenant", "nobody", "--config", str(config_dir / "example.yaml")
    )
    assert code == 2 and out == ""
    assert "nobody" in err and "acme" in err


async def test_serve_with_a_broken_config_names_file_key_and_problem(config_dir: Path) -> None:
    """`serve` on a bad config exits 2 with file, key path and problem, before listening."""
    bad = config_dir / "example.yaml"
    bad.write_text(bad.read_text().replace("first_byte: 120", "first_byte: soon"))
    code, _, err = await run_cli("serve", "--config", str(bad), env={"TOGETHER_API_KEY": "x"})
    assert code == 2
    assert str(bad) in err and "upstream.timeouts.first_byte" in err and "'soon'" in err


async def test_serve_without_together_key_exits_2(config_dir: Path) -> None:
    """The together key only comes from TOGETHER_API_KEY; without it serve refuses to start."""
    env = {k: v for k, v in os.environ.items() if k != "TOGETHER_API_KEY"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        "serve",
        "--config",
        str(config_dir / "example.yaml"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2 and b"TOGETHER_API_KEY" in err


async def test_check_config_reports_ok_and_errors(config_dir: Path) -> None:
    """check-config exits 0 on a good file and 2 on an unknown key."""
    good = str(config_dir / "example.yaml")
    code, out, _ = await run_cli("check-config", good)
    assert code == 0 and "2 tenants" in out and "upstream https://api.together.ai/v1)" in out
    split = config_dir / "split.yaml"
    split.write_text(
        (config_dir / "example.yaml")
        .read_text()
        .replace("  # inference_url: https://", "  inference_url: https://", 1)
    )
    code, out, _ = await run_cli("check-config", str(split))
    assert code == 0 and out.rstrip().endswith(
        "upstream https://api.together.ai/v1, inference https://api-inference.together.ai/v1)"
    )
    bad = config_dir / "bad.yaml"
    bad.write_text((config_dir / "example.yaml").read_text() + "\nbudgets_everywhere: true\n")
    code, _, err = await run_cli("check-config", str(bad))
    assert code == 2 and "budgets_everywhere" in err and "unknown key" in err


async def test_prices_list_json_matches_the_price_table(config_dir: Path) -> None:
    """`prices list --format json` shows every configured model with its exact rates."""
    code, out, _ = await run_cli(
        "prices", "list", "--format", "json", "--config", str(config_dir / "example.yaml")
    )
    assert code == 0
    listed = {m["model"]: m for m in json.loads(out)["models"]}
    table = load_price_table(config_dir / "prices.yaml")
    assert set(listed) == set(table.models)
    for model, rates in table.models.items():
        if not rates.by_token:  # priced per megapixel, image or second: no token rates
            assert (listed[model]["unit"], listed[model]["input"]) == (rates.unit, None)
            assert Decimal(listed[model]["per_unit"]).scaleb(12) == rates.per_unit
            continue
        assert listed[model]["input"] == str(pusd_rate_to_decimal(rates.input))
        assert listed[model]["output"] == str(pusd_rate_to_decimal(rates.output))
    assert {m["unit"] for m in listed.values()} >= {"token", "megapixel", "image", "audio_second"}


async def test_prices_sync_check_detects_drift_then_sync_fixes_it(config_dir: Path) -> None:
    """--check exits 1 listing the drift; sync rewrites the file; --check then exits 0."""
    model = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
    prices = {
        m: (i, o)
        for m, (i, o) in {
            model: ("0.95", "1.10"),  # drifted upstream
            "arcee-ai/maestro-reasoning": ("0.90", "3.30"),
        }.items()
    }
    cfg = str(config_dir / "example.yaml")
    env = {"TOGETHER_API_KEY": "operator-key"}
    sim = await simulator.start(options=simulator.SimulatorOptions(prices=prices))
    try:
        code, out, err = await run_cli(
            "prices", "sync", "--check", "--config", cfg, "--upstream", sim.url, env=env
        )
        assert code == 1, (out, err)
        assert f"~ {model}: input 0.88 -> 0.95, output 0.88 -> 1.1" in out
        assert "price drift" in err
        before = (config_dir / "prices.yaml").read_text()
        assert "0.95" not in before  # --check wrote nothing
        code, out, err = await run_cli("prices", "sync", "--config", cfg, "--upstream", sim.url, env=env)
        assert code == 0, err
        table = load_price_table(config_dir / "prices.yaml")
        assert pusd_rate_to_decimal(table.models[model].input) == pusd_rate_to_decimal(950_000)
        assert table.models[model].output == 1_100_000
        assert table.models[model].batch_input == 475_000  # default 50 % discount
        assert "synced_at" in table.extra
        # models the upstream no longer lists are kept, and said so
        assert "deepseek-ai/DeepSeek-V3" in table.models
        assert "- deepseek-ai/DeepSeek-V3: not offered by the upstream any more" in out
        code, out, _ = await run_cli(
            "prices", "sync", "--check", "--config", cfg, "--upstream", sim.url, env=env
        )
        assert code == 0, out
    finally:
        await sim.stop()


@pytest.mark.parametrize("listener", ["--port", "--admin-port"])
async def test_serve_on_a_port_in_use_is_one_line_and_exit_1(config_dir: Path, listener: str) -> None:
    """A public or admin port already taken: exit 1 with one line naming the address, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"--port": "0", "--admin-port": "0", listener: port}
        code, out, err = await run_cli(
            "serve",
            "--config",
            str(config_dir / "example.yaml"),
            "--ledger",
            str(config_dir / "l.db"),
            "--upstream",
            f"http://127.0.0.1:{_closed_port()}/v1",
            *(x for kv in ports.items() for x in kv),
            env={"TOGETHER_API_KEY": "x"},
        )
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"('127.0.0.1', {port})" in err and "address already in use" in err and listener in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_keys_create_says_a_reload_takes_the_key_without_restart(config_dir: Path) -> None:
    """The confirmation points to SIGHUP and POST /admin/reload, not to a restart."""
    code, _, err = await run_cli(
        "keys", "create", "--tenant", "acme", "--config", str(config_dir / "example.yaml")
    )
    assert code == 0, err
    assert "SIGHUP" in err and "POST /admin/reload" in err and "restart" in err.lower()
    assert "Restart the proxy" not in err


async def test_a_key_created_while_serving_works_after_post_admin_reload(config_dir: Path) -> None:
    """What `keys create` says holds: a running proxy refuses the new key (401) until
    POST /admin/reload, then accepts it; no restart."""
    from proxy.server.app import Proxy, Secrets, with_overrides

    cfg = config_dir / "example.yaml"
    sim = await simulator.start()
    ledger = config_dir / "l.db"

    def load() -> Any:
        return with_overrides(load_config(cfg), upstream=sim.url, port=0, admin_port=0, ledger_path=ledger)

    proxy = Proxy(load(), Secrets("sim-key", admin_token="admin-token"), loader=load)
    try:
        await proxy.start()
        code, out, err = await run_cli("keys", "create", "--tenant", "acme", "--config", str(cfg))
        assert code == 0, err
        chat = {
            "model": "deepseek-ai/DeepSeek-V3",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        }
        base = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
        async with aiohttp.ClientSession() as s:
            headers = {"Authorization": f"Bearer {out.strip()}"}
            async with s.post(base, json=chat, headers=headers) as r:
                assert r.status == 401
            admin = f"http://127.0.0.1:{proxy.admin_port}/admin/reload"
            async with s.post(admin, headers={"Authorization": "Bearer admin-token"}) as r:
                assert r.status == 200, await r.text()
            async with s.post(base, json=chat, headers=headers) as r:
                assert r.status == 200, await r.text()
    finally:
        await proxy.stop()
        await sim.stop()
