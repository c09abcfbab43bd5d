"""proxy/cli/tables.py: figures are never cut, whatever the terminal's width."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.table import Table

from proxy.cli import tables

CELLS = [
    ["meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo", "1,234", "0.000502542788", "0.00000774"],
    ["total", "1,240", "18.000000000003", "0.0145161290331"],
]
HEADS = ("model", "requests", "cost USD", "avg cost")


def _printed(width: int) -> str:
    out = Console(file=io.StringIO(), width=width, color_system=None)
    table = Table(title="spend")
    tables.add_columns(table, HEADS, CELLS)
    for line in CELLS:
        table.add_row(*line)
    tables.print_table(out, table)
    assert isinstance(out.file, io.StringIO)
    return out.file.getvalue()


@pytest.mark.parametrize("width", [160, 80, 50, 30])
def test_every_figure_is_printed_whole_at_any_width(width: int) -> None:
    """At 160, 80, 50 or 30 columns no cell becomes '…' and every figure is on one line."""
    text = _printed(width)
    assert "…" not in text
    for line in CELLS:
        for figure in line[1:]:
            assert figure in text, (figure, text)


def test_a_table_that_fits_is_left_as_rich_lays_it_out() -> None:
    """Wide enough: one line per row, the label unfolded, the width of the console unchanged."""
    text = _printed(160)
    assert CELLS[0][0] in text and len(text.splitlines()) == 7  # title, 3 rules, header, 2 rows


def test_a_closed_stdout_raises_broken_pipe_for_the_command_line_to_handle() -> None:
    """rich would exit 1 on its own; our console raises BrokenPipeError (main.py exits 141)."""
    console = tables.console()
    with pytest.raises(BrokenPipeError):
        console.on_broken_pipe()
