"""The long tier: each atheris target runs from its seed corpus for a bounded number of runs and
time and finds no crash (`make test-long` installs atheris; `make fuzz` runs them longer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import runner

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target", sorted(runner.TARGETS))
def test_target_finds_no_crash(target: str, tmp_path: Path) -> None:
    """Up to 50,000 inputs (30 s at most): libFuzzer exits 0, no crash input is written, and
    more than the seeds were executed."""
    pytest.importorskip("atheris", reason="the `fuzz` extra: pip install -e '.[fuzz]' (make test-long does)")
    stats = runner.fuzz(target, runs=50_000, seconds=30, workdir=tmp_path)
    assert stats["exit"] == 0 and not list((tmp_path / "crashes").iterdir())
    assert int(stats["number_of_executed_units"]) > 1000
    assert int(stats["cov"]) > 50
