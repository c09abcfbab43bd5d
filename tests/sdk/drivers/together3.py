"""together SDK 3.x (`Together(base_url="http://proxy")`, no /v1: its paths carry their version)."""

from __future__ import annotations

import importlib.metadata
import sys

import together
from common import run
from together_stainless import lines

if __name__ == "__main__":
    sys.exit(run("together", importlib.metadata.version("together"), lines(together)))
