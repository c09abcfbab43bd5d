"""Answers the proxy makes itself: OpenAI-shaped errors; whether the client is still there."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import MeterError

JSON_CT = "application/json"


def error_response(exc: MeterError, request_id: str | None = None) -> web.Response:
    """`exc` as an OpenAI-shaped error answer, with the request id when there is one."""
    headers = {"x-request-id": request_id} if request_id else {}
    if exc.retryable is False:
        headers["x-should-retry"] = "false"  # the openai SDK would otherwise retry a 429
    return web.Response(status=exc.status, body=exc.body_bytes(), content_type=JSON_CT, headers=headers)


def client_gone(request: web.Request) -> bool:
    """The client's connection is closed or closing."""
    transport = request.transport
    return transport is None or transport.is_closing()
