"""Our exceptions. Each HTTP-facing class carries its status and OpenAI error type/code.

MeterError                      rendered as {"error": {"message", "type", "code"}}
├── AuthenticationError         401 invalid_request_error / invalid_api_key
├── BadRequest                  400 invalid_request_error / invalid_request
│   ├── InvalidJSON             400 ... / invalid_json
│   ├── InvalidField            400 ... / invalid_field
│   ├── InvalidTarget           400 ... / invalid_request (a target or header unsafe to forward)
│   └── ModelNotPriced          400 ... / model_not_priced
├── ModelNotAllowed             403 permission_error / model_not_allowed
├── RouteNotAllowed             403 permission_error / route_not_allowed
├── UploadTokenInvalid          403 permission_error / invalid_upload_token (or upload_token_expired)
├── NotFound                    404 invalid_request_error / unknown_url
├── MethodNotAllowed            405 invalid_request_error / method_not_allowed
├── BodyTimeout                 408 invalid_request_error / request_timeout
├── LengthRequired              411 invalid_request_error / length_required
├── BodyTooLarge                413 invalid_request_error / request_too_large
├── RateLimited                 429 rate_limit_error / too_many_auth_failures
├── NotReady                    503 server_error / not_ready
└── UpstreamError               502 upstream_error / upstream_unreachable
    ├── UpstreamProtocolError   502 ... / upstream_protocol_error
    ├── ObjectStoreError        502 (or the store's own 4xx/5xx) ... / object_store_error
    └── UpstreamTimeout         504 ... / upstream_timeout
ConfigError                     not HTTP: a bad config file, names file, key and problem
"""

from __future__ import annotations

from typing import Any

import orjson


class MeterError(Exception):
    """An error we answer with an OpenAI-shaped body."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    retryable: bool | None = None  # False: tell SDKs not to retry (x-should-retry: false)

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def body_bytes(self) -> bytes:
        return orjson.dumps(self.body())


class AuthenticationError(MeterError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class BadRequest(MeterError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class InvalidField(BadRequest):
    code = "invalid_field"


class InvalidTarget(BadRequest):
    """The request target or a forwarded header cannot be sent upstream safely."""


class ModelNotPriced(BadRequest):
    code = "model_not_priced"


class ModelNotAllowed(MeterError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class RouteNotAllowed(MeterError):
    status = 403
    type = "permission_error"
    code = "route_not_allowed"


class UploadTokenInvalid(MeterError):
    """A presigned-upload URL of the proxy that is forged, damaged, expired or not the caller's."""

    status = 403
    type = "permission_error"
    code = "invalid_upload_token"


class NotFound(MeterError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(MeterError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class BodyTooLarge(MeterError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class BodyTimeout(MeterError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class LengthRequired(MeterError):
    status = 411
    type = "invalid_request_error"
    code = "length_required"


class RateLimited(MeterError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_auth_failures"


class NotReady(MeterError):
    status = 503
    type = "server_error"
    code = "not_ready"


class UpstreamError(MeterError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class ObjectStoreError(UpstreamError):
    """The object store refused a relayed upload: its own status is passed on when it gave one."""

    code = "object_store_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message, code=code)
        if status is not None:
            self.status = status


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"

    def __init__(self, message: str, *, code: str | None = None, sent: bool = True) -> None:
        super().__init__(message, code=code)
        self.sent = sent  # False: no connection in time, so nothing reached the upstream


class ConfigError(Exception):
    """A config file is wrong: names the file, the key path and the problem."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")
        self.file = file
        self.key = key
        self.problem = problem
