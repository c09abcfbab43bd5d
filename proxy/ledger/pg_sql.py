"""SQL pieces the PostgreSQL writer (postgres.py) and its bulk work (pg_bulk.py) share.

Rows travel as one array per column (`unnest`), so a batch of any size is one statement.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proxy.core.records import COLUMNS, LEDGER_COLUMNS, LedgerRow

# the array type of each column (records.LEDGER_COLUMNS: the one list of columns)
TYPES = tuple({"text": "text", "int": "int8", "int4": "int4", "bool": "bool"}[c.kind] for c in LEDGER_COLUMNS)
N_ROW = len(TYPES) + 1  # a row's arrays (+ owner)


def arrays(first: int, types: Iterable[str]) -> str:
    return ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))


# what a statement returns of each row it made terminal: its account moves and its rollup line
TERMINAL = (
    "request_id, tenant, feature, period, reserved_pusd, cost_pusd, started_us, model, environment, "
    "mode, endpoint, status, usage_source, prompt_tokens, completion_tokens, cached_tokens, unit, "
    "quantity_micros"
)


MOVE_ACCOUNTS_CTE = """acc AS (
    INSERT INTO accounts AS a (tenant, feature, period, spent_pusd, reserved_pusd)
    SELECT m.tenant, k.feature, m.period, SUM(m.spent), SUM(m.reserved)
    FROM moved AS m CROSS JOIN LATERAL (VALUES ('' COLLATE "C"), (m.feature)) AS k(feature)
    WHERE k.feature IS NOT NULL
    GROUP BY m.tenant, k.feature, m.period
    HAVING SUM(m.spent) <> 0 OR SUM(m.reserved) <> 0
    ORDER BY m.tenant, k.feature, m.period
    ON CONFLICT (tenant, feature, period) DO UPDATE SET
        spent_pusd = a.spent_pusd + excluded.spent_pusd,
        reserved_pusd = a.reserved_pusd + excluded.reserved_pusd
)"""


def clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; a model id or upstream id from outside might."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


CLEAN = (COLUMNS.index("model"), COLUMNS.index("upstream_id"))


def row_columns(
    rows: list[LedgerRow], owner: str | None = None, *, only: list[int] | None = None
) -> list[list[Any]]:
    """The rows as one array per column, for `unnest`: COLUMNS order then `owner`, or only the
    columns at the indexes `only` (no owner)."""
    if not rows:
        return [[] for _ in range(N_ROW if only is None else len(only))]
    values = [r.values() for r in rows]
    cols = [list(c) for c in zip(*values, strict=True)]
    for j in CLEAN:
        cols[j] = [clean(v) for v in cols[j]]
    if only is not None:
        return [cols[j] for j in only]
    cols.append([owner] * len(rows))
    return cols
