"""proxy/core/calls.py: request validation of the metered routes and cost attribution."""

from __future__ import annotations

import json

import orjson
import pytest

from proxy.core.calls import (
    Call,
    attribution,
    header_attribution,
    new_request_id,
    parse_call,
    with_stream_usage,
)
from proxy.errors import InvalidField, InvalidJSON

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def raw(body: object) -> bytes:
    return json.dumps(body).encode()


def test_a_chat_call_keeps_the_clients_bytes() -> None:
    """A valid non-streaming body is forwarded byte for byte; unknown fields pass through."""
    body = raw({**CHAT, "temperature": 0.2, "x-vendor": {"a": 1}})
    call = parse_call("chat", body)
    assert (call.endpoint, call.model, call.stream, call.max_tokens) == ("chat", "m", False, None)
    assert call.forward is call.raw is body


def test_a_stream_gets_include_usage_added_without_reencoding() -> None:
    """Streams without stream_options get include_usage inserted; the rest of the bytes stay."""
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    call = parse_call("chat", body)
    assert call.stream and not call.wants_usage
    assert call.forward == b'{"stream_options":{"include_usage":true},' + body[1:]
    assert orjson.loads(call.forward)["stream_options"] == {"include_usage": True}


def test_a_client_asking_for_usage_is_forwarded_as_is() -> None:
    """include_usage already true: nothing is added, the usage chunk will reach the client."""
    body = raw({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    call = parse_call("chat", body)
    assert call.wants_usage and call.forward is body


def test_other_stream_options_are_kept() -> None:
    """stream_options present without include_usage: merged, other options kept."""
    forward = with_stream_usage({"stream_options": {"x": 1}}, b'{"stream_options":{"x":1}}')
    assert orjson.loads(forward) == {"stream_options": {"x": 1, "include_usage": True}}


def test_output_bound_multiplies_by_n() -> None:
    """max_tokens (or max_completion_tokens) times n bounds the output."""
    assert parse_call("chat", raw({**CHAT, "max_tokens": 10, "n": 3})).max_tokens == 30
    assert parse_call("chat", raw({**CHAT, "max_completion_tokens": 7})).max_tokens == 7


@pytest.mark.parametrize(
    ("endpoint", "body", "error"),
    [
        ("chat", b"{", InvalidJSON),
        ("chat", b"[1]", InvalidJSON),
        ("chat", raw({"messages": CHAT["messages"]}), InvalidField),
        ("chat", raw({**CHAT, "model": ""}), InvalidField),
        ("chat", raw({**CHAT, "stream": "yes"}), InvalidField),
        ("chat", raw({**CHAT, "max_tokens": -1}), InvalidField),
        ("chat", raw({**CHAT, "max_tokens": 1.5}), InvalidField),
        ("chat", raw({**CHAT, "max_tokens": True}), InvalidField),
        ("chat", raw({**CHAT, "n": 0}), InvalidField),
        ("chat", raw({**CHAT, "n": 129}), InvalidField),
        ("chat", raw({**CHAT, "messages": []}), InvalidField),
        ("chat", raw({**CHAT, "messages": ["hi"]}), InvalidField),
        ("chat", raw({**CHAT, "stream_options": 1}), InvalidField),
        ("completions", raw({"model": "m", "prompt": 3}), InvalidField),
        ("embeddings", raw({"model": "m", "input": None}), InvalidField),
        ("embeddings", raw({"model": "m", "input": "x", "stream": True}), InvalidField),
    ],
)
def test_bad_bodies_are_refused(endpoint: str, body: bytes, error: type[Exception]) -> None:
    """Each malformed body is a 400 of the right kind, before anything is forwarded."""
    with pytest.raises(error):
        parse_call(endpoint, body)


def test_attribution_prefers_headers_then_metadata() -> None:
    """X-Meter-* headers win over metadata; values outside the label rule are refused."""
    call = parse_call("chat", raw({**CHAT, "metadata": {"feature": "search", "environment": "dev"}}))
    assert attribution({}, call) == ("search", "dev")
    assert attribution({"X-Meter-Feature": "chat"}, call) == ("chat", "dev")
    with pytest.raises(InvalidField, match="X-Meter-Environment"):
        attribution({"X-Meter-Environment": "bad value"}, call)
    bad = parse_call("chat", raw({**CHAT, "metadata": {"feature": 3}}))
    with pytest.raises(InvalidField, match=r"metadata\.feature"):
        attribution({}, bad)


def test_header_attribution() -> None:
    """Calls without a JSON body take feature and environment from the headers only."""
    assert header_attribution({"X-Meter-Feature": "nightly"}) == ("nightly", None)
    with pytest.raises(InvalidField):
        header_attribution({"X-Meter-Feature": "-starts-with-dash"})


def test_request_ids_are_unique_and_time_ordered() -> None:
    """Ids sort by creation time and do not repeat."""
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(i.startswith("req_") and len(i) == 29 for i in ids)
    assert sorted(ids, key=lambda i: i[4:17]) == ids


def test_call_is_a_frozen_value() -> None:
    """A Call cannot be changed after validation."""
    call = parse_call("chat", raw(CHAT))
    assert isinstance(call, Call)
    with pytest.raises(AttributeError):
        call.model = "other"  # type: ignore[misc]
