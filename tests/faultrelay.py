"""A TCP fault relay for tests: sits between a client and any TCP server and misbehaves on demand.

    relay = await FaultRelay.start("127.0.0.1", upstream_port)   # listens on 127.0.0.1:<free port>
    ... point the client at relay.host:relay.port (e.g. `relay.url("/v1")`, or a PostgreSQL DSN) ...
    relay.rechunk()          # from now on, forward one byte per write
    relay.cut_after(2000, rst=True)
    relay.passthrough()      # back to normal
    await relay.close()      # closes the listener and every connection it carries

It knows nothing about HTTP: it serves the proxy -> simulator hop as well as a client -> PostgreSQL
one. Modes switch at run time and apply to connections already open as well as new ones:

- `passthrough()`: forward bytes as they come (the default); also reopens a refusing listener.
- `delay(ms)`: sleep `ms` before each write (both directions); with `rechunk()` it trickles.
- `rechunk(True)`: split every read into 1-byte writes (the peer sees data at any split point).
- `cut_after(n, rst=False)`: after `n` more bytes server -> client on a connection (counted from
  the moment the mode is set, so a pooled keep-alive connection counts from then too), close
  that connection: a FIN (orderly close), or with `rst=True` a reset (SO_LINGER 0), on both sides.
- `stall()`: stop forwarding in both directions, keeping every connection open; data already read
  is held and delivered if the mode changes back. New connections are accepted and stalled too.
- `refuse(hard=False)`: new connections are accepted and reset at once; with `hard=True` the
  listening socket is closed, so connecting fails with ECONNREFUSED (`passthrough()` reopens it
  on the same port). Connections already open are left alone: see `drop_all`.
- `drop_all(rst=False)`: close every current connection (FIN, or reset).

Counters: `accepted` (connections forwarded to the server), `refused` (connections reset or
failed to reach the server), `bytes_down`/`bytes_up` (server -> client / client -> server);
`received` holds the client -> server bytes themselves (what an upstream was really sent).
Loopback and bounded: it binds 127.0.0.1 only, and `close()` (or `async with`) ends every
connection and task it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["FaultRelay"]

READ_SIZE = 65536
RST_SETTLE_S = 0.05  # before a reset, let the peer read the bytes already written (a RST discards them)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    """One relayed connection: the client side, the server side, and the two pump tasks."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    epoch: int
    down_since_mode: int = 0  # server -> client bytes since the mode last changed
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False

    def close(self, rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for w in (self.client, self.server):
            if rst:
                _reset(w)
            else:
                w.close()


class FaultRelay:
    """An asyncio TCP relay on 127.0.0.1 with run-time switchable faults (see the module doc)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.accepted = 0
        self.refused = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.received = bytearray()  # every byte the server was sent through the relay, in order
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()  # cleared while stalled
        self._flowing.set()
        self._epoch = 0
        self._delay = 0.0
        self._rechunk = False
        self._cut: tuple[int, bool] | None = None  # (bytes, rst)
        self._refuse: str | None = None  # None | "reset" | "closed"
        self._closed = False

    @classmethod
    async def start(cls, target_host: str, target_port: int) -> FaultRelay:
        """A relay to target_host:target_port, listening on a free loopback port."""
        relay = cls(target_host, target_port)
        await relay._listen()
        return relay

    def url(self, path: str = "") -> str:
        """`http://127.0.0.1:<port><path>`, for HTTP clients."""
        return f"http://{self.host}:{self.port}{path}"

    @property
    def connections(self) -> int:
        """Connections currently open through the relay."""
        return sum(not c.closed for c in self._conns)

    # -- modes --------------------------------------------------------------------------------

    def passthrough(self) -> None:
        """Forward everything as it comes; reopen the listener if `refuse(hard=True)` closed it."""
        self._new_mode()
        self._delay, self._rechunk, self._cut = 0.0, False, None
        self._flowing.set()
        reopen = self._refuse == "closed"
        self._refuse = None
        if reopen:
            task = asyncio.get_running_loop().create_task(self._listen())
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def reopened(self) -> None:
        """Wait until a listener closed by `refuse(hard=True)` listens again after `passthrough()`."""
        for _ in range(100):
            if self._server is not None:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the relay did not reopen its listener within 1 s")

    def delay(self, ms: float) -> None:
        """Sleep `ms` before each write, in both directions."""
        self._new_mode()
        self._delay = max(ms, 0.0) / 1000.0

    def rechunk(self, on: bool = True) -> None:
        """Forward every byte as a write of its own."""
        self._new_mode()
        self._rechunk = on

    def cut_after(self, n: int, *, rst: bool = False) -> None:
        """After `n` more server -> client bytes on a connection, close it (FIN, or RST)."""
        self._new_mode()
        self._cut = (max(n, 0), rst)

    def stall(self) -> None:
        """Stop forwarding (both directions) but keep every connection open."""
        self._new_mode()
        self._flowing.clear()

    def refuse(self, *, hard: bool = False) -> None:
        """Reset new connections at once; `hard=True` closes the listening socket instead."""
        self._new_mode()
        if hard and self._server is not None:
            self._server.close()
            self._server = None
            self._refuse = "closed"
        elif self._refuse != "closed":
            self._refuse = "reset"

    def drop_all(self, *, rst: bool = False) -> int:
        """Close every current connection on both sides; how many there were."""
        open_ = [c for c in self._conns if not c.closed]
        for conn in open_:
            conn.close(rst)
        return len(open_)

    async def close(self) -> None:
        """Stop listening, reset every connection, and wait for every task the relay started."""
        self._closed = True
        if self._server is not None:
            self._server.close()
            self._server = None
        self.drop_all(rst=True)
        self._flowing.set()
        tasks = [t for c in self._conns for t in c.tasks] + list(self._handlers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._conns.clear()

    async def __aenter__(self) -> FaultRelay:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------------

    def _new_mode(self) -> None:
        self._epoch += 1

    async def _listen(self) -> None:
        if self._closed:
            return
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            _reset(writer)  # close(): end quietly (asyncio logs a cancelled connection handler)
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refuse is not None or self._closed:
            self.refused += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5.0)
        except (OSError, TimeoutError):
            self.refused += 1
            _reset(writer)
            return
        self.accepted += 1
        conn = _Conn(writer, up_writer, self._epoch)
        self._conns.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(conn, reader, up_writer, down=False)),
            asyncio.create_task(self._pump(conn, up_reader, writer, down=True)),
        ]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            conn.close(rst=False)
            self._conns.discard(conn)

    async def _pump(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, down: bool
    ) -> None:
        """Copy one direction until EOF or a fault; a half-close is passed on as a half-close."""
        try:
            while not conn.closed:
                data = await reader.read(READ_SIZE)
                if not data:
                    if writer.can_write_eof() and not conn.closed:
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                await self._flowing.wait()
                if conn.closed:
                    return
                if conn.epoch != self._epoch:  # the mode changed: count the cut from now
                    conn.epoch, conn.down_since_mode = self._epoch, 0
                cut = self._cut if down else None
                if cut is not None and conn.down_since_mode + len(data) >= cut[0]:
                    await self._write(writer, data[: cut[0] - conn.down_since_mode])
                    conn.down_since_mode = cut[0]
                    if cut[1]:
                        await asyncio.sleep(RST_SETTLE_S)
                    conn.close(rst=cut[1])
                    return
                await self._write(writer, data)
                if down:
                    conn.down_since_mode += len(data)
                    self.bytes_down += len(data)
                else:
                    self.bytes_up += len(data)
                    self.received += data
        except (OSError, asyncio.IncompleteReadError):
            conn.close(rst=True)  # one side failed: the other side learns it the same way

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if not data:
            return
        if not self._rechunk and not self._delay:
            writer.write(data)
            await writer.drain()
            return
        pieces = [data[i : i + 1] for i in range(len(data))] if self._rechunk else [data]
        for piece in pieces:
            if writer.is_closing():
                return
            if self._delay:
                await asyncio.sleep(self._delay)
            else:
                await asyncio.sleep(0)  # one loop turn: the peer reads each byte on its own
            writer.write(piece)
            await writer.drain()
