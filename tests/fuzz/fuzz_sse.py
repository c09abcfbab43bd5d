"""Fuzz target: the SSE framer (proxy/core/sse.py) on arbitrary bytes in arbitrary splits.

Input layout: byte 0 picks the split (0: one read, 1: one byte per read, else up to 16 cuts from
a seeded RNG), byte 1 the event-size bound (1 + 8 x byte), the rest is the stream. Properties:
  - `feed` raises nothing but `SSEError`, the documented bound on the bytes of a pending event;
  - unbounded, every split yields exactly the events of a line-by-line reading of the SSE rules;
  - bounded, the framer raises exactly at the first read after which more than the bound is
    pending, and yields the same events as the unbounded framer up to there.
`make fuzz` runs it under atheris; tests/fuzz/test_corpus.py replays corpus/sse/ through `check`.
"""

from __future__ import annotations

import itertools
import random
import re
import sys

from proxy.core.sse import SSEError, SSEFramer

UNBOUNDED = 1 << 40
EventTuple = tuple[bytes, bytes | None, bytes | None]
LINE_END = re.compile(rb"\r\n|\r|\n")


def decode(data: bytes) -> tuple[list[bytes], int]:
    """(the stream split into reads, the event-size bound) from one fuzz input."""
    if len(data) < 2:
        return [data] if data else [], UNBOUNDED
    mode, bound, stream = data[0], 1 + 8 * data[1], data[2:]
    if mode == 0 or not stream:
        return [stream] if stream else [], bound
    if mode == 1:
        return [stream[i : i + 1] for i in range(len(stream))], bound
    rng = random.Random(mode * 1_000_003 + len(stream))
    cuts = sorted({rng.randrange(len(stream) + 1) for _ in range(mode % 16 + 1)} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(cuts)], bound


def reference_events(stream: bytes) -> list[EventTuple]:
    """(raw, data, event) of each complete event, read line by line per the SSE rules."""
    *lines, _unterminated = LINE_END.split(stream)
    events: list[EventTuple] = []
    block: list[bytes] = []
    for line in lines:
        if line:
            block.append(line)
        elif block:
            events.append(_event(block))
            block = []
    return events


def _event(block: list[bytes]) -> EventTuple:
    data: list[bytes] = []
    name: bytes | None = None
    for line in block:
        if line.startswith(b":"):
            continue  # a comment
        field, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    return b"\n".join(block) + b"\n\n", b"\n".join(data) if data else None, name


def check(data: bytes) -> None:
    """One fuzz input: raises AssertionError (or whatever the framer leaks) on a broken property."""
    reads, bound = decode(data)
    stream = b"".join(reads)
    expected = reference_events(stream)
    framer = SSEFramer(UNBOUNDED)
    got: list[EventTuple] = []
    pending_after: list[int] = []  # per read: bytes not yet forming an event
    events_after: list[int] = []  # per read: events yielded so far
    for chunk in reads:
        got.extend((e.raw, e.data, e.event) for e in framer.feed(chunk))
        pending_after.append(framer.pending)
        events_after.append(len(got))
    assert framer.close() == [] and framer.pending == 0
    assert got == expected, (got, expected)
    whole = SSEFramer(UNBOUNDED)
    assert [(e.raw, e.data, e.event) for e in whole.feed(stream)] == expected

    bounded = SSEFramer(bound)
    before: list[EventTuple] = []
    for i, chunk in enumerate(reads):
        try:
            before.extend((e.raw, e.data, e.event) for e in bounded.feed(chunk))
        except SSEError:
            assert pending_after[i] > bound, (i, pending_after[i], bound)
            assert before == got[: events_after[i - 1] if i else 0]
            return
        assert pending_after[i] <= bound, (i, pending_after[i], bound)
    assert before == got


if __name__ == "__main__":
    from atheris_main import fuzz

    import proxy.core.sse

    fuzz(check, [proxy.core.sse, sys.modules[__name__]])
