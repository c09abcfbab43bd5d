"""The simulator's wire helpers, shared by its routes: JSON in and out, together-shaped errors, auth,
and reading the `simulate` knobs. No state, nothing at import time."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency; json keeps the module usable
    _orjson = None  # type: ignore[assignment]


def dumps(obj: Any) -> bytes:
    if _orjson is not None:
        return _orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    return _orjson.loads(data) if _orjson is not None else json.loads(data)


def error(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """together's (and OpenAI's) error body: {"error": {"message", "type", "code"}}."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "code": code}}
    return web.Response(status=status, body=dumps(body), headers=headers, content_type="application/json")


def authorized(request: web.Request) -> bool:
    return request.headers.get("Authorization", "")[:7].lower() == "bearer "


def unauthorized() -> web.Response:
    return error(401, "Invalid API key provided. Send 'Authorization: Bearer <key>'.", "invalid_api_key")


def json_response(obj: Any) -> web.Response:
    return web.Response(body=dumps(obj), content_type="application/json")


async def json_body(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object body, or the 400 answer to send instead."""
    try:
        body = loads(await request.read())
    except ValueError:
        return error(400, "Request body is not valid JSON.")
    if not isinstance(body, dict):
        return error(400, "Request body must be a JSON object.")
    return body


def int_field(sim: dict[str, Any], key: str) -> int | None:
    v = sim.get(key)
    return v if type(v) is int else None  # bools and floats are not counts


def ms_field(sim: dict[str, Any], key: str, default: float) -> float:
    """Milliseconds from `simulate` (or the default) as seconds; junk and inf fall back."""
    v: Any = sim.get(key)
    ms = float(v) if type(v) in (int, float) and math.isfinite(v) else default
    return max(ms, 0.0) / 1000.0
