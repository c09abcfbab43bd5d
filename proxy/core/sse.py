"""Incremental server-sent-events framer: bytes in any split -> whole events out.

Follows the SSE rules: lines end in CRLF, LF or CR; an empty line ends an event; `data:` with or
without one space (a bare `data` line is an empty data line); lines starting with ':' are
comments. Events are re-emitted with LF endings (the same events to any SSE parser), which
keeps the relay free to drop or insert whole events.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024


class SSEError(ValueError):
    """The stream is not SSE we can frame (an event larger than the bound)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event: its bytes as relayed (LF endings, ends in a blank line) and its fields."""

    raw: bytes
    data: bytes | None  # the data field's lines joined by LF; None if the event has no data
    event: bytes | None = None  # the `event:` field if any

    @property
    def is_done(self) -> bool:
        return self.data == b"[DONE]"


def parse_event(block: bytes) -> Event:
    """Fields of one event block (LF line endings, without the terminating blank line)."""
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


class SSEFramer:
    """Feed bytes as they arrive; get back the events they complete."""

    __slots__ = ("_buf", "_max", "_pending_cr")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._buf = b""
        self._max = max_event_bytes
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[Event]:
        if not chunk:
            return []
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
        events: list[Event] = []
        start = 0
        scan = max(0, old - 1)  # the old buffer held no terminator: search only the new part
        while True:
            end = buf.find(b"\n\n", scan)
            if end < 0:
                break
            # extra blank lines between events end nothing: strip them from the block
            block = buf[start:end].lstrip(b"\n")
            if block:
                events.append(parse_event(block))
            start = scan = end + 2
        self._buf = buf[start:]
        if len(self._buf) > self._max:
            raise SSEError(f"an SSE event exceeds {self._max} bytes")
        return events

    def close(self) -> list[Event]:
        """End of stream: an unterminated trailing event is dropped, per the SSE rules."""
        self._buf = b""
        self._pending_cr = False
        return []

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole event."""
        return len(self._buf)
