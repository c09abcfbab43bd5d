"""Fuzz target: request validation on the hot path (core/calls.py, server/relay.py) with arbitrary bytes.

Input layout: byte 0 picks the endpoint (byte mod 3) and whether an X-Meter-Feature (bit 2) and
an X-Meter-Environment (bit 3) header is sent; each header value is the next line of the input
(up to LF), the rest is the request body. Properties:
  - `parse_call` -> `attribution` -> `_reserve` -> the body forwarded upstream raise nothing but
    a `MeterError` with a 4xx status, rendered in the OpenAI error shape;
  - an accepted call has a non-empty string model, a boolean stream, attribution values within
    the label charset, a non-negative integer reservation, and forwards the client's JSON (plus
    `stream_options.include_usage` when a stream did not ask for usage itself).
`make fuzz` runs it under atheris; tests/fuzz/test_corpus.py replays corpus/request/ through `check`.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from proxy.config import load_config
from proxy.core.auth import KeyStore
from proxy.core.calls import attribution, parse_call
from proxy.core.usage import Tokenizer
from proxy.errors import MeterError
from proxy.ledger.sqlite import SQLiteLedger
from proxy.server.metrics import Metrics
from proxy.server.relay import ENDPOINTS, Relay
from proxy.server.responses import error_response
from proxy.upstream.hosts import Upstreams

CONFIG = Path(__file__).resolve().parents[2] / "config" / "example.yaml"
PATHS = {name: path for path, name in ENDPOINTS.items()}
ENDPOINT_NAMES = ("chat", "completions", "embeddings")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
FALLBACK_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"  # rates for reserving unpriced models
HEADER_OK = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")  # what an HTTP parser lets into a value


@functools.cache
def relay() -> Relay:
    """A Relay on the example config (built once; nothing is started or opened)."""
    config = load_config(CONFIG)
    return Relay(
        config,
        KeyStore(config.key_index()),
        Upstreams(config.upstream, "fuzz-key"),
        SQLiteLedger(":memory:"),
        Metrics(config.attribution, config.prices.models),
        Tokenizer(None),
    )


def decode(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """(endpoint, X-Meter-* headers, body) from one fuzz input."""
    if not data:
        return "chat", {}, b""
    flags, rest = data[0], data[1:]
    headers = {}
    for bit, name in ((4, "X-Meter-Feature"), (8, "X-Meter-Environment")):
        if flags & bit:
            value, _, rest = rest.partition(b"\n")
            if HEADER_OK.fullmatch(value):  # else the HTTP parser would have refused the request
                headers[name] = value.decode("utf-8", "replace")  # non-ASCII fails the charset anyway
    return ENDPOINT_NAMES[flags % 3], headers, rest


def check(data: bytes) -> None:
    """One fuzz input: raises AssertionError, or the unexpected exception, on a broken property."""
    endpoint, headers, body = decode(data)
    r = relay()
    try:
        call = parse_call(endpoint, body)
        request = make_mocked_request("POST", PATHS[endpoint], headers=CIMultiDict(headers))
        feature, environment = attribution(request.headers, call)
        rates = r.config.prices.get(call.model) or r.config.prices.get(FALLBACK_MODEL)
        reserved = r._reserve(call, rates)
        forwarded = call.forward
    except MeterError as exc:
        assert 400 <= exc.status < 500, (type(exc).__name__, exc.status)
        err = orjson.loads(error_response(exc).body)["error"]  # type: ignore[arg-type]
        assert set(err) == {"message", "type", "code"} and isinstance(err["message"], str)
        return
    assert isinstance(call.model, str) and call.model and isinstance(call.stream, bool)
    for value in (feature, environment):
        assert value is None or LABEL.fullmatch(value), value
    assert isinstance(reserved, int) and reserved >= 0
    assert _same(orjson.loads(forwarded), _expected_upstream(call.body, call.stream, call.wants_usage))


def _expected_upstream(body: dict[str, Any], stream: bool, wants_usage: bool) -> dict[str, Any]:
    if not stream or wants_usage:
        return body
    return {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}


def _same(a: Any, b: Any) -> bool:
    """JSON values equal, types included (iterative: bodies may nest 1000 levels deep)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, dict):
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif x != y:
            return False
    return True


if __name__ == "__main__":
    from atheris_main import fuzz

    import proxy.core.calls
    import proxy.errors
    import proxy.server.relay

    relay()  # load the config before fuzzing, not inside the first run
    fuzz(check, [proxy.core.calls, proxy.server.relay, proxy.errors, sys.modules[__name__]])
