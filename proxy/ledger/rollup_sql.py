"""The rollups table in SQL, for both backends: its reads, and what one terminal row adds to it.

Reports, budgets and estimates read `rollups` summed in the database over the dimensions they do
not need (`keep`), so a month of millions of rows comes back as a few hundred lines. '' stands
for no feature / environment in the table (a key column cannot be NULL).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from proxy.core.rollups import ROLLUP_KEY, ROLLUP_SUMS, Rollup, RollupFilter

KEY_SQL = ", ".join(ROLLUP_KEY)
_NULLABLE = ("feature", "environment")


def select_rollups(keep: Iterable[str], where: RollupFilter, dialect: str) -> tuple[str, list[Any]]:
    """SQL summing `rollups` over the dimensions not in `keep`, and its parameters.

    `dialect` is "sqlite" (? placeholders) or "postgres" ($n placeholders).
    """
    kept = [f for f in ROLLUP_KEY if f in set(keep)]
    if not kept:
        raise ValueError("a rollup read keeps at least one dimension")
    params: list[Any] = []
    clauses: list[str] = []

    def param(value: Any) -> str:
        params.append(value)
        return "?" if dialect == "sqlite" else f"${len(params)}"

    if where.periods:
        if dialect == "sqlite":
            clauses.append(f"period IN ({', '.join(param(p) for p in where.periods)})")
        else:
            clauses.append(f"period = ANY({param(list(where.periods))}::text[])")
    for column, value in (("tenant", where.tenant), ("model", where.model), ("feature", where.feature)):
        if value is not None:
            clauses.append(f"{column} = {param(value)}")
    if where.since_day is not None:
        clauses.append(f"day >= {param(where.since_day)}")
    columns = [f if f in kept else f"'' AS {f}" for f in ROLLUP_KEY]
    sums = [f"SUM({f}) AS {f}" for f in ROLLUP_SUMS]
    sql = (
        f"SELECT {', '.join(columns + sums)} FROM rollups"
        + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
        + f" GROUP BY {', '.join(kept)} ORDER BY {', '.join(kept)}"
    )
    return sql, params


def to_rollup(record: Mapping[str, Any] | Sequence[Any]) -> Rollup:
    """A rollups line as read (either backend) as a Rollup: '' -> None, sums as exact ints."""
    values: list[Any] = [record[i] for i in range(len(ROLLUP_KEY) + len(ROLLUP_SUMS))]  # type: ignore[index]
    for f in _NULLABLE:
        i = ROLLUP_KEY.index(f)
        values[i] = values[i] or None
    for i in range(len(ROLLUP_KEY), len(values)):
        values[i] = int(values[i])
    return Rollup(*values)


_PG_ADD = ", ".join(f"{f} = l.{f} + excluded.{f}" for f in ROLLUP_SUMS)


def rollup_cte(source: str, timezone: str, table: str = "rollups") -> str:
    """PostgreSQL: `roll AS (...)`, adding the terminal rows `source` selects (columns named as in
    `requests`) to their lines of `table` in key order; `timezone` is the SQL of the zone's name."""
    day = f"to_char(to_timestamp(t.started_us / 1000000) AT TIME ZONE {timezone}::text, 'YYYY-MM-DD')"
    return f"""roll AS (
    INSERT INTO {table} AS l ({KEY_SQL}, {", ".join(ROLLUP_SUMS)})
    SELECT t.period, {day}, t.tenant, t.model, COALESCE(t.feature, ''), COALESCE(t.environment, ''),
        t.mode, t.endpoint, t.status, t.usage_source, t.unit, COUNT(*),
        COUNT(*) FILTER (WHERE t.prompt_tokens IS NOT NULL OR t.completion_tokens IS NOT NULL),
        COALESCE(SUM(t.prompt_tokens), 0), COALESCE(SUM(t.completion_tokens), 0),
        COALESCE(SUM(t.cached_tokens), 0), COUNT(t.cost_pusd), COALESCE(SUM(t.cost_pusd), 0),
        COUNT(*) FILTER (WHERE t.usage_source = 'estimated'), COUNT(*) - COUNT(t.cost_pusd),
        COALESCE(SUM(t.quantity_micros), 0)
    FROM ({source}) AS t
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
    ON CONFLICT ({KEY_SQL}) DO UPDATE SET {_PG_ADD}
)"""


# PostgreSQL: lines summed in a temporary table added to `rollups` at once, in key order
MERGE_ROLLUPS = f"""INSERT INTO rollups AS l SELECT * FROM pending_rollups ORDER BY {KEY_SQL}
ON CONFLICT ({KEY_SQL}) DO UPDATE SET {_PG_ADD}"""
