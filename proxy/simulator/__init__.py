"""A together.ai-compatible upstream for `demo`, tests and benchmarks (not product code).

`python -m proxy.simulator --port 18000`; in-process: `await start(...)` or `create_app(...)`.
"""

from __future__ import annotations

from .endpoints import DEDICATED, DedicatedFleet, ScriptedEndpoint
from .server import (
    BILLED,
    FLAT_CACHED,
    MEDIA_MODELS,
    SEEN,
    SEEN_MAX,
    TOKEN_MODELS,
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
    "MEDIA_MODELS",
    "SEEN",
    "SEEN_MAX",
    "TOKEN_MODELS",
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
