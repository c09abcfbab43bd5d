"""Incremental server-sent-events framer: bytes in any split -> whole events out.

Follows the SSE rules: lines end in CRLF, LF or CR; an empty line ends an event; `data:` with or
without one space (a bare `data` line is an empty data line); lines starting with ':' are
comments. Events are re-emitted with LF endings (the same events to any SSE parser), which
keeps the relay free to drop or insert whole events.
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024


class SSEError(ValueError):
    """The stream is not SSE we can frame (an event larger than the bound)."""


class Event(NamedTuple):
    """One event: its bytes as relayed (LF endings, ends in a blank line) and its fields.

    A named tuple, not a frozen dataclass: a stream makes one per chunk, and a tuple is built
    several times faster.
    """

    raw: bytes
    data: bytes | None  # the data field's lines joined by LF; None if the event has no data
    event: bytes | None = None  # the `event:` field if any

    @property
    def is_done(self) -> bool:
        return self.data == b"[DONE]"


def parse_event(block: bytes) -> Event:
    """Fields of one event block (LF line endings, without the terminating blank line)."""
    if block.startswith(b"data:") and b"\n" not in block:  # the usual event: one data line
        value = block[5:]
        return Event(block + b"\n\n", value[1:] if value.startswith(b" ") else value)
    data: list[bytes] = []
    name: bytes | None = None
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            value = line[6:]
            name = value[1:] if value.startswith(b" ") else value
        elif line == b"data":  # a field without a colon has an empty value
            data.append(b"")
        elif line == b"event":
            name = b""
        # comments (':...'), id:, retry: and unknown fields are kept in raw only
    return Event(block + b"\n\n", b"\n".join(data) if data else None, name)


def events_of(block: bytes) -> list[Event]:
    """The events of a block of whole events (what `SSEFramer.take` returns), in order."""
    events: list[Event] = []
    start = 0
    while (end := block.find(b"\n\n", start)) >= 0:
        if block.startswith(b"data:", start) and block.find(b"\n", start, end) < 0:
            # one data line (the usual event): slice it out without splitting lines
            value = start + 6 if block[start + 5 : start + 6] == b" " else start + 5
            events.append(Event(block[start : end + 2], block[value:end]))
        else:
            # extra blank lines between events end nothing: strip them from the block
            piece = block[start:end].lstrip(b"\n")
            if piece:
                events.append(parse_event(piece))
        start = end + 2
    return events


class SSEFramer:
    """Feed bytes as they arrive; get back the events they complete (`feed`), or the same
    events as one block of bytes (`take`: the relay's path, which rarely needs them parsed)."""

    __slots__ = ("_buf", "_max", "_pending_cr")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._buf = b""
        self._max = max_event_bytes
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[Event]:
        return events_of(self.take(chunk))

    def take(self, chunk: bytes) -> bytes:
        """The whole events `chunk` completes, as one block: LF line endings, each event ending
        in a blank line (extra blank lines as received); b"" while no event is complete."""
        if not chunk:
            return b""
        if self._pending_cr:
            # a CR ended the previous read: it was a line end, and an LF right after belongs to it
            self._pending_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                self._pending_cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        old = len(self._buf)
        buf = self._buf + chunk if old else chunk
        # the old buffer held no terminator: search only the new part (and its last byte)
        end = buf.rfind(b"\n\n", max(0, old - 1))
        cut = 0 if end < 0 else end + 2
        if end > 0 and buf[end - 1] == 10:
            cut -= _odd_run(buf, end)
        block, self._buf = (buf, b"") if cut == len(buf) else (buf[:cut], buf[cut:])
        if len(self._buf) > self._max:
            raise SSEError(f"an SSE event exceeds {self._max} bytes")
        return block

    def close(self) -> list[Event]:
        """End of stream: an unterminated trailing event is dropped, per the SSE rules."""
        self._buf = b""
        self._pending_cr = False
        return []

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole event."""
        return len(self._buf)


def _odd_run(buf: bytes, end: int) -> int:
    """1 if the run of LFs ending with the pair at `end` is odd-sized, else 0: blank lines are
    consumed in pairs, so an odd run leaves its last LF for the next read (as event by event)."""
    start = end
    while start > 0 and buf[start - 1] == 10:
        start -= 1
    return (end + 2 - start) % 2
