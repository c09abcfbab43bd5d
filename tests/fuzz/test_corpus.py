"""The fuzz targets' seed corpora (and any crash inputs saved next to them) replayed in the fast
tier: every file passes the same checks `make fuzz` runs under atheris, without atheris."""

from __future__ import annotations

from pathlib import Path

import fuzz_request
import fuzz_sse
import pytest

CORPUS = Path(__file__).resolve().parent / "corpus"
SSE = sorted((CORPUS / "sse").iterdir())
REQUEST = sorted((CORPUS / "request").iterdir())


def test_corpora_are_seeded() -> None:
    """Both corpora hold at least two dozen seeds (the tricky cases named in tests/fuzz/README)."""
    assert len(SSE) >= 24 and len(REQUEST) >= 24


@pytest.mark.parametrize("path", SSE, ids=[p.name for p in SSE])
def test_sse_seed(path: Path) -> None:
    """The SSE framer yields the reference events for this seed in its split, and only the
    documented SSEError at its bound."""
    fuzz_sse.check(path.read_bytes())


@pytest.mark.parametrize("path", REQUEST, ids=[p.name for p in REQUEST])
def test_request_seed(path: Path) -> None:
    """Request validation accepts this seed with consistent values or refuses it with a 4xx
    MeterError, never another exception."""
    fuzz_request.check(path.read_bytes())
