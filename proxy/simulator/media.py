"""together.ai's media routes in the simulator: rerank, images, audio and videos, in together's wire
format (openapi.yaml, SDKs together 1.x and 3.x, npm together-ai), each 200 answer billed once.

Routes and what an answer carries:

- `POST /v1/rerank` {model, query, documents (strings or objects), top_n, return_documents,
  rank_fields}: `{id, object: "rerank", model, results: [{index, relevance_score[, document:
  {text}]}], usage}`; an object document's text is its compact JSON (only `rank_fields` when
  given). usage.prompt_tokens = the tokenizer's count of the query plus each document's text
  (each piece apart), completion_tokens 0. Billed as tokens, like embeddings.
- `POST /v1/images/generations` {model, prompt, n 1-4, width, height (16-2048, default 1024),
  steps (1-50, default the model's), response_format url|base64 (the openai SDK's b64_json too;
  default url)}: `{id, model, object: "list", data: [{index, type: "url", url} | {index, type:
  "b64_json", b64_json}]}`. The image is a real PNG of exactly width x height (whatever
  `output_format`: the simulator writes no JPEG); a url points at the simulator itself
  (`/_sim/images/...`, no auth, like a presigned URL). `size` (the openai SDK's) and
  `aspect_ratio` are not together's size parameters and are ignored: the image is width x height.
- `POST /v1/audio/speech` {model, input, voice, response_format mp3|wav|raw (default wav; raw
  when streaming), response_encoding, sample_rate, bit_rate, stream}: the audio, 80 ms per
  character of input, silent. wav: a RIFF/WAVE file (16-bit PCM) with exact chunk sizes; raw: bare
  PCM in `response_encoding` (default pcm_f32le); mp3: constant-bitrate MPEG Layer III frames
  (`bit_rate`, default 128000; a sample rate MP3 lacks falls back to 44100, a bit rate its MPEG
  version lacks to 128000). Kokoro and Orpheus
  always answer 24000 Hz pcm_s16le (as together documents); Cartesia takes `sample_rate` (default
  44100). Content-Type audio/wav, audio/mpeg or application/octet-stream; no header names the
  rate or the encoding (together documents none). `stream: true`: server-sent events, one per
  half second of raw PCM, `data: {"object": "audio.tts.chunk", "model", "b64"}` (openapi.yaml and
  every SDK's type), then `data: [DONE]`; a streamed format other than raw is a 400.
- `POST /v1/audio/transcriptions`, `/v1/audio/translations` (multipart: file, model default
  openai/whisper-large-v3, language, prompt, response_format json|verbose_json,
  timestamp_granularities or timestamp_granularities[], temperature): `{text}` or verbose_json
  `{task, language, duration, text, segments[, words]}`. Other response formats (text, srt, vtt)
  are a 400, as in together's enum; a URL in `file` is a 400 (the simulator fetches nothing);
  audio over 4 hours is a 400 `audio_too_long`. The seconds sent are read from the upload: a WAV's
  RIFF chunks (exact), an MP3's frame headers (exact for its frames), a FLAC's STREAMINFO (exact);
  anything else is estimated at 128 kbit/s (bytes x 8 / 128000). The entry says which
  (`duration_from`).
- `POST /v2/videos` {model, prompt, seconds (string or number, default the model's), width +
  height (else the model's size), ...}: a VideoJob `{id, object: "video", model, status:
  "in_progress", created_at, size, seconds}`. `GET /v2/videos/{id}`: the job; once
  `video_delay_ms` (option, or `simulate.video_delay_ms` in the create body) has passed it is
  `completed` with `completed_at` and `outputs: {cost, video_url}`, and billed then, once.
  `simulate.fail: true` makes it end `failed` with `error: {code, message}`, never billed.

`outputs.cost`: together documents an integer "cost charged to the owner's account" with no unit
(the 1.x SDK types it float). The simulator writes the job's bill in whole US cents, rounded half
up, and 0 for an unpriced model: a number to look at, not to meter from.

Every 200 answer of a unit route is one BilledLog entry `{id, endpoint, path, model, unit,
quantity, rates: {per_unit} | None, usage_reported, ...}` (streamed speech: recorded before the
first byte, its quantity growing with each event sent). Quantities are decimal strings of at most
6 decimals, rounded half up to the millionth (a duration is samples / rate; megapixels =
n x width x height / 1e6 x max(1, steps / default_steps)); `unit_pusd(entry)` is the exact bill,
round_half_up(quantity_micros x per_unit x 1e12 / 1e6) pico-USD.

Prices: together's `GET /v1/models` pricing object documents only hourly, input, output, base,
finetune (+ cached_input); none is named as a per-megapixel, per-image or per-second price and no
published answer shows one. The simulator's choice: a media model's type is together's (image,
audio, transcribe, video), its `input`/`output` are 0 and `base` carries the per-unit price (USD
per megapixel, image or second). The per-unit prices below are illustrative, not together's list
prices (the speech and video ones especially).

`simulate` (JSON body; for multipart a `simulate` form field holding a JSON object): `status`
(an error answer, not billed; `retry_after` on 429/503), `delay_ms` (before the answer); speech
streams also `chunk_delay_ms`, `cut_after_chunks` (close the connection after that many events:
no [DONE]) and `speech_events: "delta"` (events in the shape together's streaming docs show,
`{"type": "conversation.item.audio_output.delta", "item_id", "delta"}`); videos
`video_delay_ms` and `fail`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Protocol

from aiohttp import web

from . import codecs
from .wire import authorized, error, int_field, json_body, json_response, loads, ms_field, unauthorized


@dataclass(frozen=True, slots=True)
class UnitModel:
    """A media model: together's model type, the unit it is billed in and its price per unit."""

    type: str  # image | audio (text to speech) | transcribe | video
    unit: str  # megapixel | image | audio_second | video_second
    per_unit: str | None  # USD per unit, a decimal string; None: unpriced
    default_steps: int | None = None  # megapixel models: steps at the base price
    sample_rate: int | None = None  # speech: the rate the model always answers in (None: the request's)
    encoding: str | None = None  # speech: the PCM encoding the model always answers in
    seconds: str | None = None  # video: the clip length when the request gives none
    size: str | None = None  # video: WxH when the request gives no width and height


UNIT_CATALOG: dict[str, UnitModel] = {
    "black-forest-labs/FLUX.1-schnell": UnitModel("image", "megapixel", "0.0027", default_steps=4),
    "black-forest-labs/FLUX.1-dev": UnitModel("image", "megapixel", "0.025", default_steps=28),
    "black-forest-labs/FLUX.2-pro": UnitModel("image", "image", "0.03"),
    "cartesia/sonic": UnitModel("audio", "audio_second", "0.001"),
    "hexgrad/Kokoro-82M": UnitModel(
        "audio", "audio_second", "0.00006", sample_rate=24000, encoding="pcm_s16le"
    ),
    "canopylabs/orpheus-3b-0.1-ft": UnitModel(
        "audio", "audio_second", "0.0002", sample_rate=24000, encoding="pcm_s16le"
    ),
    "openai/whisper-large-v3": UnitModel("transcribe", "audio_second", "0.000025"),
    "google/veo-3.0": UnitModel("video", "video_second", "0.4", seconds="8", size="1280x720"),
    "minimax/video-01-director": UnitModel("video", "video_second", "0.047", seconds="6", size="1366x768"),
}
SPEECH_MS_PER_CHAR = 80
MAX_SPEECH_CHARS = 4096
MAX_AUDIO_SECONDS = 4 * 3600
MAX_IMAGE_SIDE = 2048
_ESTIMATE_BITRATE = 128_000  # bit/s: an upload of a format the simulator does not parse
_BIT_RATES = (32000, 64000, 96000, 128000, 192000)
_CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "raw": "application/octet-stream"}
_LANGUAGES = {"en": "english", "fr": "french", "de": "german", "es": "spanish", "it": "italian"}
_WORDS = ("the", "meter", "heard", "every", "second", "of", "this", "simulated", "audio", "clip")
_IMAGE_NAME = re.compile(r"^[\w.-]+-\d+-(\d{1,4})x(\d{1,4})-([0-9a-f]{6})\.png$")


class Billing(Protocol):
    def record(self, entry: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(slots=True)
class MediaState:
    """What the media routes need from the simulator, handed in by `create_app` (no import back)."""

    billed: Billing
    count: Callable[[str], int]  # tokens in a text
    next_id: Callable[[], str]
    token_rates: Callable[[str], dict[str, str] | None]  # a token model's bill rates
    catalog: dict[str, UnitModel]
    video_delay_ms: float = 0.0
    videos: dict[str, dict[str, Any]] = field(default_factory=dict)


MEDIA: web.AppKey[MediaState] = web.AppKey("simulator_media", MediaState)


def unit_catalog(prices: dict[str, str | None] | None) -> dict[str, UnitModel]:
    """UNIT_CATALOG with `prices` (model -> USD per unit, or None: unpriced) applied."""
    out = dict(UNIT_CATALOG)
    for model, per_unit in (prices or {}).items():
        if model not in out:
            raise ValueError(f"unit_prices: {model!r} is not one of the simulator's media models")
        out[model] = replace(out[model], per_unit=per_unit)
    return {
        model: replace(m, per_unit=None if m.per_unit is None else _per_unit(m.per_unit))
        for model, m in out.items()
    }


def _per_unit(text: str) -> str:
    try:
        d = Decimal(text)
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError(f"per_unit {text!r} is not a decimal number") from None
    if not d.is_finite() or d < 0 or int(d.normalize().as_tuple().exponent) < -12:
        raise ValueError(f"per_unit {text!r} must be a finite number >= 0 with at most 12 decimals")
    return format(d.normalize(), "f")


def model_items(catalog: dict[str, UnitModel], created: int) -> list[str]:
    """The media models as together's /v1/models objects (JSON text): the price in pricing.base."""
    items = []
    for model, m in catalog.items():
        org, _, name = model.rpartition("/")
        head = json.dumps(
            {
                "id": model,
                "object": "model",
                "created": created,
                "type": m.type,
                "display_name": name.replace("-", " "),
                "organization": org or "together",
                "context_length": 0,
            }
        )[:-1]
        base = m.per_unit or "0"
        items.append(
            f'{head}, "pricing": {{"hourly": 0, "input": 0, "output": 0, "base": {base}, "finetune": 0}}}}'
        )
    return items


def micros(value: Fraction) -> int:
    """A non-negative quantity in millionths, rounded half up."""
    return (2 * value.numerator * 1_000_000 + value.denominator) // (2 * value.denominator)


def quantity_text(quantity_micros: int) -> str:
    return format(Decimal(quantity_micros).scaleb(-6).normalize(), "f")


def unit_pusd(entry: dict[str, Any]) -> int | None:
    """A unit entry's exact bill in pico-USD: round_half_up(quantity x per_unit x 1e12); None if unpriced."""
    rates = entry.get("rates")
    if rates is None:
        return None
    q, rate = Decimal(entry["quantity"]).scaleb(6), Decimal(rates["per_unit"]).scaleb(12)
    if q != q.to_integral_value() or rate != rate.to_integral_value():
        raise ValueError(f"{entry['quantity']} x {rates['per_unit']}: more than 6 or 12 decimals")
    return (int(q) * int(rate) + 500_000) // 1_000_000


# -- shared request handling ---------------------------------------------------------------------


async def _simulated(sim: dict[str, Any]) -> web.Response | None:
    """`simulate.delay_ms`, then `simulate.status`: an error answer (never billed), or None."""
    delay = ms_field(sim, "delay_ms", 0.0)
    if delay:
        await asyncio.sleep(delay)
    status = int_field(sim, "status")
    if status is None or status == 200:
        return None
    if not 400 <= status <= 599:
        return error(400, "simulate.status must be 200 or an HTTP error status")
    retry = {"Retry-After": str(sim.get("retry_after", 1))} if status in (429, 503) else None
    return error(status, "simulated error", headers=retry)


async def _json_request(request: web.Request) -> tuple[dict[str, Any], dict[str, Any]] | web.Response:
    """Auth, the JSON body and its `simulate` knobs (an error answer when they ask for one)."""
    if not authorized(request):
        return unauthorized()
    body = await json_body(request)
    if isinstance(body, web.Response):
        return body
    sim: dict[str, Any] = body["simulate"] if isinstance(body.get("simulate"), dict) else {}
    failed = await _simulated(sim)
    return failed if failed is not None else (body, sim)


def _unit_model(state: MediaState, model: Any, kind: str) -> UnitModel | web.Response:
    if not isinstance(model, str) or not model:
        return error(400, "'model' is required.")
    m = state.catalog.get(model)
    if m is None or m.type != kind:
        return error(
            404,
            f"Unable to access model {model}. Please visit https://api.together.ai/models to view "
            "the list of supported models.",
            "model_not_available",
        )
    return m


def _int_param(body: Any, key: str, default: int, lo: int, hi: int) -> int | web.Response:
    v = body.get(key, default)
    if type(v) is not int or not lo <= v <= hi:
        return error(400, f"'{key}' must be an integer from {lo} to {hi}.")
    return v


def _entry(
    request: web.Request, endpoint: str, rid: str, model: str, m: UnitModel, quantity: Fraction, **extra: Any
) -> dict[str, Any]:
    """A unit route's BilledLog entry (the caller records it): `quantity` rounded half up to 1e-6."""
    return {
        "id": rid,
        "endpoint": endpoint,
        "path": request.path,
        "model": model,
        "unit": m.unit,
        "quantity": quantity_text(micros(quantity)),
        "rates": None if m.per_unit is None else {"per_unit": m.per_unit},
        "authorization": request.headers.get("Authorization"),
        "headers": {k.lower(): v for k, v in request.headers.items()},
        **extra,
    }


def _origin(request: web.Request) -> str:
    """http://host:port of the simulator's own socket (loopback), for URLs it answers with."""
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not sock:
        return str(request.url.origin())
    host = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
    return f"http://{host}:{sock[1]}"


def _score(query: str, text: str) -> float:
    digest = hashlib.blake2b(f"{query}\x00{text}".encode(), digest_size=8).digest()
    return round(int.from_bytes(digest, "big") / 2**64, 8)


# -- rerank ---------------------------------------------------------------------------------------


def _documents(body: dict[str, Any]) -> list[str] | web.Response:
    """Each document's text: a string as is, an object as compact JSON (of `rank_fields`, if given)."""
    docs, fields = body.get("documents"), body.get("rank_fields")
    if not isinstance(docs, list) or not docs:
        return error(400, "'documents' must be a non-empty list of strings or of objects.")
    if fields is not None and not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
        return error(400, "'rank_fields' must be a list of strings.")
    if all(isinstance(d, str) for d in docs):
        return list(docs)
    if not all(isinstance(d, dict) for d in docs):
        return error(400, "'documents' must be all strings or all objects.")
    picked = [d if fields is None else {k: d[k] for k in fields if k in d} for d in docs]
    return [json.dumps(d, separators=(",", ":"), ensure_ascii=False) for d in picked]


async def rerank(request: web.Request) -> web.Response:
    """POST /v1/rerank: documents ordered by a deterministic score; usage counted by the tokenizer."""
    got = await _json_request(request)
    if isinstance(got, web.Response):
        return got
    body, _ = got
    state = request.app[MEDIA]
    model, query = body.get("model"), body.get("query")
    if not isinstance(model, str) or not model:
        return error(400, "'model' is required.")
    if not isinstance(query, str) or not query:
        return error(400, "'query' must be a non-empty string.")
    texts = _documents(body)
    if isinstance(texts, web.Response):
        return texts
    top_n = _int_param(body, "top_n", len(texts), 1, 10_000)
    if isinstance(top_n, web.Response):
        return top_n
    ranked = sorted(range(len(texts)), key=lambda i: (-_score(query, texts[i]), i))[:top_n]
    results: list[dict[str, Any]] = [{"index": i, "relevance_score": _score(query, texts[i])} for i in ranked]
    if body.get("return_documents") is True:
        for r in results:
            r["document"] = {"text": texts[r["index"]]}
    prompt = state.count(query) + sum(state.count(t) for t in texts)
    rid = state.next_id()
    state.billed.record(
        {
            "id": rid,
            "endpoint": "rerank",
            "path": request.path,
            "model": model,
            "stream": False,
            "prompt_tokens": prompt,
            "completion_tokens": 0,
            "cached_tokens": 0,
            "rates": state.token_rates(model),
            "usage_reported": True,
            "authorization": request.headers.get("Authorization"),
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": body,
        }
    )
    usage = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
    return json_response({"id": rid, "object": "rerank", "model": model, "results": results, "usage": usage})


# -- images ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ImageAsk:
    n: int
    width: int
    height: int
    steps: int
    b64: bool
    explicit_size: bool


def _image_ask(body: dict[str, Any], m: UnitModel) -> _ImageAsk | web.Response:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return error(400, "'prompt' must be a non-empty string.")
    fmt = body.get("response_format", "url")
    if fmt not in ("url", "base64", "b64_json"):
        return error(400, "'response_format' must be url or base64.")
    values: list[int] = []
    for key, default, hi in (("n", 1, 4), ("width", 1024, MAX_IMAGE_SIDE), ("height", 1024, MAX_IMAGE_SIDE)):
        v = _int_param(body, key, default, 1 if key == "n" else 16, hi)
        if isinstance(v, web.Response):
            return v
        values.append(v)
    steps = _int_param(body, "steps", m.default_steps or 1, 1, 50)
    if isinstance(steps, web.Response):
        return steps
    n, width, height = values
    return _ImageAsk(n, width, height, steps, fmt != "url", "width" in body and "height" in body)


def image_quantity(m: UnitModel, ask: _ImageAsk) -> Fraction:
    """Megapixels: n x w x h / 1e6 x max(1, steps / default_steps); per-image models: n."""
    if m.unit == "image":
        return Fraction(ask.n)
    default = m.default_steps or 1
    return Fraction(ask.n * ask.width * ask.height * max(ask.steps, default), default * 1_000_000)


async def images(request: web.Request) -> web.Response:
    """POST /v1/images/generations: n PNGs of the asked size, as URLs or base64; billed by unit."""
    got = await _json_request(request)
    if isinstance(got, web.Response):
        return got
    body, _ = got
    state = request.app[MEDIA]
    m = _unit_model(state, body.get("model"), "image")
    if isinstance(m, web.Response):
        return m
    ask = _image_ask(body, m)
    if isinstance(ask, web.Response):
        return ask
    rid, model = state.next_id(), body["model"]
    data: list[dict[str, Any]] = []
    for i in range(ask.n):
        seed = f"{body['prompt']}\x00{body.get('seed')}\x00{i}".encode()
        rgb = int.from_bytes(hashlib.blake2b(seed, digest_size=3).digest(), "big")
        if ask.b64:
            raw = await asyncio.to_thread(codecs.png, ask.width, ask.height, rgb)
            data.append({"index": i, "b64_json": base64.b64encode(raw).decode(), "type": "b64_json"})
        else:
            url = f"{_origin(request)}/_sim/images/{rid}-{i}-{ask.width}x{ask.height}-{rgb:06x}.png"
            data.append({"index": i, "url": url, "type": "url"})
    entry = _entry(request, "images", rid, model, m, image_quantity(m, ask), usage_reported=False, body=body)
    entry.update(n=ask.n, width=ask.width, height=ask.height, steps=ask.steps if m.default_steps else None)
    entry["explicit_size"] = ask.explicit_size  # width and height sent: "derived"; else defaults
    state.billed.record(entry)
    return json_response({"id": rid, "model": model, "object": "list", "data": data})


async def image_file(request: web.Request) -> web.Response:
    """GET /_sim/images/{name}: the PNG an image URL names (its size and colour are in the name)."""
    match = _IMAGE_NAME.match(request.match_info["name"])
    if match is None or not all(16 <= int(v) <= MAX_IMAGE_SIDE for v in match.group(1, 2)):
        return error(404, "No such image.", "not_found")
    raw = await asyncio.to_thread(codecs.png, int(match[1]), int(match[2]), int(match[3], 16))
    return web.Response(body=raw, content_type="image/png")


# -- speech ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Speech:
    """One speech request, resolved: format, encoding, rate and the samples it is made of."""

    model: str
    unit_model: UnitModel
    fmt: str
    encoding: str
    rate: int
    bitrate: int
    stream: bool
    samples: int

    def seconds(self) -> Fraction:
        if self.fmt != "mp3":
            return Fraction(self.samples, self.rate)
        sizes, per_frame = codecs.mp3_frame_sizes(self.samples, self.rate, self.bitrate)
        return Fraction(len(sizes) * per_frame, self.rate)

    def pieces(self) -> Iterator[bytes]:
        """The whole answer body, in pieces."""
        if self.fmt == "mp3":
            sizes, _ = codecs.mp3_frame_sizes(self.samples, self.rate, self.bitrate)
            yield from codecs.mp3_frames(sizes, self.rate, self.bitrate)
            return
        if self.fmt == "wav":
            yield codecs.wav_header(self.samples, self.rate)
        yield from codecs.silence(self.samples, "pcm_s16le" if self.fmt == "wav" else self.encoding)

    def size(self) -> int:
        if self.fmt == "mp3":
            return sum(codecs.mp3_frame_sizes(self.samples, self.rate, self.bitrate)[0])
        if self.fmt == "wav":
            return len(codecs.wav_header(self.samples, self.rate)) + 2 * self.samples
        return codecs.ENCODINGS[self.encoding][0] * self.samples


def _speech_ask(body: dict[str, Any], m: UnitModel) -> _Speech | web.Response:
    text, voice, stream = body.get("input"), body.get("voice"), body.get("stream") is True
    if not isinstance(text, str) or not text or len(text) > MAX_SPEECH_CHARS:
        return error(400, f"'input' must be a string of 1 to {MAX_SPEECH_CHARS} characters.")
    if not isinstance(voice, str) or not voice:
        return error(400, "'voice' is required.")
    fmt = body.get("response_format") or ("raw" if stream else "wav")
    if fmt not in _CONTENT_TYPES:
        return error(400, "'response_format' must be one of mp3, wav, raw.")
    if stream and fmt != "raw":
        return error(400, "When streaming, the only supported response_format is raw.")
    encoding = m.encoding or body.get("response_encoding", "pcm_f32le")
    if encoding not in codecs.ENCODINGS:
        return error(400, f"'response_encoding' must be one of {', '.join(codecs.ENCODINGS)}.")
    rate = m.sample_rate or _int_param(body, "sample_rate", 44100, 8000, 48000)
    bitrate = body.get("bit_rate", 128000)
    if isinstance(rate, web.Response):
        return rate
    if type(bitrate) is not int or bitrate not in _BIT_RATES:
        return error(400, f"'bit_rate' must be one of {', '.join(map(str, _BIT_RATES))}.")
    if fmt == "mp3":
        rate = rate if rate in codecs.MP3_RATES else 44100
        bitrate = bitrate if codecs.mp3_bitrate_ok(rate, bitrate) else 128000
    samples = len(text) * rate * SPEECH_MS_PER_CHAR // 1000
    return _Speech(str(body["model"]), m, fmt, encoding, rate, bitrate, stream, samples)


async def speech(request: web.Request) -> web.StreamResponse:
    """POST /v1/audio/speech: binary audio of 80 ms per character, or an SSE stream of raw PCM."""
    got = await _json_request(request)
    if isinstance(got, web.Response):
        return got
    body, sim = got
    state = request.app[MEDIA]
    m = _unit_model(state, body.get("model"), "audio")
    if isinstance(m, web.Response):
        return m
    ask = _speech_ask(body, m)
    if isinstance(ask, web.Response):
        return ask
    extra = {"format": ask.fmt, "sample_rate": ask.rate, "stream": ask.stream, "body": body}
    extra["encoding"] = ask.encoding if ask.fmt == "raw" else None
    extra["bit_rate"] = ask.bitrate if ask.fmt == "mp3" else None
    extra["bytes"] = 0 if ask.stream else ask.size()  # the body's length (streams: PCM sent so far)
    seconds = Fraction(0) if ask.stream else ask.seconds()
    rid = state.next_id()
    entry = _entry(request, "audio.speech", rid, ask.model, m, seconds, usage_reported=False, **extra)
    state.billed.record(entry)  # before any byte: the whole clip is billed once it is made
    if ask.stream:
        return await _speech_stream(request, ask, sim, entry)
    resp = web.StreamResponse(headers={"Content-Type": _CONTENT_TYPES[ask.fmt]})
    resp.content_length = ask.size()
    try:
        await resp.prepare(request)
        for piece in ask.pieces():
            await resp.write(piece)
        await resp.write_eof()
    except ConnectionError:
        pass  # the client left; together bills what it generated
    return resp


async def _speech_stream(
    request: web.Request, ask: _Speech, sim: dict[str, Any], entry: dict[str, Any]
) -> web.StreamResponse:
    """SSE: one event per half second of raw PCM; the entry's quantity is what has been sent."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    width = codecs.ENCODINGS[ask.encoding][0]
    step, pause = max(ask.rate // 2, 1), ms_field(sim, "chunk_delay_ms", 0.0)
    cut, delta = int_field(sim, "cut_after_chunks"), sim.get("speech_events") == "delta"
    sent = events = 0
    try:
        await resp.prepare(request)
        while sent < ask.samples:  # bounded: samples / step events
            n = min(step, ask.samples - sent)
            b64 = base64.b64encode(b"".join(codecs.silence(n, ask.encoding))).decode()
            event = (
                {"type": "conversation.item.audio_output.delta", "item_id": entry["id"], "delta": b64}
                if delta
                else {"object": "audio.tts.chunk", "model": ask.model, "b64": b64}
            )
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            sent, events = sent + n, events + 1
            entry["quantity"] = quantity_text(micros(Fraction(sent, ask.rate)))
            entry["bytes"] = sent * width
            if cut is not None and events >= cut:
                if request.transport is not None:
                    request.transport.close()
                return resp
            await asyncio.sleep(pause)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionError:
        pass  # the client left; the entry holds what was sent
    return resp


# -- transcriptions and translations --------------------------------------------------------------


def audio_seconds(data: bytes) -> tuple[Fraction, str] | None:
    """The seconds of audio in an upload and how they were found (None for an empty upload)."""
    readers = (
        ("wav-header", codecs.wav_duration),
        ("flac-streaminfo", codecs.flac_duration),
        ("mp3-frames", codecs.mp3_duration),
    )
    for name, reader in readers:
        seconds = reader(data)
        if seconds is not None:
            return seconds, name
    return (Fraction(len(data) * 8, _ESTIMATE_BITRATE), "bytes-at-128kbps") if data else None


def _form_simulate(form: Any) -> dict[str, Any] | web.Response:
    raw = form.get("simulate")
    if raw is None:
        return {}
    try:
        sim = loads(raw) if isinstance(raw, str) else None
    except ValueError:
        sim = None
    return sim if isinstance(sim, dict) else error(400, "The 'simulate' field must hold a JSON object.")


def _transcript(seconds: Fraction, quantity: str, words_too: bool) -> dict[str, Any]:
    """Text, segments (10 words each) and words spread evenly over the audio: 2.5 words a second."""
    n = max(1, min(200, int(seconds * 5 // 2)))
    words = [_WORDS[i % len(_WORDS)] for i in range(n)]

    def at(i: int) -> float:
        return round(float(seconds * i / n), 3)

    segments = [
        {"id": j, "start": at(s), "end": at(min(s + 10, n)), "text": " ".join(words[s : s + 10])}
        for j, s in enumerate(range(0, n, 10))
    ]
    out: dict[str, Any] = {"duration": float(quantity), "text": " ".join(words), "segments": segments}
    if words_too:
        out["words"] = [{"word": w, "start": at(i), "end": at(i + 1)} for i, w in enumerate(words)]
    return out


async def _stt(request: web.Request, task: str) -> web.Response:
    """Transcribe or translate a multipart upload; billed by the seconds of audio it holds."""
    if not authorized(request):
        return unauthorized()
    if not request.content_type.startswith("multipart/"):
        return error(400, "Expected a multipart/form-data body with a 'file'.")
    form = await request.post()
    sim = _form_simulate(form)
    if isinstance(sim, web.Response):
        return sim
    failed = await _simulated(sim)
    if failed is not None:
        return failed
    state = request.app[MEDIA]
    model = form.get("model", "openai/whisper-large-v3")
    m = _unit_model(state, model, "transcribe")
    if isinstance(m, web.Response):
        return m
    upload, fmt = form.get("file"), form.get("response_format", "json")
    if isinstance(upload, str):
        return error(400, "The simulator fetches no URLs: upload the audio file itself.", "url_not_supported")
    if not isinstance(upload, web.FileField):
        return error(400, "The form needs a 'file' part.")
    if fmt not in ("json", "verbose_json"):
        return error(400, "'response_format' must be json or verbose_json.")
    data = upload.file.read()
    found = audio_seconds(data)
    if found is None:
        return error(400, "The audio file is empty.", "invalid_audio")
    seconds, source = found
    if seconds > MAX_AUDIO_SECONDS:
        return error(400, "Audio longer than 4 hours is not accepted.", "audio_too_long")
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    endpoint = "audio.transcriptions" if task == "transcribe" else "audio.translations"
    reported = fmt == "verbose_json"  # its `duration` is the quantity
    entry = _entry(request, endpoint, state.next_id(), str(model), m, seconds, usage_reported=reported)
    entry.update(duration_from=source, file_bytes=len(data), filename=upload.filename, body=fields)
    state.billed.record(entry)
    grains = form.getall("timestamp_granularities[]", []) + form.getall("timestamp_granularities", [])
    result = _transcript(seconds, entry["quantity"], "word" in grains)
    if fmt == "json":
        return json_response({"text": result["text"]})
    language = str(form.get("language") or "en")
    named = _LANGUAGES.get(language, "english" if language == "auto" else language)
    return json_response({"task": task, "language": named} | result)


async def transcriptions(request: web.Request) -> web.Response:
    return await _stt(request, "transcribe")


async def translations(request: web.Request) -> web.Response:
    return await _stt(request, "translate")


# -- videos ---------------------------------------------------------------------------------------


def _video_seconds(value: Any, default: str) -> str | web.Response:
    """`seconds` (a string per the spec, a number from the 1.x async SDK) as a decimal string."""
    if value is None:
        value = default
    try:
        d = Decimal(repr(value) if type(value) is float else value)
    except (InvalidOperation, ValueError, TypeError):
        d = Decimal("NaN")
    if type(value) is bool or not d.is_finite() or not 0 < d <= 60 or d != d.quantize(Decimal("1e-6")):
        return error(400, "'seconds' must be a number of seconds above 0 and at most 60.")
    return format(d.normalize(), "f")


async def video_create(request: web.Request) -> web.Response:
    """POST /v2/videos: a VideoJob, in_progress until `video_delay_ms` has passed."""
    got = await _json_request(request)
    if isinstance(got, web.Response):
        return got
    body, sim = got
    state = request.app[MEDIA]
    m = _unit_model(state, body.get("model"), "video")
    if isinstance(m, web.Response):
        return m
    prompt = body.get("prompt")
    if prompt is not None and not (isinstance(prompt, str) and 1 <= len(prompt) <= 32000):
        return error(400, "'prompt' must be a string of 1 to 32000 characters.")
    seconds = _video_seconds(body.get("seconds"), m.seconds or "5")
    if isinstance(seconds, web.Response):
        return seconds
    width, height = body.get("width"), body.get("height")
    sized = type(width) is int and type(height) is int and 16 <= width <= 4096 and 16 <= height <= 4096
    now = time.time()
    job = {
        "id": f"video-{uuid.uuid4()}",
        "object": "video",
        "model": body["model"],
        "status": "in_progress",
        "created_at": int(now),
        "size": f"{width}x{height}" if sized else m.size or "1280x720",
        "seconds": seconds,
    }
    state.videos[job["id"]] = {
        "job": job,
        "due": now + ms_field(sim, "video_delay_ms", state.video_delay_ms),
        "fail": sim.get("fail") is True,
        "body": body,
    }
    return json_response(job)


def _advance(request: web.Request, record: dict[str, Any]) -> dict[str, Any]:
    """The job as of now: past its due time it completes (billed, once) or fails (not billed)."""
    job: dict[str, Any] = record["job"]
    if job["status"] != "in_progress" or time.time() < record["due"]:
        return job
    if record["fail"]:
        job.update(status="failed", completed_at=int(time.time()))
        job["error"] = {"code": "generation_failed", "message": "simulated generation failure"}
        return job
    state = request.app[MEDIA]
    m = state.catalog[job["model"]]
    seconds = Fraction(Decimal(job["seconds"]))
    entry = _entry(request, "videos", job["id"], job["model"], m, seconds, usage_reported=True)
    entry.update(path="/v2/videos", video_id=job["id"], size=job["size"], body=record["body"])
    state.billed.record(entry)
    pusd = unit_pusd(entry)
    cents = 0 if pusd is None else (pusd + 5 * 10**9) // 10**10
    url = f"{_origin(request)}/_sim/videos/{job['id']}.mp4"
    job.update(status="completed", completed_at=int(time.time()), outputs={"cost": cents, "video_url": url})
    return job


async def video_get(request: web.Request) -> web.Response:
    """GET /v2/videos/{id}: the job (404 for an unknown id)."""
    if not authorized(request):
        return unauthorized()
    record = request.app[MEDIA].videos.get(request.match_info["video_id"])
    if record is None:
        return error(404, "Video not found.", "not_found")
    return json_response(_advance(request, record))


async def video_file(request: web.Request) -> web.Response:
    """GET /_sim/videos/{id}.mp4: a tiny MP4 for a completed job's video_url."""
    name = request.match_info["name"]
    record = request.app[MEDIA].videos.get(name.removesuffix(".mp4"))
    if record is None or record["job"]["status"] != "completed":
        return error(404, "Video not found.", "not_found")
    return web.Response(body=codecs.MP4, content_type="video/mp4")


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the media routes (before the simulator's catch-all 404)."""
    router.add_post("/v1/rerank", rerank)
    router.add_post("/v1/images/generations", images)
    router.add_post("/v1/audio/speech", speech)
    router.add_post("/v1/audio/transcriptions", transcriptions)
    router.add_post("/v1/audio/translations", translations)
    router.add_post("/v2/videos", video_create)
    router.add_get("/v2/videos/{video_id}", video_get)
    router.add_get("/_sim/images/{name}", image_file)
    router.add_get("/_sim/videos/{name}", video_file)
