"""Rich tables whose figures are never cut: a narrow terminal folds labels, not costs.

rich fits a table to the terminal by cutting cells to '…'; a cost shown as `0.0004…` is a wrong
cost. Figure columns keep their widest cell on one line; when the table is too wide, their
headers wrap at spaces and the label columns fold; a table still too wide is printed whole (the
terminal wraps its lines) rather than cropped.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

UNBOUNDED = 100_000  # a width no table reaches: measures a table's natural width
LABEL_MIN = 12  # a label column folds to no narrower than this
PADDING = 2  # rich's default cell padding, left and right


class _Console(Console):
    """rich's Console, but a closed stdout raises BrokenPipeError like print() does (rich
    exits 1 itself), so the command line treats both alike (proxy/cli/main.py)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def console() -> Console:
    """The terminal's width (COLUMNS if set); 160 columns into a pipe or a file, whatever the
    environment says, so what scripts read does not depend on it."""
    return _Console(width=None if sys.stdout.isatty() else 160)


def add_columns(table: Table, heads: Sequence[str], cells: Sequence[Sequence[str]], labels: int = 1) -> None:
    """The first `labels` columns fold; the others are right-aligned figures at least as wide
    as their widest cell (markup such as `[b]` not counted)."""
    for i, head in enumerate(heads):
        if i < labels:
            table.add_column(head, overflow="fold")
            continue
        widest = max((Text.from_markup(line[i]).cell_len for line in cells), default=1)
        table.add_column(head, justify="right", no_wrap=True, min_width=widest)


def print_table(out: Console, table: Table) -> None:
    """Print without cropping; too wide for the terminal, figure headers wrap and labels fold,
    and a table that still cannot fit is printed as wide as its figures need."""
    if out.measure(table, options=out.options.update_width(UNBOUNDED)).maximum <= out.width:
        out.print(table, crop=False)
        return
    needed = len(table.columns) + 1  # the vertical rules
    for column in table.columns:
        if column.min_width is None:  # a label
            needed += LABEL_MIN + PADDING
            continue
        words = str(column.header).split() or [""]
        column.width = max(column.min_width, *(len(w) for w in words))  # a figure: its widest cell
        column.no_wrap = False  # ... and its header wraps at spaces
        needed += column.width + PADDING
    width = out.width  # rich renders no wider than its console: widen it for this table
    out.width = max(width, needed)
    try:
        out.print(table, crop=False)
    finally:
        out.width = width
