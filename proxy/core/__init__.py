"""The pure core: values and arithmetic (usage, prices, budgets, periods, SSE framing, routes,
reports, estimates). Nothing here does I/O or imports aiohttp, asyncpg or prometheus-client;
docs/architecture.md draws what may import what (checked by `make test`)."""
