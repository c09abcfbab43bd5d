"""proxy/core/usage.py and proxy/core/streaming.py: reading usage, estimating tokens, metering a stream."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core import streaming
from proxy.core.sse import Event, events_of, parse_event
from proxy.core.streaming import StreamMeter
from proxy.core.usage import (
    MAX_TOKENS_PER_REQUEST,
    PER_MESSAGE_OVERHEAD,
    Tokenizer,
    Usage,
    completion_text,
    estimate_prompt_tokens,
    usage_from_json,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


# -- usage_from_json ----------------------------------------------------------------------------


def test_valid_usage_is_read() -> None:
    """prompt_tokens and completion_tokens are read as upstream usage."""
    usage = usage_from_json({"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46})
    assert usage == Usage(12, 34, "upstream")
    assert usage.total_tokens == 46


def test_embeddings_shaped_usage_has_zero_completion_tokens() -> None:
    """A usage with only prompt_tokens is zero output for embeddings, unknown for chat (I3)."""
    assert usage_from_json({"prompt_tokens": 8, "total_tokens": 8}, has_output=False) == Usage(8, 0)
    assert usage_from_json({"prompt_tokens": 8, "total_tokens": 8}) is None
    assert usage_from_json({"prompt_tokens": 8, "completion_tokens": None}) is None


def test_count_at_the_maximum_is_accepted() -> None:
    """A count of exactly MAX_TOKENS_PER_REQUEST is still a sane count."""
    usage = usage_from_json({"prompt_tokens": MAX_TOKENS_PER_REQUEST, "completion_tokens": 0})
    assert usage is not None and usage.prompt_tokens == MAX_TOKENS_PER_REQUEST


BAD_COUNTS = [-1, "12", 12.0, 12.5, True, False, [12], {"n": 12}, MAX_TOKENS_PER_REQUEST + 1, 10**30]


@pytest.mark.parametrize(
    ("field", "bad"),
    [("prompt_tokens", b) for b in [*BAD_COUNTS, None]] + [("completion_tokens", b) for b in BAD_COUNTS],
)
def test_malformed_counts_give_no_usage(field: str, bad: Any) -> None:
    """A negative, string, float, bool or huge count makes the usage unknown, never 0 or negative."""
    obj: dict[str, Any] = {"prompt_tokens": 10, "completion_tokens": 5}
    obj[field] = bad
    assert usage_from_json(obj) is None


def test_missing_prompt_count_gives_no_usage() -> None:
    """Without prompt_tokens the usage is unknown."""
    assert usage_from_json({"completion_tokens": 5, "total_tokens": 5}) is None


@pytest.mark.parametrize("obj", [None, [], "usage", 7, {}])
def test_non_objects_give_no_usage(obj: Any) -> None:
    """A missing or non-object `usage` gives None."""
    assert usage_from_json(obj) is None


def test_cached_tokens_from_prompt_tokens_details() -> None:
    """prompt_tokens_details.cached_tokens is read as the cached count."""
    usage = usage_from_json(
        {"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 60}}
    )
    assert usage is not None and usage.cached_tokens == 60


def test_cached_tokens_directly_in_usage() -> None:
    """cached_tokens directly in usage (some together.ai models) is read too."""
    usage = usage_from_json({"prompt_tokens": 100, "completion_tokens": 5, "cached_tokens": 40})
    assert usage is not None and usage.cached_tokens == 40


def test_cached_tokens_are_capped_at_the_prompt() -> None:
    """A cached count larger than the prompt is capped at the prompt count."""
    usage = usage_from_json({"prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 40})
    assert usage is not None and usage.cached_tokens == 10


def test_malformed_cached_count_is_dropped_not_the_usage() -> None:
    """A malformed cached count leaves cached_tokens unknown but keeps the prompt/completion usage."""
    usage = usage_from_json(
        {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": -3}}
    )
    assert usage == Usage(10, 5, "upstream", None, None)


def test_reasoning_tokens_are_read() -> None:
    """completion_tokens_details.reasoning_tokens is read as the reasoning count."""
    usage = usage_from_json(
        {"prompt_tokens": 10, "completion_tokens": 50, "completion_tokens_details": {"reasoning_tokens": 30}}
    )
    assert usage is not None and usage.reasoning_tokens == 30


def test_details_win_over_a_flat_cached_count() -> None:
    """Both shapes in one usage: prompt_tokens_details.cached_tokens is taken (the OpenAI shape)."""
    usage = usage_from_json(
        {
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "cached_tokens": 90,
            "prompt_tokens_details": {"cached_tokens": 60},
        }
    )
    assert usage is not None and usage.cached_tokens == 60


def test_null_details_fall_back_to_the_flat_count() -> None:
    """prompt_tokens_details with a null cached count: the flat `cached_tokens` is read instead."""
    usage = usage_from_json(
        {
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "cached_tokens": 40,
            "prompt_tokens_details": {"cached_tokens": None},
        }
    )
    assert usage is not None and usage.cached_tokens == 40


def test_reasoning_tokens_stay_inside_the_completion_count() -> None:
    """Reasoning tokens are a part of completion_tokens: the token counts are not changed by them."""
    usage = usage_from_json(
        {
            "prompt_tokens": 10,
            "completion_tokens": 50,
            "total_tokens": 60,
            "completion_tokens_details": {"reasoning_tokens": 30},
        }
    )
    assert usage == Usage(10, 50, "upstream", None, 30) and usage.total_tokens == 60


# -- token estimation ---------------------------------------------------------------------------


def test_tokenizer_loads_the_offline_encoding(tok: Tokenizer) -> None:
    """Tokenizer.load uses tiktoken's offline cl100k encoding, not the bytes/4 fallback."""
    assert tok.name != "bytes/4"
    assert tok.count("hello world") == 2


@pytest.mark.parametrize("text", ["", "a", "abcd", "abcde", "héllo wörld", "日本語のテキスト", "x" * 4001])
def test_tokenizer_without_encoding_counts_bytes_over_four(text: str) -> None:
    """With no encoding, a text counts as its UTF-8 byte length / 4, rounded up."""
    counter = Tokenizer()
    assert counter.name == "bytes/4"
    assert counter.count(text) == math.ceil(len(text.encode("utf-8")) / 4)


def test_chat_estimate_with_string_content(tok: Tokenizer) -> None:
    """Chat estimate = each message's content tokens plus a per-message overhead."""
    system, user = "You are a terse assistant.", "How many tokens is this sentence?"
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    expected = tok.count(system) + tok.count(user) + 2 * PER_MESSAGE_OVERHEAD
    assert estimate_prompt_tokens("chat", body, tok) == expected


def test_chat_estimate_with_list_of_parts_content(tok: Tokenizer) -> None:
    """Text parts of list content are counted; non-text parts add nothing."""
    parts = [
        {"type": "text", "text": "Describe this picture"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "text", "text": "in one line."},
    ]
    body = {"messages": [{"role": "user", "content": parts}]}
    expected = tok.count("Describe this picture") + tok.count("in one line.") + PER_MESSAGE_OVERHEAD
    assert estimate_prompt_tokens("chat", body, tok) == expected


def test_chat_estimate_counts_tool_call_arguments(tok: Tokenizer) -> None:
    """Assistant tool calls in the history count their name and arguments."""
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    body = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    expected = tok.count("get_weather") + tok.count('{"city": "Paris"}') + PER_MESSAGE_OVERHEAD
    assert estimate_prompt_tokens("chat", body, tok) == expected


def test_completions_estimate_with_string_and_list_prompt(tok: Tokenizer) -> None:
    """A completions prompt counts as its text, or the sum of its texts when a list."""
    prompts = ["Once upon a time", "there was a meter that counted everything"]
    assert estimate_prompt_tokens("completions", {"prompt": prompts[0]}, tok) == tok.count(prompts[0])
    assert estimate_prompt_tokens("completions", {"prompt": prompts}, tok) == sum(map(tok.count, prompts))


def test_embeddings_estimate_for_str_list_and_token_ids(tok: Tokenizer) -> None:
    """Embedding input counts as text tokens, summed over a list, or one per pre-tokenized id."""
    texts = ["the quick brown fox", "jumps over the lazy dog again and again"]
    assert estimate_prompt_tokens("embeddings", {"input": texts[0]}, tok) == tok.count(texts[0])
    assert estimate_prompt_tokens("embeddings", {"input": texts}, tok) == sum(map(tok.count, texts))
    assert estimate_prompt_tokens("embeddings", {"input": [101, 2023, 2003, 102]}, tok) == 4
    assert estimate_prompt_tokens("embeddings", {"input": [[1, 2, 3], [4, 5]]}, tok) == 5


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("chat", {"messages": []}),
        ("chat", {}),
        ("completions", {"prompt": ""}),
        ("embeddings", {"input": None}),
    ],
)
def test_estimate_is_never_zero(endpoint: str, body: dict[str, Any], tok: Tokenizer) -> None:
    """An estimate is at least one token: unknown usage is never recorded as zero."""
    assert estimate_prompt_tokens(endpoint, body, tok) >= 1


# -- completion_text ----------------------------------------------------------------------------


def test_together_chunk_with_text_and_delta_counts_once() -> None:
    """A together.ai chunk repeating the word in choices[].text and delta.content counts it once."""
    chunk = {"choices": [{"index": 0, "text": "Hello", "delta": {"role": "assistant", "content": "Hello"}}]}
    assert completion_text(chunk) == "Hello"


def test_completion_text_of_legacy_completions_chunk() -> None:
    """A /v1/completions chunk carries its text in choices[].text."""
    assert completion_text({"choices": [{"index": 0, "text": " world"}]}) == " world"


def test_completion_text_of_a_whole_response() -> None:
    """A non-streaming chat response carries its text in choices[].message.content."""
    body = {"choices": [{"message": {"role": "assistant", "content": "Hi there"}}]}
    assert completion_text(body) == "Hi there"


def test_completion_text_includes_reasoning_and_tool_arguments() -> None:
    """Reasoning text and tool-call name/arguments are generated output too."""
    chunk = {
        "choices": [
            {
                "delta": {
                    "reasoning": "think ",
                    "content": "answer",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                }
            }
        ]
    }
    out = completion_text(chunk)
    for piece in ("think ", "answer", "f", "{}"):
        assert piece in out
    assert len(out) == len("think answerf{}")


# -- StreamMeter --------------------------------------------------------------------------------

WORDS = ["Hel", "lo", ",", " wor", "ld"]


def ev(payload: Any, event: str | None = None) -> Event:
    """One SSE event carrying `payload` (JSON-encoded unless bytes)."""
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return parse_event(head + b"data: " + data)


def chunk(word: str | None, *, usage: Any = "absent", finish: str | None = None) -> dict[str, Any]:
    """A together.ai-style chat chunk (text repeated in `text` and `delta.content`)."""
    choice: dict[str, Any] = {
        "index": 0,
        "text": word or "",
        "delta": {"content": word},
        "finish_reason": finish,
    }
    out: dict[str, Any] = {"id": "up-1", "object": "chat.completion.chunk", "choices": [choice]}
    if usage != "absent":
        out["usage"] = usage
    return out


def usage_only(prompt: int, completion: int) -> dict[str, Any]:
    """The OpenAI-style trailing chunk: no choices, only usage."""
    return {
        "id": "up-1",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def u(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


DONE = parse_event(b"data: [DONE]")


def test_usage_on_the_finish_chunk() -> None:
    """Usage carried by the finish chunk is recorded and the chunk is relayed."""
    events = [ev(chunk(w)) for w in WORDS] + [ev(chunk(None, finish="stop", usage=u(9, 5))), DONE]
    meter = StreamMeter(hide_usage_chunk=True)
    out = meter.feed(events)
    assert meter.usage == Usage(9, 5)
    assert meter.upstream_id == "up-1"
    assert out == b"".join(e.raw for e in events[:-1])
    assert meter.done


@pytest.mark.parametrize("hide", [True, False])
def test_trailing_usage_only_chunk(hide: bool) -> None:
    """A trailing usage-only chunk is recorded; it is relayed only if the client asked for usage."""
    content = [ev(chunk(w)) for w in WORDS] + [ev(chunk(None, finish="stop"))]
    trailer = ev(usage_only(9, 5))
    meter = StreamMeter(hide_usage_chunk=hide)
    out = meter.feed([*content, trailer, DONE])
    assert meter.usage == Usage(9, 5)
    relayed = b"".join(e.raw for e in content)
    assert out == (relayed if hide else relayed + trailer.raw)


@pytest.mark.parametrize(
    "cached",
    [{"prompt_tokens_details": {"cached_tokens": 6}}, {"cached_tokens": 6}],
    ids=["details", "flat"],
)
def test_cached_and_reasoning_counts_on_a_streamed_usage(cached: dict[str, Any]) -> None:
    """together's finish chunk with cached (either shape) and reasoning counts: all are recorded."""
    usage = {**u(9, 5), **cached, "completion_tokens_details": {"reasoning_tokens": 2}}
    events = [ev(chunk(w)) for w in WORDS] + [ev(chunk(None, finish="stop", usage=usage)), DONE]
    meter = StreamMeter(hide_usage_chunk=True)
    meter.feed(events)
    assert meter.usage == Usage(9, 5, "upstream", 6, 2)


def test_cumulative_usage_takes_the_last_never_the_sum() -> None:
    """With cumulative usage on every chunk, the last chunk's usage is recorded, not the sum."""
    events = [ev(chunk(w, usage=u(9, i + 1))) for i, w in enumerate(WORDS)]
    meter = StreamMeter(hide_usage_chunk=True)
    out = meter.feed(events)
    assert meter.usage == Usage(9, len(WORDS))
    assert out == b"".join(e.raw for e in events)


def test_cumulative_usage_over_several_reads() -> None:
    """Usage seen across several feed calls is still the last one."""
    meter = StreamMeter(hide_usage_chunk=False)
    for i, w in enumerate(WORDS):
        meter.feed([ev(chunk(w, usage=u(9, i + 1)))])
    meter.feed([ev(usage_only(9, 7))])
    assert meter.usage == Usage(9, 7)


def test_stream_without_usage_keeps_its_text() -> None:
    """Without any usage, usage stays None and received_text returns the streamed text once."""
    events = [ev(chunk(w)) for w in WORDS] + [ev(chunk(None, finish="stop"))]
    meter = StreamMeter(hide_usage_chunk=True)
    out = meter.feed(events[:2]) + meter.feed(events[2:])
    assert meter.usage is None
    assert out == b"".join(e.raw for e in events)
    assert meter.received_text() == ("".join(WORDS), 0)


def test_null_usage_is_not_taken_as_usage() -> None:
    """Chunks with `"usage": null` (even with no choices) are relayed as content, usage unknown."""
    events = [ev(chunk(w, usage=None)) for w in WORDS] + [ev({"id": "up-1", "choices": [], "usage": None})]
    meter = StreamMeter(hide_usage_chunk=True)
    out = meter.feed(events)
    assert meter.usage is None
    assert out == b"".join(e.raw for e in events)
    assert meter.received_text()[0] == "".join(WORDS)


def test_malformed_usage_is_not_taken() -> None:
    """A usage object with a negative count leaves usage unknown rather than pricing it."""
    meter = StreamMeter(hide_usage_chunk=True)
    meter.feed([ev(chunk("Hi", usage=u(-1, 5)))])
    assert meter.usage is None


def test_unparseable_chunk_counts_by_size() -> None:
    """A relayed chunk that is not JSON still counts in the estimate: half its bytes as extra."""
    broken = orjson.dumps(chunk("Hi", usage=u(9, 2)))[:-9]
    meter = StreamMeter(hide_usage_chunk=True)
    out = meter.feed([ev(chunk(w)) for w in WORDS] + [ev(broken)])
    assert meter.usage is None and out.endswith(broken + b"\n\n")
    assert meter.received_text() == ("".join(WORDS), len(broken) // 2)


def test_done_is_not_relayed_and_ends_the_stream() -> None:
    """[DONE] sets done, is never in the returned bytes, and nothing after it is relayed."""
    first = ev(chunk("Hi"))
    meter = StreamMeter(hide_usage_chunk=False)
    out = meter.feed([first, DONE, ev(chunk("late"))])
    assert meter.done
    assert out == first.raw
    assert b"[DONE]" not in out
    assert meter.feed([ev(chunk("later"))]) == b""


def test_comments_pass_through() -> None:
    """Keep-alive comments are relayed unchanged and are not content."""
    ping = parse_event(b": ping")
    meter = StreamMeter(hide_usage_chunk=True)
    assert meter.feed([ping]) == ping.raw
    assert not meter.saw_content


@pytest.mark.parametrize(
    "error",
    [
        ev({"message": "overloaded", "type": "server_error"}, event="error"),
        ev({"error": {"message": "overloaded", "type": "server_error"}}),
    ],
)
def test_error_event_is_flagged_and_relayed(error: Event) -> None:
    """An error event (event: error, or an {"error": ...} payload) sets error_event and is relayed."""
    first = ev(chunk("Hi"))
    meter = StreamMeter(hide_usage_chunk=True)
    out = meter.feed([first, error])
    assert meter.error_event
    assert out == first.raw + error.raw
    assert not meter.done


# -- StreamMeter.feed_block: the relay's path gives what feed gives, event by event ------------

_PLAIN = [
    orjson.dumps(chunk("Hel", usage=None)),
    b'{"id": "up-1", "choices": [{"delta": {"content": "lo"}}], "usage": null}',  # spaced JSON
    orjson.dumps(chunk(" wor")),  # no usage key
    b'{"id":"up-1","choices":[{"delta":{"content":"usage"}}],"usage":null}',
]
_OTHER = [
    orjson.dumps(chunk("ld", finish="stop", usage=u(9, 5))),
    orjson.dumps(usage_only(9, 7)),
    orjson.dumps({"id": "up-1", "choices": [], "usage": None}),
    b'{"a":"usage","b":{"choices":[]},"choices":[]}',  # "usage" as a value, an object after it
    b'{"id":"x","usage" :{"prompt_tokens":1,"completion_tokens":2}}',
    orjson.dumps({"error": {"message": "overloaded"}}),
    b"[DONE]",
    b"not json {",
    b'{"usage":{"prompt_tokens":-1,"completion_tokens":2},"choices":[]}',
]
_event_text = st.one_of(
    st.sampled_from(_PLAIN).map(lambda d: b"data: " + d + b"\n\n"),
    st.sampled_from(_PLAIN + _OTHER).map(lambda d: b"data: " + d + b"\n\n"),
    st.sampled_from(_PLAIN).map(lambda d: b"data:" + d + b"\n\n"),
    st.sampled_from(_PLAIN).map(lambda d: b"event: error\ndata: " + d + b"\n\n"),
    st.sampled_from(_PLAIN).map(lambda d: b"data: " + d[:9] + b"\ndata: " + d[9:] + b"\n\n"),
    st.just(b": ping\n\n"),
    st.just(b"\n"),  # an extra blank line
)
_blocks = st.lists(st.lists(_event_text, min_size=1, max_size=5).map(b"".join), max_size=8)


@settings(max_examples=400, deadline=None)
@given(_blocks, st.booleans(), st.booleans(), st.sampled_from([0, 150, 700, 1 << 20]))
def test_feed_block_is_feed_event_by_event(
    blocks: list[bytes], hide: bool, priced: bool, keep_bytes: int
) -> None:
    """Whatever the blocks hold (plain content, usage in any shape, [DONE], errors, comments,
    extra blank lines) and however little text may be kept, feed_block relays the same bytes and
    ends in the same state, estimate included, as feeding the same events one by one."""
    price = (lambda us: "0.000001") if priced else None
    fast, slow = StreamMeter(hide, price), StreamMeter(hide, price)
    saved, streaming.KEEP_TEXT_BYTES = streaming.KEEP_TEXT_BYTES, keep_bytes
    try:
        for block in blocks:
            assert fast.feed_block(block) == slow.feed(events_of(block))
        if slow.usage is None:  # the estimate is made (and what was kept read) only then
            assert fast.received_text() == slow.received_text()
    finally:
        streaming.KEEP_TEXT_BYTES = saved
    state = ("usage", "upstream_id", "done", "error_event", "saw_content")
    assert [getattr(fast, a) for a in state] == [getattr(slow, a) for a in state]


def test_plain_content_blocks_are_relayed_as_they_came() -> None:
    """A block of content chunks without usage objects is passed on as the same bytes object."""
    block = b"".join(b"data: " + orjson.dumps(chunk(w, usage=None)) + b"\n\n" for w in WORDS)
    meter = StreamMeter(hide_usage_chunk=True)
    assert meter.feed_block(block) is block
    assert meter.saw_content and meter.usage is None
    assert meter.received_text() == ("".join(WORDS), 0)
