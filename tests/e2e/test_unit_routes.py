"""Rerank, images, audio and video through the proxy with the real together SDK: one row per call,
in together's unit, equal to the simulator's bill to the pico-dollar; ownership of video jobs;
bad input refused before anything is forwarded."""

from __future__ import annotations

import asyncio
import base64
import io
import wave
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal

import pytest
from together import AsyncTogether

from proxy.core.pricing import PriceTable
from proxy.simulator import billed_pusd

from .support import Meter, StartMeter, error_of, post_raw
from .test_video_jobs import job_row

RERANK = "Salesforce/Llama-Rank-V1"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
PER_IMAGE = "black-forest-labs/FLUX.2-pro"
KOKORO = "hexgrad/Kokoro-82M"
SONIC = "cartesia/sonic"
WHISPER = "openai/whisper-large-v3"
VEO = "google/veo-3.0"
FEATURE = {"X-Meter-Feature": "search"}


def micros(entry: dict[str, object]) -> int:
    return int(Decimal(str(entry["quantity"])).scaleb(6))


def wav_file(frames: int, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x01" * frames)
    return buf.getvalue()


@pytest.fixture
async def tog(meter: Meter) -> AsyncIterator[AsyncTogether]:
    async with AsyncTogether(
        api_key=meter.keys["acme"], base_url=meter.origin, max_retries=0, timeout=20
    ) as c:
        yield c


async def _one_row(meter: Meter) -> tuple[dict[str, object], object]:
    (entry,) = meter.sim.billed.entries
    (row,) = await meter.wait_terminal(1)
    return entry, row


async def test_rerank_is_priced_by_its_prompt_tokens(meter: Meter, tog: AsyncTogether) -> None:
    r = await tog.rerank.create(
        model=RERANK, query="Which meter?", documents=["a gas meter", "a proxy"], top_n=1
    )
    assert len(r.results) == 1 and r.usage is not None
    entry, row = await _one_row(meter)
    assert (row.endpoint, row.unit, row.usage_source, row.completion_tokens) == (
        "rerank",
        "token",
        "upstream",
        0,
    )
    assert row.prompt_tokens == entry["prompt_tokens"] == r.usage.prompt_tokens
    assert row.cost_pusd == billed_pusd(entry) == meter.cost(RERANK, row.prompt_tokens, 0) > 0


async def test_images_are_billed_in_megapixels_with_steps_above_the_default(
    meter: Meter, tog: AsyncTogether
) -> None:
    raw = await tog.images.with_raw_response.generate(
        model=SCHNELL, prompt="a meter", width=1024, height=768, steps=8, n=2, extra_headers=FEATURE
    )
    r = await raw.parse()
    assert len(r.data) == 2
    entry, row = await _one_row(meter)
    assert (row.endpoint, row.unit, row.usage_source, row.feature) == (
        "images",
        "megapixel",
        "derived",
        "search",
    )
    assert row.quantity_micros == micros(entry) == 2 * 786_432 * 2  # n x MP x 8/4 steps
    assert row.cost_pusd == billed_pusd(entry) and row.cost_pusd is not None
    assert raw.headers["x-meter-cost-usd"] == str(Decimal(row.cost_pusd).scaleb(-12).normalize())
    assert row.prompt_tokens is None and row.completion_tokens is None


async def test_per_image_models_count_images_and_default_sizes_are_estimates(
    meter: Meter, tog: AsyncTogether
) -> None:
    await tog.images.generate(model=PER_IMAGE, prompt="x", n=3)
    await tog.images.generate(model=SCHNELL, prompt="y")  # no size: together's 1024 x 1024, assumed
    rows = {r.model: r for r in await meter.wait_terminal(2)}
    bills = {e["model"]: e for e in meter.sim.billed.entries}
    assert (rows[PER_IMAGE].unit, rows[PER_IMAGE].quantity_micros) == ("image", 3_000_000)
    assert rows[PER_IMAGE].cost_pusd == billed_pusd(bills[PER_IMAGE])
    assert (rows[SCHNELL].usage_source, rows[SCHNELL].quantity_micros) == (
        "estimated",
        micros(bills[SCHNELL]),
    )
    assert rows[SCHNELL].cost_pusd == billed_pusd(bills[SCHNELL])


async def test_speech_wav_seconds_are_exact(meter: Meter, tog: AsyncTogether) -> None:
    r = await tog.audio.speech.create(model=KOKORO, input="Hello from the meter.", voice="af_alloy")
    data = await r.read()
    with wave.open(io.BytesIO(data)) as w:
        seconds = Decimal(w.getnframes()) / w.getframerate()
    entry, row = await _one_row(meter)
    assert (row.endpoint, row.unit, row.usage_source) == ("audio.speech", "audio_second", "derived")
    assert row.quantity_micros == micros(entry) == int(seconds.scaleb(6))
    assert row.cost_pusd == billed_pusd(entry)


async def test_streamed_speech_is_relayed_and_billed_for_the_audio_sent(
    meter: Meter, tog: AsyncTogether
) -> None:
    stream = await tog.audio.speech.create(
        model=SONIC, input="Stream me, please.", voice="x", stream=True, sample_rate=16000,
        response_encoding="pcm_s16le",
    )  # fmt: skip
    pcm = b"".join([base64.b64decode(chunk.b64) async for chunk in stream])
    entry, row = await _one_row(meter)
    assert (row.status, row.stream_complete, row.usage_source) == ("ok", True, "derived")
    assert row.quantity_micros == micros(entry) == len(pcm) * 1_000_000 // (2 * 16000)
    assert row.cost_pusd == billed_pusd(entry)


async def test_transcriptions_take_the_stated_duration_else_the_wav(meter: Meter, tog: AsyncTogether) -> None:
    audio = wav_file(40_000, 16_000)  # 2.5 s
    r = await tog.audio.transcriptions.create(
        file=("clip.wav", audio, "audio/wav"), model=WHISPER, response_format="verbose_json"
    )
    assert r.duration == 2.5  # type: ignore[union-attr]
    await tog.audio.translations.create(file=("clip.wav", audio, "audio/wav"), model=WHISPER)
    rows = sorted(await meter.wait_terminal(2), key=lambda r: r.endpoint)
    assert [(r.endpoint, r.usage_source, r.quantity_micros) for r in rows] == [
        ("audio.transcriptions", "upstream", 2_500_000),
        ("audio.translations", "derived", 2_500_000),
    ]
    assert (
        sum(r.cost_pusd or 0 for r in rows) == sum(billed_pusd(e) or 0 for e in meter.sim.billed.entries) > 0
    )


async def test_a_video_job_is_owned_and_billed_for_its_seconds(meter: Meter, tog: AsyncTogether) -> None:
    """Owned by its creator; billed at completion (tests/e2e/test_video_jobs.py has the rest)."""
    job = await tog.videos.create(
        model=VEO, prompt="a meter", seconds="4.5", extra_body={"simulate": {"video_delay_ms": 50}}
    )
    (created,) = await meter.wait_terminal(1)
    assert (created.endpoint, created.unit, created.cost_pusd) == ("videos.create", "video_second", 0)
    status, _, body = await post_raw(
        f"{meter.origin}/v2/videos/{job.id}", None, meter.auth("globex"), method="GET"
    )
    assert status == 404 and error_of(body)["code"] == "not_found"  # another tenant's job
    done = job
    for _ in range(100):  # bounded: 100 x 20 ms
        done = await tog.videos.retrieve(job.id)
        if done.status != "in_progress":
            break
        await asyncio.sleep(0.02)
    assert done.status == "completed"
    row = await job_row(meter, job.id)
    assert (row.unit, row.quantity_micros, row.usage_source) == ("video_second", 4_500_000, "upstream")
    (entry,) = meter.sim.billed.entries
    assert row.cost_pusd == billed_pusd(entry)
    seen = [s["path"] for s in meter.upstream_seen]
    assert seen.count(f"/v2/videos/{job.id}") >= 1 and "/v1/videos" not in seen


async def test_unpriced_unit_models_have_an_unknown_cost(start_meter: StartMeter) -> None:
    def unpriced(config):  # type: ignore[no-untyped-def]
        models = {m: r for m, r in config.prices.models.items() if m != SCHNELL}
        return replace(config, prices=PriceTable(models, config.prices.source), unpriced_models="forward")

    async with start_meter(change=unpriced) as meter:
        async with AsyncTogether(
            api_key=meter.keys["acme"], base_url=meter.origin, max_retries=0, timeout=20
        ) as tog:
            await tog.images.generate(model=SCHNELL, prompt="x", width=512, height=512)
        (row,) = await meter.wait_terminal(1)
        assert (row.status, row.unit, row.quantity_micros, row.cost_pusd) == (
            "ok",
            "megapixel",
            262_144,
            None,
        )


async def test_bad_unit_requests_are_refused_before_anything_is_forwarded(meter: Meter) -> None:
    status, _, body = await post_raw(
        meter.base_url + "/images/generations",
        b'{"model": "%s", "prompt": "x", "n": "two"}' % SCHNELL.encode(),
        meter.auth(),
    )
    assert status == 400 and "'n'" in error_of(body)["message"]
    form = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + WHISPER.encode() + b"\r\n--b--\r\n"
    )
    status, _, body = await post_raw(
        meter.base_url + "/audio/transcriptions", form,
        {**meter.auth(), "Content-Type": "multipart/form-data; boundary=b"},
    )  # fmt: skip
    assert status == 400 and "'file'" in error_of(body)["message"]
    status, _, body = await post_raw(meter.base_url + "/audio/speech", b"{not json", meter.auth())
    assert status == 400 and error_of(body)["code"] == "invalid_json"
    assert meter.upstream_seen == []
    rows = await meter.wait_terminal(3)
    assert {(r.status, r.cost_pusd) for r in rows} == {("rejected", 0)}


async def test_units_reach_the_metrics(meter: Meter, tog: AsyncTogether) -> None:
    await tog.images.generate(model=SCHNELL, prompt="x", width=1000, height=1000)
    await meter.wait_terminal(1)
    samples = await meter.metric_samples()
    series = samples["together_meter_units_total"]
    assert series[(("model", SCHNELL), ("tenant", "acme"), ("unit", "megapixel"))] == 1.0


async def test_a_multipart_body_over_the_limit_is_413_before_anything_is_forwarded(
    start_meter: StartMeter,
) -> None:
    def small(config):  # type: ignore[no-untyped-def]
        return replace(config, limits=replace(config.limits, max_body_bytes=64 * 1024))

    async with start_meter(change=small) as meter:
        audio = wav_file(80_000, 16_000)  # 160 KB of audio
        form = (
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + WHISPER.encode() + b"\r\n"
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n--b--\r\n"
        )
        headers = {**meter.auth(), "Content-Type": "multipart/form-data; boundary=b"}
        status, _, body = await post_raw(meter.base_url + "/audio/transcriptions", form, headers)
        assert status == 413 and error_of(body)["code"] == "request_too_large"
        assert meter.upstream_seen == [] and meter.sim.billed.entries == []
