"""together SDK 2.x (`Together(base_url="http://proxy/v1")`: its paths are relative to /v1)."""

from __future__ import annotations

import importlib.metadata
import sys

import together
from common import run
from together_stainless import lines

if __name__ == "__main__":
    sys.exit(run("together", importlib.metadata.version("together"), lines(together)))
