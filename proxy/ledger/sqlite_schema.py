"""The SQLite ledger's schema, and its rollups kept by triggers in the rows' own transaction.

Every statement that makes a row terminal (the writer's finish and record, the start-up reaper,
`db import`) fires a trigger that adds the row to its `rollups` line in the same statement, so
the rollups can never disagree with the rows (docs/ledger.md#rollups). The day of a row is cut
in budgets.timezone: by SQLite's own date() for UTC, else by `meter_day`, a function every
connection of ours that writes rows registers (`connect_writer`); a connection without it cannot
make a row terminal at all (so it cannot make rows and rollups disagree either).
"""

from __future__ import annotations

import logging
import sqlite3

from proxy.core.budgets import Periods
from proxy.core.records import IN_FLIGHT, LEDGER_COLUMNS, Column
from proxy.core.rollups import ROLLUP_KEY, ROLLUP_SUMS, DayCutter
from proxy.ledger.endpoint_minutes import SQLITE_SCHEMA as ENDPOINT_MINUTES_SCHEMA
from proxy.ledger.endpoint_minutes import sqlite_add_v2_columns
from proxy.ledger.rollup_sql import KEY_SQL

log = logging.getLogger(__name__)
SCHEMA_VERSION = 2  # 2: requests.unit and requests.quantity_micros (priced per unit)
ROLLUPS_VERSION = "2"  # meta 'rollups': the table exists and holds every terminal row; 2: by unit
_ROLLUPS_V1 = "1"  # before units: no `unit` key, no `quantity_micros` sum
_KEY_V1 = ", ".join(k for k in ROLLUP_KEY if k != "unit")
_SUMS_V1 = ", ".join(s for s in ROLLUP_SUMS if s != "quantity_micros")
_EMPTY = "rollups made from the rows: 0 line(s)"

_SQLITE_TYPES = {"text": "TEXT", "int": "INTEGER", "int4": "INTEGER", "bool": "INTEGER"}


def _column_sql(c: Column) -> str:
    """One column of `requests` in SQLite (booleans are 0/1 integers, a boolean default 0/1)."""
    default = {"false": "0", "true": "1"}.get(c.default or "", c.default)
    return (
        f"{c.name} {_SQLITE_TYPES[c.kind]}"
        + (" PRIMARY KEY" if c.key else " NOT NULL" if c.not_null else "")
        + (f" DEFAULT {default}" if default is not None else "")
    )


_REQUEST_COLUMNS = ",\n    ".join(_column_sql(c) for c in LEDGER_COLUMNS)
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS requests (
    {_REQUEST_COLUMNS}
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_period_tenant ON requests (period, tenant);
CREATE INDEX IF NOT EXISTS requests_in_flight ON requests (status) WHERE status = '{IN_FLIGHT}';
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS notifications (
    tenant TEXT NOT NULL,
    feature TEXT NOT NULL,
    period TEXT NOT NULL,
    threshold TEXT NOT NULL,
    sent_us INTEGER NOT NULL,
    PRIMARY KEY (tenant, feature, period, threshold)
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    feature TEXT,
    environment TEXT,
    created_us INTEGER NOT NULL,
    status TEXT NOT NULL,
    output_file_id TEXT,
    recorded_us INTEGER
);
CREATE INDEX IF NOT EXISTS batches_open ON batches (recorded_us) WHERE recorded_us IS NULL;
CREATE INDEX IF NOT EXISTS batches_tenant ON batches (tenant);
CREATE TABLE IF NOT EXISTS files (
    file_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    source TEXT NOT NULL,
    batch_id TEXT
);
CREATE INDEX IF NOT EXISTS files_tenant ON files (tenant);
CREATE TABLE IF NOT EXISTS video_jobs (
    video_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    feature TEXT,
    environment TEXT,
    created_us INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    reserved_pusd INTEGER,
    seconds_micros INTEGER,
    status TEXT NOT NULL,
    recorded_us INTEGER
);
CREATE INDEX IF NOT EXISTS video_jobs_open ON video_jobs (recorded_us) WHERE recorded_us IS NULL;
"""

_SUMS_SQL = ", ".join(ROLLUP_SUMS)
# sums are INTEGER (64-bit): one line holds up to 9.2e18 pico-USD ($9.2 million); the CHECK
# makes an overflow (SQLite would turn the sum into a float) fail the write instead of rounding
_ROLLUPS_TABLE = f"""CREATE TABLE IF NOT EXISTS rollups (
    {", ".join(f"{k} TEXT NOT NULL" for k in ROLLUP_KEY)},
    {", ".join(f"{s} INTEGER NOT NULL" for s in ROLLUP_SUMS)},
    CHECK (typeof(cost_pusd) = 'integer' AND typeof(input_tokens) = 'integer'),
    PRIMARY KEY ({KEY_SQL})
) WITHOUT ROWID"""
_ADD = ", ".join(f"{s} = {s} + excluded.{s}" for s in ROLLUP_SUMS)
_ROW_LINE = """NEW.period, {day}, NEW.tenant, NEW.model, COALESCE(NEW.feature, ''),
    COALESCE(NEW.environment, ''), NEW.mode, NEW.endpoint, NEW.status, NEW.usage_source, NEW.unit,
    1, NEW.prompt_tokens IS NOT NULL OR NEW.completion_tokens IS NOT NULL,
    COALESCE(NEW.prompt_tokens, 0), COALESCE(NEW.completion_tokens, 0), COALESCE(NEW.cached_tokens, 0),
    NEW.cost_pusd IS NOT NULL, COALESCE(NEW.cost_pusd, 0), NEW.usage_source = 'estimated',
    NEW.cost_pusd IS NULL, COALESCE(NEW.quantity_micros, 0)"""
_ON_CONFLICT_ADD = f"ON CONFLICT ({KEY_SQL}) DO UPDATE SET {_ADD}"
_BACKFILL_ROWS = f"""INSERT INTO rollups ({KEY_SQL}, {_SUMS_SQL})
SELECT period, {{day}}, tenant, model, COALESCE(feature, ''), COALESCE(environment, ''),
    mode, endpoint, status, usage_source, unit, COUNT(*),
    SUM(prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL), SUM(COALESCE(prompt_tokens, 0)),
    SUM(COALESCE(completion_tokens, 0)), SUM(COALESCE(cached_tokens, 0)), SUM(cost_pusd IS NOT NULL),
    SUM(COALESCE(cost_pusd, 0)), SUM(usage_source = 'estimated'), SUM(cost_pusd IS NULL),
    SUM(COALESCE(quantity_micros, 0))
FROM requests WHERE status <> '{IN_FLIGHT}' GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11"""


def day_sql(column: str, periods: Periods) -> str:
    """SQL of a µs column's day: SQLite's own date() in UTC (no Python call on the write path),
    else `meter_day` (zoneinfo, registered by connect_writer)."""
    if periods.timezone == "UTC":
        return f"date({column} / 1000000, 'unixepoch')"
    return f"meter_day({column})"


def rollup_triggers(periods: Periods) -> tuple[str, str]:
    """A row inserted terminal (record, import) or made terminal (finish, reaper) joins its line once."""
    upsert = (
        f"INSERT INTO rollups ({KEY_SQL}, {_SUMS_SQL}) "
        f"VALUES ({_ROW_LINE.format(day=day_sql('NEW.started_us', periods))}) {_ON_CONFLICT_ADD}"
    )
    return (
        f"""CREATE TRIGGER rollup_inserted AFTER INSERT ON requests
    WHEN NEW.status <> '{IN_FLIGHT}' BEGIN {upsert}; END""",
        f"""CREATE TRIGGER rollup_finished AFTER UPDATE OF status ON requests
    WHEN OLD.status = '{IN_FLIGHT}' AND NEW.status <> '{IN_FLIGHT}' BEGIN {upsert}; END""",
    )


# what `db prune` kept before rollups existed: its lines are the rows it deleted (no cached tokens)
_BACKFILL_AGGREGATES = f"""INSERT INTO rollups ({KEY_SQL}, {_SUMS_SQL})
SELECT {_KEY_V1}, 'token', requests, with_usage, input_tokens, output_tokens, 0, priced, cost_pusd,
    CASE WHEN usage_source = 'estimated' THEN requests ELSE 0 END, requests - priced, 0
FROM aggregates WHERE true ON CONFLICT ({KEY_SQL}) DO UPDATE SET {_ADD}"""


def connect_writer(path: str, periods: Periods, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection that may write rows: `meter_day` cuts their rollup days in `periods`' zone."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread)
    conn.create_function("meter_day", 1, DayCutter(periods), deterministic=True)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def prepare(conn: sqlite3.Connection, periods: Periods) -> list[str]:
    """Create the schema; create and fill the rollups if this file has none yet. What it did."""
    _add_unit_columns(conn)  # a ledger made before units (schema 1): before the indexes
    conn.executescript(SCHEMA)
    sqlite_add_v2_columns(conn)  # an endpoint_minutes table made before v2: + cents_per_hour
    conn.executescript(ENDPOINT_MINUTES_SCHEMA)  # dedicated endpoints by the minute (if not there yet)
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    if _meta(conn, "rollups") == _ROLLUPS_V1:
        _rollups_by_unit(conn, periods)
    if _meta(conn, "rollups") == ROLLUPS_VERSION:
        _note_timezone(conn, periods)
        return []
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = _create_rollups(conn, periods)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if done != [_EMPTY]:  # a new file is not news
        log.info("ledger: %s", "; ".join(done))
    return done


def _add_unit_columns(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: the unit columns, added in place (every existing row is priced by tokens)."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
    if not columns or "unit" in columns:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("ALTER TABLE requests ADD COLUMN unit TEXT NOT NULL DEFAULT 'token'")
        conn.execute("ALTER TABLE requests ADD COLUMN quantity_micros INTEGER")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    log.info("ledger: requests gained the unit columns (schema 2)")


def _rollups_by_unit(conn: sqlite3.Connection, periods: Periods) -> None:
    """Rollups 1 -> 2: the same lines, keyed by unit too ('token': every line so far), kept as
    they are (a pruned month's lines have no rows to be made again from)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DROP TRIGGER IF EXISTS rollup_inserted")
        conn.execute("DROP TRIGGER IF EXISTS rollup_finished")
        conn.execute("ALTER TABLE rollups RENAME TO rollups_v1")
        conn.execute(_ROLLUPS_TABLE)
        conn.execute(
            f"INSERT INTO rollups ({KEY_SQL}, {_SUMS_SQL}) "
            f"SELECT {_KEY_V1}, 'token', {_SUMS_V1}, 0 FROM rollups_v1"
        )
        conn.execute("DROP TABLE rollups_v1")
        for statement in rollup_triggers(periods):
            conn.execute(statement)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('rollups', ?)", (ROLLUPS_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    log.info("ledger: rollups are kept by unit too (rollups 2)")


def _create_rollups(conn: sqlite3.Connection, periods: Periods) -> list[str]:
    conn.execute(_ROLLUPS_TABLE)
    for statement in rollup_triggers(periods):
        conn.execute(statement)
    conn.execute(_BACKFILL_ROWS.format(day=day_sql("started_us", periods)))
    done = [f"rollups made from the rows: {conn.execute('SELECT changes()').fetchone()[0]} line(s)"]
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'aggregates'").fetchone():
        conn.execute(_BACKFILL_AGGREGATES)
        conn.execute("INSERT OR IGNORE INTO meta SELECT DISTINCT 'pruned:' || period, '1' FROM aggregates")
        conn.execute("DROP TABLE aggregates")
        done.append("the pruned months' aggregates moved into the rollups")
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('rollups', ?)", (ROLLUPS_VERSION,))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('rollup_timezone', ?)", (periods.timezone,))
    return done


def _note_timezone(conn: sqlite3.Connection, periods: Periods) -> None:
    """budgets.timezone changed since the rollups were made: rows made terminal from now on are
    cut in the new zone; days already summed stay, like the periods of rows already written."""
    before = _meta(conn, "rollup_timezone")
    if before == periods.timezone:
        return
    log.warning(
        "ledger: rollup days were cut in %s, from now on in %s (budgets.timezone)", before, periods.timezone
    )
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DROP TRIGGER IF EXISTS rollup_inserted")
        conn.execute("DROP TRIGGER IF EXISTS rollup_finished")
        for statement in rollup_triggers(periods):
            conn.execute(statement)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('rollup_timezone', ?)", (periods.timezone,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _meta(conn: sqlite3.Connection, key: str) -> str | None:
    found = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if found is None else str(found[0])


def pruned_periods(conn: sqlite3.Connection) -> set[str]:
    """The periods `db prune` deleted rows of: their rollups hold those rows, an import skips them."""
    found = conn.execute("SELECT substr(key, 8) FROM meta WHERE key LIKE 'pruned:%'").fetchall()
    return {str(p) for (p,) in found}
