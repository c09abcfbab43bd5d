"""The price table file (config/prices.yaml): read it, write it back (`prices sync`)."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import yaml

from proxy.core.pricing import (
    BATCH_DISCOUNT,
    BATCH_RATES,
    PriceTable,
    Rates,
    batch_rate,
    parse_price_table,
    pusd_rate_to_decimal,
)
from proxy.errors import ConfigError

DEFAULT_HEADER = (
    "# together-meter price table: USD per 1M tokens, as together.ai publishes them.",
    "# `batch` says whether together discounts the model's batch lines: {discount: 0.5} (50 % off),",
    "# none (serverless rates), unknown (serverless rates, shown as 'no batch discount known').",
    "# Refresh the rates with",
    "#   together-meter prices sync --config config/example.yaml",
)


def load_price_table(path: str | Path) -> PriceTable:
    """Read and validate a prices YAML file (its leading comment lines are kept as its header)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(file, "", f"cannot read: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", f"invalid YAML: {exc}") from exc
    return replace(parse_price_table(data, file), header=leading_comments(text))


def leading_comments(text: str) -> tuple[str, ...]:
    """The comment lines a YAML text starts with (up to the first other line)."""
    out: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        out.append(line)
    return tuple(out)


def dump_price_table(table: PriceTable) -> str:
    """The YAML text of a price table, sorted by model id (case aside), rates as exact decimals."""
    lines = list(table.header or DEFAULT_HEADER)
    for key in ("synced_at", "source"):
        if key in table.extra:
            lines.append(f"{key}: {table.extra[key]}")
    lines.append("models:")
    for model_id in sorted(table.models, key=lambda m: (m.lower(), m)):
        lines.append(f"  {_yaml_key(model_id)}:")
        lines.extend(f"    {line}" for line in model_lines(table.models[model_id]))
    return "\n".join(lines) + "\n"


def model_lines(r: Rates) -> list[str]:
    """One model's keys as YAML lines: what it says about batches, and only what was set."""
    lines = [f"type: {r.type}"] if r.type else []
    if not r.by_token:
        return lines + _unit_lines(r)
    lines += [f"input: {_rate(r.input)}", f"output: {_rate(r.output)}"]
    if r.cached_input is not None:
        lines.append(f"cached_input: {_rate(r.cached_input)}")
    if r.batch == BATCH_DISCOUNT:
        lines.append(f"batch: {{discount: {r.batch_discount}}}")
    elif r.batch != BATCH_RATES:
        lines.append(f"batch: {r.batch}")
    for name, serverless, rate in (
        ("batch_input", r.input, r.batch_input),
        ("batch_output", r.output, r.batch_output),
    ):
        if r.batch == BATCH_RATES or rate != batch_rate(serverless, r.batch, r.batch_discount):
            lines.append(f"{name}: {_rate(rate)}")
    if r.context_length:
        lines.append(f"context_length: {r.context_length}")
    if r.read:
        lines.append(f"read: '{r.read}'")
    if r.note is not None:
        lines.append(f"note: {_yaml_scalar(r.note)}")
    return lines


def _unit_lines(r: Rates) -> list[str]:
    """A model priced per megapixel, image or second: its unit, price and what else was set."""
    lines = [f"unit: {r.unit}", f"per_unit: {unit_price_text(r.per_unit or 0)}", "batch: none"]
    if r.default_steps is not None:
        lines.append(f"default_steps: {r.default_steps}")
    if r.read:
        lines.append(f"read: '{r.read}'")
    if r.note is not None:
        lines.append(f"note: {_yaml_scalar(r.note)}")
    return lines


def unit_price_text(pusd: int) -> str:
    """Pico-USD per unit as an exact decimal number of USD ('0.0027')."""
    return f"{Decimal(pusd).scaleb(-12).normalize():f}"


def _rate(rate: int) -> str:
    return f"{pusd_rate_to_decimal(rate):f}"


def _yaml_scalar(text: str) -> str:
    """A string as one double-quoted line of YAML (non-printable characters escaped)."""
    return str(yaml.safe_dump(text, default_style='"', width=10**9, allow_unicode=True)).rstrip("\n")


def _yaml_key(key: str) -> str:
    return key if all(c.isalnum() or c in "-_./" for c in key) else yaml.safe_dump(key).strip()
