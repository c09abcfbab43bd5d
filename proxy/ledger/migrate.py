"""Versioned schema migrations of the PostgreSQL ledger (`proxy/ledger/migrations/NNNN_name.sql`).

Applied in version order, all pending ones in one transaction under a PostgreSQL advisory lock,
so replicas starting together neither race nor apply a migration twice: the second waits for
the first to commit, then finds nothing left to do. `schema_migrations` records what was applied.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
LOCK_KEY = 7_312_667_114_020_160_001  # pg_advisory_xact_lock key of together-meter migrations
_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


def available(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations shipped with this version, oldest first."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _NAME_RE.match(path.name)
        if m is None:
            raise ValueError(f"migration file {path.name} is not named NNNN_name.sql")
        version = int(m.group(1))
        if version in found:
            raise ValueError(f"two migrations with version {version}")
        found[version] = Migration(version, m.group(2), path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(
    conn: Any,
    directory: Path = MIGRATIONS_DIR,
    *,
    timezone: str = "UTC",
    command_timeout: float | None = None,
) -> list[Migration]:
    """Apply the migrations `conn`'s database lacks; return those applied (empty: up to date).

    `timezone` (budgets.timezone) is what a migration reads as `together_meter.timezone`.
    `command_timeout`: seconds a migration (or the wait for another process's) may take, beyond the
    connection's command timeout (a migration that copies a table takes minutes at 10M rows).
    """
    applied: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY, timeout=command_timeout)
        await conn.execute("SELECT set_config('together_meter.timezone', $1, true)", timezone)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        ours = available(directory)
        for migration in ours:
            if migration.version in done:
                continue
            await conn.execute(migration.sql, timeout=command_timeout)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration)
        newer = sorted(v for v in done if v > max((m.version for m in ours), default=0))
        if newer:
            log.warning("the ledger database has migrations this version does not know: %s", newer)
    for migration in applied:
        log.info("ledger migration applied: %s", migration.label)
    return applied


async def current_version(conn: Any) -> int:
    """The highest applied migration (0 when none)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))
