"""Request validation for the metered inference routes: the body, and who the cost is for.

Pure: bytes and header values in, a `Call` out (or a BadRequest naming what is wrong). Unknown
fields pass through untouched; the proxy validates only what it meters.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from proxy.errors import InvalidField, InvalidJSON

# feature / environment values (X-Meter-* headers, metadata, config label lists)
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}\Z")
LABEL_RULE = (
    "must be 1-64 characters of letters, digits, '.', '_', ':', '/', '-', starting with a letter or digit."
)
ATTRIBUTION = (("X-Meter-Feature", "feature"), ("X-Meter-Environment", "environment"))
NO_STREAM = frozenset({"embeddings", "rerank"})  # routes with no streamed answer
INPUT_ONLY = NO_STREAM  # routes billed for input tokens only (no completion)


@dataclass(frozen=True, slots=True)
class Call:
    """A validated request body."""

    endpoint: str
    model: str
    stream: bool
    body: dict[str, Any]
    wants_usage: bool  # the client asked for stream usage itself
    max_tokens: int | None  # output bound across all `n` choices, if the request gave one
    raw: bytes  # as the client sent it
    forward: bytes  # what goes upstream: `raw`, with stream_options.include_usage when we must add it


def new_request_id() -> str:
    """Time-ordered and unique: `req_` + µs clock (hex) + 48 random bits (not a secret)."""
    return f"req_{time.time_ns() // 1000:013x}{random.getrandbits(48):012x}"


def parse_call(endpoint: str, raw: bytes) -> Call:
    """Validate the JSON body enough to meter it; unknown fields pass through untouched."""
    body = _json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidField("'model' is required and must be a non-empty string.")
    stream = _stream_flag(endpoint, body)
    max_tokens = _output_bound(body)
    _check_input(endpoint, body)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidField("'stream_options' must be an object.")
    wants_usage = bool(options and options.get("include_usage") is True)
    forward = with_stream_usage(body, raw) if stream and not wants_usage else raw
    return Call(endpoint, model, stream, body, wants_usage, max_tokens, raw, forward)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"The request body is not valid JSON: {exc.args[0]}") from None
    if not isinstance(body, dict):
        raise InvalidJSON("The request body must be a JSON object.")
    return body


def _stream_flag(endpoint: str, body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise InvalidField("'stream' must be a boolean.")
    if endpoint in NO_STREAM and stream:
        raise InvalidField(f"'stream' is not supported for {endpoint}.")
    return stream


def _output_bound(body: dict[str, Any]) -> int | None:
    """max_tokens (or max_completion_tokens) times `n`: the most output the request allows."""
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (type(value) is not int or value < 0):
            raise InvalidField(f"'{name}' must be a non-negative integer.")
        if value is not None and max_tokens is None:
            max_tokens = value
    n = body.get("n")
    if n is not None and (type(n) is not int or not 1 <= n <= 128):
        raise InvalidField("'n' must be an integer between 1 and 128.")
    if max_tokens is not None and n is not None:
        max_tokens *= n  # n choices: up to n times the output
    return max_tokens


def _check_input(endpoint: str, body: dict[str, Any]) -> None:
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise InvalidField("'messages' must be a non-empty array of message objects.")
    elif endpoint == "completions":
        if not isinstance(body.get("prompt"), str | list):
            raise InvalidField("'prompt' must be a string or an array.")
    elif endpoint == "rerank":
        if not isinstance(body.get("query"), str):
            raise InvalidField("'query' must be a string.")
        docs = body.get("documents")
        if not isinstance(docs, list) or not docs or not all(isinstance(d, str | dict) for d in docs):
            raise InvalidField("'documents' must be a non-empty array of strings or objects.")
    elif not isinstance(body.get("input"), str | list):
        raise InvalidField("'input' must be a string or an array.")


def with_stream_usage(body: dict[str, Any], raw: bytes) -> bytes:
    """The body plus stream_options.include_usage, so the stream's last chunk carries the usage."""
    if "stream_options" not in body:
        # the usual case: insert the key after the opening brace and leave the client's bytes
        # as they are (re-encoding would cost time and fail on very deep nesting)
        start = raw.index(b"{") + 1
        return raw[:start] + b'"stream_options":{"include_usage":true},' + raw[start:]
    body = {**body, "stream_options": {**(body["stream_options"] or {}), "include_usage": True}}
    try:
        return orjson.dumps(body)
    except TypeError:  # nesting deeper than orjson writes (255 levels): json can, up to its limit
        import json

        try:
            return json.dumps(body, separators=(",", ":")).encode()
        except RecursionError:
            raise InvalidJSON("The request body is nested too deeply.") from None


class HasBody(Protocol):
    @property
    def body(self) -> dict[str, Any]: ...


def attribution(headers: Mapping[str, str], call: HasBody) -> tuple[str | None, str | None]:
    """Feature and environment from X-Meter-* headers, else the body's `metadata`."""
    meta = call.body.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    values = []
    for header, key in ATTRIBUTION:
        value, source = headers.get(header), header
        if value is None:
            value, source = meta.get(key), f"metadata.{key}"
        if value is not None and (not isinstance(value, str) or not LABEL_VALUE_RE.match(value)):
            raise InvalidField(f"{source} {LABEL_RULE}")
        values.append(value)
    return values[0], values[1]


def header_attribution(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """Feature and environment from the X-Meter-* headers only (calls without a JSON body)."""
    values = []
    for header, _ in ATTRIBUTION:
        value = headers.get(header)
        if value is not None and not LABEL_VALUE_RE.match(value):
            raise InvalidField(f"{header} {LABEL_RULE}")
        values.append(value)
    return values[0], values[1]
