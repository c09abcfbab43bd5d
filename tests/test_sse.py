"""proxy/core/sse.py: the incremental SSE framer gives the same events however the bytes are split."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.sse import Event, SSEError, SSEFramer, events_of


def frame(*chunks: bytes, max_event_bytes: int | None = None) -> list[Event]:
    """All events a fresh framer yields for these reads, in order."""
    framer = SSEFramer() if max_event_bytes is None else SSEFramer(max_event_bytes)
    events: list[Event] = []
    for chunk in chunks:
        events.extend(framer.feed(chunk))
    events.extend(framer.close())
    return events


def datas(events: list[Event]) -> list[bytes | None]:
    return [e.data for e in events]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


# -- strategies: streams of well-formed SSE events ---------------------------------------------

line_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12
).map(lambda s: s.encode("utf-8"))
field_line = st.one_of(
    line_text.map(lambda v: b"data: " + v),
    line_text.map(lambda v: b"data:" + v),
    line_text.map(lambda v: b":" + v),  # comment
    line_text.map(lambda v: b"event: " + v),
    st.just(b"id: 7"),
    st.just(b"data: [DONE]"),
)
event_blocks = st.lists(field_line, min_size=1, max_size=4)


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[list[list[bytes]], bytes]:
    """(the events as lists of lines, the stream text with a random line ending per line)."""
    blocks = draw(st.lists(event_blocks, max_size=6))
    out = b""

    def eol() -> bytes:
        # a lone CR followed by a lone LF would be one CRLF line end, not two
        choice = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
        return b"\r\n" if choice == b"\n" and out.endswith(b"\r") else choice

    for block in blocks:
        for line in block:
            out += line
            out += eol()
        out += eol()
        for _ in range(draw(st.integers(0, 2))):  # extra blank lines between events
            out += eol()
    return blocks, out


@settings(max_examples=300, deadline=None)
@given(sse_streams(), st.data())
def test_any_split_yields_the_same_events(
    stream: tuple[list[list[bytes]], bytes], data: st.DataObject
) -> None:
    """Splitting a stream into chunks at any bytes yields exactly the events of feeding it whole."""
    _, text = stream
    whole = frame(text)
    cuts = data.draw(st.lists(st.integers(0, max(len(text), 0)), max_size=12))
    assert frame(*split_at(text, cuts)) == whole


@settings(max_examples=300, deadline=None)
@given(sse_streams(), st.data())
def test_take_hands_on_every_byte_once_in_whole_events(
    stream: tuple[list[list[bytes]], bytes], data: st.DataObject
) -> None:
    """`take` (the relay's path) returns only whole events; its blocks and what is still pending
    are the stream with LF endings, byte for byte, and hold exactly the events `feed` yields."""
    _, text = stream
    cuts = data.draw(st.lists(st.integers(0, max(len(text), 0)), max_size=12))
    framer = SSEFramer()
    blocks = [framer.take(chunk) for chunk in split_at(text, cuts)]
    assert all(b == b"" or b.endswith(b"\n\n") for b in blocks)
    joined = b"".join(blocks)
    lf = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    assert lf.startswith(joined) and len(lf) - len(joined) == framer.pending
    assert events_of(joined) == frame(text)


def test_take_returns_the_read_itself_when_it_ends_on_an_event() -> None:
    """A read of whole events is handed on as the same bytes object (no copy per chunk)."""
    chunk = b"data: a\n\ndata: b\n\n"
    assert SSEFramer().take(chunk) is chunk


def test_an_odd_run_of_blank_lines_leaves_one_lf_pending() -> None:
    """Blank lines are consumed in pairs, as event by event: an odd run leaves one LF pending."""
    for text, pending in ((b"data: a\n\n\n", 1), (b"data: a\n\n\n\n", 0), (b"data: a\n\n\n\n\n", 1)):
        framer = SSEFramer()
        assert framer.take(text) == text[: len(text) - pending]
        assert framer.pending == pending


@settings(max_examples=100, deadline=None)
@given(sse_streams())
def test_one_byte_reads_yield_the_same_events(stream: tuple[list[list[bytes]], bytes]) -> None:
    """Feeding one byte at a time yields exactly the events of feeding the stream whole."""
    _, text = stream
    assert frame(*(text[i : i + 1] for i in range(len(text)))) == frame(text)


@settings(max_examples=200, deadline=None)
@given(sse_streams())
def test_every_written_event_comes_out_once(stream: tuple[list[list[bytes]], bytes]) -> None:
    """Each event written yields one Event whose raw bytes are its lines with LF endings."""
    blocks, text = stream
    assert [e.raw for e in frame(text)] == [b"\n".join(b) + b"\n\n" for b in blocks]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings_give_the_same_events(eol: bytes) -> None:
    """LF, CRLF and CR line endings give identical events."""
    text = (
        b"event: message"
        + eol
        + b'data: {"a": 1}'
        + eol
        + eol
        + b": keep-alive"
        + eol
        + eol
        + b"data: [DONE]"
        + eol
        + eol
    )
    assert frame(text) == frame(text.replace(eol, b"\n"))
    assert datas(frame(text)) == [b'{"a": 1}', None, b"[DONE]"]


def test_crlf_split_between_reads_is_one_line_end() -> None:
    """A CR ending one read and the LF starting the next form one line end, not an empty line."""
    events = frame(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
    assert datas(events) == [b"a\nb"]


def test_cr_cr_split_between_reads_ends_the_event() -> None:
    """A CR ending one read and a CR starting the next are two line ends: the event ends."""
    assert datas(frame(b"data: a\r", b"\rdata: b\r\r")) == [b"a", b"b"]


def test_empty_read_between_cr_and_lf_changes_nothing() -> None:
    """An empty read between a CR and its LF does not turn the CRLF into two line ends."""
    assert datas(frame(b"data: a\r", b"", b"\ndata: b\r\n\r\n")) == [b"a\nb"]


def test_data_without_space() -> None:
    """`data:x` is the value 'x'; only one leading space is stripped from `data:  x`."""
    assert datas(frame(b"data:x\n\ndata:  y\n\n")) == [b"x", b" y"]


def test_comments_are_events_without_data() -> None:
    """A comment-only block yields an event with no data; a comment inside an event is ignored."""
    events = frame(b": ping\n\ndata: a\n: note\ndata: b\n\n")
    assert datas(events) == [None, b"a\nb"]
    assert events[0].raw == b": ping\n\n"


def test_multi_line_data_is_joined_with_lf() -> None:
    """Several data lines in one event join with LF."""
    assert datas(frame(b"data: one\ndata: two\ndata:\ndata: four\n\n")) == [b"one\ntwo\n\nfour"]


def test_field_name_without_colon_has_empty_value() -> None:
    """A bare `data` line is an empty data line and a bare `event` an empty event name (SSE rules;
    found by tests/fuzz/fuzz_sse.py); `datax` and `data :` are other fields, ignored."""
    events = frame(b"data\n\ndata\ndata: x\n\nevent\ndata: y\n\ndatax\ndata :z\n\n")
    assert [(e.data, e.event) for e in events] == [(b"", None), (b"\nx", None), (b"y", b""), (None, None)]


def test_event_field_is_parsed() -> None:
    """The `event:` field is exposed separately from data."""
    (ev,) = frame(b"event: error\ndata: {}\n\n")
    assert (ev.event, ev.data) == (b"error", b"{}")


def test_blank_lines_between_events_are_ignored() -> None:
    """Extra blank lines between events yield no extra events."""
    assert datas(frame(b"\n\ndata: a\n\n\n\n\ndata: b\n\n\n")) == [b"a", b"b"]


def test_done_marker_is_recognised() -> None:
    """`data: [DONE]` is flagged is_done; other data is not."""
    events = frame(b"data: [DONE]\n\ndata: [DONE]x\n\n")
    assert [e.is_done for e in events] == [True, False]


def test_unterminated_trailing_event_is_not_emitted() -> None:
    """An event without its blank line at end of stream is dropped, not emitted."""
    framer = SSEFramer()
    assert datas(framer.feed(b"data: a\n\ndata: partial\n")) == [b"a"]
    assert framer.pending > 0
    assert framer.close() == []
    assert framer.pending == 0


def test_event_larger_than_the_bound_raises() -> None:
    """An event growing past max_event_bytes across reads raises SSEError."""
    framer = SSEFramer(max_event_bytes=1024)
    framer.feed(b"data: ")
    with pytest.raises(SSEError):
        for _ in range(200):
            framer.feed(b"x" * 100)
    # the framer gave up early, not after buffering the whole stream
    assert framer.pending <= 1024 + 100


def test_events_within_the_bound_pass() -> None:
    """Many events each smaller than max_event_bytes pass however long the stream."""
    event = b"data: " + b"x" * 1000 + b"\n\n"
    events = frame(*([event] * 50), max_event_bytes=1024)
    assert len(events) == 50
