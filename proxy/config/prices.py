"""The price table file (config/prices.yaml): read it, write it back (`prices sync`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from proxy.core.pricing import PriceTable, discounted, parse_price_table, pusd_rate_to_decimal
from proxy.errors import ConfigError


def load_price_table(path: str | Path) -> PriceTable:
    """Read and validate a prices YAML file."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(file, "", f"cannot read: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", f"invalid YAML: {exc}") from exc
    return parse_price_table(data, file)


def dump_price_table(table: PriceTable) -> str:
    """The YAML text of a price table, sorted by model id, rates as exact decimals."""
    lines = [
        "# together-meter price table: USD per 1M tokens, as together.ai publishes them.",
        "# batch_* default to batch_discount x the serverless rate. Refresh with",
        "#   together-meter prices sync --config config/example.yaml",
        f"batch_discount: {table.batch_discount}",
    ]
    for key in ("synced_at", "source"):
        if key in table.extra:
            lines.append(f"{key}: {table.extra[key]}")
    lines.append("models:")
    for model_id in sorted(table.models):
        r = table.models[model_id]
        lines.append(f"  {_yaml_key(model_id)}:")
        if r.type:
            lines.append(f"    type: {r.type}")
        lines.append(f"    input: {pusd_rate_to_decimal(r.input):f}")
        lines.append(f"    output: {pusd_rate_to_decimal(r.output):f}")
        if r.batch_input != discounted(r.input, table.batch_discount):
            lines.append(f"    batch_input: {pusd_rate_to_decimal(r.batch_input):f}")
        if r.batch_output != discounted(r.output, table.batch_discount):
            lines.append(f"    batch_output: {pusd_rate_to_decimal(r.batch_output):f}")
        if r.cached_input is not None:
            lines.append(f"    cached_input: {pusd_rate_to_decimal(r.cached_input):f}")
        if r.context_length:
            lines.append(f"    context_length: {r.context_length}")
        if r.read:
            lines.append(f"    read: '{r.read}'")
    return "\n".join(lines) + "\n"


def _yaml_key(key: str) -> str:
    return key if all(c.isalnum() or c in "-_./" for c in key) else yaml.safe_dump(key).strip()
