"""proxy/core/cost_body.py and the opt-in cost in stream chunks (proxy/core/streaming.py)."""

from __future__ import annotations

from decimal import Decimal

import orjson

from proxy.core.cost_body import body_with_cost, event_with_cost
from proxy.core.sse import SSEFramer
from proxy.core.streaming import StreamMeter
from proxy.core.usage import Usage

BODY = b'{"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'


def test_the_cost_is_the_exact_decimal() -> None:
    """usage.cost is written as the decimal text given, never through a float."""
    out = body_with_cost(BODY, "0.00000000000123456789")
    assert b'"cost":0.00000000000123456789' in out
    assert orjson.loads(out)["usage"]["prompt_tokens"] == 3


def test_a_body_without_usage_is_unchanged() -> None:
    """No usage object (together's embeddings): the bytes stay exactly as they were."""
    data = b'{"object":"list","data":[]}'
    assert body_with_cost(data, "0.1") is data
    assert body_with_cost(b"not json", "0.1") == b"not json"
    assert event_with_cost({"choices": []}, "0.1") is None


def chunks(*objs: dict[str, object]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in objs) + b"data: [DONE]\n\n"


STREAM = chunks(
    {"id": "c", "choices": [{"delta": {"content": "hi"}}]},
    {"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
)


def test_an_opted_in_stream_shows_the_usage_chunk_with_its_cost() -> None:
    """The chunk carrying usage gets usage.cost from the price function; other chunks are as sent."""
    seen: list[Usage] = []

    def price(usage: Usage) -> str:
        seen.append(usage)
        return "0.0042"

    meter = StreamMeter(hide_usage_chunk=False, price=price)
    out = meter.feed(SSEFramer(1 << 20).feed(STREAM))
    events = [e for e in out.split(b"\n\n") if e]
    assert events[0] == b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}]}'
    last = orjson.loads(events[1][len(b"data: ") :])
    assert Decimal(str(last["usage"]["cost"])) == Decimal("0.0042") and b'"cost":0.0042' in events[1]
    assert seen == [Usage(5, 2)] and meter.done


def test_without_opt_in_the_stream_is_relayed_byte_for_byte() -> None:
    """No price function: the usage chunk passes unchanged (or is hidden, as before)."""
    shown = StreamMeter(hide_usage_chunk=False).feed(SSEFramer(1 << 20).feed(STREAM))
    assert shown == STREAM[: STREAM.index(b"data: [DONE]")]
    hidden = StreamMeter(hide_usage_chunk=True).feed(SSEFramer(1 << 20).feed(STREAM))
    assert b"usage" not in hidden


def test_an_unpriced_usage_gets_no_cost_field() -> None:
    """A price function answering None (unpriced model) leaves the chunk as sent."""
    out = StreamMeter(hide_usage_chunk=False, price=lambda u: None).feed(SSEFramer(1 << 20).feed(STREAM))
    assert b"cost" not in out
