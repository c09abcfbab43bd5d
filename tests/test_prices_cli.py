"""`prices sync` and `prices list` (proxy/cli/prices.py) as real subprocesses against the simulator."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from proxy import simulator
from proxy.config.prices import load_price_table
from proxy.core.pricing import BATCH_UNKNOWN, rate_to_pusd

ROOT = Path(__file__).resolve().parent.parent
ENV = {"TOGETHER_API_KEY": "operator-key"}
LLAMA = "meta-llama/Llama-3.3-70B-Instruct-Turbo"  # together discounts its batches by 50 %
V3 = "deepseek-ai/DeepSeek-V3"
SEED = "arcee-ai/maestro-reasoning"


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        *args,
        cwd=ROOT,
        env={**os.environ, **ENV},
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


@pytest.fixture
async def sims() -> AsyncIterator[list[simulator.RunningSimulator]]:
    """Simulators a test starts (stopped at teardown)."""
    started: list[simulator.RunningSimulator] = []
    yield started
    for sim in started:
        await sim.stop()


async def start_sim(
    sims: list[simulator.RunningSimulator], prices: dict[str, tuple[str, ...]] | None = None
) -> str:
    sim = await simulator.start(options=simulator.SimulatorOptions(prices=prices))
    sims.append(sim)
    return sim.url


def edit_prices(config_dir: Path, model: str, **fields: object) -> None:
    """Set (or with None, remove) keys of one model in the copied prices.yaml."""
    path = config_dir / "prices.yaml"
    text = path.read_text(encoding="utf-8")
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    data = yaml.safe_load(text)
    for key, value in fields.items():
        if value is None:
            data["models"][model].pop(key, None)
        else:
            data["models"][model][key] = value
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


async def sync(config_dir: Path, url: str, *flags: str) -> tuple[int, str, str]:
    return await run_cli(
        "prices", "sync", *flags, "--config", str(config_dir / "example.yaml"), "--upstream", url
    )


async def test_cached_input_is_synced_from_the_upstream_field_by_field(
    config_dir: Path, sims: list[simulator.RunningSimulator]
) -> None:
    """pricing.cached_input of GET /v1/models lands in prices.yaml; the diff names exactly that field."""
    url = await start_sim(sims)
    code, out, err = await sync(config_dir, url, "--check")
    assert code == 1 and "price drift: 2 difference(s)" in err, (out, err)
    assert f"~ {LLAMA}: cached_input - -> 0.22\n" in out and f"~ {V3}: cached_input - -> 0.5\n" in out
    code, out, err = await sync(config_dir, url)
    assert code == 0, err
    table = load_price_table(config_dir / "prices.yaml")
    assert table.models[LLAMA].cached_input == rate_to_pusd("0.22")
    assert table.models[V3].cached_input == rate_to_pusd("0.5")
    assert table.models[SEED].cached_input is None
    code, out, err = await sync(config_dir, url, "--check")
    assert code == 0 and "match" in out, (out, err)


async def test_hand_set_batch_rates_notes_and_comments_survive_a_rate_change(
    config_dir: Path, sims: list[simulator.RunningSimulator]
) -> None:
    """A rate change keeps hand-set batch rates, notes and the file's comments, and says so in the diff."""
    edit_prices(config_dir, V3, batch=None, batch_input=0.3, batch_output=0.4, note="negotiated by hand")
    url = await start_sim(sims, {V3: ("1.5", "1.25"), SEED: ("0.90", "3.30")})
    code, out, err = await sync(config_dir, url)
    assert code == 0, err
    assert f"~ {V3}: input 1.25 -> 1.5, batch_input 0.3 kept (set by hand)\n" in out
    rates = load_price_table(config_dir / "prices.yaml").models[V3]
    assert (rates.input, rates.batch_input, rates.batch_output) == (1_500_000, 300_000, 400_000)
    assert rates.note == "negotiated by hand"
    text = (config_dir / "prices.yaml").read_text(encoding="utf-8")
    assert text.startswith("# together-meter price table") and "docs.together.ai/docs/inference/batch" in text


async def test_discounted_batch_rates_follow_the_new_serverless_rates(
    config_dir: Path, sims: list[simulator.RunningSimulator]
) -> None:
    """`batch: {discount: 0.5}` keeps its meaning: the batch rates move with the serverless ones, shown."""
    url = await start_sim(sims, {LLAMA: ("0.95", "1.10")})
    code, out, err = await sync(config_dir, url)
    assert code == 0, err
    assert f"~ {LLAMA}: input 0.88 -> 0.95, output 0.88 -> 1.1, batch_input 0.44 -> 0.475, " in out
    rates = load_price_table(config_dir / "prices.yaml").models[LLAMA]
    assert (rates.batch, rates.batch_input, rates.batch_output) == ("discount", 475_000, 550_000)


async def test_a_hand_set_cached_rate_the_upstream_does_not_publish_is_kept(
    config_dir: Path, sims: list[simulator.RunningSimulator]
) -> None:
    """maestro has no pricing.cached_input upstream: the cached_input set by hand stays, no drift."""
    edit_prices(config_dir, SEED, cached_input=0.45)
    url = await start_sim(sims, {SEED: ("0.90", "3.30")})
    code, out, err = await sync(config_dir, url, "--check")
    assert code == 0 and SEED not in out, (out, err)
    await sync(config_dir, url)
    assert load_price_table(config_dir / "prices.yaml").models[SEED].cached_input == 450_000


async def test_new_models_are_added_with_no_batch_discount_known(
    config_dir: Path, sims: list[simulator.RunningSimulator]
) -> None:
    """--all adds an upstream model as `batch: unknown`; list and the diff say 'no batch discount known'."""
    url = await start_sim(sims, {"new-org/new-model": ("0.40", "0.80", "0.10"), SEED: ("0.90", "3.30")})
    code, out, err = await sync(config_dir, url, "--all")
    assert code == 0, err
    assert (
        "+ new-org/new-model: input 0.4 output 0.8 cached_input 0.1; batch unknown (no batch discount known"
        in out
    )
    rates = load_price_table(config_dir / "prices.yaml").models["new-org/new-model"]
    assert (rates.batch, rates.batch_input, rates.batch_output) == (BATCH_UNKNOWN, 400_000, 800_000)
    assert "    batch: unknown\n" in (config_dir / "prices.yaml").read_text(encoding="utf-8")
    code, out, _ = await run_cli(
        "prices", "list", "--format", "json", "--config", str(config_dir / "example.yaml")
    )
    listed = {m["model"]: m for m in json.loads(out)["models"]}
    assert listed["new-org/new-model"]["batch_terms"] == "no batch discount known"
    assert (listed[LLAMA]["batch_terms"], listed[LLAMA]["batch_input"]) == ("50 % off", "0.44")


async def test_an_upstream_cached_rate_above_input_is_refused_not_written(
    config_dir: Path, sims: list[simulator.RunningSimulator]
) -> None:
    """A cached_input above the input rate is flagged `!` (drift for --check); the model keeps its rates."""
    url = await start_sim(sims, {LLAMA: ("0.88", "0.88", "0.99")})
    code, out, _ = await sync(config_dir, url, "--check")
    assert code == 1 and f"! {LLAMA}: cached_input 0.99 is above the input rate 0.88" in out
    code, _, err = await sync(config_dir, url)
    assert code == 0, err
    assert load_price_table(config_dir / "prices.yaml").models[LLAMA].cached_input is None


async def test_prices_list_table_says_which_models_have_a_batch_discount(config_dir: Path) -> None:
    """The table shows the cached rate and, per model, '50 % off' or 'no batch discount'."""
    code, out, err = await run_cli("prices", "list", "--config", str(config_dir / "example.yaml"))
    assert code == 0, err
    line = {row.split("│")[1].strip(): row for row in out.splitlines() if row.count("│") > 5}
    assert "50 % off" in line[LLAMA] and "0.44" in line[LLAMA]
    assert "no batch discount" in line[SEED] and "3.3" in line[SEED]


async def test_a_legacy_global_batch_discount_stops_with_the_way_to_migrate(config_dir: Path) -> None:
    """A prices.yaml with the old top-level batch_discount is a config error (exit 2) saying what to do."""
    path = config_dir / "prices.yaml"
    path.write_text("batch_discount: 0.5\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    code, _, err = await run_cli("prices", "list", "--config", str(config_dir / "example.yaml"))
    assert code == 2 and "batch_discount" in err and "batch: {discount: 0.5}" in err


async def test_a_filled_in_context_length_is_shown_but_is_no_price_drift(
    config_dir: Path, sims: list[simulator.RunningSimulator]
) -> None:
    """A missing context_length is filled in from the upstream (`=` line); --check does not fail on it."""
    edit_prices(config_dir, SEED, context_length=None)
    url = await start_sim(sims, {SEED: ("0.90", "3.30")})
    code, out, err = await sync(config_dir, url, "--check")
    assert code == 0 and f"= {SEED}: context_length - -> 131072\n" in out, (out, err)
    await sync(config_dir, url)
    assert load_price_table(config_dir / "prices.yaml").models[SEED].context_length == 131072


async def test_a_hand_set_cached_rate_above_a_lowered_input_rate_is_flagged(
    config_dir: Path, sims: list[simulator.RunningSimulator]
) -> None:
    """The upstream lowers input below a hand-set cached_input: a `!` line, the model left as it was."""
    edit_prices(config_dir, SEED, cached_input=0.45)
    url = await start_sim(sims, {SEED: ("0.40", "3.30")})
    code, out, err = await sync(config_dir, url)
    assert (
        code == 0 and f"! {SEED}: cached_input 0.45 (set by hand) is above the new input rate 0.4" in out
    ), err
    rates = load_price_table(config_dir / "prices.yaml").models[SEED]
    assert (rates.input, rates.cached_input) == (900_000, 450_000)
