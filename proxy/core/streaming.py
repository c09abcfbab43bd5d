"""Metering a relayed SSE stream: which events to pass on, and what usage they carried.

Usage may come on the finish chunk (together.ai), on a trailing usage-only chunk (OpenAI style,
when `stream_options.include_usage` is set), cumulatively on every chunk (take the last one,
never the sum), or not at all (then the caller estimates from the text the stream carried).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import orjson

from proxy.core.cost_body import event_with_cost
from proxy.core.sse import Event
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


class StreamMeter:
    """Tracks one stream: events to relay, the last upstream usage, the end marker."""

    __slots__ = (
        "_dropped_bytes",
        "_kept",
        "_kept_bytes",
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
            self._kept.clear()
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
        """Generated text seen so far, and the byte size of payloads too many to keep or not JSON."""
        parts = []
        unreadable = self._dropped_bytes
        for data in self._kept:
            try:
                parts.append(completion_text(orjson.loads(data)))
            except orjson.JSONDecodeError:
                unreadable += len(data)  # relayed all the same: count its size, never 0
        return "".join(parts), unreadable // 2  # JSON framing is about half a chunk
