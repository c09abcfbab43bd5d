"""The configured ledger backend, built (not opened) from `ledger:` settings.

Used by the proxy (`app.py`) and by the commands that read the ledger (`report`, `estimate`,
`db prune|export|migrate`), so every one of them works on SQLite and on PostgreSQL alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.errors import ConfigError
from proxy.ledger import Ledger, LedgerRow

if TYPE_CHECKING:
    from proxy.config import LedgerSettings
    from proxy.ledger.postgres import HardLimits


def postgres_dsn(settings: LedgerSettings, file: str = "config") -> str:
    """`ledger.dsn`, or the value of the variable `ledger.dsn_env` names (read now, at the edge)."""
    if settings.dsn:
        return settings.dsn
    if settings.dsn_env:
        value = os.environ.get(settings.dsn_env, "")
        if not value:
            raise ConfigError(file, "ledger.dsn_env", f"environment variable {settings.dsn_env} is not set")
        if not value.startswith(("postgresql://", "postgres://")):
            raise ConfigError(file, "ledger.dsn_env", f"{settings.dsn_env} must hold a postgresql:// URL")
        return value
    raise ConfigError(file, "ledger.dsn", "missing (backend: postgres needs dsn or dsn_env)")


def open_ledger(
    settings: LedgerSettings,
    *,
    path: str | None = None,
    file: str = "config",
    on_commit: Callable[[int, float, bool], None] | None = None,
    on_terminal: Callable[[LedgerRow], None] | None = None,
    hard_limits: HardLimits | None = None,
) -> Ledger:
    """The ledger `settings` describe; `path` overrides a SQLite file. Call `open()` to write.

    Reads work without `open()` (no writer, no reaper: a proxy may be running beside).
    """
    if settings.backend == "postgres":
        from proxy.ledger.postgres import PostgresLedger

        return PostgresLedger(
            postgres_dsn(settings, file),
            pool_size=settings.pool_size,
            lease_seconds=settings.lease_seconds,
            commit_timeout=settings.commit_timeout,
            on_commit=on_commit,
            on_terminal=on_terminal,
            hard_limits=hard_limits,
            timezone=settings.timezone,
        )
    from proxy.ledger.sqlite import SQLiteLedger

    return SQLiteLedger(
        path or settings.path,
        synchronous=settings.synchronous,
        on_commit=on_commit,
        on_terminal=on_terminal,
        timezone=settings.timezone,
    )
