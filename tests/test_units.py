"""Quantities and per-unit prices of the routes together bills in megapixels, images and seconds."""

from __future__ import annotations

import struct
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.multipart import parse_form
from proxy.core.pricing import parse_model, unit_cost_pusd
from proxy.core.units import (
    audio_seconds,
    decimal_micros,
    image_bound,
    image_quantity,
    micros,
    mp3_kbps,
    transcription_quantity,
    video_quantity,
    wav_seconds,
)
from proxy.errors import ConfigError, InvalidField

FLUX = parse_model("flux", {"unit": "megapixel", "per_unit": "0.0027", "default_steps": 4}, "t")
PER_IMAGE = parse_model("partner", {"unit": "image", "per_unit": 0.04}, "t")


def wav(
    seconds_frames: int, rate: int = 24000, channels: int = 1, bits: int = 16, size: int | None = None
) -> bytes:
    data = b"\x01\x00" * (seconds_frames * channels * bits // 16)
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    declared = len(data) if size is None else size
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", declared) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_megapixels_follow_size_count_and_steps_above_the_default() -> None:
    q = image_quantity({"width": 1024, "height": 768, "steps": 4}, FLUX, returned=2)
    assert (q.unit, q.micros, q.source) == ("megapixel", 2 * 786_432, "derived")
    more = image_quantity({"width": 1024, "height": 1024, "steps": 10}, FLUX, returned=1)
    assert more.micros == micros(Fraction(1_048_576, 1_000_000) * Fraction(10, 4)) == 2_621_440
    fewer = image_quantity({"width": 512, "height": 512, "steps": 1}, FLUX, returned=1)
    assert fewer.micros == 262_144  # fewer steps than the default: no discount


def test_image_defaults_are_an_estimate_and_per_image_models_count_images() -> None:
    q = image_quantity({"prompt": "x"}, FLUX, returned=1)
    assert (q.micros, q.source) == (1_048_576, "estimated")
    assert image_quantity({"n": 3}, PER_IMAGE, returned=3).micros == 3_000_000
    assert image_quantity({"n": 3}, PER_IMAGE, returned=None).source == "estimated"


def test_the_image_reservation_bounds_every_measured_quantity() -> None:
    for body in ({"width": 1024, "height": 1024, "steps": 60, "n": 2}, {"n": 1}, {"steps": 4}):
        assert image_quantity(body, FLUX, returned=body.get("n", 1)).micros <= image_bound(body, FLUX)


def test_cost_per_unit_is_exact_and_rounds_half_up_at_the_pico_dollar() -> None:
    assert unit_cost_pusd(1_048_576, FLUX) == 2_831_155_200  # 1.048576 MP x $0.0027
    odd = parse_model("m", {"unit": "audio_second", "per_unit": "0.000000000003"}, "t")  # 3 pUSD
    assert unit_cost_pusd(500_000, odd) == 2  # 1.5 pUSD -> 2
    assert unit_cost_pusd(499_999, odd) == 1


@given(st.integers(0, 10**12), st.integers(0, 10**15))
def test_unit_cost_equals_decimal_arithmetic(quantity: int, per_unit_pusd: int) -> None:
    rates = parse_model(
        "m", {"unit": "video_second", "per_unit": str(Decimal(per_unit_pusd).scaleb(-12))}, "t"
    )
    expected = (Decimal(quantity) * Decimal(per_unit_pusd) / Decimal(10**6)).quantize(
        Decimal(1), ROUND_HALF_UP
    )
    assert unit_cost_pusd(quantity, rates) == int(expected)


def test_unit_price_table_entries_are_validated() -> None:
    with pytest.raises(ConfigError, match="per_unit"):
        parse_model("m", {"unit": "megapixel"}, "t")
    with pytest.raises(ConfigError, match="token rates"):
        parse_model("m", {"unit": "image", "per_unit": 1, "input": 1}, "t")
    with pytest.raises(ConfigError, match="12 decimals"):
        parse_model("m", {"unit": "image", "per_unit": "0.0000000000001"}, "t")
    with pytest.raises(ConfigError, match="unit"):
        parse_model("m", {"unit": "furlong", "per_unit": 1}, "t")
    with pytest.raises(ConfigError, match="default_steps"):
        parse_model("m", {"unit": "audio_second", "per_unit": 1, "default_steps": 4}, "t")
    with pytest.raises(ConfigError, match="per unit"):
        parse_model("m", {"input": 1, "output": 1, "per_unit": 1}, "t")


def test_wav_duration_is_exact_from_the_header() -> None:
    assert wav_seconds(wav(36_000)) == Fraction(36_000, 24_000)
    assert wav_seconds(wav(44_100, rate=44_100, channels=2)) == 1
    streamed = wav(12_000, size=0xFFFFFFFF)  # a streamed WAV: the bytes after the header count
    assert wav_seconds(streamed) == Fraction(1, 2)
    assert wav_seconds(b"not a wav file at all") is None
    q = audio_seconds(wav(36_000), "audio/wav", {})
    assert (q.unit, q.micros, q.source) == ("audio_second", 1_500_000, "derived")


def test_raw_pcm_is_exact_only_with_its_rate_and_encoding() -> None:
    body = {"response_format": "raw", "sample_rate": 16000, "response_encoding": "pcm_s16le"}
    assert audio_seconds(b"\x00" * 64_000, "application/octet-stream", body).micros == 2_000_000
    guess = audio_seconds(b"\x00" * 64_000, "application/octet-stream", {"response_format": "raw"})
    assert guess.source == "estimated"


def test_mp3_is_estimated_from_its_bitrate() -> None:
    frame = bytes([0xFF, 0xFB, 0x90, 0x64])  # MPEG-1 Layer III, 128 kbit/s
    assert mp3_kbps(b"ID3\x03\x00\x00\x00\x00\x00\x00" + frame + b"\x00" * 100) == 128
    data = frame + b"\x00" * 15_996  # 16,000 bytes at 128 kbit/s = 1 s
    q = audio_seconds(data, "audio/mpeg", {"response_format": "mp3"})
    assert (q.micros, q.source) == (1_000_000, "estimated")


def test_transcriptions_prefer_the_stated_duration() -> None:
    assert (
        transcription_quantity({"text": "hi", "duration": 3.25}, wav(24_000), "audio/wav").micros == 3_250_000
    )
    q = transcription_quantity({"text": "hi"}, wav(24_000), "audio/wav")
    assert (q.micros, q.source) == (1_000_000, "derived")


def test_videos_take_the_jobs_seconds() -> None:
    q = video_quantity({"id": "v1", "seconds": "8"}, {"seconds": "5"})
    assert (q.unit, q.micros, q.source) == ("video_second", 8_000_000, "upstream")
    assert video_quantity({"id": "v1"}, {"seconds": 6}).source == "derived"
    assert video_quantity(None, {}).source == "estimated"
    assert decimal_micros("1.0000005") == 1_000_001 and decimal_micros(-1) is None
    assert decimal_micros(True) is None and decimal_micros("x") is None


def test_multipart_forms_give_fields_and_the_file() -> None:
    raw = (
        b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nopenai/whisper-large-v3\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + wav(100) + b"\r\n--XyZ--\r\n"
    )
    form = parse_form(raw, 'multipart/form-data; boundary="XyZ"')
    assert form.fields == {"model": "openai/whisper-large-v3"}
    assert form.files["file"].filename == "a.wav" and form.files["file"].data == wav(100)
    with pytest.raises(InvalidField):
        parse_form(raw[:-9], "multipart/form-data; boundary=XyZ")
    with pytest.raises(InvalidField):
        parse_form(raw, "application/json")
