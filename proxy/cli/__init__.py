"""The command line (`together-meter ...`): argument parsing and the commands it runs."""

from __future__ import annotations

from typing import Any


def main(argv: Any = None) -> int:
    """The console script; imports the commands only when one runs."""
    from .main import main as run

    return run(argv)


__all__ = ["main"]
