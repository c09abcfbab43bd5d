"""proxy/errors.py: every MeterError renders the OpenAI error shape with its documented status."""

from __future__ import annotations

import orjson
import pytest

from proxy import errors
from proxy.errors import ConfigError, MeterError

# status, type, code as documented in errors.py's docstring and DESIGN.md ("Errors")
DOCUMENTED = {
    "MeterError": (500, "server_error", "internal_error"),
    "AuthenticationError": (401, "invalid_request_error", "invalid_api_key"),
    "BadRequest": (400, "invalid_request_error", "invalid_request"),
    "InvalidJSON": (400, "invalid_request_error", "invalid_json"),
    "InvalidField": (400, "invalid_request_error", "invalid_field"),
    "InvalidTarget": (400, "invalid_request_error", "invalid_request"),
    "ModelNotPriced": (400, "invalid_request_error", "model_not_priced"),
    "ModelNotAllowed": (403, "permission_error", "model_not_allowed"),
    "RouteNotAllowed": (403, "permission_error", "route_not_allowed"),
    "UploadTokenInvalid": (403, "permission_error", "invalid_upload_token"),
    "NotFound": (404, "invalid_request_error", "unknown_url"),
    "MethodNotAllowed": (405, "invalid_request_error", "method_not_allowed"),
    "BodyTimeout": (408, "invalid_request_error", "request_timeout"),
    "BodyTooLarge": (413, "invalid_request_error", "request_too_large"),
    "LengthRequired": (411, "invalid_request_error", "length_required"),
    "RateLimited": (429, "rate_limit_error", "too_many_auth_failures"),
    "NotReady": (503, "server_error", "not_ready"),
    "UpstreamError": (502, "upstream_error", "upstream_unreachable"),
    "UpstreamProtocolError": (502, "upstream_error", "upstream_protocol_error"),
    "ObjectStoreError": (502, "upstream_error", "object_store_error"),
    "UpstreamTimeout": (504, "upstream_error", "upstream_timeout"),
}


def all_meter_errors() -> list[type[MeterError]]:
    found, todo = [], [MeterError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__ == errors.__name__]


def test_every_error_class_is_documented() -> None:
    """Each MeterError class appears in the docstring hierarchy and in this table of statuses."""
    names = {cls.__name__ for cls in all_meter_errors()}
    assert names == set(DOCUMENTED)
    assert errors.__doc__ is not None
    for name in names:
        assert name in errors.__doc__


@pytest.mark.parametrize("cls", all_meter_errors(), ids=lambda c: c.__name__)
def test_error_renders_openai_shape_with_documented_status(cls: type[MeterError]) -> None:
    """body() and body_bytes() give {"error": {message, type, code}} and status is as documented."""
    status, type_, code = DOCUMENTED[cls.__name__]
    exc = cls("something went wrong")
    expected = {"error": {"message": "something went wrong", "type": type_, "code": code}}
    assert exc.status == status
    assert exc.body() == expected
    assert orjson.loads(exc.body_bytes()) == expected
    assert str(exc) == "something went wrong"


@pytest.mark.parametrize("cls", all_meter_errors(), ids=lambda c: c.__name__)
def test_code_can_be_overridden_per_instance(cls: type[MeterError]) -> None:
    """A code given to one instance changes that instance only, not its class."""
    exc = cls("over budget", code="budget_exceeded")
    assert exc.body()["error"]["code"] == "budget_exceeded"
    assert cls("plain").body()["error"]["code"] == DOCUMENTED[cls.__name__][2]


def test_config_error_names_file_key_and_problem() -> None:
    """ConfigError keeps file, key and problem and shows all three in its message."""
    exc = ConfigError("meter.yaml", "listen.port", "must be an integer")
    assert (exc.file, exc.key, exc.problem) == ("meter.yaml", "listen.port", "must be an integer")
    assert str(exc) == "meter.yaml: listen.port: must be an integer"
    assert str(ConfigError("meter.yaml", "", "invalid YAML")) == "meter.yaml: invalid YAML"
    assert not isinstance(exc, MeterError)
