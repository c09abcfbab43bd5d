"""Quantities of the routes together bills in units other than tokens, exactly where possible.

Pure: request bodies and answer bytes in, a `Quantity` out. together's answers to these routes
carry no usage, so the quantity is read where together states it (a video job's `seconds`, a
verbose transcription's `duration`), else derived from the request or the returned bytes:

  images                 megapixel: n x width x height / 1e6 x max(1, steps / default_steps)
                         (image: n) for models priced per image
  audio.speech           audio_second: the returned audio's duration (WAV and raw PCM exactly,
                         MP3 and other compressed formats estimated from their bitrate)
  audio.transcriptions,  audio_second: the uploaded audio's duration (`duration` of a verbose
  audio.translations     answer, else a WAV upload's header; other formats estimated)
  videos                 video_second: the job's `seconds`

A quantity is an integer number of millionths of its unit (`micros`); `source` says how it was
found: "upstream" (together's answer states it), "derived" (exact from the request or the bytes)
or "estimated" (approximated, flagged as such in the ledger).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from proxy.core.pricing import Rates

MICRO = 1_000_000
DEFAULT_IMAGE_SIDE = 1024  # together's width/height when a request gives none
DEFAULT_VIDEO_SECONDS = 5  # a video request without `seconds` (the reservation's assumption)
_MP3_BITRATES = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)  # MPEG-1 L3 kbit/s
_ASSUMED_KBPS = 128  # compressed audio whose bitrate cannot be read


@dataclass(frozen=True, slots=True)
class Quantity:
    unit: str
    micros: int  # millionths of `unit`
    source: str  # "upstream" | "derived" | "estimated"


def micros(value: Fraction | int) -> int:
    """A non-negative exact quantity in millionths, rounded half-up."""
    scaled = Fraction(value) * MICRO
    whole, rest = divmod(scaled.numerator, scaled.denominator)
    return whole + (1 if rest * 2 >= scaled.denominator else 0)


def decimal_micros(value: Any) -> int | None:
    """A JSON number or numeric string (e.g. together's `seconds: "5"`) in millionths; None if not
    a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        exact = Fraction(str(value)) if not isinstance(value, int) else Fraction(value)
    except (ValueError, ZeroDivisionError):
        return None
    return micros(exact) if exact >= 0 else None


# -- images -----------------------------------------------------------------------------------


def _positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    return value if type(value) is int and value > 0 else None


def image_quantity(body: dict[str, Any], rates: Rates | None, returned: int | None) -> Quantity:
    """The megapixels (or images) an images/generations call is billed for.

    `returned` is the number of images in the answer (None when it could not be read): the
    request's `n` otherwise. Sizes the request does not give are together's default 1024 x 1024,
    an assumption (flagged estimated), as is a model without a known default step count.
    """
    n = returned if returned is not None else (_positive_int(body, "n") or 1)
    if rates is not None and rates.unit == "image":
        return Quantity("image", n * MICRO, "derived" if returned is not None else "estimated")
    width, height = _positive_int(body, "width"), _positive_int(body, "height")
    exact = width is not None and height is not None and returned is not None
    pixels = (width or DEFAULT_IMAGE_SIDE) * (height or DEFAULT_IMAGE_SIDE)
    factor = Fraction(1)
    steps = _positive_int(body, "steps")
    default = rates.default_steps if rates is not None else None
    if steps is not None and default is not None and steps > default:
        factor = Fraction(steps, default)
    elif steps is not None and default is None:
        exact = False
    return Quantity(
        "megapixel", micros(Fraction(n * pixels, MICRO) * factor), "derived" if exact else "estimated"
    )


def image_bound(body: dict[str, Any], rates: Rates | None) -> int:
    """The most megapixels (or images) a request can be billed for, in millionths (its budget
    reservation): the request's own sizes, 2048 x 2048 where it gives none, at least 50 steps."""
    n = _positive_int(body, "n") or 1
    if rates is not None and rates.unit == "image":
        return n * MICRO
    side = 2 * DEFAULT_IMAGE_SIDE
    pixels = (_positive_int(body, "width") or side) * (_positive_int(body, "height") or side)
    steps = _positive_int(body, "steps") or 50
    default = (rates.default_steps if rates is not None else None) or 1
    return micros(Fraction(n * pixels, MICRO) * max(Fraction(1), Fraction(max(steps, 50), default)))


def images_returned(answer: Any) -> int | None:
    """How many images an images/generations answer holds (`data` items), None if unreadable."""
    data = answer.get("data") if isinstance(answer, dict) else None
    return len(data) if isinstance(data, list) else None


# -- audio ------------------------------------------------------------------------------------


def wav_seconds(data: bytes) -> Fraction | None:
    """The exact duration of a RIFF/WAVE file from its header (PCM or float), None if not one.

    A streamed WAV may carry a placeholder data size (0 or 0xFFFFFFFF): then the bytes after the
    header count.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, byte_rate = 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk == b"fmt " and size >= 16 and body + 16 <= len(data):
            byte_rate = struct.unpack_from("<I", data, body + 8)[0]
        elif chunk == b"data":
            if not byte_rate:
                return None
            available = len(data) - body
            length = available if size in (0, 0xFFFFFFFF) or size > available else size
            return Fraction(length, byte_rate)
        pos = body + size + (size & 1)
    return None


def pcm_seconds(length: int, sample_rate: int, bytes_per_sample: int, channels: int = 1) -> Fraction:
    return Fraction(length, sample_rate * bytes_per_sample * channels)


def mp3_kbps(data: bytes) -> int | None:
    """The bitrate of the first MPEG-1 Layer III frame header found (after an ID3 tag)."""
    start = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        size = data[6] << 21 | data[7] << 14 | data[8] << 7 | data[9]
        start = 10 + size
    for pos in range(start, min(len(data) - 3, start + 4096)):
        if data[pos] == 0xFF and data[pos + 1] & 0xFE == 0xFA:  # sync, MPEG-1, Layer III
            index = data[pos + 2] >> 4
            if 0 < index < len(_MP3_BITRATES):
                return _MP3_BITRATES[index]
    return None


def audio_seconds(data: bytes, content_type: str, body: dict[str, Any]) -> Quantity:
    """Seconds of audio in `data` (an answer to audio/speech, or an uploaded file).

    WAV: exact from its header; raw PCM (`response_format: raw`): exact from the request's
    `sample_rate` and encoding (together's defaults 44100 Hz, 32-bit float), else assumed;
    MP3 and anything else: bytes over the bitrate (read from the first frame, else 128 kbit/s),
    an estimate.
    """
    seconds = wav_seconds(data)
    if seconds is not None:
        return Quantity("audio_second", micros(seconds), "derived")
    fmt = body.get("response_format")
    if fmt == "raw" or content_type.startswith(("audio/pcm", "audio/raw", "audio/l16")):
        return pcm_quantity(len(data), body)
    kbps = mp3_kbps(data) or _ASSUMED_KBPS
    return Quantity("audio_second", micros(Fraction(len(data) * 8, kbps * 1000)), "estimated")


def pcm_quantity(length: int, body: dict[str, Any]) -> Quantity:
    rate = _positive_int(body, "sample_rate")
    encoding = body.get("response_encoding")
    width = {"pcm_f32le": 4, "pcm_s16le": 2, "pcm_mulaw": 1, "pcm_alaw": 1}.get(str(encoding))
    exact = rate is not None and width is not None
    seconds = pcm_seconds(length, rate or 44100, width or 4)
    return Quantity("audio_second", micros(seconds), "derived" if exact else "estimated")


def speech_event_audio(data: bytes | None) -> bytes:
    """The audio bytes one streamed-speech event carries: together's `{"object": "audio.tts.chunk",
    "b64": ...}` (the spec, every SDK) or `{"type": "...audio_output.delta", "delta": ...}` (its
    streaming docs); nothing for anything else ([DONE], errors, other objects)."""
    if not data or data == b"[DONE]":
        return b""
    try:
        obj = json.loads(data)
    except ValueError:
        return b""
    value = obj.get("b64", obj.get("delta")) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        return b""


def speech_bound(body: dict[str, Any]) -> int:
    """The most seconds a speech request can return, in millionths (its reservation): a second
    per character of `input` (speech runs at ~15 characters a second), at least 10 seconds."""
    text = body.get("input")
    chars = len(text) if isinstance(text, str) else 0
    return max(chars, 10) * MICRO


def transcription_quantity(answer: Any, upload: bytes, upload_type: str) -> Quantity:
    """Seconds of audio a transcription or translation was billed for: the verbose answer's
    `duration` where together gives it, else the uploaded file's duration."""
    if isinstance(answer, dict):
        stated = decimal_micros(answer.get("duration"))
        if stated is not None:
            return Quantity("audio_second", stated, "upstream")
    return audio_seconds(upload, upload_type, {})


def upload_bound(upload: bytes, upload_type: str) -> int:
    """The most seconds an uploaded file can hold, in millionths (a transcription's reservation):
    a WAV's exact duration, else its bytes at 8 kbit/s (lower than any usable speech codec)."""
    seconds = wav_seconds(upload)
    if seconds is not None:
        return micros(seconds)
    return micros(Fraction(len(upload), 1000))


# -- video ------------------------------------------------------------------------------------


def video_quantity(answer: Any, body: dict[str, Any]) -> Quantity:
    """Seconds of video a video job is billed for: the job's `seconds`, else the request's."""
    if isinstance(answer, dict):
        stated = decimal_micros(answer.get("seconds"))
        if stated is not None:
            return Quantity("video_second", stated, "upstream")
    asked = decimal_micros(body.get("seconds"))
    if asked is not None:
        return Quantity("video_second", asked, "derived")
    return Quantity("video_second", DEFAULT_VIDEO_SECONDS * MICRO, "estimated")


def video_bound(body: dict[str, Any]) -> int:
    asked = decimal_micros(body.get("seconds"))
    return asked if asked is not None else 4 * DEFAULT_VIDEO_SECONDS * MICRO


__all__ = [
    "MICRO",
    "Quantity",
    "audio_seconds",
    "decimal_micros",
    "image_bound",
    "image_quantity",
    "images_returned",
    "micros",
    "pcm_quantity",
    "speech_bound",
    "speech_event_audio",
    "transcription_quantity",
    "upload_bound",
    "video_bound",
    "video_quantity",
    "wav_seconds",
]
