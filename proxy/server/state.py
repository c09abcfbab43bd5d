"""Small shared types of a running proxy: its secrets, its workers, what the admin API reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from proxy.config import Config
from proxy.core.budgets import BudgetBook, Periods
from proxy.ledger import Ledger
from proxy.server.metrics import Metrics
from proxy.upstream.hosts import Upstreams


class Fleet(Protocol):
    """A supervisor's workers, as its Proxy sees them (proxy/server/workers.py)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def reload(self) -> dict[str, str]: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class Secrets:
    """What never comes from the config file: the together key, the operator token."""

    together_key: str
    admin_token: str | None = None


class Accepting(Protocol):
    accepting: bool


class Operated(Protocol):
    """The running proxy as the admin API sees it (proxy/server/app.py's Proxy)."""

    config: Config
    secrets: Secrets
    budgets: BudgetBook
    periods: Periods
    ledger: Ledger
    metrics: Metrics
    upstream: Upstreams
    fleet: Fleet | None

    @property
    def relay(self) -> Accepting: ...

    def clock(self) -> int: ...

    async def reload(self) -> dict[str, Any]: ...


__all__ = ["Accepting", "Fleet", "Operated", "Secrets"]
