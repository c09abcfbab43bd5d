"""The tokenizer, loaded on first need in a worker thread: never at start, never on the loop."""

from __future__ import annotations

import asyncio

from proxy.core.usage import Tokenizer


async def loaded(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with its encoding loaded (the first call loads it in a thread, ~0.15 s)."""
    if tokenizer.needs_loading:
        await asyncio.to_thread(tokenizer.load_now)
    return tokenizer
