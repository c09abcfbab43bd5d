"""Table `endpoint_minutes`: one line per dedicated endpoint and minute (docs/ledger.md).

The key is (endpoint_id, minute_start), so a minute is recorded once however many times it is
observed: by the next poll, after a restart, or by another replica. When two observations of a
minute differ, the larger one stays (`proxy.core.dedicated.rank`: a known replica count over an
unknown one, then more replicas, then the dearer), decided under the row's lock: SQLite's write
lock (BEGIN IMMEDIATE), PostgreSQL's row lock (SELECT ... FOR UPDATE; a concurrent first insert
is caught by ON CONFLICT DO NOTHING and compared on the second pass). Both backends use the SQL
here; sqlite.py and pg_store.py only open the connection.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from proxy.core.dedicated import EndpointMinute, MinutesLine, better, cents_text

COLUMNS = (
    "endpoint_id",
    "minute_start",
    "period",
    "name",
    "model",
    "hardware",
    "state",
    "replicas",
    "min_replicas",
    "max_replicas",
    "cents_per_minute",
    "cost_pusd",
    "cost_low_pusd",
    "cost_high_pusd",
    "observed_us",
    "cents_per_hour",
)
_RANKED = ("replicas", "cost_pusd", "cost_low_pusd", "cost_high_pusd")

# SQLite: an idempotent step of sqlite_schema.prepare(); money INTEGER pico-USD, the price TEXT
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS endpoint_minutes (
    endpoint_id TEXT NOT NULL,
    minute_start INTEGER NOT NULL,
    period TEXT NOT NULL,
    name TEXT NOT NULL,
    model TEXT NOT NULL,
    hardware TEXT NOT NULL,
    state TEXT NOT NULL,
    replicas INTEGER,
    min_replicas INTEGER,
    max_replicas INTEGER,
    cents_per_minute TEXT,
    cost_pusd INTEGER,
    cost_low_pusd INTEGER,
    cost_high_pusd INTEGER,
    observed_us INTEGER NOT NULL,
    cents_per_hour TEXT,
    PRIMARY KEY (endpoint_id, minute_start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS endpoint_minutes_period ON endpoint_minutes (period, endpoint_id);
"""
# a ledger made before v2 (no cents_per_hour column): added by sqlite_add_v2_columns()
_SQLITE_V2 = "ALTER TABLE endpoint_minutes ADD COLUMN cents_per_hour TEXT"


def sqlite_add_v2_columns(conn: sqlite3.Connection) -> bool:
    """Add `cents_per_hour` to an endpoint_minutes table made before v2 (idempotent); did it?"""
    have = {r[1] for r in conn.execute("PRAGMA table_info(endpoint_minutes)")}
    if not have or "cents_per_hour" in have:
        return False
    conn.execute(_SQLITE_V2)
    return True


@dataclass(frozen=True, slots=True)
class MinuteWrite:
    """What recording one observation did: inserted the minute, replaced it (larger), or nothing;
    `delta_pusd` is the known cost it added to the ledger (summed over replicas it is exact)."""

    inserted: bool
    replaced: bool
    delta_pusd: int


def values(m: EndpointMinute) -> tuple[Any, ...]:
    cents = None if m.cents_per_minute is None else cents_text(m.cents_per_minute)
    return (
        m.endpoint_id,
        m.minute_start,
        m.period,
        m.name,
        m.model,
        m.hardware,
        m.state,
        m.replicas,
        m.min_replicas,
        m.max_replicas,
        cents,
        m.cost_pusd,
        m.cost_low_pusd,
        m.cost_high_pusd,
        m.observed_us,
        None if m.cents_per_hour is None else cents_text(m.cents_per_hour),
    )


def _decided(m: EndpointMinute, old: dict[str, Any] | None) -> MinuteWrite:
    if old is None:
        return MinuteWrite(True, False, m.cost_pusd or 0)
    if better(m, old):
        return MinuteWrite(False, True, (m.cost_pusd or 0) - (old["cost_pusd"] or 0))
    return MinuteWrite(False, False, 0)


# -- SQLite --------------------------------------------------------------------------------------

_Q = ", ".join("?" for _ in COLUMNS)
_SQLITE_OLD = f"SELECT {', '.join(_RANKED)} FROM endpoint_minutes WHERE endpoint_id = ? AND minute_start = ?"
_SQLITE_INSERT = f"INSERT INTO endpoint_minutes ({', '.join(COLUMNS)}) VALUES ({_Q})"
_SET = ", ".join(f"{c} = ?" for c in COLUMNS[2:])
_SQLITE_REPLACE = f"UPDATE endpoint_minutes SET {_SET} WHERE endpoint_id = ? AND minute_start = ?"


def sqlite_record(conn: sqlite3.Connection, m: EndpointMinute) -> MinuteWrite:
    """Record one observation in its own transaction (the connection is in autocommit mode)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute(_SQLITE_OLD, (m.endpoint_id, m.minute_start)).fetchone()
        old = None if found is None else dict(zip(_RANKED, found, strict=True))
        done = _decided(m, old)
        row = values(m)
        if done.inserted:
            conn.execute(_SQLITE_INSERT, row)
        elif done.replaced:
            conn.execute(_SQLITE_REPLACE, (*row[2:], m.endpoint_id, m.minute_start))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return done


_LINES = """SELECT endpoint_id, name, model, hardware, cents_per_minute, cents_per_hour,
    COUNT(*) AS minutes, COUNT(cost_pusd) AS known_minutes,
    COALESCE(SUM(CASE WHEN cost_pusd IS NOT NULL THEN replicas END), 0) AS replica_minutes,
    COALESCE(SUM(cost_pusd), 0) AS cost_pusd,
    COALESCE(SUM(CASE WHEN cost_pusd IS NULL THEN cost_low_pusd END), 0) AS unknown_low_pusd,
    COALESCE(SUM(CASE WHEN cost_pusd IS NULL THEN cost_high_pusd END), 0) AS unknown_high_pusd,
    COUNT(CASE WHEN cost_pusd IS NULL AND cost_high_pusd IS NULL THEN 1 END) AS unbounded,
    MIN(minute_start) AS first_minute, MAX(minute_start) AS last_minute
FROM endpoint_minutes WHERE period = {p}
GROUP BY endpoint_id, name, model, hardware, cents_per_minute, cents_per_hour
ORDER BY endpoint_id, first_minute"""
SQLITE_LINES = _LINES.format(p="?")
PG_LINES = _LINES.format(p="$1")


def to_line(r: Any) -> MinutesLine:
    """A MinutesLine from a row of SQLITE_LINES / PG_LINES (sqlite3.Row or asyncpg.Record)."""
    cents = r["cents_per_minute"]
    per_hour = r["cents_per_hour"]
    return MinutesLine(
        endpoint_id=r["endpoint_id"],
        name=r["name"],
        model=r["model"],
        hardware=r["hardware"],
        cents_per_minute=None if cents is None else Decimal(str(cents)),
        minutes=int(r["minutes"]),
        known_minutes=int(r["known_minutes"]),
        replica_minutes=int(r["replica_minutes"]),
        cost_pusd=int(r["cost_pusd"]),
        unknown_low_pusd=int(r["unknown_low_pusd"]),
        unknown_high_pusd=None if int(r["unbounded"]) else int(r["unknown_high_pusd"]),
        first_minute=int(r["first_minute"]),
        last_minute=int(r["last_minute"]),
        cents_per_hour=None if per_hour is None else Decimal(str(per_hour)),
    )


# -- PostgreSQL (migrations 0005_endpoint_minutes.sql, 0007_endpoint_minutes_v2.sql) ----------

_PG_KEY = "endpoint_id = $1 AND minute_start = $2"
_PG_OLD = f"SELECT {', '.join(_RANKED)} FROM endpoint_minutes WHERE {_PG_KEY} FOR UPDATE"
_PG_INSERT = (
    f"INSERT INTO endpoint_minutes ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(COLUMNS)))}) "
    "ON CONFLICT (endpoint_id, minute_start) DO NOTHING RETURNING 1"
)
_PG_REPLACE = (
    "UPDATE endpoint_minutes SET "
    + ", ".join(f"{c} = ${i + 1}" for i, c in enumerate(COLUMNS[2:]))
    + f" WHERE endpoint_id = ${len(COLUMNS) - 1} AND minute_start = ${len(COLUMNS)}"
)


def _pg_values(m: EndpointMinute) -> tuple[Any, ...]:
    row = list(values(m))
    row[COLUMNS.index("cents_per_minute")] = m.cents_per_minute  # NUMERIC: exact
    row[COLUMNS.index("cents_per_hour")] = m.cents_per_hour
    return tuple(row)


async def pg_record(conn: Any, m: EndpointMinute) -> MinuteWrite:
    """Record one observation in one transaction, under the minute's row lock.

    A first insert racing another replica's loses to ON CONFLICT DO NOTHING; the second pass then
    locks the row that won and compares (two passes at most).
    """
    row = _pg_values(m)
    async with conn.transaction():
        for _ in range(2):
            found = await conn.fetchrow(_PG_OLD, m.endpoint_id, m.minute_start)
            if found is None:
                if await conn.fetchval(_PG_INSERT, *row):
                    return MinuteWrite(True, False, m.cost_pusd or 0)
                continue
            done = _decided(m, dict(found))
            if done.replaced:
                await conn.execute(_PG_REPLACE, *row[2:], m.endpoint_id, m.minute_start)
            return done
    raise AssertionError("the minute was neither there nor insertable")  # pragma: no cover
