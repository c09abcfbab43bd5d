"""Metering a relayed SSE stream: which events to pass on, and what usage they carried.

Usage may come on the finish chunk (together.ai), on a trailing usage-only chunk (OpenAI style,
when `stream_options.include_usage` is set), cumulatively on every chunk (take the last one,
never the sum), or not at all (then the caller estimates from the text the stream carried).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import orjson

from proxy.core.cost_body import event_with_cost
from proxy.core.sse import Event, events_of
from proxy.core.usage import Usage, completion_text, usage_from_json

KEEP_TEXT_BYTES = 1 << 20  # payloads kept for an estimate; beyond this only their size counts


def _has_usage_object(data: bytes) -> bool:
    """Cheap test for `"usage": {` so that chunks with `"usage": null` are never parsed."""
    i = data.find(b'"usage"')
    while i >= 0:
        j = data.find(b":", i + 7)
        if j < 0:
            return False
        rest = data[j + 1 : j + 3].lstrip()
        if rest.startswith(b"{"):
            return True
        i = data.find(b'"usage"', j)
    return False


def _only_plain_content(block: bytes) -> bool:
    """True when every event of `block` (SSEFramer.take) is one `data: {...}` line that `feed`
    would relay unchanged and keep for an estimate: no [DONE], no error, no usage object.
    Decided by a few byte counts, without splitting or parsing; anything else goes to `feed`."""
    if not (block.startswith(b"data: {") and block.endswith(b"\n\n")):
        return False
    events = block.count(b"\n\ndata: {") + 1  # those after the first, and the first
    # each event is one line and its blank line: every LF is in the pairs counted above and in
    # the block's final pair (so no extra blank lines, no other field or comment lines); data
    # starting `{` is never [DONE], and there are no `event:` lines to name an error
    if block.count(b"\n") != 2 * events or b'{"error"' in block:
        return False
    # every "usage" key is a null one (together sends `"usage":null` on each content chunk)
    keys = block.count(b'"usage"')
    if not keys:
        return True
    nulls = block.count(b'"usage":null')
    return keys == nulls or keys == nulls + block.count(b'"usage": null')


class StreamMeter:
    """Tracks one stream: events to relay, the last upstream usage, the end marker."""

    __slots__ = (
        "_dropped_bytes",
        "_kept",
        "_kept_bytes",
        "_pending",
        "_pending_bytes",
        "done",
        "error_event",
        "first_token_at",
        "hide_usage_chunk",
        "price",
        "saw_content",
        "upstream_id",
        "usage",
    )

    def __init__(self, hide_usage_chunk: bool, price: Callable[[Usage], str | None] | None = None) -> None:
        # we added include_usage for our own metering: the client did not ask for that chunk
        self.hide_usage_chunk = hide_usage_chunk
        self.price = price  # opted in to the cost in the body: usage -> cost text (or None)
        self.usage: Usage | None = None
        self.upstream_id: str | None = None
        self.done = False
        self.error_event = False
        self.saw_content = False
        self.first_token_at: float | None = None
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self._dropped_bytes = 0
        # what to keep, not yet split into `_kept`: (a block of plain events, True) from
        # feed_block, or (one event's data, False) from feed behind such blocks; in order
        self._pending: list[tuple[bytes, bool]] = []
        self._pending_bytes = 0

    def feed_block(self, block: bytes) -> bytes:
        """A block of whole events (SSEFramer.take); returns the bytes to relay, as `feed` does.

        The usual block, content chunks only, is relayed as it came and kept whole for an
        estimate (split into events only if one is ever needed): no per-event work per chunk.
        """
        if not block or self.done:
            return b""
        if _only_plain_content(block):
            self.saw_content = True
            if self.usage is None:  # _hold, inline: this runs once per read
                self._pending.append((block, True))
                self._pending_bytes += len(block)
                if self._pending_bytes > KEEP_TEXT_BYTES:
                    self._settle()
            return block
        return self.feed(events_of(block))

    def _hold(self, item: bytes, is_block: bool) -> None:
        self._pending.append((item, is_block))
        self._pending_bytes += len(item)
        if self._pending_bytes > KEEP_TEXT_BYTES:  # bounded: split what is held
            self._settle()

    def _settle(self) -> None:
        """Keep what is pending, in order, exactly as event-by-event keeping would have."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for item, is_block in pending:
            if not is_block:
                self._keep(item)
                continue
            for ev in events_of(item):
                self._keep(ev.data or b"")

    def feed(self, events: Iterable[Event]) -> bytes:
        """Observe events; return the bytes to relay (without [DONE], which the relay writes)."""
        out: list[bytes] = []
        for ev in events:
            if self.done:
                break  # nothing after [DONE] is part of the response
            data = ev.data
            if data is None:
                out.append(ev.raw)  # comments and keep-alives pass through
                continue
            if data == b"[DONE]":
                self.done = True
                break
            if ev.event == b"error" or data.startswith(b'{"error"'):
                self.error_event = True
                out.append(ev.raw)
                continue
            raw = ev.raw
            if _has_usage_object(data):
                shown = self._take_usage(ev)
                if shown is None:
                    continue  # the usage-only chunk the client did not ask for
                raw = shown
            self.saw_content = True
            out.append(raw)
            if self.usage is None:
                if self._pending:  # behind blocks not split yet: keep it in order, later
                    self._hold(data, False)
                else:
                    self._keep(data)
        return b"".join(out) if len(out) != 1 else out[0]

    def _take_usage(self, ev: Event) -> bytes | None:
        """Record the chunk's usage; the bytes to relay (with the cost when opted in), or None
        if the chunk should be hidden from the client."""
        try:
            obj = orjson.loads(ev.data or b"")
        except orjson.JSONDecodeError:
            return ev.raw
        if not isinstance(obj, dict):
            return ev.raw
        raw = ev.raw
        usage = usage_from_json(obj.get("usage"))
        if usage is not None:
            self.usage = usage
            self._kept.clear()  # no estimate now: what was kept for one (or held) goes
            self._pending.clear()
            self._pending_bytes = 0
            if isinstance(obj.get("id"), str):
                self.upstream_id = obj["id"]
            cost = self.price(usage) if self.price is not None and ev.event is None else None
            if cost is not None:
                raw = event_with_cost(obj, cost) or raw
        if self.hide_usage_chunk and obj.get("choices") == []:
            return None
        return raw

    def _keep(self, data: bytes) -> None:
        if self._kept_bytes + len(data) <= KEEP_TEXT_BYTES:
            self._kept.append(data)
            self._kept_bytes += len(data)
        else:
            self._dropped_bytes += len(data)

    def received_text(self) -> tuple[str, int]:
        """Generated text seen so far, and the byte size of payloads too many to keep or not JSON
        (for an estimate: what is kept is let go once the upstream's usage is seen)."""
        self._settle()
        parts = []
        unreadable = self._dropped_bytes
        for data in self._kept:
            try:
                parts.append(completion_text(orjson.loads(data)))
            except orjson.JSONDecodeError:
                unreadable += len(data)  # relayed all the same: count its size, never 0
        return "".join(parts), unreadable // 2  # JSON framing is about half a chunk
