"""The real PostgreSQL on 127.0.0.1:5432 for tests: one fresh database per test.

`pg_database()` creates `tm_<random>` and drops it afterwards (connections included). When the
server is down it tries to start the local cluster once (`pg_ctlcluster ... start`); when it
still cannot be had, tests that need it are skipped with a loud reason, never silently. Databases
a killed run left behind (no connection, over an hour old) are dropped at the first use.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

HOST, PORT = "127.0.0.1", 5432
ADMIN_DSN = os.environ.get("TM_TEST_PG_ADMIN_DSN", f"postgresql://postgres@{HOST}:{PORT}/postgres")
_state: dict[str, str | None] = {}  # "reason" -> None when the server is up, else why not


def dsn_of(database: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + database


async def _reachable() -> str | None:
    try:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def _start_cluster() -> str:
    versions = (
        sorted(p.name for p in Path("/etc/postgresql").glob("*")) if Path("/etc/postgresql").exists() else []
    )
    if not versions:
        return "no /etc/postgresql cluster to start"
    try:
        done = subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"pg_ctlcluster failed: {exc}"
    return f"pg_ctlcluster exited {done.returncode}: {(done.stderr or done.stdout).strip()[:200]}"


async def require_postgres() -> None:
    """Skip (loudly) unless PostgreSQL answers on 127.0.0.1:5432; start it once if it does not."""
    if "reason" not in _state:
        reason = await _reachable()
        if reason is not None:
            started = _start_cluster()
            reason = await _reachable()
            if reason is not None:
                reason = f"{reason}; tried to start it: {started}"
        _state["reason"] = reason
        if reason is None:
            await _drop_stale()
    if _state["reason"] is not None:
        pytest.skip(
            f"!!! PostgreSQL on {HOST}:{PORT} cannot be had ({_state['reason']}): "
            "the PostgreSQL ledger tests are SKIPPED !!!"
        )


async def _drop_stale(older_than_s: int = 3600) -> None:
    """Drop test databases a killed run left behind (no connection, created over an hour ago)."""
    with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
        admin = await asyncpg.connect(ADMIN_DSN, timeout=5)
        try:
            stale = await admin.fetch(
                "SELECT d.datname FROM pg_database AS d WHERE d.datname ~ '^tm_[0-9a-f]{12}$' "
                "AND NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE a.datname = d.datname) "
                "AND (pg_stat_file('base/' || d.oid || '/PG_VERSION')).modification "
                "< now() - make_interval(secs => $1)",
                older_than_s,
            )
            for r in stale:
                await admin.execute(f'DROP DATABASE IF EXISTS "{r[0]}"')
        finally:
            await admin.close()


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh empty database; yields its DSN and drops it (and its connections) afterwards."""
    await require_postgres()
    name = f"tm_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield dsn_of(name)
    finally:
        admin = await asyncpg.connect(ADMIN_DSN, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
