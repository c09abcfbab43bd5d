"""The fault relay test tool (tests/faultrelay.py) in front of a loopback echo server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from faultrelay import FaultRelay

PAYLOAD = bytes(range(256)) * 4  # 1,024 bytes


@pytest.fixture
async def relay() -> AsyncIterator[FaultRelay]:
    """A relay in front of an echo server (both on loopback, both closed at teardown)."""
    handlers: set[asyncio.Task[None]] = set()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        with contextlib.suppress(OSError):
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    r = await FaultRelay.start("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        yield r
    finally:
        await r.close()
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def _connect(relay: FaultRelay) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(relay.host, relay.port)


async def _read_all(reader: asyncio.StreamReader, n: int) -> tuple[bytes, int]:
    """Up to n bytes (less if the stream ends), and how many reads it took; bounded to 5 s."""
    got, reads = b"", 0
    async with asyncio.timeout(5):
        while len(got) < n:
            data = await reader.read(n - len(got))
            if not data:
                break
            got += data
            reads += 1
    return got, reads


async def test_passthrough_is_transparent(relay: FaultRelay) -> None:
    """Pass mode: every byte arrives, in order, both ways, and the counters say how many."""
    reader, writer = await _connect(relay)
    writer.write(PAYLOAD)
    got, _ = await _read_all(reader, len(PAYLOAD))
    writer.close()
    assert got == PAYLOAD
    assert (relay.accepted, relay.refused, relay.bytes_up, relay.bytes_down) == (1, 0, 1024, 1024)


async def test_rechunk_writes_one_byte_at_a_time(relay: FaultRelay) -> None:
    """Rechunk mode: the same bytes arrive, split into many reads (one byte per relay write)."""
    relay.rechunk()
    reader, writer = await _connect(relay)
    writer.write(PAYLOAD[:64])
    got, reads = await _read_all(reader, 64)
    writer.close()
    assert got == PAYLOAD[:64]
    assert reads > 8  # a passthrough relay hands 64 bytes over in one or two reads


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
async def test_cut_after_n_bytes(relay: FaultRelay, rst: bool) -> None:
    """cut_after(300): the client gets exactly 300 bytes, then an orderly EOF or a reset."""
    relay.cut_after(300, rst=rst)
    reader, writer = await _connect(relay)
    writer.write(PAYLOAD)
    got = b""
    error: type[BaseException] | None = None
    try:
        got, _ = await _read_all(reader, len(PAYLOAD))
    except ConnectionResetError as exc:
        error = type(exc)
    writer.close()
    if rst:
        assert error is ConnectionResetError
    else:
        assert (got, error) == (PAYLOAD[:300], None)
    assert relay.connections == 0


async def test_stall_holds_data_until_the_mode_changes(relay: FaultRelay) -> None:
    """Stall: nothing is forwarded while stalled, the connection stays open; pass delivers it."""
    relay.stall()
    reader, writer = await _connect(relay)
    writer.write(b"hello")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await reader.read(5)
    assert relay.connections == 1
    relay.passthrough()
    got, _ = await _read_all(reader, 5)
    writer.close()
    assert got == b"hello"


async def test_refuse_resets_or_closes_the_listener(relay: FaultRelay) -> None:
    """refuse(): new connections are reset; refuse(hard=True): refused; passthrough reopens."""
    port = relay.port
    relay.refuse()
    reader, writer = await _connect(relay)
    writer.write(b"x")
    with pytest.raises(ConnectionResetError):
        await _read_all(reader, 1)
    writer.close()
    relay.refuse(hard=True)
    with pytest.raises(ConnectionRefusedError):
        await _connect(relay)
    relay.passthrough()
    await relay.reopened()
    reader, writer = await _connect(relay)
    writer.write(b"back")
    got, _ = await _read_all(reader, 4)
    writer.close()
    assert (got, relay.port, relay.refused, relay.accepted) == (b"back", port, 1, 1)


async def test_drop_all_and_close_end_every_connection(relay: FaultRelay) -> None:
    """drop_all closes the open connections (the client reads EOF); close() leaves none open."""
    pairs = [await _connect(relay) for _ in range(3)]
    for reader, writer in pairs:
        writer.write(b"ping")
        assert (await _read_all(reader, 4))[0] == b"ping"
    assert relay.drop_all() == 3
    for reader, writer in pairs:
        assert (await _read_all(reader, 1))[0] == b""
        writer.close()
    reader, writer = await _connect(relay)
    writer.write(b"ping")
    assert (await _read_all(reader, 4))[0] == b"ping"
    await relay.close()
    with contextlib.suppress(ConnectionResetError):  # close() resets: EOF or a reset
        assert (await _read_all(reader, 1))[0] == b""
    writer.close()
    assert relay.connections == 0
