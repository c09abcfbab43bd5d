"""Bytes the simulator's media routes answer with, and the durations it reads back from uploads.

Writing: a solid-colour PNG of the exact requested size; silent PCM in together's four
`response_encoding`s; a 16-bit PCM RIFF/WAVE file; constant-bitrate MPEG audio frames (Layer III
headers, silent bodies, padding spread as an encoder does so the bitrate is exact on average).
Reading: a WAV's duration from its RIFF chunks (exact), an MP3's from its frame headers (exact for
the frames found), a FLAC's from STREAMINFO (exact). Durations are `Fraction`s of a second; every
loop is bounded by the size of the data. Pure functions, no I/O.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Iterator
from fractions import Fraction

# response_encoding -> (bytes per sample, the byte one silent sample is made of)
ENCODINGS: dict[str, tuple[int, bytes]] = {
    "pcm_f32le": (4, b"\x00"),
    "pcm_s16le": (2, b"\x00"),
    "pcm_mulaw": (1, b"\xff"),  # 0xFF is mu-law zero
    "pcm_alaw": (1, b"\xd5"),  # 0xD5 is A-law zero
}
PIECE = 64 * 1024  # bytes per piece of a long body

# MPEG audio: sample rate -> (version bits, sample-rate index, samples per frame, slot coefficient)
_MP3_RATES: dict[int, tuple[int, int, int, int]] = {
    44100: (0b11, 0, 1152, 144),
    48000: (0b11, 1, 1152, 144),
    32000: (0b11, 2, 1152, 144),
    22050: (0b10, 0, 576, 72),
    24000: (0b10, 1, 576, 72),
    16000: (0b10, 2, 576, 72),
    11025: (0b00, 0, 576, 72),
    12000: (0b00, 1, 576, 72),
    8000: (0b00, 2, 576, 72),
}
MP3_RATES = frozenset(_MP3_RATES)
# Layer III bitrates (bit/s) by index, MPEG-1 and MPEG-2/2.5
_MP3_BITRATES = {
    0b11: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    0b10: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_SAMPLE_RATES = {0b11: (44100, 48000, 32000), 0b10: (22050, 24000, 16000), 0b00: (11025, 12000, 8000)}


def silence(samples: int, encoding: str) -> Iterator[bytes]:
    """`samples` silent samples in `encoding`, in pieces of at most PIECE bytes."""
    width, zero = ENCODINGS[encoding]
    left = samples * width
    while left > 0:
        n = min(left, PIECE)
        yield zero * n
        left -= n


def wav_header(samples: int, rate: int) -> bytes:
    """The 44-byte RIFF/WAVE header of `samples` mono 16-bit PCM samples (the data follows it)."""
    data = 2 * samples
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, rate, 2 * rate, 2, 16)
    return struct.pack("<4sI4s", b"RIFF", 36 + data, b"WAVE") + fmt + struct.pack("<4sI", b"data", data)


def mp3_frame_sizes(samples: int, rate: int, bitrate: int) -> tuple[list[int], int]:
    """Frame lengths (bytes) of a CBR stream covering `samples` samples, and samples per frame."""
    _, _, per_frame, coef = _MP3_RATES[rate]
    frames = -(-samples // per_frame)
    base, rest_step = divmod(coef * bitrate, rate)
    sizes, rest = [], 0
    for _ in range(frames):
        rest += rest_step
        pad = rest >= rate
        if pad:
            rest -= rate
        sizes.append(base + pad)
    return sizes, per_frame


def mp3_bitrate_ok(rate: int, bitrate: int) -> bool:
    version = _MP3_RATES[rate][0]
    return bitrate % 1000 == 0 and bitrate // 1000 in _MP3_BITRATES[0b11 if version == 0b11 else 0b10][1:]


def mp3_frames(sizes: list[int], rate: int, bitrate: int) -> Iterator[bytes]:
    """MPEG Layer III frames (mono, no CRC) of the given lengths: a real header, a silent body."""
    version, rate_index, _, coef = _MP3_RATES[rate]
    table = _MP3_BITRATES[0b11 if version == 0b11 else 0b10]
    br_index = table.index(bitrate // 1000)
    base = coef * bitrate // rate
    for size in sizes:
        pad = size - base
        header = 0xFFE00000 | version << 19 | 0b01 << 17 | 1 << 16 | br_index << 12
        header |= rate_index << 10 | pad << 9 | 0b11 << 6
        yield struct.pack(">I", header) + bytes(size - 4)


def wav_duration(data: bytes) -> Fraction | None:
    """Seconds of audio in a RIFF/WAVE file: its `data` chunk size over the `fmt ` byte rate."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, byte_rate, size = 12, 0, None
    while pos + 8 <= len(data):  # each step moves past one chunk: bounded by len(data)
        cid, length = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"fmt " and length >= 16 and pos + 24 <= len(data):
            byte_rate = struct.unpack_from("<I", data, pos + 16)[0]
        elif cid == b"data":
            size = min(length, len(data) - pos - 8)  # a truncated upload holds only what came
            break
        pos += 8 + length + (length & 1)
    if size is None or byte_rate <= 0:
        return None
    return Fraction(size, byte_rate)


def _mp3_frame(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """(frame length, samples, sample rate) of the Layer III frame header at `pos`, or None."""
    if pos + 4 > len(data):
        return None
    h = struct.unpack_from(">I", data, pos)[0]
    version, layer, br_i, sr_i = h >> 19 & 3, h >> 17 & 3, h >> 12 & 15, h >> 10 & 3
    if h >> 21 != 0x7FF or version == 0b01 or layer != 0b01 or br_i in (0, 15) or sr_i == 3:
        return None
    rate = _MP3_SAMPLE_RATES[version][sr_i]
    bitrate = _MP3_BITRATES[0b11 if version == 0b11 else 0b10][br_i] * 1000
    per_frame, coef = (1152, 144) if version == 0b11 else (576, 72)
    return coef * bitrate // rate + (h >> 9 & 1), per_frame, rate


def mp3_duration(data: bytes) -> Fraction | None:
    """Seconds in an MP3: the frames found back to back after an optional ID3v2 tag."""
    pos = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        pos = 10 + (data[6] << 21 | data[7] << 14 | data[8] << 7 | data[9])
    total, frames = Fraction(0), 0
    while (frame := _mp3_frame(data, pos)) is not None:  # each frame is >= 24 bytes: bounded
        length, samples, rate = frame
        total += Fraction(samples, rate)
        frames += 1
        pos += length
    return total if frames else None


def flac_duration(data: bytes) -> Fraction | None:
    """Seconds in a FLAC file from its STREAMINFO block (None when it does not say)."""
    if data[:4] != b"fLaC" or len(data) < 8 + 18 or data[4] & 0x7F != 0:
        return None
    info = int.from_bytes(data[8 + 10 : 8 + 18], "big")
    rate, total = info >> 44, info & (1 << 36) - 1
    return Fraction(total, rate) if rate and total else None


@functools.lru_cache(maxsize=32)
def png(width: int, height: int, rgb: int) -> bytes:
    """A valid PNG, `width` x `height`, one colour (truecolour, 8 bits): small once deflated."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + rgb.to_bytes(3, "big") * width
    deflate = zlib.compressobj(6)
    raw = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


# an MP4 a video URL can serve: an `ftyp` box and an empty `mdat`, enough for a sniffer
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00\x00\x00\x08mdat"
