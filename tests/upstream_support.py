"""Helpers for tests/test_upstream.py: raw loopback servers that record the exact bytes they
receive and answer scripted bytes, a test CA made with the openssl CLI, and a CONNECT proxy.

Everything listens on 127.0.0.1 port 0; every wait is bounded (WAIT seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

WAIT = 5.0  # the longest any test waits for an event it expects
T = TypeVar("T")


async def bounded(aw: Awaitable[T], seconds: float = WAIT) -> T:
    """`aw`, or TimeoutError after `seconds`: no test can hang."""
    async with asyncio.timeout(seconds):
        return await aw


async def until(condition: Callable[[], bool], seconds: float = WAIT) -> None:
    """Yield to the loop until `condition()` holds (for state only the loop can change, such as
    a connection noticing its peer closed); AssertionError after `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# -- HTTP bytes ---------------------------------------------------------------------------------


def response(
    body: bytes = b"{}",
    *,
    status: int = 200,
    headers: Iterable[tuple[str, str]] = (),
    framing: str = "length",
    chunk_size: int = 0,
) -> bytes:
    """A whole HTTP/1.1 response. framing: "length" (Content-Length), "chunked" (pieces of
    `chunk_size`, default one chunk), or "close" (no length: ends when the server closes)."""
    lines = [f"HTTP/1.1 {status} X\r\n"] + [f"{k}: {v}\r\n" for k, v in headers]
    if framing == "length":
        return ("".join(lines) + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    if framing == "close":
        return ("".join(lines) + "Connection: close\r\n\r\n").encode() + body
    return ("".join(lines) + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked(body, chunk_size)


def chunked(body: bytes, size: int = 0) -> bytes:
    """`body` in chunked transfer coding, `size` bytes per chunk (0: one chunk), then the end."""
    size = size or max(len(body), 1)
    parts = [b"%x\r\n%s\r\n" % (len(p), p) for p in (body[i : i + size] for i in range(0, len(body), size))]
    return b"".join(parts) + b"0\r\n\r\n"


# -- a raw server -------------------------------------------------------------------------------


@dataclass
class Peer:
    """One accepted connection, seen from the server."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)  # every byte the client sent
    requests: list[bytes] = field(default_factory=list)  # each request (head + body), in order
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the client closed or reset
    got_request: asyncio.Event = field(default_factory=asyncio.Event)  # a request (or head) arrived

    async def read_request(self) -> bytes | None:
        """The next request (head, then a Content-Length body); None at the end of the stream."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.received += head + body
        self.requests.append(head + body)
        self.got_request.set()
        return head + body

    async def read_head(self) -> bytes | None:
        """The next request head only (the body stays unread)."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.received += head
        self.requests.append(head)
        self.got_request.set()
        return head

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_to_eof(self) -> None:
        """Record what else the client sends until it closes (or resets) the connection."""
        with contextlib.suppress(ConnectionError):
            while chunk := await self.reader.read(1 << 16):
                self.received += chunk


Script = Callable[[Peer], Awaitable[None]]


class RawServer:
    """asyncio.start_server on 127.0.0.1:0: each connection runs `script(peer)`, then the server
    records until the client closes; `peers` in accept order, `arrived` a queue of them."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.peers: list[Peer] = []
        self.arrived: asyncio.Queue[Peer] = asyncio.Queue()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(len(self.peers), reader, writer)
        self.peers.append(peer)
        self.arrived.put_nowait(peer)
        try:
            await self.script(peer)
            await peer.read_to_eof()
        except (ConnectionError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            pass  # close() stops us; ending normally spares 3.11's stream callback a CancelledError
        finally:
            peer.closed.set()
            writer.close()
            self._tasks.discard(task)

    async def next_peer(self) -> Peer:
        return await bounded(self.arrived.get())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def answering(*answers: bytes) -> Script:
    """A script answering each request of a connection with the next of `answers` (the last
    one repeats)."""

    async def script(peer: Peer) -> None:
        i = 0
        while await peer.read_request() is not None:
            await peer.send(answers[min(i, len(answers) - 1)])
            i += 1

    return script


# -- TLS: a test CA and server certificates, made with the openssl CLI --------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate (PEM)
    ca_dir: Path  # a directory holding only the CA, by its subject hash (for SSL_CERT_DIR)
    cert: Path  # server certificate for DNS:localhost and IP:127.0.0.1
    key: Path
    wrong_cert: Path  # server certificate for DNS:wrong.example only
    wrong_key: Path
    empty_dir: Path  # a directory with no certificate (SSL_CERT_DIR that trusts nothing)


def _openssl(*args: str, cwd: Path) -> str:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30)
    return done.stdout


def _leaf(d: Path, name: str, san: str) -> None:
    (d / f"{name}.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=d)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d,
    )  # fmt: skip


def make_pki(d: Path) -> Pki:
    """A fresh CA and two server certificates under `d` (about 0.1 s)."""
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=d)
    _openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=together-meter test CA", "-days", "2",
        "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem", cwd=d,
    )  # fmt: skip
    _leaf(d, "server", "DNS:localhost,IP:127.0.0.1")
    _leaf(d, "wrong", "DNS:wrong.example")
    ca_dir, empty = d / "ca-dir", d / "empty-dir"
    ca_dir.mkdir()
    empty.mkdir()
    subject_hash = _openssl("x509", "-hash", "-noout", "-in", "ca.pem", cwd=d).strip()
    (ca_dir / f"{subject_hash}.0").write_bytes((d / "ca.pem").read_bytes())
    return Pki(
        d / "ca.pem", ca_dir, d / "server.pem", d / "server.key", d / "wrong.pem", d / "wrong.key", empty
    )


def server_tls(cert: Path, key: Path, sni_seen: list[str | None]) -> ssl.SSLContext:
    """A server context that records the SNI name of every handshake in `sni_seen`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def on_sni(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        sni_seen.append(name)

    ctx.sni_callback = on_sni  # type: ignore[assignment]
    return ctx


# -- a CONNECT proxy ----------------------------------------------------------------------------


class ConnectProxy:
    """A tiny HTTP CONNECT proxy: records each request head, answers `status` (200: opens the
    tunnel and pipes bytes both ways; else refuses); `hold`: never answers."""

    def __init__(self, status: int = 200, hold: bool = False) -> None:
        self.status = status
        self.hold = hold
        self.heads: list[bytes] = []
        self.arrived = asyncio.Event()
        self.port = 0
        self.closed = asyncio.Event()  # a client closed a held connection
        self._inner = RawServer(self._serve)

    async def start(self) -> ConnectProxy:
        await self._inner.start()
        self.port = self._inner.port
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        await self._inner.close()

    async def _serve(self, peer: Peer) -> None:
        head = await peer.read_head()
        if head is None:
            return
        self.heads.append(head)
        self.arrived.set()
        if self.hold:
            await peer.read_to_eof()
            self.closed.set()
            return
        if self.status != 200:
            await peer.send(
                b"HTTP/1.1 %d No\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n" % self.status
            )
            return
        host, _, port = head.split(b" ")[1].decode().rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await peer.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            await asyncio.gather(_pipe(peer.reader, up_writer), _pipe(up_reader, peer.writer))
        finally:
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(1 << 16):
            writer.write(chunk)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()
