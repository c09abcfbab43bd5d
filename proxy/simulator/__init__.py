"""A together.ai-compatible upstream for `demo`, tests and benchmarks (not product code).

`python -m proxy.simulator --port 18000`; in-process: `await start(...)` or `create_app(...)`.
"""

from __future__ import annotations

from .endpoints import DEDICATED, DedicatedFleet, ScriptedEndpoint
from .server import (
    BILLED,
    FLAT_CACHED,
    SEEN,
    SEEN_MAX,
    BilledLog,
    RunningSimulator,
    SimulatorOptions,
    billed_pusd,
    create_app,
    main,
    start,
)

__all__ = [
    "BILLED",
    "DEDICATED",
    "FLAT_CACHED",
    "SEEN",
    "SEEN_MAX",
    "BilledLog",
    "DedicatedFleet",
    "RunningSimulator",
    "ScriptedEndpoint",
    "SimulatorOptions",
    "billed_pusd",
    "create_app",
    "main",
    "start",
]
