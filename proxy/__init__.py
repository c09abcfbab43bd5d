"""together-meter: an OpenAI-compatible metering proxy for together.ai."""

from __future__ import annotations

from .app import Proxy, Secrets, with_overrides
from .config import Config, load_config
from .errors import ConfigError, MeterError
from .ledger import LedgerRow
from .pricing import PriceTable, Rates, cost_pusd, format_usd
from .usage import Usage

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
