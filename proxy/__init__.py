"""together-meter: an OpenAI-compatible metering proxy for together.ai.

`import proxy` loads nothing else: each public name is imported on first use, so the CLI and
the pure core do not pay for the server (aiohttp, asyncpg, prometheus-client).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.config import Config, load_config
    from proxy.core.pricing import PriceTable, Rates, cost_pusd, format_usd
    from proxy.core.records import LedgerRow
    from proxy.core.usage import Usage
    from proxy.errors import ConfigError, MeterError
    from proxy.server.app import Proxy, Secrets, with_overrides

_EXPORTS = {
    "Config": "proxy.config",
    "load_config": "proxy.config",
    "ConfigError": "proxy.errors",
    "MeterError": "proxy.errors",
    "LedgerRow": "proxy.core.records",
    "PriceTable": "proxy.core.pricing",
    "Rates": "proxy.core.pricing",
    "cost_pusd": "proxy.core.pricing",
    "format_usd": "proxy.core.pricing",
    "Usage": "proxy.core.usage",
    "Proxy": "proxy.server.app",
    "Secrets": "proxy.server.app",
    "with_overrides": "proxy.server.app",
}
__all__ = [
    "Config",
    "ConfigError",
    "LedgerRow",
    "MeterError",
    "PriceTable",
    "Proxy",
    "Rates",
    "Secrets",
    "Usage",
    "cost_pusd",
    "format_usd",
    "load_config",
    "with_overrides",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'proxy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value
