"""A together.ai-compatible upstream for `demo`, tests and benchmarks (not product code).

`python -m proxy.simulator --port 18000`; in-process: `await start(...)` or `create_app(...)`.
"""

from __future__ import annotations

from .server import (
    BILLED,
    SEEN,
    SEEN_MAX,
    BilledLog,
    RunningSimulator,
    SimulatorOptions,
    create_app,
    main,
    start,
)

__all__ = [
    "BILLED",
    "SEEN",
    "SEEN_MAX",
    "BilledLog",
    "RunningSimulator",
    "SimulatorOptions",
    "create_app",
    "main",
    "start",
]
